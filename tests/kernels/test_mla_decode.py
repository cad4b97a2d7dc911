import os
import subprocess
import sys

import pytest
import torch
from dsc.kernels.mla_decode import mla_decode_cpu, mla_decode_ref
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.tolerances import TOL

SHAPES = [(2, 1, 4, 32, 8, 70), (1, 3, 5, 16, 8, 33), (2, 2, 16, 64, 16, 129)]  # (B, S, H, dc, dr, T)


def _inputs(B, S, H, dc, dr, T):
    q, kv = torch.randn(B, S, H, dc + dr), torch.randn(B, T, dc + dr)
    mask = torch.zeros(B, S, T)
    for s in range(S):  # causal inside the chunk, plus some DSA-style holes
        mask[:, s, T - S + s + 1 :] = float("-inf")
    mask[0, 0, 1:5] = float("-inf")
    return q, kv, mask


def _per_head_mha(q, kv, mask, scale, dv):
    """Independent check: materialise per-head K = V = the latent and run ordinary attention per head."""
    B, S, H, C = q.shape
    out = torch.empty(B, S, H, dv)
    for h in range(H):
        s = torch.einsum("bsc,btc->bst", q[:, :, h], kv) * scale + mask
        out[:, :, h] = s.softmax(-1) @ kv[..., :dv]
    return out


@pytest.mark.parametrize("shape", SHAPES)
def test_cpu_matches_reference_and_per_head_attention(shape):
    q, kv, mask = _inputs(*shape)
    dc = shape[3]
    got = torch.ops.dsc.mla_decode(q, kv, mask, 0.125, dc)
    torch.testing.assert_close(got, mla_decode_ref(q, kv, mask, 0.125, dc), **TOL["fp32_reassoc"])
    torch.testing.assert_close(got, _per_head_mha(q, kv, mask, 0.125, dc), **TOL["fp32_reassoc"])
    assert torch.isfinite(got).all()


def _selection(B, S, T, K, seed=0):
    """(indices with some -1 slots, the equivalent additive mask)."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.stack([torch.stack([torch.randperm(T, generator=g)[:K] for _ in range(S)]) for _ in range(B)])
    idx[0, 0, -3:] = -1  # invalid slots
    mask = torch.full((B, S, T), float("-inf"))
    for b in range(B):
        for s in range(S):
            valid = idx[b, s][idx[b, s] >= 0]
            mask[b, s, valid] = 0.0
    return idx, mask


def test_indices_equal_mask():
    B, S, H, dc, dr, T = 2, 2, 4, 16, 8, 40
    q, kv, _ = _inputs(B, S, H, dc, dr, T)
    idx, mask = _selection(B, S, T, 10)
    got = torch.ops.dsc.mla_decode(q, kv, None, 0.2, dc, idx)
    torch.testing.assert_close(got, mla_decode_ref(q, kv, mask, 0.2, dc), **TOL["fp32_reassoc"])


TRITON_CHECK = """
import torch
from dsc.kernels.mla_decode import mla_decode_cpu, mla_decode_ref, mla_decode_triton
from tests.kernels.test_mla_decode import SHAPES, _inputs, _selection
torch.manual_seed(0)
for shape in SHAPES:
    q, kv, mask = _inputs(*shape)
    for splits in (1, 3):
        got = mla_decode_triton(q, kv, mask, 0.125, shape[3], splits=splits)
        ref = mla_decode_ref(q, kv, mask, 0.125, shape[3])
        assert torch.allclose(got, ref, atol=1e-4, rtol=1e-3), (shape, splits, (got - ref).abs().max())
    got = mla_decode_triton(q, kv, None, 0.125, shape[3])
    assert torch.allclose(got, mla_decode_ref(q, kv, None, 0.125, shape[3]), atol=1e-4, rtol=1e-3)
    B, S, H, dc, dr, T = shape
    idx, sel_mask = _selection(B, S, T, min(T, 37))
    for splits in (1, 2):  # DSA: only the selected slots, -1 slots ignored
        got = mla_decode_triton(q, kv, None, 0.125, dc, splits=splits, indices=idx)
        ref = mla_decode_ref(q, kv, sel_mask, 0.125, dc)
        assert torch.allclose(got, ref, atol=1e-4, rtol=1e-3), (shape, "indices", (got - ref).abs().max())
print("ok")
"""


def test_triton_kernel_in_interpreter():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    r = subprocess.run(
        [sys.executable, "-c", TRITON_CHECK],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))),
    )
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-3000:]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_triton_kernel_on_gpu():
    for B, S, H, dc, dr, T in [(4, 1, 128, 512, 64, 4096), (2, 2, 16, 512, 64, 1000)]:
        q, kv, mask = (t.cuda() for t in _inputs(B, S, H, dc, dr, T))
        got = torch.ops.dsc.mla_decode(q, kv, mask, 0.1352, dc)
        torch.testing.assert_close(got, mla_decode_ref(q, kv, mask, 0.1352, dc), atol=2e-3, rtol=2e-3)
        idx, sel_mask = _selection(B, S, T, 512)
        got = torch.ops.dsc.mla_decode(q, kv, None, 0.1352, dc, idx.cuda())
        torch.testing.assert_close(got, mla_decode_ref(q, kv, sel_mask.cuda(), 0.1352, dc), atol=2e-3, rtol=2e-3)


@settings(max_examples=25, deadline=None)
@given(
    B=st.integers(1, 2),
    S=st.integers(1, 3),
    H=st.integers(1, 6),
    dc=st.integers(1, 24),
    dr=st.integers(0, 8),
    T=st.integers(1, 50),
    seed=st.integers(0, 2**16),
)
def test_cpu_matches_reference_on_any_shape(B, S, H, dc, dr, T, seed):
    g = torch.Generator().manual_seed(seed)
    q, kv = torch.randn(B, S, H, dc + dr, generator=g), torch.randn(B, T, dc + dr, generator=g)
    mask = torch.where(torch.rand(B, S, T, generator=g) < 0.3, float("-inf"), 0.0)
    mask[..., 0] = 0.0  # at least one visible key per query
    want = mla_decode_ref(q, kv, mask, 0.3, dc)
    torch.testing.assert_close(torch.ops.dsc.mla_decode(q, kv, mask, 0.3, dc), want, **TOL["fp32_reassoc"])
    # the blocked online softmax across block edges, with blocks that see only masked keys
    torch.testing.assert_close(mla_decode_cpu(q, kv, mask, 0.3, dc, block=4), want, **TOL["fp32_reassoc"])
    if S == 1:  # a mask that broadcasts over the batch
        got = mla_decode_cpu(q, kv, mask[:1], 0.3, dc, block=3)
        torch.testing.assert_close(got, mla_decode_ref(q, kv, mask[:1].expand(B, S, T), 0.3, dc), **TOL["fp32_reassoc"])
