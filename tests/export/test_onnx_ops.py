"""Each ``dsc::`` op's ONNX translation (``dsc.export.onnx_ops``) against the op itself, on seeded
inputs: one op exported alone, run by onnxruntime."""

import numpy as np
import onnxruntime as ort
import pytest
import torch
from dsc.export.onnx import _ort_value, _quiet
from dsc.export.onnx_ops import TABLE
from dsc.model.fp8 import block_quant

from tests.tolerances import TOL

dsc = torch.ops.dsc


class _Op(torch.nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, *args):
        return self.fn(*args)


def _run_onnx(fn, args: tuple, ops: list | None = None):
    """fn exported alone (its inputs as graph inputs), run by onnxruntime; its outputs as tensors
    (``ops``: filled with the model's operator types)."""
    ep = torch.export.export(_Op(fn), args, strict=False)
    with _quiet():
        onx = torch.onnx.export(ep, dynamo=True, opset_version=23, custom_translation_table=TABLE, verify=False)
    if ops is not None:
        ops.extend(n.op_type for n in onx.model_proto.graph.node)
    sess = ort.InferenceSession(onx.model_proto.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    outs = sess.run_with_ort_values(None, {n: _ort_value(ort, a) for n, a in zip(names, args)})
    return [_raw(o) for o in outs]


def _raw(v):
    """An onnxruntime output as a torch tensor; FP8 as its bytes (numpy has no e4m3)."""
    if v.data_type() == "tensor(float8e4m3fn)":
        return torch.from_numpy(np.array(v.numpy()).view(np.uint8)).view(torch.float8_e4m3fn)
    return torch.from_numpy(v.numpy())


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize(("K", "ue8m0"), [(256, False), (200, False), (256, True)])
def test_act_quant_is_bit_exact(K, ue8m0):
    g = _gen()
    # a wide range of magnitudes per group, so that scales and subnormal e4m3 values both occur
    x = torch.randn(3, 5, K, generator=g) * 10.0 ** torch.randint(-3, 3, (3, 5, K), generator=g).float()
    x[0, 0, :128] = 0.0  # an all-zero group: the 1e-4 floor
    q, s = _run_onnx(lambda t: dsc.act_quant(t, 128, ue8m0), (x,))
    want_q, want_s = dsc.act_quant(x, 128, ue8m0)
    assert torch.equal(s, want_s)
    assert torch.equal(q.view(torch.uint8), want_q.view(torch.uint8))


@pytest.mark.parametrize(
    ("N", "K", "w8a8", "bias"), [(384, 256, True, False), (200, 300, True, True), (256, 384, False, False)]
)
def test_fp8_linear_matches_the_op(N, K, w8a8, bias):
    g = _gen(1)
    wq, ws = block_quant(torch.randn(N, K, generator=g) * 0.05)
    x = torch.randn(2, 7, K, generator=g)
    b = torch.randn(N, generator=g) if bias else None
    xq, xs = dsc.act_quant(x, 128, False) if w8a8 else (x, None)

    def fn(xq, *rest):
        return dsc.fp8_linear(xq, rest[0] if w8a8 else None, wq, ws, b)

    args = (xq, xs) if w8a8 else (xq,)
    (y,) = _run_onnx(fn, args)
    torch.testing.assert_close(y, dsc.fp8_linear(xq, xs, wq, ws, b), **TOL["fp32_reassoc"])


@pytest.mark.parametrize("w8a8", [True, False])
def test_fp8_linear_per_head_matches_the_op(w8a8):
    g = _gen(7)
    q = [block_quant(torch.randn(200, 136, generator=g) * 0.05) for _ in range(3)]  # 3 heads, ragged blocks
    wq, ws = torch.stack([a for a, _ in q]), torch.stack([b for _, b in q])
    x = torch.randn(2, 5, 3, 136, generator=g)
    xq, xs = dsc.act_quant(x, 128, False) if w8a8 else (x, None)

    def fn(xq, *rest):
        return dsc.fp8_linear(xq, rest[0] if w8a8 else None, wq, ws, None)

    (y,) = _run_onnx(fn, (xq, xs) if w8a8 else (xq,))
    torch.testing.assert_close(y, dsc.fp8_linear(xq, xs, wq, ws, None), **TOL["fp32_reassoc"])


def test_fp8_linear_gathered_matches_the_op():
    g = _gen(8)
    q = [block_quant(torch.randn(200, 136, generator=g) * 0.05) for _ in range(4)]
    wq, ws = torch.stack([a for a, _ in q]), torch.stack([b for _, b in q])
    x, ids = torch.randn(9, 136, generator=g), torch.tensor([3, 0, 3, 1, 1, 3, 0, 0, 3])
    xq, xs = dsc.act_quant(x, 128, False)
    (y,) = _run_onnx(lambda a, s, i: dsc.fp8_linear_gathered(a, s, i, wq, ws), (xq, xs, ids))
    torch.testing.assert_close(y, dsc.fp8_linear_gathered(xq, xs, ids, wq, ws), **TOL["fp32_reassoc"])


def test_add_rms_norm_matches_the_op():
    g = _gen(2)
    x, r, w = torch.randn(2, 5, 64, generator=g), torch.randn(2, 5, 64, generator=g), torch.randn(64, generator=g)
    y, s = _run_onnx(lambda a, b: dsc.add_rms_norm(a, b, w, 1e-6), (x, r))
    want_y, want_s = dsc.add_rms_norm(x, r, w, 1e-6)
    torch.testing.assert_close(s, want_s, **TOL["fp32_exact_graph"])
    torch.testing.assert_close(y, want_y, **TOL["fp32_reassoc"])


@pytest.mark.parametrize("T", [5, 23])  # fewer visible tokens than top-k, and more
def test_indexer_topk_selects_what_the_op_selects(T):
    g = _gen(3)
    B, S, H, D, topk = 2, 3, 4, 16, 8
    q, w, k = torch.randn(B, S, H, D, generator=g), torch.randn(B, S, H, generator=g), torch.randn(B, T, D, generator=g)
    limit = torch.tensor([[T - 3, T - 2, T - 1], [0, T // 2, T - 1]])
    (got,) = _run_onnx(lambda *a: dsc.indexer_topk(*a, topk), (q, w, k, limit))
    want = dsc.indexer_topk(q, w, k, limit, topk)
    assert got.shape == want.shape
    # the same set of tokens per query (the order of equal scores aside), -1 in the same number of slots
    assert torch.equal(got.sort(-1).values, want.sort(-1).values)


def test_sparse_mla_and_mla_decode_match_the_ops():
    g = _gen(4)
    B, S, H, dc, dr, T, K = 2, 3, 4, 32, 8, 19, 6
    q_abs, q_pe = torch.randn(B, S, H, dc, generator=g), torch.randn(B, S, H, dr, generator=g)
    latent, rope = torch.randn(B, T, dc, generator=g), torch.randn(B, T, dr, generator=g)
    idx = torch.randint(0, T, (B, S, K), generator=g)
    idx[0, 0, 3:] = -1  # unused slots
    (got,) = _run_onnx(lambda *a: dsc.sparse_mla(*a, 0.3), (q_abs, q_pe, latent, rope, idx))
    torch.testing.assert_close(got, dsc.sparse_mla(q_abs, q_pe, latent, rope, idx, 0.3), **TOL["fp32_reassoc"])

    q, kv = torch.randn(B, S, H, dc + dr, generator=g), torch.randn(B, T, dc + dr, generator=g)
    mask = torch.zeros(B, S, T).masked_fill(torch.rand(B, S, T, generator=g) < 0.3, float("-inf"))
    mask[..., 0] = 0.0
    (dense,) = _run_onnx(lambda a, b, m: dsc.mla_decode(a, b, m, 0.3, dc), (q, kv, mask))
    torch.testing.assert_close(dense, dsc.mla_decode(q, kv, mask, 0.3, dc), **TOL["fp32_reassoc"])
    (sparse,) = _run_onnx(lambda a, b, i: dsc.mla_decode(a, b, None, 0.3, dc, i), (q, kv, idx))
    torch.testing.assert_close(sparse, dsc.mla_decode(q, kv, None, 0.3, dc, idx), **TOL["fp32_reassoc"])


def test_sparse_mha_matches_the_op():
    g = _gen(6)
    B, S, H, D, Dv, T, K = 2, 3, 4, 16, 8, 19, 6
    q, k, v = (torch.randn(B, n, H, d, generator=g) for n, d in ((S, D), (T, D), (T, Dv)))
    idx = torch.stack([torch.randperm(T, generator=g)[:K] for _ in range(B * S)]).view(B, S, K)  # distinct, as a top-k
    idx[0, 0, 3:] = -1  # unused slots
    idx[1, 2] = -1  # a row with no token: zeros
    (got,) = _run_onnx(lambda *a: dsc.sparse_mha(*a, 0.3), (q, k, v, idx))
    want = dsc.sparse_mha(q, k, v, idx, 0.3)
    assert (want[1, 2] == 0).all()
    torch.testing.assert_close(got, want, **TOL["fp32_reassoc"])


def test_moe_experts_matches_the_op():
    g = _gen(5)
    E, k, D, inter, N = 4, 2, 16, 24, 9
    gate, up, down = (
        [torch.randn(*s, generator=g) * 0.2 for _ in range(E)] for s in ((inter, D), (inter, D), (D, inter))
    )
    x = torch.randn(N, D, generator=g)
    idx = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(N)])
    wts = torch.rand(N, k, generator=g)
    (got,) = _run_onnx(lambda a, i, w: dsc.moe_experts(a, i, w, gate, up, down), (x, idx, wts))
    torch.testing.assert_close(got, dsc.moe_experts(x, idx, wts, gate, up, down), **TOL["fp32_reassoc"])


@pytest.mark.parametrize("act_quant", [True, False])
def test_moe_experts_fp8_matches_the_op(act_quant):
    g = _gen(6)
    E, k, D, inter, N = 4, 2, 200, 136, 9  # ragged 128-blocks both ways
    q = [
        [block_quant(torch.randn(*s, generator=g) * 0.2) for _ in range(E)]
        for s in ((inter, D), (inter, D), (D, inter))
    ]
    wq, ws = [[a for a, _ in grp] for grp in q], [[b for _, b in grp] for grp in q]
    x = torch.randn(N, D, generator=g)
    idx = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(N)])
    wts = torch.rand(N, k, generator=g)

    def fn(a, i, w):
        return dsc.moe_experts_fp8(a, i, w, *wq, *ws, act_quant, False)

    (got,) = _run_onnx(fn, (x, idx, wts))
    torch.testing.assert_close(got, fn(x, idx, wts), **TOL["fp32_reassoc"])


def test_stable_sort_is_topk_with_ties_to_the_lower_index():
    x = torch.tensor([[3.0, 1.0, 3.0, 2.0, 1.0, 3.0]])
    vals, idx = _run_onnx(lambda t: torch.sort(t, dim=-1, descending=True, stable=True), (x,))
    want = torch.sort(x, dim=-1, descending=True, stable=True)
    assert torch.equal(vals, want.values) and torch.equal(idx, want.indices)


@pytest.mark.parametrize(
    ("equation", "shapes"),
    [
        ("bshd,hdc->bshc", [(2, 3, 4, 8), (4, 8, 5)]),  # absorbed MLA: W_UK per head
        ("bshc,hvc->bshv", [(2, 1, 4, 5), (4, 8, 5)]),  # and W_UV
        ("bshd,btd->bsht", [(2, 3, 4, 8), (2, 6, 8)]),  # indexer scores
        ("bsht,bthd->bshd", [(2, 3, 4, 6), (2, 6, 4, 8)]),  # attention values
        ("bij,jk->bki", [(1, 3, 4), (4, 5)]),  # an output order neither operand has
        ("bij,bjk->bik", [(1, 3, 4), (3, 4, 5)]),  # a broadcast batch label
        ("ij,jk->", [(3, 4), (4, 5)]),  # a scalar
        ("bij,kl->bil", [(2, 3, 4), (6, 5)]),  # labels summed in one operand only
        ("...ij,...jk->...ik", [(2, 3, 4), (2, 4, 5)]),  # ellipsis: left to Einsum
    ],
)
def test_einsum_as_matmul(equation, shapes):
    g = _gen(6)
    a, b = (torch.randn(*s, generator=g) for s in shapes)
    ops = []
    (got,) = _run_onnx(lambda x, y: torch.einsum(equation, x, y), (a, b), ops=ops)
    torch.testing.assert_close(got, torch.einsum(equation, a, b), **TOL["fp32_reassoc"])
    assert ("Einsum" in ops) == ("..." in equation), ops


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float8_e4m3fn])
def test_tensors_without_a_numpy_type_cross_both_ways(dtype):
    """bf16 / e4m3 caches go in as raw bytes with their ONNX type and come back into torch buffers."""
    from onnx import TensorProto, helper

    t = {torch.bfloat16: TensorProto.BFLOAT16, torch.float8_e4m3fn: TensorProto.FLOAT8E4M3FN}[dtype]
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])], "g",
        [helper.make_tensor_value_info("x", t, [None, 3])], [helper.make_tensor_value_info("y", t, [None, 3])],
    )  # fmt: skip
    sess = ort.InferenceSession(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)]).SerializeToString(),
        providers=["CPUExecutionProvider"],
    )
    x = torch.randn(4, 3).to(dtype)[::2]  # not contiguous
    out = torch.empty(2, 3, dtype=dtype)
    binding = sess.io_binding()
    binding.bind_ortvalue_input("x", _ort_value(ort, x))
    binding.bind_ortvalue_output("y", _ort_value(ort, out))
    sess.run_with_iobinding(binding)
    assert torch.equal(out.view(torch.uint8), x.contiguous().view(torch.uint8))
