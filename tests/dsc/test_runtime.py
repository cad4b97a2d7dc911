"""One runtime for eager and compiled: same tokens, batching, sampling."""

import pytest
import torch

from dsc.errors import DscError
from dsc.runtime import EagerBackend, SamplingParams, generate, prefill, sample_next
from tests.tolerances import TOL


def test_greedy_same_on_eager_and_program(tiny, tiny_optimized):
    program, _ = tiny_optimized
    prompts = [[256, 10, 20, 30], [256, 5]]
    p = SamplingParams(max_new_tokens=30, stop_at_eos=False)
    a = generate(EagerBackend(tiny), prompts, p)
    b = generate(program, prompts, p)
    assert a.tokens == b.tokens and len(a.tokens[0]) == 30


def test_batch_of_different_lengths_equals_one_by_one(tiny):
    prompts = [[256] + list(range(40, 60)), [256, 7, 8], [256] + list(range(100, 130))]  # > index_topk: sparse
    p = SamplingParams(max_new_tokens=12, stop_at_eos=False)
    batched = generate(EagerBackend(tiny), prompts, p).tokens
    single = [generate(EagerBackend(tiny), [q], p).tokens[0] for q in prompts]
    assert batched == single


@pytest.mark.parametrize("chunk", [7, 16, 29])
def test_chunked_prefill_equals_one_call(tiny, tiny_optimized, chunk):
    """A prompt prefilled as chunks (a prefill, then decode extends) leaves the caches and the rows'
    last logits of one prefill call, rows of different lengths ending in different chunks; eager
    and compiled, chunk sizes that do and do not divide the prompt, chunks past index_topk."""
    program, _ = tiny_optimized
    assert program.prefill_chunk == 4096  # the H200 context the forms were chosen for
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 256, (3, 45), generator=g)
    lens = torch.tensor([45, 12, 30])
    for backend in (EagerBackend(tiny), program):
        whole = backend.cache.allocate(3, 50)
        want = prefill(backend, tokens, whole, lens, chunk=0)
        parts = backend.cache.allocate(3, 50)
        got = prefill(backend, tokens, parts, lens, chunk=chunk)
        torch.testing.assert_close(got, want, **TOL["fp32_rewrite"])
        for a, b in zip(parts, whole):
            torch.testing.assert_close(a, b, **TOL["fp32_rewrite"])
    p = SamplingParams(max_new_tokens=8, stop_at_eos=False)
    prompts = [tokens[i, : lens[i]].tolist() for i in range(3)]
    assert generate(program, prompts, p, chunk=chunk).tokens == generate(program, prompts, p, chunk=0).tokens


def test_sampling_is_seeded_and_respects_top_p(tiny):
    b = EagerBackend(tiny)
    p = SamplingParams(max_new_tokens=10, temperature=1.0, top_p=0.9, seed=7, stop_at_eos=False)
    assert generate(b, [[256, 1, 2]], p).tokens == generate(b, [[256, 1, 2]], p).tokens
    logits = torch.tensor([[5.0, 4.9, -10.0, -10.0]])
    gen = torch.Generator().manual_seed(0)
    draws = {int(sample_next(logits, SamplingParams(temperature=1.0, top_p=0.5), gen)) for _ in range(50)}
    assert draws == {0}  # top-p 0.5 keeps only the most likely token
    draws = {int(sample_next(logits, SamplingParams(temperature=1.0), gen)) for _ in range(200)}
    assert draws == {0, 1}


def test_stats_and_bad_params(tiny):
    res = generate(EagerBackend(tiny), [[256, 3]], SamplingParams(max_new_tokens=4, stop_at_eos=False))
    assert res.stats["new_tokens"] == 4 and res.stats["decode_steps"] == 3
    for bad in (dict(max_new_tokens=0), dict(temperature=-1), dict(top_p=0)):
        with pytest.raises(DscError):
            generate(EagerBackend(tiny), [[1]], SamplingParams(**bad))
    with pytest.raises(DscError, match="max_position_embeddings"):
        generate(EagerBackend(tiny), [[1] * 1000], SamplingParams(max_new_tokens=100))


def test_program_under_inductor_gives_the_same_tokens(tiny_optimized, capsys):
    """``inductor=True`` (``dsc generate --compile``): each entry through torch.compile, dsc:: ops
    opaque; the same greedy tokens over prompts of different lengths (dynamic shapes)."""
    import dataclasses

    from dsc.cli import main

    program, _ = tiny_optimized
    compiled = dataclasses.replace(program, inductor=True, _modules={})
    prompts = [[256, 10, 20, 30], [256, 5]]
    p = SamplingParams(max_new_tokens=12, stop_at_eos=False)
    assert generate(compiled, prompts, p).tokens == generate(program, prompts, p).tokens
    assert main(["generate", "tiny", "--prompt-tokens", "1,2", "--compile"]) == 2
    assert "dsc optimize` output directory" in capsys.readouterr().err
