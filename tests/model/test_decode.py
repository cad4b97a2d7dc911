"""Cached decoding reproduces the full-sequence forward; extend by S > 1 equals S single steps."""

import pytest
import torch

from tests.tolerances import TOL


def _prefill_then_steps(model, tokens, n_prefill, chunks):
    """Prefill n_prefill tokens, then extend by the given chunk sizes; -> concatenated logits."""
    B, S = tokens.shape
    caches = model.new_cache(B, S + 4)
    out, _ = model.prefill(tokens[:, :n_prefill], [c[:, :n_prefill] for c in caches])
    outs, p = [out], n_prefill
    for n in chunks:
        pos = torch.arange(p, p + n).expand(B, n)
        logits, _ = model.decode(tokens[:, p : p + n], pos, [c[:, : p + n] for c in caches])
        outs.append(logits)
        p += n
    assert p == S
    return torch.cat(outs, 1), caches


@pytest.mark.parametrize("S", [14, 48])  # dense and sparse (index_topk 16)
def test_decode_reproduces_full_forward(tiny, S):
    tokens = torch.randint(0, 256, (2, S))
    with torch.no_grad():
        full, _ = tiny(tokens)
        inc, _ = _prefill_then_steps(tiny, tokens, 5, [1] * (S - 5))
    torch.testing.assert_close(inc, full, **TOL["fp32_reassoc"])


def test_extend_equals_single_steps(tiny):
    S = 44
    tokens = torch.randint(0, 256, (2, S))
    with torch.no_grad():
        chunked, c1 = _prefill_then_steps(tiny, tokens, 20, [3, 5, 2, 7, 7])
        single, c2 = _prefill_then_steps(tiny, tokens, 20, [1] * 24)
    torch.testing.assert_close(chunked, single, **TOL["fp32_reassoc"])
    for a, b in zip(c1, c2):
        torch.testing.assert_close(a, b, **TOL["fp32_reassoc"])


def test_batch_rows_with_different_lengths(tiny):
    """Right-padded rows at their own positions give each sequence's own results."""
    a = torch.randint(0, 256, (1, 9))
    b = torch.randint(0, 256, (1, 14))
    with torch.no_grad():
        la, _ = tiny(a)
        lb, _ = tiny(b)
        tokens = torch.cat((torch.cat((a, torch.zeros(1, 5, dtype=torch.long)), 1), b))
        caches = tiny.new_cache(2, 16)
        pre, _ = tiny.prefill(tokens, [c[:, :14] for c in caches])
        # next token per row at its own position (row 0 overwrites its padding slot 9)
        nxt = torch.tensor([[7], [8]])
        pos = torch.tensor([[9], [14]])
        step, _ = tiny.decode(nxt, pos, [c[:, :15] for c in caches])
        la2, _ = tiny(torch.cat((a, nxt[:1]), 1))
        lb2, _ = tiny(torch.cat((b, nxt[1:]), 1))
    torch.testing.assert_close(pre[0, :9], la[0], **TOL["fp32_reassoc"])
    torch.testing.assert_close(pre[1], lb[0], **TOL["fp32_reassoc"])
    torch.testing.assert_close(step[0, 0], la2[0, -1], **TOL["fp32_reassoc"])
    torch.testing.assert_close(step[1, 0], lb2[0, -1], **TOL["fp32_reassoc"])


def test_decode_writes_only_new_positions(tiny):
    caches = tiny.new_cache(1, 12)
    for c in caches:
        c.fill_(3.0)
    with torch.no_grad():
        tiny.decode(torch.tensor([[5, 6]]), torch.tensor([[4, 5]]), [c[:, :6] for c in caches])
    n_main = 3 * tiny.config.num_hidden_layers
    for i, c in enumerate(caches):
        untouched = torch.cat((c[:, :4], c[:, 6:]), 1)
        assert (untouched == 3.0).all()
        assert (c[:, 4:6] != 3.0).any() == (i < n_main)  # MTP caches belong to the draft step
