"""dsc::act_quant and dsc::fp8_linear against the spec (§7.2, §7.3): scales per 1x128 activation
group and 128x128 weight block, ragged edges, zero groups, UE8M0, W8A8 and W8A16."""

import os
import subprocess
import sys

import pytest
import torch
from dsc.kernels import fp8, moe, native
from dsc.model.fp8 import block_dequant, block_quant

from tests.tolerances import TOL

needs_native = pytest.mark.skipif(native.library() is None, reason="no native FP8 kernel on this machine")


def test_act_quant_groups_scales_and_edges():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 300, generator=g)  # K = 300: groups of 128, 128, 44
    x[0, 0, :128] = 0  # an all-zero group: the floor scale, zeros back
    for ue8m0 in (False, True):
        q, s = torch.ops.dsc.act_quant(x, 128, ue8m0)
        assert q.dtype == torch.float8_e4m3fn and q.shape == x.shape and s.shape == (3, 5, 3)
        amax = torch.stack([x[..., :128], x[..., 128:256], torch.nn.functional.pad(x[..., 256:], (0, 84))], -2)
        want = amax.abs().amax(-1).clamp_min(1e-4) / 448
        if ue8m0:
            want = torch.exp2(torch.ceil(torch.log2(want)))
            assert torch.equal(s, torch.exp2(torch.log2(s).round()))
        torch.testing.assert_close(s, want, rtol=0, atol=0)
        back = q.float() * s.repeat_interleave(128, -1)[..., :300]
        assert torch.equal(back[0, 0, :128], torch.zeros(128))
        assert ((back - x).abs() <= x.abs().amax(-1, keepdim=True) / 16 + 1e-6).all()  # e4m3: 3 mantissa bits


@pytest.mark.parametrize("shape", [(4, 256, 384), (1, 300, 200), (7, 128, 130), (40, 300, 260)])  # M, K, N
def test_fp8_linear_cpu_equals_the_block_scaled_reference(shape):
    M, K, N = shape
    g = torch.Generator().manual_seed(1)
    x, w, b = torch.randn(M, K, generator=g), torch.randn(N, K, generator=g) * 0.05, torch.randn(N, generator=g)
    wq, ws = block_quant(w)
    xq, xs = torch.ops.dsc.act_quant(x)
    for args in ((xq, xs, wq, ws, b), (x, None, wq, ws, None)):  # W8A8, W8A16
        got = torch.ops.dsc.fp8_linear(*args)
        ref = fp8.fp8_linear_ref(*args)
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    # the reference is the dequantised product (the block scales factor out of each K block)
    deq = (xq.float() * xs.repeat_interleave(128, -1)[:, :K]) @ block_dequant(wq, ws).T + b
    torch.testing.assert_close(fp8.fp8_linear_ref(xq, xs, wq, ws, b), deq, rtol=1e-5, atol=1e-5)
    # and close to the fp32 matmul: ~30 dB for W8A8
    exact = x @ w.T + b
    sqnr = 10 * torch.log10(exact.pow(2).sum() / (torch.ops.dsc.fp8_linear(xq, xs, wq, ws, b) - exact).pow(2).sum())
    assert sqnr > 25, sqnr


def test_fake_shapes_under_export():
    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            wq, ws = block_quant(torch.randn(200, 300))
            self.register_buffer("wq", wq)
            self.register_buffer("ws", ws)

        def forward(self, x):
            q, s = torch.ops.dsc.act_quant(x, 128, False)
            return torch.ops.dsc.fp8_linear(q, s, self.wq, self.ws, None)

    ep = torch.export.export(M(), (torch.randn(2, 3, 300),))
    out = [n for n in ep.graph.nodes if n.op == "output"][0].args[0][0]
    assert tuple(out.meta["val"].shape) == (2, 3, 200)


@needs_native
def test_native_dequant_is_torchs_cast_bit_for_bit():
    """Every e4m3 byte but NaN (subnormals and -0 included), against scales of every kind: the
    widening inside the kernel is exact and its product rounded once, as torch's."""
    g = torch.Generator().manual_seed(2)
    b = torch.arange(256, dtype=torch.uint8)
    b = b[(b & 0x7F) != 0x7F]
    q = b[torch.randint(0, len(b), (300, 333), generator=g)].view(torch.float8_e4m3fn)  # ragged both ways
    for s in (torch.rand(3, 3, generator=g) * 1e-2, torch.exp2(torch.randint(-20, 3, (3, 3), generator=g).float())):
        want = q.float() * s.repeat_interleave(128, 0)[:300].repeat_interleave(128, 1)[:, :333]
        assert torch.equal(native.dequant(q, s, 128), want)
    s = torch.rand(300, 3, generator=g)  # activations: one scale per row and group
    assert torch.equal(native.dequant(q, s, 1), q.float() * s.repeat_interleave(128, 1)[:, :333])


@needs_native
def test_native_act_quant_is_the_reference_bit_for_bit():
    """Every magnitude e4m3 meets (subnormals, ties, the 448 edge), zero groups, -0, NaN, ragged K."""
    g = torch.Generator().manual_seed(6)
    x = torch.randn(7, 333, generator=g) * 10.0 ** torch.randint(-6, 4, (7, 333), generator=g).float()
    x[0, :128], x[1, 5], x[2, 7] = 0.0, -0.0, float("nan")
    x[3, :128] = torch.arange(128) / 127 * 448 * 2**-9  # a group whose values land on e4m3's subnormal grid and halfway
    ties = torch.tensor([448.0, 1.0625, 1.1875, 2.125, 3.25, 240.0, 1.5 * 2**-9, 2.5 * 2**-9, 7.5 * 2**-9])
    x[4, : len(ties)] = torch.cat([ties[:1], ties[1:], -ties[1:]])[: len(ties)]  # halfway: ties to even (scale 1)
    x[4, len(ties) : 2 * len(ties) - 1] = -ties[1:]
    q, s = native.act_quant(x)
    want_q, want_s = fp8.act_quant_ref(x)
    assert torch.equal(s[~s.isnan()], want_s[~want_s.isnan()]) and s.isnan().equal(want_s.isnan())
    assert torch.equal(q.view(torch.uint8), want_q.view(torch.uint8))


@needs_native
@pytest.mark.parametrize("M", [1, 2, 3, 4, 5, 9, native.ROWS_MAX, native.ROWS_MAX + 1, 70])
@pytest.mark.parametrize("NK", [(260, 300), (5, 16), (128, 1000)])
def test_native_matmul_equals_the_block_scaled_reference(M, NK):
    """The decode path (rows streamed through the weight, 1-4 rows a tile, ragged N and K tails) and
    the prompt path (a band of dequantised blocks into a GEMM) against fp8_linear's specification."""
    N, K = NK
    g = torch.Generator().manual_seed(M)
    x = torch.randn(M, K, generator=g)
    wq, ws = block_quant(torch.randn(N, K, generator=g))
    ref = fp8.fp8_linear_ref(x, None, wq, ws)
    got = native.rows(x, wq, ws) if M <= native.ROWS_MAX else native.matmul(x, wq, ws, chunk_bytes=1 << 17)
    torch.testing.assert_close(got, ref, **TOL["fp32_reassoc"])
    xq, xs = fp8.act_quant_ref(x)
    torch.testing.assert_close(
        fp8.fp8_linear_cpu(xq, xs, wq, ws), fp8.fp8_linear_ref(xq, xs, wq, ws), **TOL["fp32_reassoc"]
    )


def test_without_the_native_kernel_one_warning_and_the_same_numbers(monkeypatch):
    g = torch.Generator().manual_seed(3)
    x, (wq, ws) = torch.randn(3, 200, generator=g), block_quant(torch.randn(150, 200, generator=g))
    native.library.cache_clear()
    monkeypatch.setenv("CC", "/no/such/compiler")
    try:
        with pytest.warns(RuntimeWarning, match="no C compiler"):
            assert native.library() is None
        torch.testing.assert_close(fp8.fp8_linear_cpu(x, None, wq, ws), fp8.fp8_linear_ref(x, None, wq, ws),
                                   **TOL["fp32_reassoc"])  # fmt: skip
    finally:
        native.library.cache_clear()


def _experts(g, E=4, D=200, F=136):
    return [[torch.randn(*shape, generator=g) * 0.1 for _ in range(E)] for shape in ((F, D), (F, D), (D, F))]


@pytest.mark.parametrize("tokens", [3, 11])  # the decode path (token by token) and the sorted dispatch
@pytest.mark.parametrize("act_quant", [True, False])
def test_moe_experts_fp8_equals_its_specification(tokens, act_quant):
    g = torch.Generator().manual_seed(4)
    weights = _experts(g)
    q = [[block_quant(w) for w in ws] for ws in weights]
    wq, sc = [[a for a, _ in ws] for ws in q], [[b for _, b in ws] for ws in q]
    x = torch.randn(tokens, 200, generator=g)
    idx = torch.stack([torch.randperm(4, generator=g)[:2] for _ in range(tokens)])
    wts = torch.rand(tokens, 2, generator=g)
    got = torch.ops.dsc.moe_experts_fp8(x, idx, wts, *wq, *sc, act_quant, False)
    ref = moe.moe_experts_fp8_ref(x, idx, wts, *wq, *sc, act_quant, False)
    torch.testing.assert_close(got, ref, **TOL["fp32_reassoc"])
    if not act_quant:  # weights only: the fp32 mixture over the dequantised experts
        deq = [[block_dequant(a, b) for a, b in ws] for ws in q]
        torch.testing.assert_close(got, torch.ops.dsc.moe_experts(x, idx, wts, *deq), **TOL["fp32_reassoc"])
    exact = torch.ops.dsc.moe_experts(x, idx, wts, *weights)
    assert 10 * torch.log10(exact.pow(2).sum() / (got - exact).pow(2).sum()) > 21


@pytest.mark.parametrize("lead", [(2, 5), (1, 1), (4, 5)])  # decode-sized rows, and more than ROWS_MAX
@pytest.mark.parametrize("w8a8", [True, False])
def test_fp8_linear_per_head(w8a8, lead):
    """A per-head weight (H, N, K) against x (..., H, K): head h's rows through head h's weight, as
    absorbed MLA's W_UK / W_UV are applied; the CPU path and the exporters' decomposition agree."""
    g = torch.Generator().manual_seed(5)
    w = torch.randn(3, 200, 136, generator=g) * 0.05
    q = [block_quant(w[h]) for h in range(3)]
    wq, ws = torch.stack([a for a, _ in q]), torch.stack([b for _, b in q])
    x = torch.randn(*lead, 3, 136, generator=g)
    xq, xs = fp8.act_quant_ref(x) if w8a8 else (x, None)
    got = torch.ops.dsc.fp8_linear(xq, xs, wq, ws, None)
    assert got.shape == (*lead, 3, 200)
    for h in range(3):
        head = fp8.fp8_linear_ref(xq[..., h, :], None if xs is None else xs[..., h, :], wq[h], ws[h])
        torch.testing.assert_close(got[..., h, :], head, **TOL["fp32_reassoc"])
    torch.testing.assert_close(fp8.fp8_linear_decomposed(xq, xs, wq, ws), got, **TOL["fp32_reassoc"])


TRITON_CHECK = """
import torch
from dsc.kernels import fp8, moe
from dsc.model.fp8 import block_quant
torch.manual_seed(0)
for M, K, N in [(1, 300, 200), (3, 256, 130), (7, 300, 200), (70, 128, 64)]:  # GEMV and GEMM, ragged edges
    x, w = torch.randn(M, K), torch.randn(N, K) * 0.05
    wq, ws = block_quant(w)
    for ue8m0 in (False, True):
        q, s = fp8.act_quant_triton(x, 128, ue8m0)
        rq, rs = fp8.act_quant_ref(x, 128, ue8m0)
        assert torch.equal(s, rs), ("scales", M, K, ue8m0)
        # the interpreter's e4m3 cast drops the carry of a value that rounds up to a power of two
        # (124.3 -> 64, not 128): every other value is the reference's, bit for bit
        bad = q.float() != rq.float()
        p = rq.float()[bad]
        assert torch.equal(q.float()[bad], p / 2) and torch.equal(p.abs(), torch.exp2(p.abs().log2().round())), (M, K)
    xq, xs = fp8.act_quant_ref(x)
    for args in ((xq, xs, wq, ws, None), (x, None, wq, ws, torch.randn(N))):  # W8A8, W8A16 with a bias
        got, ref = fp8.fp8_linear_triton(*args), fp8.fp8_linear_ref(*args)
        assert torch.allclose(got, ref, atol=1e-5, rtol=1e-5), (M, K, N, (got - ref).abs().max())
# per head, and the MoE's experts through the Triton kernels (weights only: no interpreter cast)
q = [block_quant(torch.randn(64, 136) * 0.05) for _ in range(3)]
wq, ws = torch.stack([a for a, _ in q]), torch.stack([b for _, b in q])
x = torch.randn(2, 3, 136)
assert torch.allclose(fp8.fp8_linear_triton(x, None, wq, ws), fp8.fp8_linear_ref(x, None, wq, ws), atol=1e-5, rtol=1e-5)
E, D, F, T = 4, 200, 136, 9
ex = [[block_quant(torch.randn(*s) * 0.1) for _ in range(E)] for s in ((F, D), (F, D), (D, F))]
eq, es = [[a for a, _ in g] for g in ex], [[b for _, b in g] for g in ex]
x, idx, wts = torch.randn(T, D), torch.stack([torch.randperm(E)[:2] for _ in range(T)]), torch.rand(T, 2)
ffn = moe._fp8_ffn((*eq, *es), False, False, fp8.fp8_linear_triton, fp8.act_quant_triton)
got = moe._dispatch(x, idx, wts, E, ffn)
assert torch.allclose(got, moe.moe_experts_fp8_ref(x, idx, wts, *eq, *es, False), atol=1e-5, rtol=1e-5)
print("ok")
"""


def test_triton_kernels_in_interpreter():
    """act_quant's scales exactly, its e4m3 values but for the interpreter's known carry drop; the
    block-scaled GEMV / GEMM, per head and inside the MoE, against the specification (fp32 dots)."""
    pytest.importorskip("triton")
    r = subprocess.run([sys.executable, "-c", TRITON_CHECK], capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, TRITON_INTERPRET="1"),
                       cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))  # fmt: skip
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-3000:]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_triton_kernels_on_gpu():
    """On the GPU the e4m3 casts are the hardware's: act_quant bit for bit, the FP8 tensor-core GEMM
    and the GEMV within fp32 re-association of the specification."""
    g = torch.Generator().manual_seed(0)
    for M, K, N in [(1, 7168, 1536), (4, 2048, 7168), (512, 7168, 576), (37, 300, 200)]:
        x, w = torch.randn(M, K, generator=g), torch.randn(N, K, generator=g) * 0.02
        wq, ws = block_quant(w)
        for ue8m0 in (False, True):
            q, s = torch.ops.dsc.act_quant(x.cuda(), 128, ue8m0)
            rq, rs = fp8.act_quant_ref(x, 128, ue8m0)
            assert torch.equal(s.cpu(), rs) and torch.equal(q.cpu().view(torch.uint8), rq.view(torch.uint8))
        xq, xs = fp8.act_quant_ref(x)
        for args in ((xq, xs, wq, ws, None), (x, None, wq, ws, None)):
            got = torch.ops.dsc.fp8_linear(*(a.cuda() if a is not None else None for a in args))
            torch.testing.assert_close(got.cpu(), fp8.fp8_linear_ref(*args), atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("w8a8", [True, False])
def test_fp8_linear_gathered_is_each_rows_expert(w8a8):
    """Row r through expert ids[r]'s weight (transformers' batched experts, lowered): grouped by
    expert on CPU, against the specification and against one fp8_linear per row."""
    g = torch.Generator().manual_seed(7)
    q = [block_quant(torch.randn(200, 136, generator=g) * 0.05) for _ in range(4)]
    wq, ws = torch.stack([a for a, _ in q]), torch.stack([b for _, b in q])
    x, ids = torch.randn(9, 136, generator=g), torch.tensor([3, 0, 3, 1, 1, 3, 0, 0, 3])  # expert 2 unused
    xq, xs = fp8.act_quant_ref(x) if w8a8 else (x, None)
    got = torch.ops.dsc.fp8_linear_gathered(xq, xs, ids, wq, ws)
    torch.testing.assert_close(got, fp8.fp8_linear_gathered_ref(xq, xs, ids, wq, ws), **TOL["fp32_reassoc"])
    for r in (0, 3, 8):
        one = fp8.fp8_linear_ref(xq[r : r + 1], None if xs is None else xs[r : r + 1], wq[ids[r]], ws[ids[r]])
        torch.testing.assert_close(got[r : r + 1], one, **TOL["fp32_reassoc"])
