"""``dsc export OUT --format aoti``: each entry point compiled ahead of time by AOTInductor.

Every entry is lowered to standard ATen first (``dsc.kernels.decompose``: each ``dsc::`` op by its
reference decomposition), so a package holds no call back into dsc's Python code: C++
(``torch::inductor::AOTIModelPackageLoader``) or Python (``torch._inductor.aoti_load_package``) runs
it with torch alone. The packages keep the Program's calling convention, caches updated in place,
and batch / sequence / context stay dynamic. ``export.json`` carries the config and the CacheSpec,
so ``dsc generate DIR`` runs an export without the Program. After writing, the packages run on the
Program's verification scenario and are compared with it through the tolerance table.
"""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path

import torch
from dsc.export.common import MANIFEST, check_against_program, export_plan, first_line, preflight

from dsc.errors import DscError
from dsc.program import Program, logits_hidden
from dsc.verify import make_scenario

FORMAT = "aoti"


class AotiBackend:
    """An AOTInductor export behind the Program interface (what ``dsc generate`` and verification run)."""

    def __init__(self, directory: str | Path):
        from dsc.model.config import ModelConfig

        from dsc.cache import CacheSpec

        directory = Path(directory)
        manifest = read_manifest(directory)
        self.config = ModelConfig.from_dict(manifest["config"])
        self.cache = CacheSpec.from_dict(manifest["cache"])
        self.prefill_chunk = manifest.get("prefill_chunk")
        self.entries = dict(manifest["entries"])
        loaded: dict[str, object] = {}
        for f in set(self.entries.values()):
            try:
                loaded[f] = torch._inductor.aoti_load_package(str(directory / f))
            except Exception as e:  # noqa: BLE001 - a package from another torch or machine fails many ways
                raise DscError(
                    f"{directory / f} does not load ({first_line(e)}); AOTInductor packages run only with the torch "
                    f"version and machine kind that built them (built with torch {manifest.get('torch')})"
                ) from None
        self._mods = {k: loaded[f] for k, f in self.entries.items()}

    def _run(self, name: str, *args):
        if name not in self._mods:
            raise DscError(f"the export has no {name} entry (exported: {', '.join(self.entries)})")
        *inputs, caches = args
        # a package reads its inputs with the strides it was compiled for, contiguous (an expanded
        # positions tensor read as contiguous indexes out of bounds; a batch > 1 cache window
        # cache[:, :T] of a longer cache has another batch stride): a window that is not contiguous
        # runs as a contiguous copy, written back (batch 1 windows are contiguous: no copy)
        flat = [c if c.is_contiguous() else c.contiguous() for c in caches]
        out = self._mods[name](*[t.contiguous() for t in inputs], flat)
        for c, f in zip(caches, flat):
            if f is not c:
                c.copy_(f)
        return out

    def prefill(self, tokens, caches):
        return logits_hidden(self._run("prefill", tokens, caches))

    def decode(self, tokens, positions, caches):
        return logits_hidden(self._run("decode", tokens, positions, caches))

    def verify(self, tokens, positions, caches):
        return logits_hidden(self._run("verify", tokens, positions, caches))

    def draft(self, hidden, tokens, positions, caches):
        return logits_hidden(self._run("draft", hidden, tokens, positions, caches))

    def mtp(self, hidden, tokens, positions, caches):
        return self._run("mtp", hidden, tokens, positions, caches)


def read_manifest(directory: Path) -> dict:
    path = directory / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DscError(f"{path} cannot be read ({e}); run `dsc export OUT --format aoti` to make one") from None
    if manifest.get("format") != FORMAT:
        raise DscError(f"{directory} is a {manifest.get('format')!r} export, not an AOTInductor one")
    return manifest


def export_aoti(
    program: Program, dest: str | Path, verify: bool = True, overwrite: bool = False,
    entries: list[str] | None = None, log=None,
) -> dict:  # fmt: skip
    """The entries of ``program`` (default: all) as ``dest/<entry>.pt2`` AOTInductor packages with
    ``dest/export.json``, written atomically; returns the manifest."""
    from dsc.kernels import decompose

    from dsc.fsutil import atomic_dir

    chosen = preflight(program, dest, overwrite, entries, "AOTInductor")
    log = log or (lambda msg: None)
    scenario = make_scenario(program.config)
    manifest = {
        "format": FORMAT, "torch": torch.__version__, "entries": {}, "config": program.config.to_dict(),
        "cache": program.cache.to_dict(), "prefill_chunk": program.prefill_chunk, "numerics": None,
        "bytes": {}, "seconds": {},
    }  # fmt: skip

    def write(tmp: Path) -> None:
        files = manifest["entries"]
        for name, args, length, same in export_plan(program, scenario, chosen, files):
            if same is not None:
                log(f"{name}: the same graph and weights as {same}, one package")
                files[name] = files[same]
                continue
            log(f"compiling {name} with AOTInductor")
            t0 = time.perf_counter()
            try:
                with warnings.catch_warnings(), torch.no_grad():
                    warnings.simplefilter("ignore", FutureWarning)  # torch's own pytree deprecation, per copy
                    low = decompose(program.entries[name])  # no dsc:: op left: torch alone runs the package
                    low.example_inputs = ((*args, program.cache.allocate(args[0].shape[0], length)), {})
                    torch._inductor.aoti_compile_and_package(low, package_path=str(tmp / f"{name}.pt2"))
            except Exception as e:  # noqa: BLE001 - Inductor's failures are many; name the entry and the cause
                raise DscError(f"AOTInductor compilation of the {name} entry failed: {first_line(e)}") from e
            files[name] = f"{name}.pt2"
            manifest["bytes"][name] = (tmp / files[name]).stat().st_size
            manifest["seconds"][name] = round(time.perf_counter() - t0, 2)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        if verify:
            log("verifying the packages against the Program")
            t0 = time.perf_counter()
            manifest["numerics"] = verify_export(tmp, program, scenario)
            manifest["seconds"]["check"] = round(time.perf_counter() - t0, 2)
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")

    atomic_dir(dest, write, overwrite=overwrite, marker=MANIFEST)
    return manifest


def verify_export(directory: Path, program: Program, scenario) -> dict:
    """The packages on the verification scenario against the Program: Inductor reorders fp32 sums and
    the decompositions replace the fused ops' loops (``fp32_rewrite``; ``fp8_w8a8`` with FP8
    activations, where a flipped e4m3 rounding moves a value by a step)."""
    return check_against_program(program, AotiBackend(directory), scenario, "the AOTInductor packages disagree")
