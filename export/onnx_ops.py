"""ONNX translations of the ``dsc::`` ops (and of the ATen ops torch's exporter has none for), built
from standard operators at opset 23, for ``torch.onnx.export(..., custom_translation_table=TABLE)``.

Each function receives the op's arguments as the exporter traces them (tensors as graph values,
scalars as Python numbers, an absent optional tensor as None) and returns the op's outputs. Each
follows its op's reference (``dsc.kernels``) formula by formula; ``FUSION`` says, op by op, what a
translation keeps of the fused implementation and what it gives up, for the export report.
"""

from __future__ import annotations

import math

import onnx_ir as ir
import torch
from onnxscript import opset23 as op

FLOAT, INT64, BOOL, E4M3 = ir.DataType.FLOAT, ir.DataType.INT64, ir.DataType.BOOL, ir.DataType.FLOAT8E4M3FN
NEG_INF = float("-inf")
FP8_MAX = 448.0


def _i64(*v: int):
    return op.Constant(value_ints=list(v))


def _f(x: float):
    return op.Constant(value_float=float(x))


def _dim(x, axis: int):
    """x.shape[axis] as a 1-D int64 tensor."""
    return op.Shape(x, start=axis, end=axis + 1 if axis != -1 else None)


def _static(x, axis: int) -> int | None:
    d = x.shape[axis] if x.shape is not None else None
    return d if isinstance(d, int) else None


# ---- aten ops the exporter has no translation for -----------------------------------------------
def sort_stable(x, stable: bool | None = None, dim: int = -1, descending: bool = False):
    """A stable sort is TopK over the whole axis: ONNX TopK breaks ties toward the lower index, which
    is what ``stable=True`` means in both directions."""
    vals, idx = op.TopK(x, _dim(x, dim), axis=dim, largest=1 if descending else 0, sorted=1)
    return vals, idx


def einsum(equation: str, tensors):
    """A two-operand einsum as one batched MatMul between Transposes and Reshapes, the form
    onnxruntime and TensorRT run fastest (onnxruntime's CPU Einsum re-lays out its operands on every
    call: an absorbed MLA decode step spent a third of its time there). Other equations stay Einsum."""
    ins, out = equation.replace(" ", "").split("->") if "->" in equation else (equation, None)
    labels = ins.split(",")
    if len(tensors) != 2 or out is None or "." in equation or any(len(set(x)) != len(x) for x in [*labels, out]):
        return op.Einsum(*tensors, equation=equation)
    (la, lb), (a, b) = labels, tensors
    a, la = _sum_alone(a, la, lb, out)  # a label of one operand alone that the output drops: summed first
    b, lb = _sum_alone(b, lb, la, out)
    batch = [c for c in out if c in la and c in lb]
    contract = [c for c in la if c in lb and c not in out]
    a_only, b_only = [c for c in la if c not in lb], [c for c in lb if c not in la]

    def size(c):  # a label's size as a 1-D int64 tensor (batch labels broadcast)
        da = _dim(a, la.index(c)) if c in la else None
        db = _dim(b, lb.index(c)) if c in lb else None
        return db if da is None else da if db is None else op.Max(da, db)

    def prod(cs):
        return _i64(1) if not cs else op.ReduceProd(op.Concat(*[size(c) for c in cs], axis=0), keepdims=1)

    batch_dims = [size(c) for c in batch]
    a2 = op.Reshape(op.Transpose(a, perm=[la.index(c) for c in batch + a_only + contract]),
                    op.Concat(*[_dim(a, la.index(c)) for c in batch], prod(a_only), prod(contract), axis=0))  # fmt: skip
    b2 = op.Reshape(op.Transpose(b, perm=[lb.index(c) for c in batch + contract + b_only]),
                    op.Concat(*[_dim(b, lb.index(c)) for c in batch], prod(contract), prod(b_only), axis=0))  # fmt: skip
    y = op.MatMul(a2, b2)  # (batch..., |a_only|, |b_only|)
    order = batch + a_only + b_only
    dims = [*batch_dims, *[size(c) for c in a_only + b_only]]
    y = op.Reshape(y, op.Concat(*dims, axis=0) if dims else op.Constant(value_ints=[]))  # no dims: a scalar
    return op.Transpose(y, perm=[order.index(c) for c in out]) if order != list(out) else y


def _sum_alone(x, lx: str, other: str, out: str):
    gone = [i for i, c in enumerate(lx) if c not in other and c not in out]
    if not gone:
        return x, lx
    return op.ReduceSum(x, _i64(*gone), keepdims=0), "".join(c for i, c in enumerate(lx) if i not in gone)


# ---- dsc ops -----------------------------------------------------------------------------------
def add_rms_norm(x, residual, weight, eps: float):
    """s = x + residual; y = weight ⊙ s / sqrt(mean(s², -1) + eps) in fp32, y in x's dtype."""
    s = op.Add(x, residual)
    sf = op.Cast(s, to=FLOAT)
    ms = op.ReduceMean(op.Mul(sf, sf), _i64(-1), keepdims=1)
    y = op.Mul(op.Cast(weight, to=FLOAT), op.Div(sf, op.Sqrt(op.Add(ms, _f(eps)))))
    return op.CastLike(y, x), s


def _gather_rows(cache, indices):
    """cache (B, T, C), indices (B, S, K) >= 0 -> (B, S, K, C): each row's selected tokens (GatherND
    with one batch dimension)."""
    flat = op.Reshape(indices, _i64(0, -1, 1))  # (B, S·K, 1)
    got = op.GatherND(cache, flat, batch_dims=1)  # (B, S·K, C)
    return op.Reshape(got, op.Concat(op.Shape(indices), _i64(-1), axis=0))


def _masked_softmax(scores, valid):
    """softmax over the last axis where ``valid``; a row with no valid slot gives zeros, not NaN."""
    scores = op.Where(valid, scores, _f(NEG_INF))
    any_valid = op.ReduceMax(op.Cast(valid, to=FLOAT), _i64(-1), keepdims=1)
    return op.Where(op.Greater(any_valid, _f(0.0)), op.Softmax(scores, axis=-1), _f(0.0))


def indexer_topk(q, w, keys, limit, topk: int):
    """I[b,s,t] = Σ_h w[b,s,h]·ReLU(q[b,s,h]·k[b,t]) for t <= limit[b,s], -inf elsewhere; the first
    ``topk`` of a descending TopK (ties to the earlier token) over I padded with ``topk`` -inf slots,
    so K is a constant whatever the context; slots past the visible count are -1."""
    qf, kf, wf = op.Cast(q, to=FLOAT), op.Cast(keys, to=FLOAT), op.Cast(w, to=FLOAT)
    kt = op.Unsqueeze(op.Transpose(kf, perm=[0, 2, 1]), _i64(1))  # (B, 1, D, T)
    per_head = op.Relu(op.MatMul(qf, kt))  # (B, S, H, T)
    scores = op.Squeeze(op.MatMul(op.Unsqueeze(wf, _i64(2)), per_head), _i64(2))  # (B, S, T)
    T = _dim(keys, 1)
    pos = op.Range(op.Constant(value_int=0), op.Squeeze(T, _i64(0)), op.Constant(value_int=1))
    visible = op.LessOrEqual(pos, op.Unsqueeze(limit, _i64(-1)))
    scores = op.Where(visible, scores, _f(NEG_INF))
    pad = op.Expand(_f(NEG_INF), op.Concat(op.Shape(limit), _i64(topk), axis=0))
    vals, idx = op.TopK(op.Concat(scores, pad, axis=-1), _i64(topk), axis=-1, largest=1, sorted=1)
    keep = op.And(op.Greater(vals, _f(NEG_INF)), op.Less(idx, T))
    return op.Where(keep, idx, op.Constant(value_int=-1))


def sparse_mla(q_abs, q_pe, latent, rope, indices, scale: float):
    """softmax_j(scale·(q_abs·c_j + q_pe·r_j))·c_j over the selected slots j (not -1)."""
    safe = op.Max(indices, op.Constant(value_int=0))
    c = op.Cast(_gather_rows(latent, safe), to=FLOAT)  # (B, S, K, dc)
    r = op.Cast(_gather_rows(rope, safe), to=FLOAT)
    perm = [0, 1, 3, 2]
    scores = op.Add(
        op.MatMul(op.Cast(q_abs, to=FLOAT), op.Transpose(c, perm=perm)),
        op.MatMul(op.Cast(q_pe, to=FLOAT), op.Transpose(r, perm=perm)),
    )  # (B, S, H, K)
    valid = op.Unsqueeze(op.GreaterOrEqual(indices, op.Constant(value_int=0)), _i64(2))
    p = _masked_softmax(op.Mul(scores, _f(scale)), valid)
    return op.CastLike(op.MatMul(p, c), q_abs)


def sparse_mha(q, k, v, indices, scale: float):
    """softmax_j(scale·q_h·k_{j,h})·v_{j,h} over the selected tokens j (not -1), per head h."""
    safe = op.Max(indices, op.Constant(value_int=0))

    def gather(x):  # (B, T, H, D) -> (B, S, H, K, D): each row's tokens, every head
        flat = op.Reshape(x, _i64(0, 0, -1))
        got = _gather_rows(flat, safe)  # (B, S, K, H·D)
        got = op.Reshape(got, op.Concat(op.Shape(got, start=0, end=3), op.Shape(x, start=2), axis=0))
        return op.Transpose(op.Cast(got, to=FLOAT), perm=[0, 1, 3, 2, 4])

    ks, vs = gather(k), gather(v)
    qf = op.Unsqueeze(op.Cast(q, to=FLOAT), _i64(3))  # (B, S, H, 1, D)
    scores = op.Squeeze(op.MatMul(qf, op.Transpose(ks, perm=[0, 1, 2, 4, 3])), _i64(3))  # (B, S, H, K)
    valid = op.Unsqueeze(op.GreaterOrEqual(indices, op.Constant(value_int=0)), _i64(2))
    p = _masked_softmax(op.Mul(scores, _f(scale)), valid)
    return op.Squeeze(op.MatMul(op.Unsqueeze(p, _i64(3)), vs), _i64(3))


def mla_decode(q, kv, mask, scale: float, dv: int, indices=None):
    """softmax_t(scale·q·kv_t (+ mask))·kv_t[:dv] over the whole latent cache, or over the slots of
    ``indices`` (-1: none)."""
    qf = op.Cast(q, to=FLOAT)
    if indices is not None:
        sel = op.Cast(_gather_rows(kv, op.Max(indices, op.Constant(value_int=0))), to=FLOAT)  # (B, S, K, C)
        scores = op.Mul(op.MatMul(qf, op.Transpose(sel, perm=[0, 1, 3, 2])), _f(scale))
        valid = op.Unsqueeze(op.GreaterOrEqual(indices, op.Constant(value_int=0)), _i64(2))
        p = op.Softmax(op.Where(valid, scores, _f(NEG_INF)), axis=-1)
        values = op.Slice(sel, _i64(0), _i64(dv), _i64(-1))
        return op.CastLike(op.MatMul(p, values), q)
    kvf = op.Unsqueeze(op.Cast(kv, to=FLOAT), _i64(1))  # (B, 1, T, C): one K/V head for every query head
    scores = op.Mul(op.MatMul(qf, op.Transpose(kvf, perm=[0, 1, 3, 2])), _f(scale))  # (B, S, H, T)
    if mask is not None:
        scores = op.Add(scores, op.Unsqueeze(op.Cast(mask, to=FLOAT), _i64(2)))
    p = op.Softmax(scores, axis=-1)
    return op.CastLike(op.MatMul(p, op.Slice(kvf, _i64(0), _i64(dv), _i64(-1))), q)


def _mixture(x, idx, wts, n_experts: int, ffn):
    """Σ_i wts[n,i]·ffn(e, x)[n], e = idx[n,i], as the reference computes it: every expert on every
    token, weighted by that token's mixture weight for it (0 when not routed)."""
    w = op.CastLike(wts, x)
    y = None
    for e in range(n_experts):
        weight = op.ReduceSum(op.Where(op.Equal(idx, op.Constant(value_int=e)), w, op.CastLike(_f(0.0), x)),
                              _i64(-1), keepdims=1)  # fmt: skip
        term = op.Mul(weight, ffn(e))
        y = term if y is None else op.Add(y, term)
    return y


def moe_experts(x, idx, wts, gate_w, up_w, down_w):
    """Σ_i wts[n,i]·down_e(silu(gate_e x)·up_e x), e = idx[n,i], every expert on every token."""

    def ffn(e):
        gate = op.MatMul(x, op.Transpose(gate_w[e], perm=[1, 0]))
        h = op.Mul(op.Mul(gate, op.Sigmoid(gate)), op.MatMul(x, op.Transpose(up_w[e], perm=[1, 0])))
        return op.MatMul(h, op.Transpose(down_w[e], perm=[1, 0]))

    return _mixture(x, idx, wts, len(gate_w), ffn)


def moe_experts_fp8(x, idx, wts, gate_w, up_w, down_w, gate_s, up_s, down_s, act_quant: bool = True,
                    ue8m0: bool = False):  # fmt: skip
    """The same mixture on e4m3 experts: each matmul the ``fp8_linear`` translation, its input
    through the ``act_quant`` one first with W8A8 (gate and up share the quantised x)."""

    def quant(t, K: int):  # (the rows are 2-D: N tokens)
        return _quantise(t, K, 2, 128, ue8m0) if act_quant else (t, None)

    a = quant(x, _static(gate_w[0], 1))

    def ffn(e):
        gate = fp8_linear(*a, gate_w[e], gate_s[e])
        h = op.Mul(op.Mul(gate, op.Sigmoid(gate)), fp8_linear(*a, up_w[e], up_s[e]))
        return op.CastLike(fp8_linear(*quant(h, _static(down_w[e], 1)), down_w[e], down_s[e]), x)

    return _mixture(x, idx, wts, len(gate_w), ffn)


def _pow2_ceil(s):
    """2^ceil(log2 s) for s > 0, exactly: the exponent from Log is corrected by comparing powers of two
    (Pow of 2 to an integer is exact), so a scale that is already a power of two stays itself."""
    two = _f(2.0)
    e = op.Ceil(op.Div(op.Log(s), _f(math.log(2.0))))
    e = op.Where(op.Less(op.Pow(two, e), s), op.Add(e, _f(1.0)), e)  # Log rounded down past a power
    e = op.Where(op.GreaterOrEqual(op.Pow(two, op.Sub(e, _f(1.0))), s), op.Sub(e, _f(1.0)), e)  # or up past one
    return op.Pow(two, e)


def act_quant(x, block: int = 128, ue8m0: bool = False):
    """Per token, per group of ``block`` values: s = max(|x|, 1e-4) / 448 (a power of two rounded up
    with ``ue8m0``), q = e4m3(clamp(x / s, ±448)) (Cast rounds to nearest even, like torch)."""
    K = _static(x, -1)
    if K is None:
        raise NotImplementedError("act_quant needs a static last dimension to export")
    return _quantise(x, K, len(x.shape), block, ue8m0)


def _quantise(x, K: int, rank: int, block: int, ue8m0: bool):
    """``act_quant`` of x (rank ``rank``, last dimension K: given where the exporter has not inferred
    the shape of a tensor made inside a translation)."""
    G = math.ceil(K / block)
    xf = op.Cast(x, to=FLOAT)
    if G * block != K:  # the last group is zero-padded, as the reference pads it
        xf = op.Pad(xf, _i64(*[0] * (2 * rank - 1), G * block - K))
    groups = op.Reshape(xf, op.Concat(op.Shape(x, end=-1), _i64(G, block), axis=0))
    s = op.Div(op.Max(op.ReduceMax(op.Abs(groups), _i64(-1), keepdims=0), _f(1e-4)), _f(FP8_MAX))
    if ue8m0:
        s = _pow2_ceil(s)
    q = op.Clip(op.Div(groups, op.Unsqueeze(s, _i64(-1))), _f(-FP8_MAX), _f(FP8_MAX))
    q = op.Reshape(q, op.Concat(op.Shape(x, end=-1), _i64(G * block), axis=0))
    if G * block != K:
        q = op.Slice(q, _i64(0), _i64(K), _i64(-1))
    return op.Cast(q, to=E4M3), s  # cast last: onnxruntime's Slice takes no FP8


def _dequant_weight(w, w_scale):
    """(leading dims, fp32 weight): e4m3 ([E,] N, K) with its ([E,] N/128, K/128) block scales."""
    dims = [_static(w, i) for i in range(len(w.shape))]
    if None in dims:
        raise NotImplementedError("fp8_linear needs a static weight shape to export")
    *H, N, K = dims
    Nb, Kb = math.ceil(N / 128), math.ceil(K / 128)
    rows = op.Reshape(op.Expand(op.Unsqueeze(w_scale, _i64(-2)), _i64(*H, Nb, 128, Kb)), _i64(*H, Nb * 128, Kb))
    rows = op.Slice(rows, _i64(0), _i64(N), _i64(-2))  # (.., N, K/128): row n's block scales
    return H, op.DequantizeLinear(w, rows, axis=-1, block_size=128)  # (.., N, K) fp32


def _dequant_x(x, x_scale):
    if x_scale is None:
        return op.Cast(x, to=FLOAT)
    return op.DequantizeLinear(x, op.Cast(x_scale, to=FLOAT), axis=-1, block_size=128)


def fp8_linear_gathered(x, x_scale, ids, w, w_scale):
    """Row r through expert ids[r]'s dequantised weight: Gather of the (E, N, K) fp32 weights by the
    routing, then a batched MatMul (as the reference computes it)."""
    _, wf = _dequant_weight(w, w_scale)
    rows = op.Gather(wf, ids, axis=0)  # (R, N, K)
    return op.Squeeze(op.MatMul(rows, op.Unsqueeze(_dequant_x(x, x_scale), _i64(-1))), _i64(-1))


def fp8_linear(x, x_scale, w, w_scale, bias=None):
    """y = dequant(x)·dequant(w)ᵀ (+ bias) in fp32. The e4m3 weight stays FP8 in the file and feeds
    DequantizeLinear with 1-D blocks of 128 along K: its (N/128, K/128) block scales are repeated
    along N, the form onnxruntime runs (a 2-D block scale passes the checker but not the runtime).
    A per-head weight (H, N, K) the same way per head, against x (..., H, K)."""
    H, wf = _dequant_weight(w, w_scale)
    xf = _dequant_x(x, x_scale)
    if H:  # (..., H, 1, K) @ (H, K, N)
        return op.Squeeze(op.MatMul(op.Unsqueeze(xf, _i64(-2)), op.Transpose(wf, perm=[0, 2, 1])), _i64(-2))
    y = op.MatMul(xf, op.Transpose(wf, perm=[1, 0]))
    return y if bias is None else op.Add(y, op.Cast(bias, to=FLOAT))


aten, dsc = torch.ops.aten, torch.ops.dsc
TABLE = {
    aten.sort.stable: sort_stable,
    aten.einsum.default: einsum,
    dsc.add_rms_norm.default: add_rms_norm,
    dsc.indexer_topk.default: indexer_topk,
    dsc.sparse_mla.default: sparse_mla,
    dsc.sparse_mha.default: sparse_mha,
    dsc.mla_decode.default: mla_decode,
    dsc.moe_experts.default: moe_experts,
    dsc.moe_experts_fp8.default: moe_experts_fp8,
    dsc.act_quant.default: act_quant,
    dsc.fp8_linear.default: fp8_linear,
    dsc.fp8_linear_gathered.default: fp8_linear_gathered,
}

# what each translation keeps of the fused op (the export report shows the ops a model holds)
FUSION = {
    "add_rms_norm": "standard ops (Add, ReduceMean, Sqrt, Div); a runtime's fusion may or may not rejoin them",
    "indexer_topk": "fused: scores by MatMul and TopK with a constant K (index_topk); the (S, H, T) per-head "
    "products are materialised (the CPU/Triton kernels never hold them)",
    "sparse_mla": "fused: GatherND of the selected latents only, attention over K slots",
    "sparse_mha": "fused: GatherND of the selected tokens' per-head K/V (copied per query row), attention over K slots",
    "mla_decode": "fused: one shared latent K/V head (MatMul broadcast over heads); the (S, H, T) scores are "
    "materialised (no online softmax)",
    "moe_experts": "reference decomposition: every routed expert runs on every token (E / top-k times the "
    "expert FLOPs of the dispatching kernel), weighted 0 where not routed",
    "moe_experts_fp8": "reference decomposition, as moe_experts, each expert matmul as fp8_linear's (e4m3 on disk)",
    "fp8_linear_gathered": "every expert's weight dequantised (DequantizeLinear), gathered per row, batched MatMul",
    "act_quant": "standard ops: ReduceMax per 128-group, Div, Clip, Cast to FLOAT8E4M3FN",
    "fp8_linear": "FP8 weights stay e4m3 on disk: DequantizeLinear (block_size 128) then an fp32 MatMul "
    "(no FP8 tensor-core GEMM unless the runtime fuses Q/DQ)",
}
