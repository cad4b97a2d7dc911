"""RoPE/YaRN against the spec's numbers and an independent complex-number computation."""

import math

import torch
from dsc.model import preset
from dsc.model.config import yarn_mscale
from dsc.model.rope import apply_rope_half, apply_rope_interleaved, yarn_inv_freq


def test_yarn_frequencies_match_spec_table():
    cfg = preset("deepseek-v3.2")
    f = yarn_inv_freq(cfg).double()
    base = 1.0 / (10000 ** (torch.arange(32, dtype=torch.float64) * 2 / 64))
    ratio = f / base
    # spec §3: j <= 10 unchanged, j >= 23 divided by 40, linear ramp in between
    assert torch.allclose(ratio[:11], torch.ones(11, dtype=torch.float64), atol=1e-6)
    assert torch.allclose(ratio[23:], torch.full((9,), 1 / 40, dtype=torch.float64), atol=1e-7)
    ramp = (torch.arange(11, 23, dtype=torch.float64) - 10) / 13
    assert torch.allclose(ratio[11:23], 1 - ramp + ramp / 40, atol=1e-6)
    assert abs(ratio[11].item() - 0.925) < 1e-3


def test_mscale():
    assert abs(yarn_mscale(40.0, 1.0) - 1.368888) < 1e-6
    assert yarn_mscale(1.0) == 1.0
    assert abs(preset("deepseek-v3.2").softmax_scale - 192**-0.5 * yarn_mscale(40.0) ** 2) < 1e-12


def _complex_rotate(pairs_re, pairs_im, theta):
    z = torch.complex(pairs_re.double(), pairs_im.double()) * torch.polar(torch.ones_like(theta), theta)
    return z.real.float(), z.imag.float()


def test_interleaved_and_half_layouts():
    r = 8
    x = torch.randn(3, 5, r)
    theta = torch.rand(3, 5, r // 2).double() * 10
    cos, sin = theta.cos().float(), theta.sin().float()
    # interleaved: pairs (2j, 2j+1)
    re, im = _complex_rotate(x[..., 0::2], x[..., 1::2], theta)
    want = torch.stack((re, im), -1).flatten(-2)
    torch.testing.assert_close(apply_rope_interleaved(x, cos, sin), want, atol=1e-5, rtol=1e-5)
    # half: pairs (j, j + r/2)
    re, im = _complex_rotate(x[..., : r // 2], x[..., r // 2 :], theta)
    torch.testing.assert_close(apply_rope_half(x, cos, sin), torch.cat((re, im), -1), atol=1e-5, rtol=1e-5)


def test_rope_preserves_norm_and_relative_positions():
    cfg = preset("tiny")
    inv = yarn_inv_freq(cfg)
    q, k = torch.randn(cfg.qk_rope_head_dim), torch.randn(cfg.qk_rope_head_dim)

    def at(x, p):
        a = p * inv
        return apply_rope_interleaved(x, a.cos(), a.sin())

    assert math.isclose(at(q, 7).norm().item(), q.norm().item(), rel_tol=1e-5)
    # q_m . k_n depends only on m - n
    assert math.isclose((at(q, 10) @ at(k, 4)).item(), (at(q, 26) @ at(k, 20)).item(), rel_tol=1e-4, abs_tol=1e-5)
