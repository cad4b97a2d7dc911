"""One generation runtime for the eager reference model and for compiled Programs.

Both expose ``prefill(tokens, caches)``, ``decode(tokens, positions, caches)`` and a CacheSpec; the
runtime allocates the caches once at (batch, prompt + new tokens) and hands each call a view
``cache[:, :T]`` of the current context (``CacheSpec.window``), so a step reads O(T) and writes only
its new positions.

Batches of different prompt lengths are right-padded: every row is at its own positions, attention
is causal by position, and a row's first decode step overwrites its padding slot before any query
can see it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import Tensor

from dsc.errors import DscError
from dsc.program import logits_hidden


class EagerBackend:
    """Eager code behind the Program interface: the reference model, or any frontend's model with
    the entry-point protocol (``prefill`` / ``decode`` [/ ``mtp``]) and its CacheSpec."""

    def __init__(self, model, cache=None, config=None):
        if cache is None:
            from dsc.frontends.reference import cache_spec_of

            cache = cache_spec_of(model)
        self.model, self.cache, self.config = model, cache, config if config is not None else model.config

    def prefill(self, tokens, caches):
        return logits_hidden(self.model.prefill(tokens, caches))

    def decode(self, tokens, positions, caches):
        return logits_hidden(self.model.decode(tokens, positions, caches))

    def mtp(self, hidden, tokens, positions, caches):
        return self.model.mtp(hidden, tokens, positions, caches)

    def draft(self, hidden, tokens, positions, caches):
        if not callable(getattr(self.model, "draft", None)) or not self.config.num_nextn_predict_layers:
            raise DscError(
                "this model has no MTP draft: speculative decoding needs an MTP module (num_nextn_predict_layers)"
            )
        return logits_hidden(self.model.draft(hidden, tokens, positions, caches))

    def verify(self, tokens, positions, caches):
        return self.decode(tokens, positions, caches)


@dataclass
class SamplingParams:
    max_new_tokens: int = 32
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int = 0
    stop_at_eos: bool = True

    def validate(self) -> None:
        if self.max_new_tokens < 1:
            raise DscError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not self.temperature >= 0 or self.temperature == float("inf"):  # NaN fails every comparison
            raise DscError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:  # NaN too
            raise DscError(f"top_p must be in (0, 1], got {self.top_p}")


@dataclass
class Generation:
    tokens: list[list[int]]  # new tokens per row
    stats: dict = field(default_factory=dict)


def probs_of(logits: Tensor, p: SamplingParams) -> Tensor:
    """The distribution sampling draws from (temperature > 0): softmax(logits / T), cut to the
    smallest prefix of the sorted probabilities reaching ``top_p`` and renormalised."""
    probs = (logits.float() / p.temperature).softmax(-1)
    if p.top_p < 1:
        sorted_p, order = probs.sort(-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p > p.top_p  # keep the smallest prefix reaching top_p
        probs = probs.scatter(-1, order, sorted_p.masked_fill(drop, 0.0))
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def draw(probs: Tensor, gen: torch.Generator) -> Tensor:
    """One token per row of ``probs`` (.., V) by the exponential-race trick argmax(probs / Exp(1))
    (spec §2), which draws exactly from ``probs``."""
    noise = torch.empty_like(probs).exponential_(1.0, generator=gen)
    return (probs / noise).argmax(-1)


def sample_next(logits: Tensor, p: SamplingParams, gen: torch.Generator) -> Tensor:
    """logits (B, V) -> tokens (B,). Greedy at temperature 0, else a draw from ``probs_of``."""
    if p.temperature == 0:
        return logits.argmax(-1)
    return draw(probs_of(logits, p), gen)


@torch.no_grad()
def prefill(
    backend, tokens: Tensor, caches: list[Tensor], lens: Tensor | None = None, chunk: int | None = -1,
    hidden: bool = False,
):  # fmt: skip
    """Each row's logits at its last prompt position (B, V), the prompt's keys written into ``caches``
    (allocated to at least the prompt's length); with ``hidden``, also the final hidden state at
    every prompt position (B, P, D). A prompt longer than ``chunk`` tokens (default: the
    backend's ``prefill_chunk``, the length its prefill form was chosen for; None or 0: never) runs
    as a prefill of ``chunk`` tokens, then decode extends of up to ``chunk`` tokens at their
    positions: no call sees more queries than its form was chosen for, and a long prompt's
    per-call memory stays that of a ``chunk``-token one."""
    B, P = tokens.shape
    lens = torch.full((B,), P) if lens is None else lens
    last, states = None, []
    for start, end in prompt_chunks(backend, P, chunk):
        window = backend.cache.window(caches, end)
        if start == 0:
            logits, h = backend.prefill(tokens[:, :end], window)
        else:
            pos = torch.arange(start, end).repeat(B, 1)
            logits, h = backend.decode(tokens[:, start:end], pos, window)
        if hidden:
            if h is None:
                raise DscError("this model's prefill returns no hidden state, which speculative decoding needs")
            states.append(h)
        last = keep_last(logits, lens, start, end, last)
    return (last, torch.cat(states, 1)) if hidden else last


def prompt_chunks(backend, P: int, chunk: int | None = -1) -> list[tuple[int, int]]:
    """The (start, end) calls a P-token prompt is run in: ``chunk`` tokens each (-1: the backend's
    ``prefill_chunk``; None or 0: one call)."""
    if chunk == -1:
        chunk = getattr(backend, "prefill_chunk", None)
    step = chunk or P
    return [(s, min(s + step, P)) for s in range(0, P, step)]


def keep_last(values: Tensor, lens: Tensor, start: int, end: int, kept: Tensor | None) -> Tensor:
    """Each row's value at its last prompt position (lens - 1) from a call over positions
    start..end-1, where that position falls in it; ``kept`` (from earlier calls) elsewhere."""
    got = values[torch.arange(values.shape[0]), (lens - 1 - start).clamp(0, end - start - 1)]
    here = ((lens - 1 >= start) & (lens - 1 < end)).view(-1, *[1] * (got.dim() - 1))
    return got if kept is None else torch.where(here, got, kept)


def _validated(backend, prompts: list[list[int]], params: SamplingParams, extra: int = 0):
    """(lens, the padded prompt (B, P), caches for P + max_new_tokens + ``extra`` positions within
    the model's limit): the checks every generation makes before any work."""
    params.validate()
    if not prompts or any(len(p) == 0 for p in prompts):
        raise DscError("every prompt needs at least one token")
    cfg = backend.config
    B = len(prompts)
    lens = torch.tensor([len(p) for p in prompts])
    P = int(lens.max())
    if backend.cache.shared_positions and int(lens.min()) != P:
        raise DscError(
            "this model's cache writes every row of a batch at the same positions (a transformers StaticCache), "
            f"so a batch needs prompts of one length; got lengths {sorted(set(lens.tolist()))}. "
            "Run them one at a time or pad them to one length."
        )
    total = P + params.max_new_tokens
    if total > cfg.max_position_embeddings:
        raise DscError(
            f"prompt ({P}) + max_new_tokens ({params.max_new_tokens}) exceeds the model's "
            f"max_position_embeddings ({cfg.max_position_embeddings})"
        )
    vocab = getattr(cfg, "vocab_size", None)
    bad = [t for p in prompts for t in p if not 0 <= t < (vocab or t + 1)]
    if bad:
        raise DscError(f"prompt token ids must be in [0, {vocab}) (the model's vocabulary); got {bad[:5]}")
    caches = backend.cache.allocate(B, min(total + extra, cfg.max_position_embeddings))
    tokens = torch.zeros(B, P, dtype=torch.long)
    if hasattr(backend, "check_inputs"):
        backend.check_inputs(tokens, caches)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = torch.tensor(p)
    return lens, tokens, caches


@torch.no_grad()
def generate(
    backend, prompts: list[list[int]], params: SamplingParams, chunk: int | None = -1, speculative: int = 0
) -> Generation:
    """``chunk``: see ``prefill``. ``speculative`` n > 0: MTP drafts n tokens per step and the main
    model verifies them in one call (``dsc.speculative``): the same greedy tokens, the same
    sampling distribution."""
    if speculative:
        from dsc.speculative import speculative_generate

        return speculative_generate(backend, prompts, params, speculative, chunk)
    lens, tokens, caches = _validated(backend, prompts, params)
    cfg, B = backend.config, len(prompts)
    gen = torch.Generator().manual_seed(params.seed)

    t0 = time.perf_counter()
    last = prefill(backend, tokens, caches, lens, chunk)
    t_prefill = time.perf_counter() - t0

    out: list[list[int]] = [[] for _ in range(B)]
    done = torch.zeros(B, dtype=torch.bool)
    positions = lens.clone()
    step_times = []
    for step in range(params.max_new_tokens):
        nxt = sample_next(last, params, gen)
        for i in range(B):
            if not done[i]:
                out[i].append(int(nxt[i]))
        if params.stop_at_eos:
            done |= torch.isin(nxt, torch.tensor(cfg.eos_ids))
        if done.all() or step == params.max_new_tokens - 1:
            break
        t1 = time.perf_counter()
        T = int(positions.max()) + 1
        logits, _ = backend.decode(nxt[:, None], positions[:, None], backend.cache.window(caches, T))
        step_times.append(time.perf_counter() - t1)
        last = logits[:, -1]
        positions += 1
    n_new = sum(len(o) for o in out)
    decode_s = sum(step_times)
    return Generation(
        out,
        {
            "batch": B,
            "prompt_tokens": int(lens.sum()),
            "new_tokens": n_new,
            "prefill_s": round(t_prefill, 4),
            "decode_s": round(decode_s, 4),
            "decode_steps": len(step_times),
            "ms_per_step": round(1000 * decode_s / max(len(step_times), 1), 3),
            "tokens_per_s": round(n_new / max(t_prefill + decode_s, 1e-9), 2),
        },
    )
