"""Straightforward re-statements of the spec's formulas, written independently of dsc.model:
explicit loops over heads and tokens, complex-number RoPE, Hadamard from its bit formula."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def rope_complex(x, theta, interleaved):
    """x (..., r), theta (..., r/2) -> rotated x."""
    r = x.shape[-1]
    if interleaved:
        re, im = x[..., 0::2], x[..., 1::2]
    else:
        re, im = x[..., : r // 2], x[..., r // 2 :]
    z = torch.complex(re.double(), im.double()) * torch.polar(
        torch.ones_like(theta, dtype=torch.float64), theta.double()
    )
    if interleaved:
        return torch.stack((z.real, z.imag), -1).flatten(-2).float()
    return torch.cat((z.real, z.imag), -1).float()


def hadamard(n):
    i = torch.arange(n)
    bits = torch.tensor([[bin(a & b).count("1") % 2 for b in range(n)] for a in range(n)])
    return (1 - 2 * bits).float() / math.sqrt(n) + 0 * i[:1]


def rms(x, w, eps):
    return w * x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps)


def angles(cfg, inv_freq, S):
    return torch.arange(S).double()[:, None] * inv_freq.double()[None]  # (S, r/2)


def indexer_scores(idx, cfg, x, qr, theta):
    """I (S, T=S) for one sequence: I[t,s] = Σ_h w[t,h] ReLU(q̃[t,h]·k̃[s]) with w = weights_proj(x)/sqrt(H d)."""
    S = x.shape[0]
    H, d, r = cfg.index_n_heads, cfg.index_head_dim, cfg.qk_rope_head_dim
    Hd = hadamard(d)
    q = (qr @ idx.wq_b.weight.T).view(S, H, d)
    q = torch.cat((rope_complex(q[..., :r], theta[:, None, :], False), q[..., r:]), -1) @ Hd
    k = F.layer_norm(x @ idx.wk.weight.T, (d,), idx.k_norm.weight, idx.k_norm.bias, cfg.rms_norm_eps)
    k = torch.cat((rope_complex(k[:, :r], theta, False), k[:, r:]), -1) @ Hd
    w = (x @ idx.weights_proj.weight.T) / math.sqrt(H * d)
    out = torch.zeros(S, S)
    for t in range(S):
        for h in range(H):
            out[t] += w[t, h] * torch.relu(k @ q[t, h])
    return out


def topk_mask(scores, k):
    """Causal top-min(k, t+1) selection per query row, ties to the earlier token."""
    S = scores.shape[0]
    sel = torch.zeros(S, S, dtype=torch.bool)
    for t in range(S):
        vis = scores[t, : t + 1]
        order = sorted(range(t + 1), key=lambda s: (-vis[s].item(), s))
        sel[t, order[: min(k, t + 1)]] = True
    return sel


def mla(attn, cfg, x, theta, selected):
    """Naive MLA for one sequence at positions 0..S-1 with a boolean (S, S) selection."""
    S = x.shape[0]
    H, dn, dr, dv, dc = (
        cfg.num_attention_heads,
        cfg.qk_nope_head_dim,
        cfg.qk_rope_head_dim,
        cfg.v_head_dim,
        cfg.kv_lora_rank,
    )
    qr = rms(x @ attn.q_a_proj.weight.T, attn.q_a_layernorm.weight, cfg.rms_norm_eps)
    q = (qr @ attn.q_b_proj.weight.T).view(S, H, dn + dr)
    kv = x @ attn.kv_a_proj_with_mqa.weight.T
    c = rms(kv[:, :dc], attn.kv_a_layernorm.weight, cfg.rms_norm_eps)
    k_pe = rope_complex(kv[:, dc:], theta, True)
    W = attn.kv_b_proj.weight.view(H, dn + dv, dc)
    out = torch.zeros(S, H, dv)
    for h in range(H):
        qh = torch.cat((q[:, h, :dn], rope_complex(q[:, h, dn:], theta, True)), -1)
        kh = torch.cat((c @ W[h, :dn].T, k_pe), -1)
        vh = c @ W[h, dn:].T
        s = (qh @ kh.T) * cfg.softmax_scale
        s = s.masked_fill(~selected, float("-inf"))
        out[:, h] = s.softmax(-1) @ vh
    return out.reshape(S, H * dv) @ attn.o_proj.weight.T, qr


def route(gate, cfg, x):
    """Per-token Python routing: (ids, weights) lists, spec §6."""
    E, G = cfg.n_routed_experts, cfg.n_group
    res = []
    for n in range(x.shape[0]):
        s = torch.sigmoid(gate.weight @ x[n])
        b = s + gate.e_score_correction_bias
        per = E // G
        gscore = [sorted(b[g * per : (g + 1) * per].tolist(), reverse=True)[:2] for g in range(G)]
        gscore = [sum(v) for v in gscore]
        kept = sorted(range(G), key=lambda g: -gscore[g])[: cfg.topk_group]
        cand = [e for e in range(E) if e // per in kept]
        ids = sorted(cand, key=lambda e: -b[e].item())[: cfg.num_experts_per_tok]
        w = torch.stack([s[e] for e in ids])
        res.append((ids, (w / w.sum() * cfg.routed_scaling_factor).tolist()))
    return res
