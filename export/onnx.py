"""``dsc export OUT --format onnx``: one ONNX model per entry point of a Program, checked with onnxruntime.

Each entry is re-exported functionally: the Program's entries write their caches in place, which
ONNX cannot say, so every entry becomes a function of (its inputs, the cache tensors it reads) that
returns (its outputs, the cache tensors it writes, whole). Inputs are ``tokens``, ``positions``,
``hidden`` and ``cache.<name>`` (the CacheSpec's names); outputs ``logits``, ``hidden_out`` and
``present.<name>``. Batch, sequence and context length are dynamic axes.

The ``dsc::`` ops go through ``onnx_ops.TABLE`` (standard operators, opset 23); FP8 weights stay
``FLOAT8E4M3FN`` initializers. After writing, every model runs in onnxruntime on the Program's
verification scenario (prefill, decode steps, draft and verify, feeding each call's caches to the
next) and is compared with the Program through the tolerance table.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from dsc.export.common import (
    MANIFEST,
    check_against_program,
    dsc_ops,
    export_plan,
    first_line,
    preflight,
)
from torch import Tensor

from dsc.errors import DscError
from dsc.program import ENTRY_INPUTS, Program, logits_hidden
from dsc.verify import Scenario, make_scenario

OPSET = 23
PROTOBUF_LIMIT = 2**31 - 1  # bytes: larger models keep their weights in an external data file
TRT_TOPK_MAX = 3840  # TensorRT's largest TopK K


def require_onnx() -> None:
    missing = [m for m in ("onnx", "onnxscript", "onnxruntime") if _absent(m)]
    if missing:
        raise DscError(f"ONNX export needs {', '.join(missing)}: pip install 'dsc[onnx]'")


def _absent(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is None


@dataclass
class Entry:
    """One exported entry: the file, its named inputs in call order, its outputs, and which cache
    tensors (indices into the CacheSpec) it reads and writes."""

    name: str
    file: str
    inputs: list[str]
    outputs: list[str]
    reads: list[int]
    writes: list[int]
    n_outputs: int  # the entry's own outputs (logits[, hidden]) before the caches

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class OnnxExport:
    entries: dict[str, Entry] = field(default_factory=dict)
    ops: dict[str, dict[str, int]] = field(default_factory=dict)  # entry -> ONNX op histogram
    fusion: dict[str, str] = field(default_factory=dict)  # dsc op -> what its translation keeps
    trt: list[str] = field(default_factory=list)  # what TensorRT's parser would reject
    numerics: dict | None = None
    bytes: dict[str, int] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)


# ---- sample inputs ------------------------------------------------------------------------------
def _filled(caches: list[Tensor], seed: int) -> list[Tensor]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for c in caches:
        if c.is_floating_point() and c.element_size() > 1:
            out.append(torch.randn(c.shape, generator=gen).to(c.dtype))
        else:
            out.append(torch.randint(0, 100, c.shape, generator=gen).to(c.dtype))
    return out


class _Functional(torch.nn.Module):
    """An entry with its caches as separate arguments and its cache writes as outputs."""

    def __init__(self, mod, n_caches: int, reads: list[int], writes: list[int]):
        super().__init__()
        self.mod, self.n, self.reads, self.writes = mod, n_caches, reads, writes

    def forward(self, *args):
        k = len(args) - len(self.reads)
        caches: list = [None] * self.n
        for i, c in zip(self.reads, args[k:]):
            caches[i] = c
        out = self.mod(*args[:k], caches)
        out = tuple(out) if isinstance(out, (tuple, list)) else (out,)
        return (*out, *[caches[i] for i in self.writes])


def _trial(program: Program, name: str, args: tuple, caches: list[Tensor]) -> tuple[list[int], int]:
    """One call of the entry on copies of ``caches``: the cache tensors (indices into the CacheSpec) it
    changes, and how many outputs of its own it returns."""
    after = [c.clone() for c in caches]
    with torch.no_grad():
        out = program.module(name)(*args, after)
    n_out = len(out) if isinstance(out, (tuple, list)) else 1
    changed = [
        i for i, (a, b) in enumerate(zip(caches, after)) if not torch.equal(a.view(torch.uint8), b.view(torch.uint8))
    ]
    return changed, n_out


def _output_names(n: int) -> list[str]:
    # not "hidden": that is the draft entry's input, and ONNX names a value once
    return ["logits", "hidden_out"][:n] if n <= 2 else [f"output_{i}" for i in range(n)]


def export_entry(program: Program, name: str, args: tuple, length: int, path: Path) -> Entry:
    from dsc.export.onnx_ops import TABLE

    reads = list(range(len(program.cache.tensors)))  # an entry takes the whole CacheSpec
    caches = _filled(program.cache.allocate(args[0].shape[0], length), 0)
    writes, n_out = _trial(program, name, args, caches)
    mod = program.entries[name].module(check_guards=False)  # its weights keep their names in the ONNX file
    mod._forward_pre_hooks.clear()
    wrapper = _Functional(mod, len(caches), reads, writes)
    Dim, specs = torch.export.Dim, program.cache.tensors
    batch, seq, context = Dim("batch"), Dim("seq"), Dim("context")  # the ONNX files' dimension names
    if name == "prefill":  # a prompt fills the caches it is given: context is the prompt's length
        context = seq
    dyn = tuple({0: batch, 1: seq} for _ in args) + tuple({0: batch, specs[i].time_dim: context} for i in reads)
    example = (*args, *[caches[i] for i in reads])
    ep = torch.export.export(wrapper, example, dynamic_shapes=(dyn,), strict=False)
    arg_names = ENTRY_INPUTS.get(name, [f"input_{i}" for i in range(len(args) + 1)])[:-1]
    inputs = [*arg_names, *[f"cache.{specs[i].name}" for i in reads]]
    outputs = [*_output_names(n_out), *[f"present.{specs[i].name}" for i in writes]]
    with _quiet():
        onx = torch.onnx.export(
            ep, dynamo=True, opset_version=OPSET, custom_translation_table=TABLE, input_names=inputs,
            output_names=outputs, optimize=True, verify=False,
        )  # fmt: skip
    _name_dims(onx.model, {n: specs[i].time_dim for n, i in zip(inputs[len(args) :], reads)})
    inits = onx.model.graph.initializers
    for v in list(inits.values()):  # the Program's weight names, without the wrapper's
        if v.name.startswith("mod."):
            inits.pop(v.name)
            v.name = v.name.removeprefix("mod.")
            inits[v.name] = v
    size = sum(t.numel() * t.element_size() for t in ep.state_dict.values())
    onx.save(str(path), external_data=size > PROTOBUF_LIMIT // 2)
    return Entry(name, path.name, inputs, outputs, reads, writes, n_out)


def _name_dims(model, cache_time_dims: dict[str, int]) -> None:
    """The exporter's size symbols (s0, s1, ...) renamed batch / seq / context wherever they occur."""
    import onnx_ir as ir

    names: dict[str, str] = {}
    for v in model.graph.inputs:
        roles = (
            {0: "batch", cache_time_dims[v.name]: "context"} if v.name in cache_time_dims else {0: "batch", 1: "seq"}
        )
        for axis, role in roles.items():
            d = v.shape[axis]
            if isinstance(d, ir.SymbolicDim) and d.value is not None:
                names.setdefault(d.value, role)
    values = [*model.graph.inputs, *model.graph.outputs, *(o for n in model.graph.all_nodes() for o in n.outputs)]
    for v in values:
        if v.shape is None:
            continue
        for axis, d in enumerate(v.shape):
            if isinstance(d, ir.SymbolicDim) and d.value in names:
                v.shape[axis] = ir.SymbolicDim(names[d.value])


@contextlib.contextmanager
def _quiet():
    """torch.onnx prints its progress and warns about absent torchvision ops; dsc reports its own."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        import logging

        log = logging.getLogger("torch.onnx")
        level = log.level
        log.setLevel(logging.ERROR)
        try:
            yield
        finally:
            log.setLevel(level)


# ---- running the exported models ----------------------------------------------------------------
_ORT_TYPES = {torch.bfloat16: 16, torch.float8_e4m3fn: 17}  # ONNX TensorProto types numpy has no dtype for


class OnnxBackend:
    """An exported directory behind the Program interface (``prefill`` / ``decode`` / ``draft`` /
    ``verify`` on a CacheSpec's caches), run by onnxruntime: what verification compares with the
    Program, and what ``dsc bench`` times. The caches stay torch tensors: each call feeds the
    current window and copies the ``present.*`` outputs back into it."""

    def __init__(self, directory: str | Path, program: Program, providers: list[str] | None = None):
        import onnxruntime as ort

        directory = Path(directory)
        manifest = json.loads((directory / MANIFEST).read_text())
        self.cache, self.config, self.prefill_chunk = program.cache, program.config, program.prefill_chunk
        self.entries = {k: Entry(**v) for k, v in manifest["entries"].items()}
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        providers = providers or default_providers()
        files = {e.file for e in self.entries.values()}  # entries with one graph share a file and a session
        self.sessions = {f: ort.InferenceSession(str(directory / f), opts, providers=providers) for f in files}

    def _run(self, name: str, args: tuple, caches: list[Tensor]):
        import onnxruntime as ort

        if name not in self.entries:
            raise DscError(f"the exported models have no {name} entry (exported: {', '.join(self.entries)})")
        e = self.entries[name]
        binding = self.sessions[e.file].io_binding()
        for n, t in zip(e.inputs, [*args, *[caches[i] for i in e.reads]]):
            binding.bind_ortvalue_input(n, _ort_value(ort, t))
        for n in e.outputs[: e.n_outputs]:
            binding.bind_output(n, "cpu")
        # the written caches land in torch buffers (bf16 / fp8 have no numpy type to come back as)
        present = [torch.empty(caches[i].shape, dtype=caches[i].dtype) for i in e.writes]
        for n, buf in zip(e.outputs[e.n_outputs :], present):
            binding.bind_ortvalue_output(n, _ort_value(ort, buf))
        self.sessions[e.file].run_with_iobinding(binding)
        for i, buf in zip(e.writes, present):
            caches[i].copy_(buf)
        return tuple(torch.from_numpy(v.numpy()) for v in binding.get_outputs()[: e.n_outputs])

    def prefill(self, tokens, caches):
        return logits_hidden(self._run("prefill", (tokens,), caches))

    def decode(self, tokens, positions, caches):
        return logits_hidden(self._run("decode", (tokens, positions), caches))

    def verify(self, tokens, positions, caches):
        return logits_hidden(self._run("verify", (tokens, positions), caches))

    def draft(self, hidden, tokens, positions, caches):
        return logits_hidden(self._run("draft", (hidden, tokens, positions), caches))

    def mtp(self, hidden, tokens, positions, caches):
        return self._run("mtp", (hidden, tokens, positions), caches)[0]


def default_providers() -> list[str]:
    """CUDA when onnxruntime-gpu and a GPU are present, else the CPU."""
    import onnxruntime as ort

    have = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in have]


def _ort_value(ort, t: Tensor):
    """A torch tensor as an OrtValue over the same memory (a copy only when it is not contiguous)."""
    t = t.detach().contiguous()
    if t.dtype in _ORT_TYPES:  # crosses as raw bytes with its ONNX type
        raw = t.view(torch.uint8 if t.element_size() == 1 else torch.int16).numpy()
        return ort.OrtValue.ortvalue_from_numpy_with_onnx_type(raw, _ORT_TYPES[t.dtype])
    return ort.OrtValue.ortvalue_from_numpy(t.numpy())


# ---- TensorRT readiness ---------------------------------------------------------------------------
# what TensorRT's ONNX parser takes (its supported-operators list): other element types are rejected
TRT_DTYPES = {"FLOAT", "FLOAT16", "BFLOAT16", "INT8", "UINT8", "INT32", "INT64", "BOOL", "FLOAT8E4M3FN", "INT4"}
DATA_DEPENDENT = {"NonZero", "Unique", "Compress", "NonMaxSuppression"}  # output sizes from values


def trt_findings(model, entry: str) -> list[str]:
    """What TensorRT's parser would reject or cannot build well, node by node: TopK with K > 3840 or
    a K computed at run time, ops whose output size depends on values, element types it lacks."""
    import onnx
    from onnx import numpy_helper

    model = onnx.shape_inference.infer_shapes(model)
    g = model.graph
    consts = {t.name: t for t in g.initializer}
    for n in g.node:
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
            consts[n.output[0]] = n.attribute[0].t
    out = []
    for n in g.node:
        where = f"{entry}: {n.op_type} {n.name or n.output[0]}"
        if n.op_type == "TopK":
            k = consts.get(n.input[1])
            k = None if k is None else int(numpy_helper.to_array(k).reshape(-1)[0])
            if k is None:
                out.append(f"{where}: K is computed at run time (TensorRT needs a constant K)")
            elif k > TRT_TOPK_MAX:
                out.append(f"{where}: K = {k} > {TRT_TOPK_MAX}")
        elif n.op_type in DATA_DEPENDENT:
            out.append(f"{where}: output size depends on the data")
    seen = set()  # one finding per element type, at its first value
    typed = [(v.name, v.type.tensor_type.elem_type) for v in [*g.input, *g.output, *g.value_info]
             if v.type.HasField("tensor_type")]  # fmt: skip
    for name, elem in typed + [(f"initializer {t.name}", t.data_type) for t in g.initializer]:
        kind = onnx.TensorProto.DataType.Name(elem)
        if kind not in TRT_DTYPES and kind not in seen:
            seen.add(kind)
            out.append(f"{entry}: {name} is {kind}, an element type TensorRT does not take")
    return out


def op_histogram(model) -> dict[str, int]:
    hist: dict[str, int] = {}
    for n in model.graph.node:
        hist[n.op_type] = hist.get(n.op_type, 0) + 1
    return dict(sorted(hist.items(), key=lambda kv: -kv[1]))


# ---- the export -------------------------------------------------------------------------------------
def export_onnx(
    program: Program, dest: str | Path, verify: bool = True, check_trt: bool = False, overwrite: bool = False,
    entries: list[str] | None = None, log=None,
) -> OnnxExport:  # fmt: skip
    """The entries of ``program`` (default: all) as ``dest/<entry>.onnx`` with ``dest/export.json``;
    written atomically, so ``dest`` is whole or untouched. ``check_trt``: TensorRT findings are
    errors, raised at the first entry that has any. An entry whose graph and weights are another's
    (verify is decode's graph) shares that entry's file."""
    from dsc.fsutil import atomic_dir

    require_onnx()
    import onnx
    from dsc.export.onnx_ops import FUSION

    chosen = preflight(program, dest, overwrite, entries, "ONNX")
    untranslated = [o for o in dsc_ops(program) if o not in _translated()]
    if untranslated:
        raise DscError(
            f"no ONNX translation for dsc::{', dsc::'.join(untranslated)}; export the Program without that pass"
        )
    bitcasts = [
        k for k, ep in program.entries.items() if any(n.target == torch.ops.aten.view.dtype for n in ep.graph.nodes)
    ]
    if bitcasts:
        raise DscError(
            f"the {', '.join(bitcasts)} entries reinterpret bytes as another dtype (aten.view.dtype, e.g. the packed "
            f"FP8 index-key cache of fuse_dsa.index_cache=fp8), which ONNX opset {OPSET} cannot express (BitCast "
            "is opset 26); export a Program optimized with fuse_dsa.index_cache=keep"
        )
    log = log or (lambda msg: None)
    result = OnnxExport(fusion={o: FUSION[o] for o in dsc_ops(program) if o in FUSION})
    scenario = make_scenario(program.config)

    def write(tmp: Path) -> None:
        for name, args, length, same in export_plan(program, scenario, chosen, result.entries):
            t0 = time.perf_counter()
            if same is not None:
                log(f"{name}: the same graph and weights as {same}, one file")
                result.entries[name] = dataclasses.replace(result.entries[same], name=name)
                result.ops[name], result.bytes[name], result.seconds[name] = result.ops[same], 0, 0.0
                continue
            log(f"exporting {name}")
            try:
                entry = export_entry(program, name, args, length, tmp / f"{name}.onnx")
            except DscError:
                raise
            except Exception as e:  # noqa: BLE001 - the exporter's failures are many; name the entry and the cause
                raise DscError(f"ONNX export of the {name} entry failed: {first_line(e)}") from e
            result.entries[name] = entry
            model = onnx.load(str(tmp / entry.file), load_external_data=False)
            result.ops[name] = op_histogram(model)
            findings = trt_findings(model, name)
            if check_trt and findings:
                raise DscError("not TensorRT-ready (--check trt):\n  " + "\n  ".join(findings))
            result.trt += findings
            result.bytes[name] = sum(p.stat().st_size for p in tmp.iterdir() if p.name.startswith(f"{name}.onnx"))
            result.seconds[name] = round(time.perf_counter() - t0, 2)
        _write_manifest(tmp, program, result)
        if verify:
            log("verifying with onnxruntime")
            t0 = time.perf_counter()
            result.numerics = verify_export(tmp, program, scenario)
            result.seconds["onnxruntime_check"] = round(time.perf_counter() - t0, 2)
            _write_manifest(tmp, program, result)

    atomic_dir(dest, write, overwrite=overwrite, marker=MANIFEST)
    return result


def verify_export(directory: Path, program: Program, scenario: Scenario) -> dict:
    """The exported models on the verification scenario, compared with the Program; a mismatch raises,
    naming the entry, the output and the error."""
    backend = OnnxBackend(directory, program)
    return {
        **check_against_program(program, backend, scenario, "onnxruntime disagrees"),
        "providers": default_providers(),
    }


def _write_manifest(directory: Path, program: Program, result: OnnxExport) -> None:
    data = {
        "format": "onnx",
        "opset": OPSET,
        "entries": {k: e.to_dict() for k, e in result.entries.items()},
        "cache": program.cache.to_dict(),
        "ops": result.ops,
        "dsc_ops": result.fusion,
        "tensorrt": {"ready": not result.trt, "findings": result.trt},
        "numerics": result.numerics,
        "bytes": result.bytes,
        "seconds": result.seconds,
    }
    (directory / MANIFEST).write_text(json.dumps(data, indent=2) + "\n")


def _translated() -> set[str]:
    from dsc.export.onnx_ops import TABLE

    return {str(k).split(".")[1] for k in TABLE if str(k).startswith("dsc.")}
