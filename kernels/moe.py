"""``dsc::moe_experts`` — routed-expert SwiGLU mixture for a fixed top-k routing.

    y[n] = Σ_i wts[n, i] · down_{e}( silu(gate_{e} x[n]) ⊙ up_{e} x[n] ),   e = idx[n, i]

x: (N, D) float; idx: (N, K) int64 expert ids; wts: (N, K) float mixture weights (already
renormalised and scaled); gate_w/up_w: E tensors (F, D); down_w: E tensors (D, F). Returns (N, D).

A registered op gives the model a static-shape, exportable MoE: the data-dependent dispatch
(which tokens go to which expert) lives inside the op, not in Python control flow of the graph.
``moe_experts_ref`` is the specification (dense: every expert on every token, weighted by a
scattered combine matrix); the CPU implementation gathers only each expert's tokens.
``dsc::moe_experts_fp8`` is the same mixture on e4m3 expert weights (what ``lower_fp8`` makes).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from dsc.kernels import fp8, native
from dsc.kernels.registry import custom_op
from dsc.kernels.triton_utils import HAVE_TRITON
from torch import Tensor


def _combine(x: Tensor, idx: Tensor, wts: Tensor, n_experts: int) -> Tensor:
    """(N, E): each token's mixture weight for each expert, 0 where not routed."""
    combine = torch.zeros(x.shape[0], n_experts, dtype=x.dtype, device=x.device)
    return combine.scatter_add(1, idx, wts.to(x.dtype))  # functional: it is also the decomposition


def moe_experts_ref(x: Tensor, idx: Tensor, wts: Tensor, gate_w, up_w, down_w) -> Tensor:
    combine = _combine(x, idx, wts, len(gate_w))
    y = torch.zeros_like(x)
    for e, (g, u, d) in enumerate(zip(gate_w, up_w, down_w)):
        y = y + combine[:, e : e + 1] * (F.silu(x @ g.T) * (x @ u.T)) @ d.T
    return y


FEW_TOKENS = 4  # decode and verify steps: token by token, straight from the routing
USE_NATIVE = True  # fp32 decode steps through moe_cpu.c where it can be built (kernels/native.py)


def _dispatch(x: Tensor, idx: Tensor, wts: Tensor, n_experts: int, ffn) -> Tensor:
    """Σ_i wts[n, i] · ffn(e, x[n]) over each token's routed experts e = idx[n, i], computing each
    expert once on the tokens routed to it. ``ffn(e, rows)`` -> (len(rows), D)."""
    if x.shape[0] <= FEW_TOKENS:  # a decode step: its experts in one read of the routing, no sort or scatter
        y = torch.zeros_like(x)
        w = wts.to(x.dtype)
        for n in range(x.shape[0]):
            for i, e in sorted(enumerate(idx[n].tolist()), key=lambda p: p[1]):  # experts in order, as below
                y[n : n + 1] += ffn(e, x[n : n + 1]) * w[n : n + 1, i : i + 1]
        return y
    y = torch.zeros_like(x)
    flat = idx.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=n_experts).tolist()
    token_of = order // idx.shape[1]  # (N*K,) token of each sorted slot
    w_sorted = wts.reshape(-1)[order].to(x.dtype)
    start = 0
    for e, c in enumerate(counts):
        if c == 0:
            continue
        rows = token_of[start : start + c]
        y.index_add_(0, rows, ffn(e, x.index_select(0, rows)) * w_sorted[start : start + c, None])
        start += c
    return y


@custom_op("dsc::moe_experts")
def moe_experts(
    x: Tensor, idx: Tensor, wts: Tensor, gate_w: list[Tensor], up_w: list[Tensor], down_w: list[Tensor]
) -> Tensor:
    if x.shape[0] <= FEW_TOKENS and x.dtype == torch.float32 and USE_NATIVE and native.usable(x):
        y = native.moe_rows(x, idx, wts, gate_w, up_w, down_w)  # one call instead of ~20 ATen calls an expert
        if y is not None:
            return y

    def ffn(e: int, xe: Tensor) -> Tensor:
        return (F.silu(xe @ gate_w[e].T) * (xe @ up_w[e].T)) @ down_w[e].T

    return _dispatch(x, idx, wts, len(gate_w), ffn)


@moe_experts.register_fake
def _(x, idx, wts, gate_w, up_w, down_w):
    return torch.empty_like(x)


def _fp8_ffn(weights, act_quant: bool, ue8m0: bool, linear, quant):
    """ffn(e, rows) of e4m3 experts with 128x128 block scales: each of the three matmuls is
    ``fp8_linear``, its input quantised per token in 1x128 groups first (W8A8; gate and up share
    one quantisation of x) or not (W8A16)."""
    gate_q, up_q, down_q, gate_s, up_s, down_s = weights

    def ffn(e: int, xe: Tensor) -> Tensor:
        a = quant(xe, 128, ue8m0) if act_quant else (xe, None)
        h = F.silu(linear(*a, gate_q[e], gate_s[e])) * linear(*a, up_q[e], up_s[e])
        b = quant(h, 128, ue8m0) if act_quant else (h, None)
        return linear(*b, down_q[e], down_s[e]).to(xe.dtype)

    return ffn


def moe_experts_fp8_ref(x, idx, wts, gate_w, up_w, down_w, gate_s, up_s, down_s, act_quant=True, ue8m0=False):
    """The specification: the mixture of ``moe_experts_ref`` with every expert matmul an ``fp8_linear``."""
    ffn = _fp8_ffn((gate_w, up_w, down_w, gate_s, up_s, down_s), act_quant, ue8m0,
                   fp8.fp8_linear_decomposed, fp8.act_quant_ref)  # fmt: skip
    combine = _combine(x, idx, wts, len(gate_w))
    y = torch.zeros_like(x)
    for e in range(len(gate_w)):
        y = y + combine[:, e : e + 1] * ffn(e, x)
    return y


@custom_op("dsc::moe_experts_fp8")
def moe_experts_fp8(
    x: Tensor, idx: Tensor, wts: Tensor, gate_w: list[Tensor], up_w: list[Tensor], down_w: list[Tensor],
    gate_s: list[Tensor], up_s: list[Tensor], down_s: list[Tensor], act_quant: bool = True, ue8m0: bool = False,
) -> Tensor:  # fmt: skip
    """``moe_experts`` on e4m3 expert weights (``lower_fp8``): gate_w / up_w (F, D) and down_w (D, F)
    e4m3, each with its (ceil(rows/128), ceil(cols/128)) fp32 block scales; ``act_quant``: W8A8 (the
    activations in e4m3 too, as deployed) or W8A16. Each expert runs on its own tokens only."""
    ffn = _fp8_ffn((gate_w, up_w, down_w, gate_s, up_s, down_s), act_quant, ue8m0,
                   fp8.fp8_linear_cpu, fp8.act_quant_cpu)  # fmt: skip
    return _dispatch(x, idx, wts, len(gate_w), ffn)


@moe_experts_fp8.register_kernel("cuda")
def _(x, idx, wts, gate_w, up_w, down_w, gate_s, up_s, down_s, act_quant=True, ue8m0=False):
    fns = (
        (fp8.fp8_linear_triton, fp8.act_quant_triton) if HAVE_TRITON else (fp8.fp8_linear_decomposed, fp8.act_quant_ref)
    )
    ffn = _fp8_ffn((gate_w, up_w, down_w, gate_s, up_s, down_s), act_quant, ue8m0, *fns)
    return _dispatch(x, idx, wts, len(gate_w), ffn)


@moe_experts_fp8.register_fake
def _(x, idx, wts, gate_w, up_w, down_w, gate_s, up_s, down_s, act_quant=True, ue8m0=False):
    return torch.empty_like(x)


def _setup_context(ctx, inputs, output):
    x, idx, wts, gate_w, up_w, down_w = inputs
    ctx.save_for_backward(x, idx, wts, *gate_w, *up_w, *down_w)
    ctx.n_experts = len(gate_w)


def _backward(ctx, grad):
    # Training (the demo model) differentiates through the dense reference; its gradients are the
    # op's gradients by definition.
    x, idx, wts, *ws = ctx.saved_tensors
    E = ctx.n_experts
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_(t.requires_grad or t.is_floating_point()) for t in (x, wts, *ws)]
        xl, wl, *wsl = leaves
        y = moe_experts_ref(xl, idx, wl, wsl[:E], wsl[E : 2 * E], wsl[2 * E :])
        grads = torch.autograd.grad(y, leaves, grad, allow_unused=True)
    gx, gw, *gws = grads
    return gx, None, gw, list(gws[:E]), list(gws[E : 2 * E]), list(gws[2 * E :])


moe_experts.register_autograd(_backward, setup_context=_setup_context)
