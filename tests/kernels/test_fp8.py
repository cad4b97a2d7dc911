"""dsc::act_quant and dsc::fp8_linear against the spec (§7.2, §7.3): scales per 1x128 activation
group and 128x128 weight block, ragged edges, zero groups, UE8M0, W8A8 and W8A16."""

import pytest
import torch
from dsc.kernels import fp8
from dsc.model.fp8 import block_dequant, block_quant


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


@pytest.mark.parametrize("shape", [(4, 256, 384), (1, 300, 200), (7, 128, 130)])  # M, K, N: ragged K and N
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
