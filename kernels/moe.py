"""``dsc::moe_experts`` — routed-expert SwiGLU mixture for a fixed top-k routing.

    y[n] = Σ_i wts[n, i] · down_{e}( silu(gate_{e} x[n]) ⊙ up_{e} x[n] ),   e = idx[n, i]

x: (N, D) float; idx: (N, K) int64 expert ids; wts: (N, K) float mixture weights (already
renormalised and scaled); gate_w/up_w: E tensors (F, D); down_w: E tensors (D, F). Returns (N, D).

A registered op gives the model a static-shape, exportable MoE: the data-dependent dispatch
(which tokens go to which expert) lives inside the op, not in Python control flow of the graph.
``moe_experts_ref`` is the specification (dense: every expert on every token, weighted by a
scattered combine matrix); the CPU implementation gathers only each expert's tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from dsc.kernels.registry import custom_op
from torch import Tensor


def moe_experts_ref(x: Tensor, idx: Tensor, wts: Tensor, gate_w, up_w, down_w) -> Tensor:
    combine = torch.zeros(x.shape[0], len(gate_w), dtype=x.dtype, device=x.device)
    combine = combine.scatter_add(1, idx, wts.to(x.dtype))  # (N, E); functional: it is also the decomposition
    y = torch.zeros_like(x)
    for e, (g, u, d) in enumerate(zip(gate_w, up_w, down_w)):
        y = y + combine[:, e : e + 1] * (F.silu(x @ g.T) * (x @ u.T)) @ d.T
    return y


FEW_TOKENS = 4  # decode and verify steps: token by token, straight from the routing


def _one_token(x: Tensor, idx: Tensor, wts: Tensor, gate_w, up_w, down_w) -> Tensor:
    """The same sum for one token (a decode step): its experts in one read of the routing, no
    sort, gather or scatter."""
    w = wts.to(x.dtype)
    y = torch.zeros_like(x)
    for i, e in sorted(enumerate(idx[0].tolist()), key=lambda p: p[1]):  # experts in order, as below
        y += (F.silu(x @ gate_w[e].T) * (x @ up_w[e].T)) @ down_w[e].T * w[:, i : i + 1]
    return y


@custom_op("dsc::moe_experts")
def moe_experts(
    x: Tensor, idx: Tensor, wts: Tensor, gate_w: list[Tensor], up_w: list[Tensor], down_w: list[Tensor]
) -> Tensor:
    if x.shape[0] <= FEW_TOKENS:
        return torch.cat([_one_token(x[n : n + 1], idx[n : n + 1], wts[n : n + 1], gate_w, up_w, down_w)
                          for n in range(x.shape[0])])  # fmt: skip
    y = torch.zeros_like(x)
    flat = idx.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=len(gate_w)).tolist()
    token_of = order // idx.shape[1]  # (N*K,) token of each sorted slot
    w_sorted = wts.reshape(-1)[order].to(x.dtype)
    start = 0
    for e, c in enumerate(counts):
        if c == 0:
            continue
        rows = token_of[start : start + c]
        xe = x.index_select(0, rows)
        h = F.silu(xe @ gate_w[e].T) * (xe @ up_w[e].T)
        y.index_add_(0, rows, (h @ down_w[e].T) * w_sorted[start : start + c, None])
        start += c
    return y


@moe_experts.register_fake
def _(x, idx, wts, gate_w, up_w, down_w):
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
