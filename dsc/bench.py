"""``dsc bench``: variants side by side in one process — medians, ratios, peak memory, bandwidth limit.

Variants: ``eager`` (the reference model), ``compile`` (the reference under ``torch.compile``,
Inductor, dynamic shapes), ``dsc`` (the verified, optimized Program) and per-pass ablations
``dsc:a+b`` (the Program after only passes a and b). Scenarios: ``decode`` (one
step of one new token at context T: the cache is filled with random values, so no prefill of T
tokens is needed), ``prefill`` (a prompt of P tokens) and ``attention`` (one MLA layer's decode
attention at context T in four forms, the model's sizes: per-head K/V cache, a latent cache
re-decompressed every step, the absorbed form in plain torch, and ``dsc::mla_decode``; checked to
agree before they are timed) and ``speculative`` (greedy generation of ``generate`` tokens from a
code prompt, plain and with n MTP drafts per step, for eager and the Programs with a draft: the
same tokens, checked; tokens/s, tokens per verify step and acceptance per position) and ``gemv``
(one token's row against an n x n weight in fp32 and in FP8 as ``lower_fp8`` makes it: the decode
matmul on its own, against the bandwidth limit of its bytes). Each point:
each variant's warm-up calls, then rounds of one timed call of every variant in turn, so that the
drift of a shared machine's speed reaches all variants alike; the median is reported, and every
variant's ratio to ``eager`` (to ``per_head`` for attention, ``fp32`` for gemv).

Memory: the process's resident set is sampled every few ms during a variant's warm-up calls;
"peak" is its caches plus the highest RSS above the level before them. Bandwidth: a large tensor copy measured in the same
run; ``bytes / bandwidth`` from the cost model is each point's lower bound, and ``x_bound`` says how
far above it the measured time is.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
import shutil
import statistics
import tempfile
import threading
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dsc.cost import entry_cost, tokens_label
from dsc.errors import DscError
from dsc.fsutil import atomic_write_text, check_writable
from dsc.runtime import EagerBackend, prefill

log = logging.getLogger(__name__)
VARIANTS = ("eager", "compile", "dsc")
# dsc+inductor: the Program's entries under Inductor (minutes of compilation on big models); dsc+onnx: its
# prefill and decode exported to ONNX and run by onnxruntime (the 'onnx' extra)
# dsc+aoti: its prefill and decode as AOTInductor packages (minutes of compilation); dsc+fp8: the default
# pipeline with lower_fp8 (W8A8)
OPT_IN_VARIANTS = ("dsc+inductor", "dsc+onnx", "dsc+aoti", "dsc+fp8")
SCENARIOS = ("decode", "prefill", "attention", "speculative", "gemv")
# a prompt for the speculative scenario on byte-level models (the demo model writes Python)
CODE_PROMPT = b"import os\n\n\ndef read_lines(path):\n    with open(path) as f:\n        "
ATTENTION_FORMS = ("per_head", "redecompress", "absorbed_torch", "mla_decode")
GEMV_FORMS = ("fp32", "fp8_w8a16", "fp8_w8a8")
# the scenarios timed as forms of one computation (checked to agree), with the form the others are compared to
FORM_SCENARIOS = {"attention": "per_head", "gemv": "fp32"}


@dataclass
class BenchConfig:
    model: str | None = "small"
    variants: tuple[str, ...] = VARIANTS
    scenarios: tuple[str, ...] = SCENARIOS
    contexts: tuple[int, ...] = (1024, 8192, 32768)
    prompts: tuple[int, ...] = (1024, 4096)
    warmup: int = 2
    repeat: int = 5
    budget_s: float = 20.0  # per point: fewer repeats when a call is slow
    threads: int = 0
    generate: int = 256  # speculative: greedy tokens generated per timed call
    drafts: tuple[int, ...] = (0, 1, 2, 3)  # speculative: drafted tokens per step (0: plain decoding)
    gemv_sizes: tuple[int, ...] = (1024, 4096)  # gemv: n of the n x n weight

    @classmethod
    def quick(cls, **kw) -> BenchConfig:
        quick = {"model": "tiny", "contexts": (256, 768), "prompts": (128, 512), "warmup": 1, "repeat": 3,
                 "generate": 48, "drafts": (0, 2), "gemv_sizes": (512,)}  # fmt: skip
        return cls(**(quick | kw))


class _RssSampler:
    def __init__(self, interval: float = 0.005):
        self.interval, self.peak, self._stop = interval, 0, threading.Event()

    @staticmethod
    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096

    def __enter__(self):
        self.base = self.rss()
        self.peak = self.base
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(self.interval)

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self.rss())

    @property
    def above_base(self) -> int:
        return self.peak - self.base


def measure_bandwidth(nbytes: int = 256 * 2**20, repeat: int = 5) -> float:
    """Memory bandwidth in bytes/s from a large copy (read + write)."""
    src = torch.ones(nbytes // 4)
    dst = torch.empty_like(src)
    times = []
    for _ in range(repeat + 1):
        t = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - t)
    return 2 * nbytes / statistics.median(times[1:])


def _time_side_by_side(
    calls: dict, warmup: int, repeat: int, budget: float, memory: dict | None = None
) -> dict[str, tuple[float, list[float]]]:
    """Each call's median time and its times: warm-up calls of one call after another (with
    ``memory``, each call's under an RSS sampler: its peak above the level before, in bytes, into
    ``memory``), then ``repeat`` rounds of one timed call each, in turn. Taking turns gives every
    variant the same machine: on a shared host the speed drifts over seconds, which a block of one
    variant's calls, then the next's, turns into a false ratio. Fewer rounds once the budget (per
    call) is spent."""
    for name, fn in calls.items():
        with _RssSampler() as mem:
            for _ in range(max(warmup, 1 if memory is not None else 0)):
                fn()
        if memory is not None:
            memory[name] = mem.above_base
    times: dict[str, list[float]] = {name: [] for name in calls}
    t_end = time.perf_counter() + budget * len(calls)
    for i in range(repeat):
        for name, fn in calls.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
        if time.perf_counter() > t_end and i >= 1:
            break
    return {name: (statistics.median(ts), ts) for name, ts in times.items()}


def _shared_caches(pool: list, spec, length: int, gen: torch.Generator | None = None) -> list[torch.Tensor]:
    """Batch-1 caches of ``length`` positions for ``spec``: the set already in ``pool`` for an equal
    spec, else a new one (random contents when ``gen`` is given) added to it."""
    for other, caches in pool:
        if other == spec:
            return caches
    caches = spec.allocate(1, length)
    if gen is not None:
        for c in caches:
            _fill(c, gen)
    pool.append((spec, caches))
    return caches


def _fill(cache: torch.Tensor, gen: torch.Generator, block: int = 512) -> None:
    """Random-looking cache contents at memcpy speed: one random block tiled along the context."""
    src = torch.randn((cache.shape[0], min(block, cache.shape[1]), *cache.shape[2:]), generator=gen) * 0.1
    for t in range(0, cache.shape[1], block):
        n = min(block, cache.shape[1] - t)
        cache[:, t : t + n].copy_(src[:, :n])


@dataclass
class BenchResult:
    config: dict
    bandwidth_gbs: float
    points: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"config": self.config, "bandwidth_gbs": self.bandwidth_gbs, "points": self.points}


def build_variants(cfg: BenchConfig, on_event=print):
    from dsc.frontends.reference import capture, load_model
    from dsc.pass_manager import run_pipeline, select_passes, with_pass

    model, _ = load_model(cfg.model)
    variants = {}
    if "eager" in cfg.variants:
        variants["eager"] = EagerBackend(model)
    if "compile" in cfg.variants:
        on_event("variant", "compile: torch.compile(dynamic=True) of prefill and decode (compiled on first call)")
        compiled = EagerBackend(model)
        compiled.prefill = torch.compile(model.prefill, dynamic=True)
        compiled.decode = torch.compile(model.decode, dynamic=True)
        variants["compile"] = compiled
    reference = capture(model, source=cfg.model or "default")
    costs = {"reference": reference}
    for v in cfg.variants:  # "dsc": the default pipeline; "dsc:a+b": an ablation with only passes a, b
        if v in OPT_IN_VARIANTS:
            continue
        if v == "dsc" or v.startswith("dsc:"):
            passes = v.split(":", 1)[1].split("+") if ":" in v else None
            on_event("variant", f"{v}: capture + verified pass pipeline")
            program, _ = run_pipeline(reference, select_passes(passes))
            variants[v] = program
            costs[v] = program
    if "dsc+fp8" in cfg.variants:
        on_event("variant", "dsc+fp8: the verified pipeline with lower_fp8 (W8A8)")
        variants["dsc+fp8"], _ = run_pipeline(
            reference, select_passes(with_pass([p.name for p in select_passes()], "lower_fp8"))
        )
        costs["dsc+fp8"] = variants["dsc+fp8"]
    if "dsc+inductor" in cfg.variants:
        on_event("variant", "dsc+inductor: the verified Program, each entry compiled by Inductor on first call")
        program = variants.get("dsc") or run_pipeline(reference, select_passes())[0]
        compiled = dataclasses.replace(program, inductor=True, _modules={})
        variants["dsc+inductor"] = compiled
        costs["dsc+inductor"] = compiled
    for v, make in (("dsc+onnx", onnx_variant), ("dsc+aoti", aoti_variant)):
        if v in cfg.variants:
            variants[v] = make(variants.get("dsc") or run_pipeline(reference, select_passes())[0], on_event)
            costs[v] = costs.get("dsc") or variants[v].program
    return model.config, variants, costs


def aoti_variant(program, on_event=print):
    """The Program's prefill and decode as AOTInductor packages (checked against it)."""
    from dsc.export.aoti import AotiBackend, export_aoti

    on_event("variant", "dsc+aoti: the verified Program's prefill and decode compiled by AOTInductor (minutes)")
    return _exported(program, "aoti", export_aoti, AotiBackend)


def onnx_variant(program, on_event=print):
    """The Program's prefill and decode as ONNX models (checked against it), run by onnxruntime."""
    from dsc.export.onnx import OnnxBackend, export_onnx, require_onnx

    require_onnx()
    on_event("variant", "dsc+onnx: the verified Program's prefill and decode exported to ONNX, run by onnxruntime")
    return _exported(program, "onnx", export_onnx, lambda d: OnnxBackend(d, program))


def _exported(program, kind: str, export, runner):
    """``program``'s prefill and decode exported (and verified) into a scratch directory, loaded by
    ``runner``; the directory goes when the runner does (it has loaded the files)."""
    scratch = Path(tempfile.mkdtemp(prefix=f"dsc-bench-{kind}-"))
    try:
        export(program, scratch / kind, entries=["prefill", "decode"])
        backend = runner(scratch / kind)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    backend.program = program
    weakref.finalize(backend, shutil.rmtree, str(scratch), True)
    return backend


@torch.no_grad()
def measure_speed(backends: dict, config, context: int = 1024, prompt: int = 128, budget_s: float = 3.0) -> dict:
    """A decode step at ``context`` (caches filled with random values) and a prefill of ``prompt``
    tokens for each backend, medians of a few calls on this machine: what ``dsc optimize`` puts
    beside the cost model's ratios so that a report cannot show a gain the machine does not see."""
    limit = config.max_position_embeddings
    context, prompt = min(context, limit - 1), min(prompt, limit)
    gen = torch.Generator().manual_seed(0)
    vocab = min(config.vocab_size, 256)
    tok, pos = torch.randint(0, vocab, (1, 1), generator=gen), torch.tensor([[context]])
    ptoks = torch.randint(0, vocab, (1, prompt), generator=gen)
    out = {"decode": {"context": context}, "prefill": {"tokens": prompt}, "threads": torch.get_num_threads()}
    steps, fills, pool = {}, {}, []
    for name, backend in backends.items():
        caches = _shared_caches(pool, backend.cache, context + 1, gen)
        steps[name] = lambda b=backend, c=caches: b.decode(tok, pos, c)
        fresh = backend.cache.allocate(1, prompt)
        fills[name] = lambda b=backend, c=fresh: prefill(b, ptoks, c)
    for kind, calls, warmup, repeat in (("decode", steps, 2, 7), ("prefill", fills, 1, 3)):
        for name, (median, _) in _time_side_by_side(calls, warmup, repeat, budget_s).items():
            out[kind][f"{name}_ms"] = round(median * 1e3, 3)
    return out


def attention_forms(mcfg, T: int, gen: torch.Generator) -> dict[str, tuple]:
    """One MLA layer's attention for one new token over T cached tokens, four ways, at the model's
    sizes: {form: (call, bytes it has to read: its cache, plus W_kvb when it decompresses)}."""
    from dsc.kernels.mla_decode import mla_decode_ref

    H, dn, dr, dv, dc = (mcfg.num_attention_heads, mcfg.qk_nope_head_dim, mcfg.qk_rope_head_dim,
                         mcfg.v_head_dim, mcfg.kv_lora_rank)  # fmt: skip
    scale = mcfg.softmax_scale

    def r(*shape):
        return torch.randn(*shape, generator=gen) * 0.1

    q, latent, w_kvb = r(1, 1, H, dn + dr), r(1, T, dc + dr), r(H * (dn + dv), dc)
    w_uk, w_uv = w_kvb.view(H, dn + dv, dc).split([dn, dv], 1)
    q_abs = torch.cat([torch.einsum("bshd,hdc->bshc", q[..., :dn], w_uk), q[..., dn:]], -1)

    def decompress():  # per-head K = [W_UK c ; k_pe], V = W_UV c for every cached token
        k_nope, v = torch.nn.functional.linear(latent[..., :dc], w_kvb).view(1, T, H, dn + dv).split([dn, dv], -1)
        return torch.cat([k_nope, latent[..., dc:].unsqueeze(2).expand(1, T, H, dr)], -1), v.contiguous()

    def attend(k, v):
        s = torch.einsum("bshd,bthd->bsht", q, k) * scale
        return torch.einsum("bsht,bthd->bshd", s.softmax(-1), v)

    k, v = decompress()  # the per-head cache holds what the latent decompresses to: all four agree

    def absorbed(op):
        return lambda: torch.einsum("bshc,hvc->bshv", op(q_abs, latent, None, scale, dc), w_uv)

    lat_bytes, w_bytes = latent.numel() * 4, w_kvb.numel() * 4
    return {
        "per_head": (lambda: attend(k, v), (k.numel() + v.numel()) * 4),
        "redecompress": (lambda: attend(*decompress()), lat_bytes + w_bytes),
        "absorbed_torch": (absorbed(mla_decode_ref), lat_bytes),
        "mla_decode": (absorbed(torch.ops.dsc.mla_decode), lat_bytes),
    }


def gemv_forms(mcfg, n: int, gen: torch.Generator) -> dict[str, tuple]:
    """One token's row against an n x n weight: fp32, and FP8 e4m3 with 128x128 block scales as
    ``lower_fp8`` makes it (weights only, and W8A8 with the row quantised by ``act_quant``)
    {form: (call, bytes it has to read: the weight at 4 or 1 bytes a value, plus its scales)}."""
    from dsc.kernels.fp8 import fp8_linear_cpu
    from dsc.model.fp8 import block_quant

    x, w = torch.randn(1, n, generator=gen), torch.randn(n, n, generator=gen) * n**-0.5
    wq, ws = block_quant(w)
    fp8_bytes = wq.numel() + ws.numel() * 4
    return {
        "fp32": (lambda: x @ w.T, w.numel() * 4),
        "fp8_w8a16": (lambda: fp8_linear_cpu(x, None, wq, ws), fp8_bytes),
        "fp8_w8a8": (lambda: fp8_linear_cpu(*torch.ops.dsc.act_quant(x), wq, ws), fp8_bytes),
    }


@torch.no_grad()
def run_bench(cfg: BenchConfig, on_event=print) -> BenchResult:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    on_event("stage", "measuring memory bandwidth")
    bw = measure_bandwidth()
    mcfg, variants, programs = build_variants(cfg, on_event)
    limit = mcfg.max_position_embeddings
    res = BenchResult(
        {"model": cfg.model, "variants": list(variants), "scenarios": list(cfg.scenarios), "warmup": cfg.warmup,
         "repeat": cfg.repeat, "threads": torch.get_num_threads(), "torch": torch.__version__},
        round(bw / 1e9, 2),
    )  # fmt: skip
    gen = torch.Generator().manual_seed(0)
    vocab = min(mcfg.vocab_size, 256)
    cost_cache = {}

    def bound_bytes(variant: str, kind: str, n: int) -> float:
        prog = programs.get(variant, programs["reference"])
        key = (variant if variant in programs else "reference", kind)
        if key not in cost_cache:
            cost_cache[key] = entry_cost(prog.entries[kind], kind)
        return cost_cache[key].at(n)[1]

    for scenario in cfg.scenarios:
        if scenario == "speculative":
            res.points += speculative_points(cfg, mcfg, variants, on_event)
            continue
        sizes = {"prefill": cfg.prompts, "gemv": cfg.gemv_sizes}.get(scenario, cfg.contexts)
        for n in sizes:
            if n + 1 > limit and scenario != "gemv":
                on_event("skip", f"{scenario} at {n}: beyond max_position_embeddings {limit}")
                continue
            base_time = None
            base = FORM_SCENARIOS.get(scenario, "eager")
            if scenario in FORM_SCENARIOS:
                forms = (attention_forms if scenario == "attention" else gemv_forms)(mcfg, n, gen)
                outs = {name: fn() for name, (fn, _) in forms.items()}
                for name, out in outs.items():  # a form that computes something else is not a speed-up
                    if scenario == "attention":
                        torch.testing.assert_close(out, outs[base], atol=1e-4, rtol=1e-3, msg=f"{name} at {n}")
                    else:  # FP8: e4m3 has 3 mantissa bits (SQNR ~30 dB for a weight, ~26 with the row)
                        noise = (out - outs[base]).pow(2).sum() / outs[base].pow(2).sum()
                        assert noise < 10**-2.2, f"{name} at {n}: SQNR {-10 * noise.log10().item():.1f} dB"
                runs = forms
            else:
                runs = {name: (backend, None) for name, backend in variants.items()}
            # the calls hold their caches until the last timed call; variants with one cache layout share
            # one set (each call writes its own positions before it reads them)
            calls, cache_bytes, pool = {}, {}, []
            for name, (backend, _) in runs.items():
                caches = []
                if scenario in FORM_SCENARIOS:
                    calls[name] = backend
                elif scenario == "decode":
                    caches = _shared_caches(pool, backend.cache, n + 1, gen)
                    tok = torch.randint(0, vocab, (1, 1), generator=gen)
                    pos = torch.tensor([[n]])
                    calls[name] = lambda backend=backend, caches=caches, tok=tok, pos=pos: backend.decode(
                        tok, pos, caches
                    )
                else:
                    caches = _shared_caches(pool, backend.cache, n)
                    tok = torch.randint(0, vocab, (1, n), generator=gen)
                    # as generate runs it: chunked past prefill_chunk
                    calls[name] = lambda backend=backend, caches=caches, tok=tok: prefill(backend, tok, caches)
                cache_bytes[name] = sum(c.numel() * c.element_size() for c in caches)
            del caches, pool
            gc.collect()
            peaks: dict[str, int] = {}
            timed = _time_side_by_side(calls, cfg.warmup, cfg.repeat, cfg.budget_s, memory=peaks)
            del calls
            for name, (_, nbytes) in runs.items():
                median, times = timed[name]
                bound = (nbytes if nbytes is not None else bound_bytes(name, scenario, n)) / bw
                if name == base:
                    base_time = median
                point = {
                    "scenario": scenario, "variant": name, "tokens": n, "median_ms": round(median * 1e3, 3),
                    "times_ms": [round(t * 1e3, 3) for t in times], "peak_rss_mb": round((cache_bytes[name] + peaks[name]) / 2**20, 1),
                    "bytes_moved": bound * bw, "bandwidth_bound_ms": round(bound * 1e3, 3),
                    "x_bound": round(median / bound, 2) if bound else None,
                    "speedup_vs_eager": round(base_time / median, 3) if base_time else None,
                }  # fmt: skip
                res.points.append(point)
                on_event(
                    "point",
                    f"{scenario:9s} {tokens_label(n):>5s} {name:14s} {median * 1e3:10.2f} ms  "
                    f"x{point['speedup_vs_eager'] or float('nan'):.2f} vs {base}"
                    f"  peak +{point['peak_rss_mb']:.0f} MB",
                )
    return res


class _CallTimes:
    """``backend`` behind the same interface, each entry call's wall time recorded in call order:
    the split of a generation into its decode / verify / draft calls and the runtime's own work."""

    def __init__(self, backend):
        self.backend, self.calls = backend, []

    def __getattr__(self, name):  # the entries timed; cache, config, entries, check_inputs, ... as they are
        attr = getattr(self.backend, name)
        if name not in ("prefill", "decode", "verify", "draft") or not callable(attr):
            return attr

        def timed(*args):
            t = time.perf_counter()
            out = attr(*args)
            self.calls.append((name, time.perf_counter() - t))
            return out

        return timed


def step_split(calls: list[tuple[str, float]], stats: dict, prompt_calls: int) -> dict:
    """Median ms of each kind of call in the generation loop and, for speculative decoding, the
    runtime's own ms per verify step (acceptance, bookkeeping: the loop's time less its calls). The
    prompt's calls are left out: its ``prompt_calls`` chunks (a prefill, then decode extends) and,
    speculative, as many draft calls over it."""
    seen = {"main": 0, "draft": 0}
    loop = []
    for kind, t in calls:
        role = "draft" if kind == "draft" else "main"
        if seen[role] < prompt_calls and (role == "main" or stats.get("speculative")):
            seen[role] += 1
        else:
            loop.append((kind, t))
    out = {}
    for kind in ("decode", "verify", "draft"):
        ts = [t for k, t in loop if k == kind]
        if ts:
            out[f"{kind}_ms"] = round(statistics.median(ts) * 1e3, 3)
    if stats.get("speculative") and stats.get("verify_steps"):
        own = stats["decode_s"] - sum(t for _, t in loop)
        out["runtime_ms_per_step"] = round(max(own, 0.0) * 1e3 / stats["verify_steps"], 3)
    return out


def speculative_points(cfg: BenchConfig, mcfg, variants: dict, on_event=print) -> list[dict]:
    """Greedy generation of ``cfg.generate`` tokens, plain (n = 0) and with n drafts per step, for
    each variant that can draft, every (variant, n) timed in turn; every n must give the plain
    tokens (else the run stops). Each point also carries the split of a step: the median decode,
    verify and draft call and the runtime's own work per verify step (``step_split``)."""
    from dsc.errors import DscError
    from dsc.runtime import SamplingParams, generate, prompt_chunks

    if not mcfg.num_nextn_predict_layers:
        on_event("skip", "speculative: the model has no MTP module to draft with")
        return []
    if mcfg.vocab_size >= 256:
        prompt = list(CODE_PROMPT)
    else:
        prompt = torch.randint(0, mcfg.vocab_size, (24,), generator=torch.Generator().manual_seed(0)).tolist()
    params = SamplingParams(max_new_tokens=cfg.generate, stop_at_eos=False)
    last: dict = {}  # (variant, n) -> its latest Generation (tokens and stats) and its calls' times

    def call(key, backend, n):
        def run():
            timed = _CallTimes(backend)
            last[key] = generate(timed, [prompt], params, speculative=n), timed.calls

        return run

    calls = {}
    for name, backend in variants.items():
        if name == "compile":  # its draft would be eager code beside compiled verify calls: not a variant of its own
            on_event("skip", "speculative compile: the compiled reference has no compiled draft")
            continue
        if isinstance(getattr(backend, "entries", None), dict) and "draft" not in backend.entries:
            on_event("skip", f"speculative {name}: no draft entry")
            continue
        calls.update({(name, n): call((name, n), backend, n) for n in cfg.drafts})
    gc.collect()
    memory: dict = {}
    # every (variant, n) takes its turn in each round, as the other scenarios' variants do: a whole
    # generate call is hundreds of steps, so fewer rounds
    timed = _time_side_by_side(calls, cfg.warmup, max(cfg.repeat // 2, 1), float("inf"), memory)
    points = []
    for (name, n), (median, times) in timed.items():
        plain_key = (name, cfg.drafts[0])
        (gen, call_times), plain_gen = last[name, n], last[plain_key][0]
        if gen.tokens != plain_gen.tokens:
            raise DscError(f"speculative {name} n={n}: its tokens differ from plain decoding's")
        st = gen.stats
        split = step_split(call_times, st, len(prompt_chunks(variants[name], len(prompt))))
        plain, eager_plain = timed[plain_key][0], timed.get(("eager", 0), (None,))[0]
        point = {
            "scenario": "speculative", "variant": name, "tokens": cfg.generate, "draft_tokens": n,
            "median_ms": round(median * 1e3, 3), "times_ms": [round(t * 1e3, 3) for t in times],
            "peak_rss_mb": round(memory[name, n] / 2**20, 1), "tokens_per_s": round(cfg.generate / median, 2),
            "tokens_per_step": st.get("tokens_per_step", 1.0),
            "acceptance_per_position": st.get("acceptance_per_position", []),
            "speedup_vs_plain": round(plain / median, 3),
            "speedup_vs_eager": round(eager_plain / median, 3) if eager_plain else None,
            "bytes_moved": None, "bandwidth_bound_ms": None, "x_bound": None, **split,
        }  # fmt: skip
        points.append(point)
        acc = ", ".join(f"{a:.2f}" for a in point["acceptance_per_position"]) or "-"
        calls_ms = "  ".join(
            f"{k.split('_ms')[0].replace('runtime', 'runtime/step')} {v:.2f} ms" for k, v in split.items()
        )
        on_event(
            "point",
            f"speculative n={n} {name:14s} {point['tokens_per_s']:8.1f} tok/s  x{point['speedup_vs_plain']:.2f} "
            f"vs plain  {point['tokens_per_step']:.2f} tokens/step  acceptance {acc}  {calls_ms}",
        )
    return points


def plot_svgs(res: BenchResult) -> dict[str, str]:
    """One standalone SVG per scenario: median latency against tokens, one line per variant."""
    from dsc.report import svg_chart

    colors = {"eager": "#b4441c", "compile": "#7a5cc2", "dsc": "#1f6fb2", "per_head": "#b4441c",
              "redecompress": "#8a8a8a", "absorbed_torch": "#7a5cc2", "mla_decode": "#1f6fb2"}  # fmt: skip
    titles = {
        "decode": "decode step latency (ms) vs context",
        "prefill": "prefill latency (ms) vs prompt length",
        "attention": "one MLA layer's decode attention (ms) vs context",
        "gemv": "one row against an n x n weight (ms), fp32 and FP8",
    }
    out = {}
    for scenario, title in titles.items():
        series = []
        forms = {"attention": ATTENTION_FORMS, "gemv": GEMV_FORMS}
        for v in forms.get(scenario, res.config["variants"]):
            pts = [p for p in res.points if p["scenario"] == scenario and p["variant"] == v]
            if pts:
                series.append(
                    {
                        "label": v,
                        "x": [p["tokens"] for p in pts],
                        "y": [p["median_ms"] for p in pts],
                        "color": colors.get(v, "#444"),
                    }
                )
        if series:
            out[scenario] = svg_chart(series, title, "ms", "tokens")
    return out


def check_bench_output(out: Path, force: bool) -> None:
    """Before the run: ``out`` can hold the results, and an earlier bench.json there is replaced only
    with ``--force``."""
    check_writable(out, "bench output directory (-o)", directory=True)
    if (out / "bench.json").exists() and not force:
        raise DscError(f"{out / 'bench.json'} holds an earlier run; choose another -o or pass --force to replace it")


def write_results(res: BenchResult, out: Path) -> list[Path]:
    """bench.json and one SVG per scenario, each written whole (temporary file, then rename)."""
    paths = [out / "bench.json"]
    atomic_write_text(paths[0], json.dumps(res.to_dict(), indent=2))
    for scenario, svg in plot_svgs(res).items():
        paths.append(out / f"bench_{scenario}.svg")
        atomic_write_text(paths[-1], svg)
    return paths
