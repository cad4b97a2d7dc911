"""FP8 matmuls as DeepSeek deploys them (spec §7): ``dsc::act_quant`` (activations per token in
groups of 128) and ``dsc::fp8_linear`` (e4m3 weights with one fp32 scale per 128x128 block).

    act_quant:  s[m, g] = max(|x[m, 128g : 128g + 128]|, 1e-4) / 448   (a power of two, rounded up, with ue8m0)
                xq[m, k] = e4m3(clamp(x[m, k] / s[m, k // 128], ±448))
    fp8_linear: y[m, n] = Σ_kb (Σ_{k in kb} xq[m, k] · wq[n, k]) · s[m, kb] · ws[n // 128, kb]  (+ bias)
                — each 128-wide K block's partial product in fp32, scaled, accumulated in fp32 (W8A8);
                y = x · (wq ⊙ ws)ᵀ with the activations in high precision (W8A16, ``x_scale`` None)

Ragged edges: a last K group shorter than 128 has its own scale; weight blocks past the edge are
padded as the checkpoint format says (``dsc.model.fp8``). The references are the specification and
``fp8_linear_decomposed`` — one fp32 matmul over the dequantised operands (the block scales factor
out of each K block exactly in real arithmetic: fp32 re-association) — is what the exporters lower
``fp8_linear`` with, and the CPU path where the native kernel (``kernels/native.py``) is missing.
"""

from __future__ import annotations

import math

import torch
from dsc.kernels import native
from dsc.kernels.registry import custom_op
from dsc.kernels.triton_utils import HAVE_TRITON, cuda_kernel, interpret_mode, tl, triton
from torch import Tensor

BLOCK = 128
FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0


def _groups(x: Tensor, block: int) -> tuple[Tensor, int]:
    """x (..., K) zero-padded to (..., G, block), G = ceil(K / block)."""
    K = x.shape[-1]
    G = math.ceil(K / block)
    if G * block != K:
        x = torch.nn.functional.pad(x, (0, G * block - K))
    return x.unflatten(-1, (G, block)), K


def act_quant_ref(x: Tensor, block: int = BLOCK, ue8m0: bool = False) -> tuple[Tensor, Tensor]:
    """x (..., K) -> (e4m3 (..., K), fp32 scales (..., ceil(K / block)))."""
    g, K = _groups(x.float(), block)
    s = g.abs().amax(-1).clamp_min(1e-4) / FP8_MAX
    if ue8m0:
        s = torch.exp2(torch.ceil(torch.log2(s)))
    q = (g / s.unsqueeze(-1)).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q.flatten(-2)[..., :K], s


def _expand_w_scale(w_scale: Tensor, N: int, K: int, block: int = BLOCK) -> Tensor:
    """([H,] ceil(N / block), ceil(K / block)) -> ([H,] N, K): each weight's block scale."""
    return w_scale.float().repeat_interleave(block, -2)[..., :N, :].repeat_interleave(block, -1)[..., :K]


def _per_head(fn, x: Tensor, x_scale: Tensor | None, w: Tensor, w_scale: Tensor) -> Tensor:
    """A per-head weight (H, N, K) against x (..., H, K): fn on each head's (N, K), stacked -> (..., H, N)."""
    heads = [fn(x[..., h, :], None if x_scale is None else x_scale[..., h, :], w[h], w_scale[h], None)
             for h in range(w.shape[0])]  # fmt: skip
    return torch.stack(heads, -2)


def _expand_x_scale(x_scale: Tensor, K: int, block: int = BLOCK) -> Tensor:
    return x_scale.float().repeat_interleave(block, -1)[..., :K]


def fp8_linear_ref(x: Tensor, x_scale: Tensor | None, w: Tensor, w_scale: Tensor, bias: Tensor | None = None) -> Tensor:
    """The specification: per 128-wide K block, the fp32 product of the e4m3 operands times both
    scales, summed over the blocks in fp32. With ``x_scale`` None, x is the high-precision
    activation and only the weight is FP8 (W8A16). Returns fp32 (..., N). A weight (H, N, K) with
    scales (H, ceil(N/128), ceil(K/128)) is one such matmul per head h of x (..., H, K)."""
    if w.ndim == 3:
        return _per_head(fp8_linear_ref, x, x_scale, w, w_scale)
    N, K = w.shape
    if x_scale is None:
        y = x.float() @ (w.float() * _expand_w_scale(w_scale, N, K)).T
    else:
        xg, _ = _groups(x.float(), BLOCK)  # (..., G, 128)
        wg, _ = _groups(w.float(), BLOCK)  # (N, G, 128)
        partial = torch.einsum("...gk,ngk->...gn", xg, wg)  # each K block's fp32 product
        ws = w_scale.float().repeat_interleave(BLOCK, 0)[:N].T  # (G, N)
        y = (partial * x_scale.float().unsqueeze(-1) * ws).sum(-2)
    return y + bias.float() if bias is not None else y


def fp8_linear_decomposed(
    x: Tensor, x_scale: Tensor | None, w: Tensor, w_scale: Tensor, bias: Tensor | None = None
) -> Tensor:
    """The exporters' ATen form: one matmul of the dequantised operands (the block scales factor out
    of each K block), so a long prompt never materialises the per-block partial products."""
    N, K = w.shape[-2:]
    xf = x.float() if x_scale is None else x.float() * _expand_x_scale(x_scale, K)
    wf = w.float() * _expand_w_scale(w_scale, N, K)
    if w.ndim == 3:  # per head: (..., H, 1, K) @ (H, K, N)
        return (xf.unsqueeze(-2) @ wf.transpose(-1, -2)).squeeze(-2)
    y = xf @ wf.T
    return y + bias.float() if bias is not None else y


def act_quant_cpu(x: Tensor, block: int = BLOCK, ue8m0: bool = False) -> tuple[Tensor, Tensor]:
    """``act_quant`` on this CPU: the native kernel (fp32 scales), else the reference."""
    if block == BLOCK and not ue8m0 and x.numel() and native.usable(x):
        return native.act_quant(x)
    return act_quant_ref(x, block, ue8m0)


def fp8_linear_cpu(x: Tensor, x_scale: Tensor | None, w: Tensor, w_scale: Tensor, bias: Tensor | None = None) -> Tensor:
    """``fp8_linear`` on this CPU: the e4m3 weight widened inside the dot product for up to
    ``native.ROWS_MAX`` rows (decode, verify), dequantised a cache-sized band at a time into a GEMM
    for longer prompts; W8A8 activations dequantised exactly first. Without the native kernel (see
    ``kernels/native.py``), the decomposition: the same numbers up to fp32 re-association."""
    if not native.usable(x, w):
        return fp8_linear_decomposed(x, x_scale, w, w_scale, bias)
    N, K = w.shape[-2:]
    flat = x.reshape(-1, K)
    xf = flat.float() if x_scale is None else native.dequant(flat, x_scale.reshape(-1, x_scale.shape[-1]), 1)
    if w.ndim == 3:  # per head: x (..., H, K)
        H = w.shape[0]
        xf = xf.view(-1, H, K)
        if xf.shape[0] <= native.ROWS_MAX:
            return native.rows_heads(xf, w, w_scale).view(*x.shape[:-1], N)
        return torch.stack([native.matmul(xf[:, h], w[h], w_scale[h]) for h in range(H)], 1).view(*x.shape[:-1], N)
    y = native.rows(xf, w, w_scale) if xf.shape[0] <= native.ROWS_MAX else native.matmul(xf, w, w_scale)
    if bias is not None:
        y = y + bias.float()
    return y.reshape(*x.shape[:-1], N)


def fp8_linear_gathered_ref(x: Tensor, x_scale: Tensor | None, ids: Tensor, w: Tensor, w_scale: Tensor) -> Tensor:
    """Row r of x (R, K) through expert ids[r]'s e4m3 weight w[ids[r]] (E, N, K), scales (E, N/128, K/128):
    the specification, and the exporters' ATen form (every row's weight dequantised and gathered)."""
    N, K = w.shape[-2:]
    xf = x.float() if x_scale is None else x.float() * _expand_x_scale(x_scale, K)
    wf = (w.float() * _expand_w_scale(w_scale, N, K))[ids]
    return torch.bmm(wf, xf.unsqueeze(-1)).squeeze(-1)


def fp8_linear_gathered_cpu(x: Tensor, x_scale: Tensor | None, ids: Tensor, w: Tensor, w_scale: Tensor,
                            linear=None) -> Tensor:  # fmt: skip
    """The rows grouped by expert, each group one ``fp8_linear`` (``linear``, default this CPU's) of its
    expert's weight."""
    linear = linear or fp8_linear_cpu
    y = torch.empty(x.shape[0], w.shape[1], dtype=torch.float32, device=x.device)
    order = torch.argsort(ids, stable=True)
    counts = torch.bincount(ids, minlength=w.shape[0]).tolist()
    start = 0
    for e, c in enumerate(counts):
        if c:
            rows = order[start : start + c]
            xs = None if x_scale is None else x_scale.index_select(0, rows)
            y.index_copy_(0, rows, linear(x.index_select(0, rows), xs, w[e], w_scale[e]))
            start += c
    return y


@custom_op("dsc::fp8_linear_gathered")
def fp8_linear_gathered(x: Tensor, x_scale: Tensor | None, ids: Tensor, w: Tensor, w_scale: Tensor) -> Tensor:
    """x (R, K) (e4m3 with ``x_scale`` (R, ceil(K/128)) for W8A8, or high precision), ids (R,) int64 into
    the E experts of w (E, N, K) e4m3 with w_scale (E, ceil(N/128), ceil(K/128)) -> fp32 (R, N): what
    ``lower_fp8`` makes of ``bmm(W[ids], x[..., None])`` (transformers' batched experts)."""
    return fp8_linear_gathered_cpu(x, x_scale, ids, w, w_scale)


@fp8_linear_gathered.register_fake
def _(x, x_scale, ids, w, w_scale):
    return x.new_empty((x.shape[0], w.shape[1]), dtype=torch.float32)


@custom_op("dsc::act_quant")
def act_quant(x: Tensor, block: int = BLOCK, ue8m0: bool = False) -> tuple[Tensor, Tensor]:
    """Activations (..., K) -> (e4m3 (..., K), fp32 scales (..., ceil(K / block)))."""
    return act_quant_cpu(x, block, ue8m0)


@act_quant.register_fake
def _(x, block=BLOCK, ue8m0=False):
    G = math.ceil(x.shape[-1] / block)
    return x.new_empty(x.shape, dtype=FP8), x.new_empty((*x.shape[:-1], G), dtype=torch.float32)


@custom_op("dsc::fp8_linear")
def fp8_linear(x: Tensor, x_scale: Tensor | None, w: Tensor, w_scale: Tensor, bias: Tensor | None = None) -> Tensor:
    """x (..., K) e4m3 with ``x_scale`` (..., ceil(K/128)) from ``act_quant`` (W8A8), or a high-precision
    x with ``x_scale`` None (W8A16); w (N, K) e4m3, w_scale (ceil(N/128), ceil(K/128)) -> fp32 (..., N).
    Per head (absorbed MLA's W_UK / W_UV): w (H, N, K), w_scale (H, ceil(N/128), ceil(K/128)), x
    (..., H, K) -> (..., H, N), no bias."""
    return fp8_linear_cpu(x, x_scale, w, w_scale, bias)


@fp8_linear.register_fake
def _(x, x_scale, w, w_scale, bias=None):
    return x.new_empty((*x.shape[:-1], w.shape[-2]), dtype=torch.float32)


# --- GPU: Triton kernels (the CPU interpreter, TRITON_INTERPRET=1, runs them in the tests) ---------

if HAVE_TRITON:

    @triton.jit
    def _act_quant_kernel(X, Q, S, K, G, UE8M0: tl.constexpr, BLOCK: tl.constexpr):
        row, g = tl.program_id(0), tl.program_id(1)
        offs = g * BLOCK + tl.arange(0, BLOCK)
        ok = offs < K
        x = tl.load(X + row * K + offs, mask=ok, other=0.0).to(tl.float32)
        s = tl.maximum(tl.max(tl.abs(x), axis=0), 1e-4) / 448.0
        if UE8M0:
            s = tl.exp2(tl.ceil(tl.log2(s)))
        q = tl.minimum(tl.maximum(x / s, -448.0), 448.0)
        tl.store(Q + row * K + offs, q.to(Q.dtype.element_ty), mask=ok)
        tl.store(S + row * G + g, s)

    @triton.jit
    def _fp8_matmul_kernel(
        X, XS, W, WS, Y, M, N, K, KB, stride_xm, stride_ym,
        HAS_XS: tl.constexpr, FP8_DOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):  # fmt: skip
        """y[m, n] = Σ_kb (Σ_{k in kb} x[m, k] w[n, k]) · xs[m, kb] · ws[n // 128, kb]: each 128-wide K
        block's product in fp32 (an FP8 tensor-core dot with ``FP8_DOT``), scaled, accumulated in fp32."""
        pid_m, pid_n = tl.program_id(0), tl.program_id(1)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        m_ok, n_ok = offs_m < M, offs_n < N
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for kb in range(0, KB):
            offs_k = kb * BLOCK_K + tl.arange(0, BLOCK_K)
            k_ok = offs_k < K
            x = tl.load(
                X + offs_m[:, None] * stride_xm + offs_k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0
            )
            w = tl.load(W + offs_n[:, None] * K + offs_k[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
            if FP8_DOT:
                part = tl.dot(x, tl.trans(w))
            else:  # fp32 operands (the values are e4m3's exactly; the interpreter's fp8 dot is not checked)
                part = tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)))
            ws = tl.load(WS + (offs_n // BLOCK_K) * KB + kb, mask=n_ok, other=0.0)
            if HAS_XS:
                xs = tl.load(XS + offs_m * KB + kb, mask=m_ok, other=0.0)
                part = part * xs[:, None]
            acc += part * ws[None, :]
        tl.store(Y + offs_m[:, None] * stride_ym + offs_n[None, :], acc, mask=m_ok[:, None] & n_ok[None, :])

    @triton.jit
    def _fp8_gemv_kernel(
        X, XS, W, WS, Y, M, N, K, KB, HAS_XS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr
    ):
        """The decode shape: one activation row against BLOCK_N weight rows, no tensor-core dot (a
        row is too thin for one): the weight streamed once, widened in registers."""
        m, pid_n = tl.program_id(0), tl.program_id(1)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        acc = tl.zeros([BLOCK_N], tl.float32)
        for kb in range(0, KB):
            offs_k = kb * BLOCK_K + tl.arange(0, BLOCK_K)
            k_ok = offs_k < K
            x = tl.load(X + m * K + offs_k, mask=k_ok, other=0.0).to(tl.float32)
            w = tl.load(W + offs_n[:, None] * K + offs_k[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
            part = tl.sum(w.to(tl.float32) * x[None, :], axis=1)
            if HAS_XS:
                part = part * tl.load(XS + m * KB + kb)
            acc += part * tl.load(WS + (offs_n // BLOCK_K) * KB + kb, mask=n_ok, other=0.0)
        tl.store(Y + m * N + offs_n, acc, mask=n_ok)


GEMV_ROWS = 4  # up to this many activation rows, the GEMV kernel (the weight read once a row)


def act_quant_triton(x: Tensor, block: int = BLOCK, ue8m0: bool = False) -> tuple[Tensor, Tensor]:
    assert HAVE_TRITON and block == BLOCK, "act_quant_triton: triton and 128-wide groups"
    K = x.shape[-1]
    flat = x.reshape(-1, K).contiguous()
    G = math.ceil(K / block)
    q = torch.empty(flat.shape, dtype=FP8, device=x.device)
    s = torch.empty(flat.shape[0], G, dtype=torch.float32, device=x.device)
    if flat.shape[0]:
        _act_quant_kernel[(flat.shape[0], G)](flat, q, s, K, G, UE8M0=ue8m0, BLOCK=block)
    return q.view(x.shape), s.view(*x.shape[:-1], G)


def fp8_linear_triton(x: Tensor, x_scale: Tensor | None, w: Tensor, w_scale: Tensor, bias: Tensor | None = None,
                      fp8_dot: bool | None = None) -> Tensor:  # fmt: skip
    """``fp8_linear`` by the Triton kernels: the GEMV for up to ``GEMV_ROWS`` rows, else the block-scaled
    GEMM (``fp8_dot``: FP8 tensor-core dots, default on a GPU for W8A8; fp32 dots of the same values in
    the interpreter)."""
    assert HAVE_TRITON, "triton is not installed (pip install 'dsc[gpu]')"
    if w.ndim == 3:
        return _per_head(fp8_linear_triton, x, x_scale, w, w_scale)
    N, K = w.shape
    KB = math.ceil(K / BLOCK)
    flat = x.reshape(-1, K).contiguous()
    xs = x_scale.reshape(-1, KB).float().contiguous() if x_scale is not None else flat
    M = flat.shape[0]
    y = torch.empty(M, N, dtype=torch.float32, device=x.device)
    ws = w_scale.float().contiguous()
    w = w.contiguous()
    if M <= GEMV_ROWS:
        _fp8_gemv_kernel[(M, triton.cdiv(N, 64))](flat, xs, w, ws, y, M, N, K, KB, HAS_XS=x_scale is not None,
                                                  BLOCK_N=64, BLOCK_K=BLOCK)  # fmt: skip
    elif M:
        if fp8_dot is None:
            fp8_dot = x_scale is not None and x.is_cuda and not interpret_mode()
        grid = (triton.cdiv(M, 64), triton.cdiv(N, 64))
        _fp8_matmul_kernel[grid](flat, xs, w, ws, y, M, N, K, KB, flat.stride(0), y.stride(0),
                                 HAS_XS=x_scale is not None, FP8_DOT=fp8_dot, BLOCK_M=64, BLOCK_N=64,
                                 BLOCK_K=BLOCK)  # fmt: skip
    if bias is not None:
        y = y + bias.float()
    return y.view(*x.shape[:-1], N)


cuda_kernel(act_quant, "act_quant", act_quant_triton, act_quant_ref)
cuda_kernel(
    fp8_linear_gathered, "fp8_linear_gathered",
    lambda x, x_scale, ids, w, w_scale: fp8_linear_gathered_cpu(x, x_scale, ids, w, w_scale, linear=fp8_linear_triton),
    fp8_linear_gathered_ref,
)  # fmt: skip
cuda_kernel(fp8_linear, "fp8_linear", fp8_linear_triton, fp8_linear_decomposed)
