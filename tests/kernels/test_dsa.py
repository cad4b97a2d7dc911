"""dsc::indexer_topk and dsc::sparse_mla against their references (the spec), and against the
masked-dense attention they replace; ties, short contexts, per-row limits, block edges."""

import os
import subprocess
import sys

import pytest
import torch
from dsc.kernels import dsa, native
from dsc.kernels.mla_decode import mla_decode_ref

from tests.tolerances import TOL


def _indexer_inputs(B, S, H, D, T, seed=0, ties=False):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, S, H, D, generator=g)
    keys = torch.randn(B, T, D, generator=g)
    if ties:  # ReLU zeros: many keys score exactly 0
        keys[:, ::2] = -keys[:, ::2].abs()
        q = q.abs()
        keys[:, 1::3] = keys[:, 1::3].abs().round()
    w = torch.randn(B, S, H, generator=g).abs()
    start = torch.randint(0, T - S + 1, (B, 1), generator=g)
    limit = start + torch.arange(S)  # an extend of S tokens at a per-row start
    return q, w, keys, limit


def _as_sets(idx):
    return [[sorted(int(i) for i in row if i >= 0) for row in b] for b in idx]


NATIVE = pytest.param(
    True, id="native", marks=pytest.mark.skipif(native.library() is None, reason="no native CPU kernels here")
)
PATHS = [pytest.param(False, id="torch"), NATIVE]  # the CPU op's torch composition, or dsa_cpu.c


def _use_native(monkeypatch, on: bool) -> None:
    """Route the CPU ops' calls to the native kernels or to their torch composition."""
    monkeypatch.setattr(dsa, "USE_NATIVE", on)


CASES = [  # B, S, H, D, T, topk
    (1, 1, 4, 16, 50, 8),  # decode
    (2, 5, 3, 16, 37, 8),  # extend at per-row starts
    (2, 4, 2, 8, 10, 16),  # topk > T: everything visible is selected
    (1, 7, 4, 16, 7, 3),  # a prefill from position 0: the first queries see fewer than topk keys
]


@pytest.mark.parametrize("use_native", PATHS)
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("case", CASES)
def test_indexer_topk_cpu_equals_reference(case, ties, use_native, monkeypatch):
    B, S, H, D, T, k = case
    _use_native(monkeypatch, use_native)
    q, w, keys, limit = _indexer_inputs(B, S, H, D, T, ties=ties)
    want = dsa.indexer_topk_ref(q, w, keys, limit, k)
    assert want.shape == (B, S, k) and want.dtype == torch.int64
    # one block; a block per query row (with K qᵀ products for those single rows, as at long decode contexts)
    for block, keys_major in ((dsa.ROW_BLOCK_VALUES, 1 << 30), (H * T, 1 << 30), (H * T, 0)):
        monkeypatch.setattr(dsa, "ROW_BLOCK_VALUES", block)
        monkeypatch.setattr(dsa, "KEYS_MAJOR_MIN_T", keys_major)
        got = torch.ops.dsc.indexer_topk(q, w, keys, limit, k)
        assert _as_sets(got) == _as_sets(want)
    big = torch.zeros(B, T + 3, D)  # the cache the runtime hands a window of: not contiguous
    big[:, :T] = keys
    assert _as_sets(torch.ops.dsc.indexer_topk(q, w, big[:, :T], limit, k)) == _as_sets(want)
    # k = min(topk, visible): each row selects exactly that many, all visible
    visible = (limit + 1).clamp(max=T)
    assert ((got >= 0).sum(-1) == visible.clamp(max=k)).all()
    assert (got <= limit.unsqueeze(-1)).all()
    if T <= k:  # the fast path (no scores): the visible keys in increasing order, then -1
        pos = torch.arange(k)
        assert torch.equal(got, torch.where(pos <= limit.unsqueeze(-1), pos, -1))


@pytest.mark.parametrize("use_native", PATHS)
def test_ties_go_to_the_earlier_token(use_native, monkeypatch):
    _use_native(monkeypatch, use_native)
    keys = torch.zeros(1, 6, 4)
    keys[0, 4] = 1.0  # one positive score; the rest tie at ReLU's 0
    q, w = torch.ones(1, 1, 1, 4), torch.ones(1, 1, 1)
    got = torch.ops.dsc.indexer_topk(q, w, keys, torch.tensor([[5]]), 3)
    assert _as_sets(got) == [[[0, 1, 4]]]


def test_both_selection_paths_agree(monkeypatch):
    """Short rows select by a stable sort, long ones by a top-k (and where ties cross the cut, two
    top-k passes): the same sets, ties (quantised scores) and masked (-inf) slots and rows shorter
    than k included."""
    from dsc.kernels import dsa

    g = torch.Generator().manual_seed(0)
    tied = (torch.randn(64, 300, generator=g) * 3).round()  # many exact ties
    distinct = torch.randn(64, 300, generator=g)  # no ties: one top-k pass decides
    for scores, k in [(s, k) for s in (tied, distinct) for k in (1, 16, 64, 400)]:
        scores[:, 250:] = float("-inf")
        scores[5, 3:] = float("-inf")  # a row with 3 visible keys: -1 padding
        monkeypatch.setattr(dsa, "SORT_MAX_VALUES", 1 << 30)
        by_sort = dsa._select(scores, k)
        monkeypatch.setattr(dsa, "SORT_MAX_T", 0)
        by_topk = dsa._select(scores, k)
        monkeypatch.undo()
        assert _as_sets([by_sort]) == _as_sets([by_topk]), k
        for idx in (by_sort, by_topk):  # -1 pads the end of each row, never between indices
            valid = idx >= 0
            assert torch.equal(valid, valid.sum(-1, keepdim=True) > torch.arange(idx.shape[-1])), k


def _mla_inputs(B, S, H, dc, dr, T, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, S, H, dc, generator=g), torch.randn(B, S, H, dr, generator=g),
            torch.randn(B, T, dc, generator=g), torch.randn(B, T, dr, generator=g))  # fmt: skip


def _random_indices(B, S, T, K, seed=0):
    g = torch.Generator().manual_seed(seed)
    idx = torch.stack([torch.randperm(T, generator=g)[:K] for _ in range(B * S)]).view(B, S, K)
    idx[..., K // 2 :] = torch.where(torch.rand(B, S, K - K // 2, generator=g) < 0.3, -1, idx[..., K // 2 :])
    return idx


SPARSE_PATHS = {  # FEW_ROWS, UNION_HEADS_PER_K, rows per block (None: ROW_BLOCK_VALUES as it is)
    "native": (None, None, None),  # dsa_cpu.c
    "own gather per row": (1 << 30, 4, None),
    "union of a block": (0, 1e-9, None),
    "union, one block per row": (0, 1e-9, 1),
    "union, blocks of 2 rows": (0, 1e-9, 2),
    "union or per row by its size": (0, 4, None),
}


@pytest.mark.parametrize("path", SPARSE_PATHS)
@pytest.mark.parametrize("shape", [(1, 1, 4, 16, 8, 40, 12), (2, 3, 2, 8, 4, 9, 9), (2, 5, 3, 16, 8, 64, 20)])
def test_sparse_mla_equals_masked_dense_attention(shape, path, monkeypatch):
    B, S, H, dc, dr, T, K = shape
    q_abs, q_pe, c, r = _mla_inputs(B, S, H, dc, dr, T)
    idx = _random_indices(B, S, T, K)
    idx[-1, -1] = -1  # a row with no token
    dump = torch.where(idx >= 0, idx, T)  # -1 slots land in a column that is cut off
    mask = torch.full((B, S, T + 1), float("-inf")).scatter(-1, dump, 0.0)[..., :T]
    dense = mla_decode_ref(torch.cat((q_abs, q_pe), -1), torch.cat((c, r), -1), mask, 0.3, dc)
    dense[-1, -1] = 0.0  # masked-dense attention over no token is NaN; the op's answer is zeros
    ref = dsa.sparse_mla_ref(q_abs, q_pe, c, r, idx, 0.3)
    torch.testing.assert_close(ref, dense, **TOL["fp32_reassoc"])
    few, per_k, rows = SPARSE_PATHS[path]
    if path == "native" and native.library() is None:
        pytest.skip("no native CPU kernels here")
    _use_native(monkeypatch, path == "native")
    if few is not None:
        monkeypatch.setattr(dsa, "FEW_ROWS", few)
        monkeypatch.setattr(dsa, "UNION_HEADS_PER_K", per_k)
    if rows:
        monkeypatch.setattr(dsa, "ROW_BLOCK_VALUES", rows * H * T)
    per_row = []
    monkeypatch.setattr(dsa, "_sparse_mla_rows", lambda *a, f=dsa._sparse_mla_rows: per_row.append(1) or f(*a))
    torch.testing.assert_close(torch.ops.dsc.sparse_mla(q_abs, q_pe, c, r, idx, 0.3), ref, **TOL["fp32_reassoc"])
    kv = torch.zeros(B, T + 3, dc + dr)  # the latent cache's layout: [c ; k_pe] adjacent, a window of it
    kv[:, :T] = torch.cat((c, r), -1)
    fused = torch.ops.dsc.sparse_mla(q_abs, q_pe, kv[:, :T, :dc], kv[:, :T, dc:], idx, 0.3)
    torch.testing.assert_close(fused, ref, **TOL["fp32_reassoc"])
    # queries as views of one (B, H, S, .) tensor, as transformers' code makes them
    q = torch.cat((q_abs, q_pe), -1).transpose(1, 2).contiguous().transpose(1, 2)
    strided = torch.ops.dsc.sparse_mla(q[..., :dc], q[..., dc:], c, r, idx, 0.3)
    torch.testing.assert_close(strided, ref, **TOL["fp32_reassoc"])
    if path == "native":
        assert not per_row
    elif path == "union or per row by its size":  # 5 rows of 20 of 64 tokens share little: per row
        assert bool(per_row) == (shape[-1] < shape[-2] and S > 1)
    elif S > 1:
        assert bool(per_row) == (path == "own gather per row")


@pytest.mark.parametrize("use_native", PATHS)
def test_sparse_mla_row_without_a_token_is_zero(use_native, monkeypatch):
    _use_native(monkeypatch, use_native)
    q_abs, q_pe, c, r = _mla_inputs(1, 2, 2, 8, 4, 5)
    idx = torch.tensor([[[-1, -1], [3, -1]]])
    out = torch.ops.dsc.sparse_mla(q_abs, q_pe, c, r, idx, 0.5)
    assert torch.isfinite(out).all() and (out[0, 0] == 0).all()
    torch.testing.assert_close(out[0, 1], c[0, 3].expand(2, 8), **TOL["fp32_exact_graph"])  # one token: its latent


def test_fused_view_of_adjacent_caches():
    cache = torch.randn(2, 30, 12)
    window = cache[:, :17]  # what the runtime hands a step: not contiguous
    kv = dsa._fused_view(window[..., :8], window[..., 8:])
    assert kv is not None and torch.equal(kv, window) and kv.data_ptr() == window.data_ptr()
    assert dsa._fused_view(torch.randn(2, 17, 8), torch.randn(2, 17, 4)) is None


def _mha_inputs(B, S, H, D, Dv, T, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, S, H, D, generator=g), torch.randn(B, T, H, D, generator=g),
            torch.randn(B, T, H, Dv, generator=g))  # fmt: skip


def _masked_dense_mha(q, k, v, idx, scale):
    """Attention over all T per-head keys with the selection as an additive mask (rows with no token: 0)."""
    T = k.shape[1]
    mask = torch.full((*idx.shape[:2], T + 1), float("-inf")).scatter(-1, torch.where(idx >= 0, idx, T), 0.0)
    scores = torch.einsum("bshd,bthd->bsht", q, k) * scale + mask[..., :T].unsqueeze(2)
    out = torch.einsum("bsht,bthv->bshv", scores.softmax(-1), v)
    return torch.where((idx >= 0).any(-1)[..., None, None], out, 0.0)


@pytest.mark.parametrize("rows", [None, 1, 2])  # rows per block (None: ROW_BLOCK_VALUES as it is)
@pytest.mark.parametrize("causal", [False, True], ids=["gathered", "prefix"])
@pytest.mark.parametrize("shape", [(1, 1, 4, 16, 8, 40, 12), (2, 3, 2, 8, 8, 9, 9), (2, 5, 3, 16, 12, 64, 20)])
def test_sparse_mha_equals_masked_dense_attention(shape, causal, rows, monkeypatch):
    B, S, H, D, Dv, T, K = shape
    q, k, v = _mha_inputs(B, S, H, D, Dv, T)
    if causal:  # a prefill's rows: the first K keys up to each row's position, -1 past it
        pos = T - S + torch.arange(S)
        idx = torch.arange(K).expand(B, S, K).masked_fill(torch.arange(K) > pos[:, None], -1)
    else:
        idx = _random_indices(B, S, T, K)
    idx[-1, -1] = -1  # a row with no token
    dense = _masked_dense_mha(q, k, v, idx, 0.3)
    ref = dsa.sparse_mha_ref(q, k, v, idx, 0.3)
    torch.testing.assert_close(ref, dense, **TOL["fp32_reassoc"])
    if rows:
        monkeypatch.setattr(dsa, "ROW_BLOCK_VALUES", rows * H * T)
    got = torch.ops.dsc.sparse_mha(q, k, v, idx, 0.3)
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    torch.testing.assert_close(got, ref, **TOL["fp32_reassoc"])
    # views of (B, H, S, .) tensors, as transformers' code makes them, and bf16 storage
    qs, ks, vs = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k, v))
    torch.testing.assert_close(torch.ops.dsc.sparse_mha(qs, ks, vs, idx, 0.3), ref, **TOL["fp32_reassoc"])
    low = [x.bfloat16() for x in (q, k, v)]
    want = dsa.sparse_mha_ref(*low, idx, 0.3)
    torch.testing.assert_close(torch.ops.dsc.sparse_mha(*low, idx, 0.3), want, **TOL["fp32_reassoc"])


TRITON_CHECK = """
import torch
from dsc.kernels import dsa
from dsc.kernels.mla_decode import mla_decode_triton
from tests.kernels.test_dsa import _as_sets, _indexer_inputs, _mha_inputs, _mla_inputs, _random_indices
for B, S, H, dc, dr, T, K in [(1, 1, 4, 16, 8, 40, 12), (2, 3, 3, 16, 8, 33, 20)]:
    q_abs, q_pe, c, r = _mla_inputs(B, S, H, dc, dr, T)
    cache = torch.cat((c, r), -1)
    big = torch.zeros(B, T + 7, dc + dr)
    big[:, :T] = cache
    window = big[:, :T]  # a non-contiguous window, read in place
    kv = dsa._fused_view(window[..., :dc], window[..., dc:])
    idx = _random_indices(B, S, T, K)
    got = mla_decode_triton(torch.cat((q_abs, q_pe), -1), kv, None, 0.3, dc, indices=idx)
    ref = dsa.sparse_mla_ref(q_abs, q_pe, c, r, idx, 0.3)
    assert torch.allclose(got, ref, atol=1e-4, rtol=1e-3), (got - ref).abs().max()
# the MHA form (a head's [v ; k] for the kernel's latent), non-contiguous inputs, a row with no token
for B, S, H, D, Dv, T, K in [(1, 3, 2, 16, 8, 40, 12), (2, 2, 3, 8, 12, 9, 9)]:
    q, k, v = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in _mha_inputs(B, S, H, D, Dv, T))
    idx = _random_indices(B, S, T, K)
    idx[-1, -1] = -1
    got, ref = dsa.sparse_mha_triton(q, k, v, idx, 0.3), dsa.sparse_mha_ref(q, k, v, idx, 0.3)
    assert torch.allclose(got, ref, atol=1e-4, rtol=1e-3), (got - ref).abs().max()
# the indexer: head counts and feature sizes off the block sizes, T off the key block, topk > visible,
# ties, a block per query row; the selected sets are the reference's
for (B, S, H, D, T, k), ties in [((1, 1, 4, 16, 70, 8), False), ((2, 5, 3, 20, 37, 8), True),
                                 ((2, 4, 2, 8, 10, 16), False), ((1, 7, 65, 16, 7, 3), True)]:
    q, w, keys, limit = _indexer_inputs(B, S, H, D, T, ties=ties)
    big = torch.zeros(B, T + 5, D)
    big[:, :T] = keys
    want = _as_sets(dsa.indexer_topk_ref(q, w, keys, limit, k))
    assert _as_sets(dsa.indexer_topk_triton(q, w, big[:, :T], limit, k)) == want, (B, S, H, D, T, k)
    dsa.ROW_BLOCK_VALUES = T  # one query row per block
    assert _as_sets(dsa.indexer_topk_triton(q, w, keys, limit, k)) == want
    dsa.ROW_BLOCK_VALUES = 1 << 24
print("ok")
"""


def test_triton_kernels_in_interpreter():
    pytest.importorskip("triton")
    r = subprocess.run(
        [sys.executable, "-c", TRITON_CHECK], capture_output=True, text=True, timeout=600,
        env=dict(os.environ, TRITON_INTERPRET="1"), cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))),
    )  # fmt: skip
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-3000:]


def test_hadamard_and_the_fp8_index_quantiser():
    h = dsa.hadamard(128)
    torch.testing.assert_close(h @ h.T, torch.eye(128), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="power-of-two"):
        dsa.hadamard(96)
    k = torch.randn(3, 50, 128)
    k[0, 0] = 0  # an all-zero key: a finite scale, zeros back
    k[1, 1] *= 1e3  # an outlier token
    for ue8m0 in (False, True):
        k8, s = dsa.quantize_index_keys(k, ue8m0)
        assert k8.dtype == torch.float8_e4m3fn and s.shape == (3, 50, 1) and torch.isfinite(s).all()
        back = k8.float() * s
        assert torch.equal(back[0, 0], torch.zeros(128))
        assert ((back - k).abs() <= k.abs().amax(-1, keepdim=True) / 16 + 1e-6).all()  # within e4m3 precision
    # the FP8 selection keeps most of the fp32 one (tie-free random inputs, D = 128)
    q, w, keys, limit = _indexer_inputs(2, 6, 8, 128, 400, seed=3)
    a = dsa.indexer_topk_ref(q, w, keys, limit, 64)
    b = dsa.fp8_index_topk_ref(q, w, keys, limit, 64)
    past = (limit + 1) > 64
    hit = (a[past].unsqueeze(-1) == b[past].unsqueeze(-2)).any(-1).float().mean()
    assert hit > 0.9, hit


@pytest.mark.skipif(native.library() is None, reason="no native CPU kernels here")
def test_native_dsa_kernels_at_model_sizes():
    """dsa_cpu.c where its paths differ from the small cases: many rows, long rows, ties crossing the
    top-k cut at scale, head counts, D and dc off the SIMD widths, bf16 queries; an index past the
    cache is an error, not a read out of bounds."""
    for (B, S, H, D, T, k), ties in [((1, 1, 16, 128, 5000, 512), False), ((2, 9, 8, 37, 700, 64), True),
                                     ((1, 1, 4, 32, 3000, 64), True), ((3, 2, 5, 24, 300, 299), False)]:  # fmt: skip
        q, w, keys, limit = _indexer_inputs(B, S, H, D, T, ties=ties)
        want = _as_sets(dsa.indexer_topk_ref(q, w, keys, limit, k))
        assert _as_sets(torch.ops.dsc.indexer_topk(q, w, keys, limit, k)) == want, (B, S, H, D, T, k)
    for B, S, H, dc, dr, T, K in [(2, 9, 17, 131, 13, 300, 64), (1, 1, 128, 64, 16, 4000, 2048)]:
        q_abs, q_pe, c, r = _mla_inputs(B, S, H, dc, dr, T)
        idx = _random_indices(B, S, T, K)
        ref = dsa.sparse_mla_ref(q_abs, q_pe, c, r, idx, 0.1)
        torch.testing.assert_close(torch.ops.dsc.sparse_mla(q_abs, q_pe, c, r, idx, 0.1), ref, **TOL["fp32_reassoc"])
        low = torch.ops.dsc.sparse_mla(q_abs.bfloat16(), q_pe.bfloat16(), c, r, idx, 0.1)
        assert low.dtype == torch.bfloat16
        idx[0, 0, 0] = T
        with pytest.raises(IndexError, match="past the"):
            torch.ops.dsc.sparse_mla(q_abs, q_pe, c, r, idx, 0.1)
