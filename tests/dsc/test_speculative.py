"""Speculative decoding with MTP drafts: exactly plain decoding's greedy tokens, exactly the target's
sampling distribution, the MTP cache holding the accepted prefix, and the known failure classes."""

import dataclasses
import json
from types import SimpleNamespace

import pytest
import torch
from dsc.model.config import preset
from dsc.model.model import DeepseekV32ForCausalLM

from dsc.cache import CacheSpec
from dsc.cli import main
from dsc.errors import DscError
from dsc.runtime import EagerBackend, SamplingParams, generate, prefill
from dsc.speculative import accept_sampled, speculative_generate
from tests.tolerances import TOL

GREEDY = SamplingParams(max_new_tokens=256, stop_at_eos=False)


class Oracle:
    """A backend whose drafts are right with probability ``hit`` (seeded), from the known plain output:
    the real draft still runs (its caches are written as usual), only its proposal is replaced.
    Rows of a batch accept different numbers of drafts at every step."""

    def __init__(self, backend, prompts, outputs, hit, seed=0, extra_vocab=0):
        self.b, self.hit, self.extra = backend, hit, extra_vocab
        self.truth = [p + o for p, o in zip(prompts, outputs)]
        self.cache, self.config = backend.cache, backend.config
        self.prefill_chunk = getattr(backend, "prefill_chunk", None)
        self.gen = torch.Generator().manual_seed(seed)
        self.prefill, self.decode, self.verify = backend.prefill, backend.decode, backend.verify

    def draft(self, hidden, tokens, positions, caches):
        logits, h = self.b.draft(hidden, tokens, positions, caches)
        V = logits.shape[-1]
        fake = torch.zeros(*logits.shape[:-1], V + self.extra)
        if self.extra:  # ids beyond the vocabulary score highest: they must never be proposed
            fake[..., V:] = 100.0
        for b in range(logits.shape[0]):
            for s in range(logits.shape[1]):
                i = int(positions[b, s]) + 2  # slot i proposes the token at position i + 2
                right = self.truth[b][i] if i < len(self.truth[b]) else 0
                ok = torch.rand((), generator=self.gen) < self.hit
                fake[b, s, right if ok else (right + 1 + int(torch.randint(V - 1, (), generator=self.gen))) % V] = 10.0
        return fake, h


PROMPTS = [[256, 10, 20, 30, 40], [256, 5], [256, *range(60, 90)]]  # one past index_topk: DSA selecting


@pytest.fixture(scope="module")
def plain(tiny_optimized):
    program, _ = tiny_optimized
    return {B: generate(program, PROMPTS[:B], GREEDY).tokens for B in (1, 3)}


@pytest.mark.parametrize("B", [1, 3])
@pytest.mark.parametrize("n", [1, 3])
def test_greedy_tokens_equal_plain_decoding(tiny_optimized, plain, B, n):
    """256 tokens per row: the Program's own drafts (random weights: nearly all rejected) and an
    oracle's right 70% of the time (rows accepting different counts); rows of different lengths."""
    program, _ = tiny_optimized
    prompts = PROMPTS[:B]
    own = generate(program, prompts, GREEDY, speculative=n)
    assert own.tokens == plain[B]
    oracle = generate(Oracle(program, prompts, plain[B], 0.7, seed=n), prompts, GREEDY, speculative=n)
    assert oracle.tokens == plain[B]
    st = oracle.stats
    assert st["verify_steps"] < own.stats["verify_steps"] and len(st["acceptance_per_position"]) == n
    assert 0.5 < st["acceptance_per_position"][0] < 0.9 and st["tokens_per_step"] > 1.3
    assert all(a >= b for a, b in zip(st["acceptance_per_position"], st["acceptance_per_position"][1:]))


def test_eager_reference_model_too(tiny):
    prompts = PROMPTS[:2]
    p = SamplingParams(max_new_tokens=40, stop_at_eos=False)
    want = generate(EagerBackend(tiny), prompts, p).tokens
    assert generate(EagerBackend(tiny), prompts, p, speculative=2).tokens == want


def test_mtp_cache_holds_the_accepted_prefix(tiny_optimized, plain):
    """After many rejections, every cache (the MTP layer's included) over each row's accepted prefix
    equals a fresh prefill of the accepted tokens followed by the MTP layer over them."""
    program, _ = tiny_optimized
    g = speculative_generate(Oracle(program, PROMPTS, plain[3], 0.5), PROMPTS, GREEDY, 3, keep_state=True)
    assert g.tokens == plain[3]
    caches, ends = g.state["caches"], g.state["positions"]
    for b, prompt in enumerate(PROMPTS):
        seq = torch.tensor([prompt + g.tokens[b]])
        c = int(ends[b])  # slots 0..c-1 hold the accepted prefix; seq[c] is the row's last verified token
        fresh = program.cache.allocate(1, c + 1)
        with torch.no_grad():
            _, hidden = program.prefill(seq[:, :c], program.cache.window(fresh, c))
            program.draft(hidden, seq[:, 1 : c + 1], torch.arange(c)[None], program.cache.window(fresh, c))
        for spec, got, want in zip(program.cache.tensors, caches, fresh):
            torch.testing.assert_close(
                got[b : b + 1].narrow(spec.time_dim, 0, c), want.narrow(spec.time_dim, 0, c), **TOL["fp32_rewrite"],
                msg=lambda m, s=spec: f"{s.name}: {m}",
            )  # fmt: skip


def test_rows_finishing_at_different_times(tiny_optimized, plain):
    """EOS ends one row early (the others go on); max_new_tokens reached mid-step is respected."""
    program, _ = tiny_optimized
    row0 = plain[3][0]
    eos = next(t for t in row0[5:] if all(t not in r[:60] for r in plain[3][1:]))  # in row 0 only, early
    cfg = dataclasses.replace(program.config, eos_token_id=eos)
    backend = Oracle(program, PROMPTS, plain[3], 0.8)
    backend.config = cfg
    p = SamplingParams(max_new_tokens=61, stop_at_eos=True)
    got = generate(backend, PROMPTS, p, speculative=3).tokens
    assert got[0] == row0[: row0.index(eos) + 1] and len(got[0]) < 61
    assert got[1:] == [r[:61] for r in plain[3][1:]]


def test_guards(tiny, tiny_optimized, plain):
    program, _ = tiny_optimized
    # draft ids outside the vocabulary are never proposed
    extra = Oracle(program, PROMPTS[:1], plain[1], 0.7, extra_vocab=5)
    assert generate(extra, PROMPTS[:1], GREEDY, speculative=2).tokens == plain[1]
    # the context reaching the cache length mid-step, n larger than the room left
    cfg = dataclasses.replace(preset("tiny"), max_position_embeddings=40)
    short = EagerBackend(DeepseekV32ForCausalLM(cfg).init_weights(0).eval())
    p = SamplingParams(max_new_tokens=34, stop_at_eos=False)
    want = generate(short, [[256, 1, 2, 3, 4, 5]], p).tokens
    assert generate(short, [[256, 1, 2, 3, 4, 5]], p, speculative=5).tokens == want
    with pytest.raises(DscError, match="drafted tokens per step"):
        generate(program, PROMPTS[:1], GREEDY, speculative=-1)
    no_draft = dataclasses.replace(program, entries={k: program.entries[k] for k in ("prefill", "decode")})
    with pytest.raises(DscError, match="no draft / verify entries"):
        generate(no_draft, PROMPTS[:1], GREEDY, speculative=2)
    with pytest.raises(DscError, match="vocabulary"):
        generate(program, [[5, 999]], GREEDY, speculative=2)
    shared = dataclasses.replace(program, cache=dataclasses.replace(program.cache, shared_positions=True))
    with pytest.raises(DscError, match="one at a time"):
        generate(shared, [[5, 6], [7, 8]], GREEDY, speculative=2)


# ---- sampling: the output distribution is the target's -------------------------------------------


class Bigram:
    """A target p(next | token) and a different draft q(next | token) over V tokens; no cache."""

    def __init__(self, V=4, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.P, self.Q = torch.randn(V, V, generator=g) * 1.5, torch.randn(V, V, generator=g) * 1.5
        self.cache = CacheSpec([])
        self.config = SimpleNamespace(vocab_size=V, max_position_embeddings=64, eos_token_id=-1)

    def prefill(self, tokens, caches):
        return self.P[tokens], tokens[..., None].float()

    def decode(self, tokens, positions, caches):
        return self.prefill(tokens, caches)

    verify = decode

    def draft(self, hidden, tokens, positions, caches):  # slot i reads t_{i+1}: proposes t_{i+2}
        return self.Q[tokens], hidden


def _freq(rows, V, n):
    idx = torch.tensor([sum(t * V**i for i, t in enumerate(r[:n])) for r in rows])
    return torch.bincount(idx, minlength=V**n).double() / len(rows)


@pytest.mark.parametrize("params", [dict(temperature=1.0), dict(temperature=0.7, top_p=0.8)])
def test_sampling_distribution_equals_the_targets(params):
    """20000 rows of 3 sampled tokens with 2 drafts per step: the joint distribution of the 3 tokens
    is the target chain's (total variation within sampling noise), while plain sampling's is too."""
    from dsc.runtime import probs_of

    m, V, N = Bigram(), 4, 20000
    p = SamplingParams(max_new_tokens=3, stop_at_eos=False, seed=1, **params)
    prompts = [[0]] * N
    step = probs_of(m.P, p)  # the target: a chain of p(. | previous token)
    exact = torch.einsum("a,ab,bc->abc", step[0], step, step).permute(2, 1, 0).reshape(-1).double()
    spec = _freq(generate(m, prompts, p, speculative=2).tokens, V, 3)
    ref = _freq(generate(m, prompts, p).tokens, V, 3)
    tv = lambda f: 0.5 * (f - exact).abs().sum().item()  # noqa: E731
    # noise of 64 cells at N = 20000: E[TV] ~ 0.02; a wrong rule (e.g. accepting every draft) is ~0.3
    assert tv(spec) < 0.04 and tv(ref) < 0.04, (tv(spec), tv(ref))
    q_only = _freq(generate(_AlwaysAccept(m), prompts, p, speculative=2).tokens, V, 3)
    assert tv(q_only) > 0.1  # the test can fail: a rule that trusts the draft is caught


class _AlwaysAccept(Bigram):
    """A broken verifier that scores with the draft's own numbers: it accepts every draft, so the
    output follows the draft's chain, not the target's."""

    def __init__(self, m):
        self.__dict__.update(m.__dict__)

    def verify(self, tokens, positions, caches):
        return self.Q[tokens], tokens[..., None].float()  # the verifier sees the draft's own numbers


def test_rejection_rule_per_position():
    """accept_sampled alone: drafts drawn from q, the first token out is distributed as p."""
    g = torch.Generator().manual_seed(0)
    V, N = 5, 40000
    p = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05])
    q = torch.tensor([0.1, 0.1, 0.2, 0.3, 0.3])
    drafts = torch.multinomial(q.expand(N, V), 1, replacement=True, generator=g)
    a, nxt = accept_sampled(drafts, q.expand(N, 1, V), p.expand(N, 2, V), g)
    first = torch.where(a > 0, drafts[:, 0], nxt)
    freq = torch.bincount(first, minlength=V).double() / N
    assert 0.5 * (freq - p.double()).abs().sum() < 0.015


def test_cli_speculative_json(tiny_optimized, plain, tmp_path, capsys):
    program, _ = tiny_optimized
    program.save(tmp_path / "prog")
    ids = ",".join(map(str, PROMPTS[0]))
    args = ["generate", str(tmp_path / "prog"), "--prompt-tokens", ids, "--max-new-tokens", "20"]
    assert main([*args, "--ignore-eos", "--json", "--speculative", "2"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["tokens"] == plain[1][0][:20]
    assert {"acceptance_rate", "acceptance_per_position", "tokens_per_step", "tokens_per_s"} <= set(out["stats"])
    assert len(out["stats"]["acceptance_per_position"]) == 2
    assert main([*args, "--speculative", "-2"]) == 2
    assert "--speculative: must be >= 0, got -2" in capsys.readouterr().err


def test_prefill_returns_hidden_for_every_position(tiny_optimized):
    program, _ = tiny_optimized
    toks = torch.randint(0, 256, (2, 30))
    caches = program.cache.allocate(2, 30)
    last, hidden = prefill(program, toks, caches, hidden=True, chunk=7)
    whole = program.cache.allocate(2, 30)
    _, want = program.prefill(toks, whole)
    torch.testing.assert_close(hidden, want, **TOL["fp32_rewrite"])


def test_chunked_prompt_drafts_like_one_call(tiny_optimized):
    """The MTP layer runs over the prompt in the main prefill's chunks: the same tokens as one call,
    rows of different lengths ending in different chunks."""
    program, _ = tiny_optimized
    prompts = [torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (30, 17)]
    params = SamplingParams(max_new_tokens=24, stop_at_eos=False)
    whole = speculative_generate(program, prompts, params, 2, chunk=0)
    for chunk in (7, 16):
        got = speculative_generate(program, prompts, params, 2, chunk=chunk)
        assert got.tokens == whole.tokens
        assert got.stats["acceptance_per_position"] == whole.stats["acceptance_per_position"]


@pytest.fixture(scope="module")
def demo_program():
    from dsc.frontends.reference import DEMO_DIR, capture, load_model
    from dsc.pass_manager import run_pipeline, select_passes

    if not (DEMO_DIR / "config.json").exists():
        pytest.skip("the demo model does not ship with this checkout")
    model, _ = load_model(str(DEMO_DIR))
    return run_pipeline(capture(model), select_passes(), verify=False)[0]


def test_demo_model_greedy_tokens_equal_plain_decoding(demo_program):
    """The trained demo model's own MTP drafts: 256 tokens per row, batch 1 and 2, the same tokens
    as plain greedy decoding of the Program, most first drafts accepted."""
    prompts = [list(b"def parse_args(argv):\n    parser = "), list(b"class Stack:\n    def push(self, x):\n")]
    for B in (1, 2):
        want = generate(demo_program, prompts[:B], GREEDY).tokens
        for n in (1, 2):
            got = generate(demo_program, prompts[:B], GREEDY, speculative=n)
            assert got.tokens == want, (B, n)
            assert got.stats["acceptance_per_position"][0] > 0.6 and got.stats["tokens_per_step"] > 1.6, got.stats
