"""The CPU's native kernels (``fp8_cpu.c``: FP8 matmuls; ``dsa_cpu.c``: the DSA ops; ``moe_cpu.c``:
the routed experts of a decode step's few tokens; ``linear_cpu.c``: fp32 linear layers of a few rows),
built with the system C compiler at first use into one library.

Why a native kernel: a decode step is memory-bound and FP8 weights are a quarter of fp32's bytes,
but torch widens e4m3 to fp32 at ~4 ns a value on this CPU (70 ms for a 4096x4096 weight, against
3 ms for the fp32 GEMV itself), and ``_scaled_mm`` takes per-tensor scales only. The C file widens
16 bytes at a time inside the dot product (AVX2 + F16C) and dequantises whole weights for the
GEMM of a long prompt. It is compiled once per source version into ``$DSC_CACHE_DIR`` (default
``~/.cache/dsc``) as a plain shared library loaded with ctypes: no Python headers, no torch ABI,
about a second of ``cc``. Where there is no compiler, no AVX2 / F16C, or ``DSC_NATIVE=0``, the
callers fall back to torch (one warning says why) and give the same numbers, slower.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch
from torch import Tensor

SOURCES = [Path(__file__).with_name(f) for f in ("fp8_cpu.c", "dsa_cpu.c", "moe_cpu.c", "linear_cpu.c")]
HEADERS = [Path(__file__).with_name("simd.h")]  # included by the sources: part of the build's digest
FLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-shared", "-fPIC"]
ROWS_MAX = 16  # up to this many activation rows, the weight is streamed through the dot product
F32_THREADED = 1 << 17  # fp32 weights of at least this many values are split over torch's threads


def cache_dir() -> Path:
    return Path(os.environ.get("DSC_CACHE_DIR") or Path.home() / ".cache" / "dsc")


def _unavailable() -> str | None:
    if os.environ.get("DSC_NATIVE", "1") == "0":
        return "DSC_NATIVE=0"
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"the native CPU kernels are written for x86-64 (this is {platform.machine()})"
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        return "this CPU has no AVX2"
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    if flags and " f16c" not in flags:
        return "this CPU has no F16C"
    if not shutil.which(os.environ.get("CC", "cc")):
        return "no C compiler (cc) on PATH"
    return None


def _build() -> Path:
    cc = os.environ.get("CC", "cc")
    digest = hashlib.sha256(b"".join(s.read_bytes() for s in SOURCES + HEADERS) + " ".join([cc, *FLAGS]).encode())
    out = cache_dir() / f"dsc_cpu-{digest.hexdigest()[:16]}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=out.stem, suffix=".so.tmp", dir=out.parent)
    os.close(fd)
    try:
        done = subprocess.run([cc, *FLAGS, *map(str, SOURCES), "-o", tmp, "-lm"], capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{cc} failed: {done.stderr.strip()[-400:]}")
        os.replace(tmp, out)  # whole or not at all: a concurrent build writes its own temporary
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


@functools.cache
def library() -> ctypes.CDLL | None:
    """The loaded kernel library, or None (after one warning) where it cannot be had."""
    why = _unavailable()
    if why is None:
        try:
            lib = ctypes.CDLL(str(_build()))
        except (OSError, RuntimeError) as e:
            why = f"building {', '.join(s.name for s in SOURCES)} failed ({e})"
    if why is not None:
        if why != "DSC_NATIVE=0":
            warnings.warn(
                f"dsc: FP8 matmuls, DSA ops, decode MoE and few-row linears on CPU use torch's slower path: {why}",
                RuntimeWarning,
                stacklevel=2,
            )
        return None
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.dsc_fp8_rows.argtypes = [ptr, i64, i64, ptr, ptr, ptr, i64, i64, i64, ctypes.c_int]
    lib.dsc_fp8_dequant.argtypes = [ptr, ptr, ptr, i64, i64, i64, i64, ctypes.c_int]
    lib.dsc_act_quant.argtypes = [ptr, i64, i64, i64, ptr, ptr]
    lib.dsc_fp8_rows_heads.argtypes = [ptr, i64, i64, ptr, ptr, ptr, i64, i64, ctypes.c_int]
    lib.dsc_fp8_rows_heads.restype = None
    lib.dsc_fp8_rows.restype = lib.dsc_fp8_dequant.restype = lib.dsc_act_quant.restype = None
    lib.dsc_indexer_topk.argtypes = [ptr, ptr, ptr, ptr, *[i64] * 7, i64, ptr]
    lib.dsc_indexer_topk.restype = None
    lib.dsc_sparse_mla.argtypes = [ptr, ptr, ptr, i64, i64, ptr, i64, i64, ptr, *[i64] * 7, ctypes.c_float, ptr]
    lib.dsc_sparse_mla.restype = i64
    lib.dsc_moe_rows.argtypes = [ptr, i64, i64, i64, i64, ptr, ptr, ptr, ptr, ptr, ptr]
    lib.dsc_moe_rows.restype = None
    lib.dsc_f32_rows.argtypes = [ptr, i64, i64, i64, ptr, ptr, ptr, i64, ctypes.c_int]
    lib.dsc_f32_rows.restype = None
    return lib


def usable(*tensors: Tensor) -> bool:
    return all(t.device.type == "cpu" for t in tensors) and library() is not None


def dequant(q: Tensor, scale: Tensor, row_block: int) -> Tensor:
    """e4m3 q (R, K) times its scales: ``scale[r // row_block, k // 128]`` (128 for a weight's
    blocks, 1 for activations' per-row groups). Equals ``q.float() * scale`` expanded, bit for bit."""
    q, scale = q.contiguous(), scale.float().contiguous()
    R, K = q.shape
    out = torch.empty(R, K, dtype=torch.float32)
    library().dsc_fp8_dequant(
        q.data_ptr(), scale.data_ptr(), out.data_ptr(), R, K, row_block, scale.shape[-1], torch.get_num_threads()
    )
    return out


def matmul(x: Tensor, w: Tensor, w_scale: Tensor, chunk_bytes: int = 1 << 21) -> Tensor:
    """fp32 x (M, K) · dequant(w)ᵀ for a long prompt: the weight is dequantised a band of 128-row
    blocks at a time into one small buffer that stays in cache, each band feeding a GEMM. A whole
    dequantised weight would be four times the FP8 bytes, and its first touch alone (page faults)
    costs more than the widening."""
    x, w, w_scale = x.float().contiguous(), w.contiguous(), w_scale.float().contiguous()
    (M, K), N = x.shape, w.shape[0]
    band = max(1, chunk_bytes // (4 * K * 128)) * 128
    buf = torch.empty(min(band, N), K, dtype=torch.float32)
    y = torch.empty(M, N, dtype=torch.float32)
    lib, threads = library(), torch.get_num_threads()
    for n0 in range(0, N, band):
        rows_ = min(band, N - n0)
        b = buf[:rows_]
        lib.dsc_fp8_dequant(w[n0].data_ptr(), w_scale[n0 // 128].data_ptr(), b.data_ptr(), rows_, K, 128,
                            w_scale.shape[1], threads)  # fmt: skip
        y[:, n0 : n0 + rows_] = x @ b.T
    return y


def act_quant(x: Tensor) -> tuple[Tensor, Tensor]:
    """fp32 x (..., K) -> (e4m3 (..., K), fp32 scales (..., ceil(K / 128))): ``act_quant_ref`` with fp32
    scales, bit for bit, in one pass over the rows."""
    K = x.shape[-1]
    flat = x.reshape(-1, K).float().contiguous()
    q = torch.empty(flat.shape, dtype=torch.float8_e4m3fn)
    s = torch.empty(flat.shape[0], -(-K // 128), dtype=torch.float32)
    library().dsc_act_quant(flat.data_ptr(), flat.shape[0], K, K, q.data_ptr(), s.data_ptr())
    return q.view(x.shape), s.view(*x.shape[:-1], s.shape[-1])


def rows(x: Tensor, w: Tensor, w_scale: Tensor) -> Tensor:
    """fp32 x (M, K) against e4m3 w (N, K) with 128x128 block scales -> fp32 (M, N): the sum of
    each 128-wide K block scaled by its block scale, as ``fp8_linear`` specifies."""
    x, w, w_scale = x.float().contiguous(), w.contiguous(), w_scale.float().contiguous()
    (M, K), N = x.shape, w.shape[0]
    y = torch.empty(M, N, dtype=torch.float32)
    library().dsc_fp8_rows(
        x.data_ptr(), M, K, w.data_ptr(), w_scale.data_ptr(), y.data_ptr(), N, N, K, torch.get_num_threads()
    )
    return y


def rows_heads(x: Tensor, w: Tensor, w_scale: Tensor) -> Tensor:
    """Per head: fp32 x (M, H, K) against e4m3 w (H, N, K) with its per-head block scales -> (M, H, N)."""
    x, w, w_scale = x.float().contiguous(), w.contiguous(), w_scale.float().contiguous()
    (M, H, K), N = x.shape, w.shape[1]
    y = torch.empty(M, H, N, dtype=torch.float32)
    library().dsc_fp8_rows_heads(
        x.data_ptr(), M, H, w.data_ptr(), w_scale.data_ptr(), y.data_ptr(), N, K, torch.get_num_threads()
    )
    return y


def indexer_topk(q: Tensor, w: Tensor, keys: Tensor, limit: Tensor, topk: int) -> Tensor:
    """``dsc::indexer_topk`` on fp32 q (B, S, H, D), w (B, S, H), keys (B, T, D) (each key contiguous):
    the selected sets of the reference, in increasing token order, -1 padded."""
    B, S, H, D = q.shape
    T = keys.shape[1]
    q, w, limit = q.contiguous(), w.contiguous(), limit.to(torch.int64).contiguous()
    out = torch.empty(B, S, topk, dtype=torch.int64)
    library().dsc_indexer_topk(q.data_ptr(), w.data_ptr(), keys.data_ptr(), limit.data_ptr(), B, S, H, D, T,
                               keys.stride(0), keys.stride(1), topk, out.data_ptr())  # fmt: skip
    return out


def sparse_mla(q_abs: Tensor, q_pe: Tensor, latent: Tensor, rope: Tensor, indices: Tensor, scale: float) -> Tensor:
    """``dsc::sparse_mla`` on fp32 inputs (each cached row contiguous) -> fp32 (B, S, H, dc)."""
    B, S, H, dc = q_abs.shape
    T, dr, K = latent.shape[1], rope.shape[-1], indices.shape[-1]
    qa, qp, idx = q_abs.contiguous(), q_pe.contiguous(), indices.contiguous()
    out = torch.empty(B, S, H, dc, dtype=torch.float32)
    bad = library().dsc_sparse_mla(
        qa.data_ptr(), qp.data_ptr(), latent.data_ptr(), latent.stride(0), latent.stride(1), rope.data_ptr(),
        rope.stride(0), rope.stride(1), idx.data_ptr(), B, S, H, dc, dr, T, K, scale, out.data_ptr(),
    )  # fmt: skip
    if bad:
        raise IndexError(f"sparse_mla: {bad} selected indices are past the {T} cached tokens")
    return out


def moe_rows(x: Tensor, idx: Tensor, wts: Tensor, gate_w, up_w, down_w) -> Tensor | None:
    """``dsc::moe_experts`` for a few fp32 tokens x (N, D) in one call; None where a routed expert's
    weights are not contiguous fp32 (the caller's torch path takes those)."""
    N, D = x.shape
    K = idx.shape[1]
    experts = [e for row in idx.tolist() for e in row]
    ws = [(gate_w[e], up_w[e], down_w[e]) for e in experts]
    if not all(t.dtype == torch.float32 and t.is_contiguous() and t.device.type == "cpu" for w in ws for t in w):
        return None
    x, idx, wts = x.contiguous(), idx.contiguous(), wts.float().contiguous()
    y = torch.empty(N, D, dtype=torch.float32)
    slots = ctypes.c_void_p * (N * K)
    library().dsc_moe_rows(
        x.data_ptr(), N, D, ws[0][0].shape[0], K, idx.data_ptr(), wts.data_ptr(),
        slots(*[w[0].data_ptr() for w in ws]), slots(*[w[1].data_ptr() for w in ws]),
        slots(*[w[2].data_ptr() for w in ws]), y.data_ptr(),
    )  # fmt: skip
    return y


def f32_rows(x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    """fp32 x (M, K) (rows contiguous) · w (N, K)ᵀ (+ b) -> (M, N), the weight read once for all M rows;
    on torch's threads only where the weight is large enough to pay for waking them."""
    (M, K), N = x.shape, w.shape[0]
    y = torch.empty(M, N, dtype=torch.float32)
    threads = torch.get_num_threads() if N * K >= F32_THREADED else 1
    library().dsc_f32_rows(
        x.data_ptr(), M, x.stride(0), K, w.data_ptr(), None if b is None else b.data_ptr(), y.data_ptr(), N, threads
    )
    return y
