"""Speculative decoding with MTP drafts (spec §8.2): the output of plain decoding, fewer main-model calls.

One step, for every row of the batch at its own position c (the token ``cur`` at c is the last one
accepted; the main cache holds 0..c-1, the MTP layer's cache 0..c-2 plus the slot c-1 that proposed
the first draft):

1. draft: d_1 comes from the MTP slot c-1; d_{j+1} from ``draft(mtp_hidden_j, d_j)`` at slot c-1+j;
2. verify: the main model over [cur, d_1..d_k] at c..c+k in one call, logits and hidden states at
   every position;
3. accept: greedy — the longest prefix of drafts equal to the main model's argmax, plus the main
   model's own next token (the correction, or a bonus when all k are accepted); sampling — the
   standard rejection rule: accept d_j with probability min(1, p(d_j) / q(d_j)), on the first
   rejection draw from norm(max(0, p - q)), a bonus draw from p when all are accepted; the output
   distribution is the target's exactly;
4. the MTP layer over the a + 1 accepted positions c..c+a with the verified hidden states and the
   accepted tokens: its cache then holds exactly the accepted prefix, and its last slot proposes the
   next step's d_1.

Rejected positions are never copied or rolled back: the next step writes them again before any
query can see them (attention is causal by position, and a row's next write starts at its first
unaccepted position). Rows accept different counts and finish at different times; a shorter row's
extra columns in step 4 sit beyond its accepted prefix, the same way.
"""

from __future__ import annotations

import time

import torch
from torch import Tensor

from dsc.errors import DscError
from dsc.runtime import Generation, SamplingParams, _validated, draw, keep_last, prefill, probs_of, prompt_chunks


def accept_greedy(drafts: Tensor, logits: Tensor) -> tuple[Tensor, Tensor]:
    """drafts (B, k), verify logits (B, k+1, V) -> (accepted count a (B,), the main model's next token (B,))."""
    best = logits.argmax(-1)
    a = (drafts == best[:, :-1]).long().cumprod(1).sum(1)
    return a, best.gather(1, a[:, None])[:, 0]


def accept_sampled(drafts: Tensor, q: Tensor, p: Tensor, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """The rejection rule: drafts (B, k) drawn from q (B, k, V), target p (B, k+1, V) -> (a (B,), next token (B,))."""
    B, k = drafts.shape
    rows = torch.arange(B)
    pd = p[:, :k].gather(2, drafts[..., None])[..., 0]
    qd = q.gather(2, drafts[..., None])[..., 0]
    u = torch.rand(B, k, generator=gen)
    ok = u * qd < pd  # u < p/q without dividing; q(d) > 0 since d was drawn from q
    a = ok.long().cumprod(1).sum(1)
    at = a.clamp(max=k - 1) if k else a
    if k:
        residual = (p[rows, at] - q[rows, at]).clamp(min=0)
        mass = residual.sum(-1, keepdim=True)
        residual = torch.where(mass > 0, residual / mass.clamp(min=1e-30), p[rows, at])  # p == q: no residual
        target = torch.where((a < k)[:, None], residual, p[rows, a])
    else:
        target = p[:, 0]
    return a, draw(target, gen)


@torch.no_grad()
def speculative_generate(
    backend, prompts: list[list[int]], params: SamplingParams, n: int, chunk: int | None = -1,
    keep_state: bool = False,
) -> Generation:  # fmt: skip
    """Up to ``n`` MTP drafts per step, verified by the main model in one call. ``keep_state``: the
    Generation's ``state`` holds the caches and each row's last verified position c (every cache,
    the MTP layer's included, holds the row's accepted prefix in slots 0..c-1)."""
    if not isinstance(n, int) or n < 1:
        raise DscError(f"--speculative takes the number of drafted tokens per step (>= 1), got {n!r}")
    if not (callable(getattr(backend, "draft", None)) and callable(getattr(backend, "verify", None))):
        raise DscError(
            "speculative decoding needs the draft and verify entries that the draft_mtp pass makes: "
            "run `dsc optimize` (with draft_mtp, a default pass) on a model with an MTP module"
        )
    if isinstance(getattr(backend, "entries", None), dict) and not {"draft", "verify"} <= set(backend.entries):
        raise DscError(
            "this Program has no draft / verify entries: the model has no MTP module, or draft_mtp did not run "
            "(see `dsc passes`); generate without --speculative"
        )
    if backend.cache.shared_positions and len(prompts) > 1:
        raise DscError(
            "speculative decoding moves each row of a batch by its own accepted count, but this model's cache writes "
            "every row at one position (a transformers StaticCache): run the prompts one at a time"
        )
    lens, tokens, caches = _validated(backend, prompts, params, extra=n)
    cfg, B = backend.config, len(prompts)
    L = caches[0].shape[backend.cache.tensors[0].time_dim] if caches else cfg.max_position_embeddings
    vocab = cfg.vocab_size
    greedy = params.temperature == 0
    gen = torch.Generator().manual_seed(params.seed)
    rows = torch.arange(B)

    def choose(logits):  # the main model's (target) choice of one token per row
        return logits.argmax(-1) if greedy else draw(probs_of(logits, params), gen)

    def drafted(logits):  # the draft's logits over the main vocabulary: an id outside it is never proposed
        return (
            logits[..., :vocab]
            if logits.shape[-1] >= vocab
            else torch.nn.functional.pad(logits, (0, vocab - logits.shape[-1]), value=float("-inf"))
        )

    t0 = time.perf_counter()
    last, hidden = prefill(backend, tokens, caches, lens, chunk, hidden=True)
    cur = choose(last)
    # the MTP layer over the prompt: slot i reads (h_i, t_{i+1}); the last real slot reads the new token
    nxt = torch.cat((tokens[:, 1:], tokens[:, -1:]), 1)
    nxt[rows, lens - 1] = cur
    q_logits = q_hidden = None
    for start, end in prompt_chunks(backend, tokens.shape[1], chunk):  # the main prefill's calls
        pos = torch.arange(start, end).repeat(B, 1)
        ml, mh = backend.draft(hidden[:, start:end], nxt[:, start:end], pos, backend.cache.window(caches, end))
        q_logits, q_hidden = keep_last(ml, lens, start, end, q_logits), keep_last(mh, lens, start, end, q_hidden)
    t_prefill = time.perf_counter() - t0

    # bookkeeping in Python lists (one transfer per step); tensors only for what the calls take
    out: list[list[int]] = [[t] for t in cur.tolist()]
    eos = set(cfg.eos_ids) if params.stop_at_eos else set()
    done = [params.max_new_tokens <= 1 or o[-1] in eos for o in out]
    c = lens.clone()  # each row's position of ``cur``
    proposed, accepted = [0] * n, [0] * n  # drafts at position j proposed / accepted (active rows)
    steps = row_steps = new_in_steps = 0
    ar = torch.arange(n + 1)
    t1 = time.perf_counter()
    while not all(done):
        active = [b for b in range(B) if not done[b]]
        cl = c.tolist()
        # no more drafts than the cache has room for (every row writes c..c+k) or any row still needs
        k = max(0, min(n, L - 1 - max(cl), max(params.max_new_tokens - len(out[b]) for b in active) - 1))
        drafts, qs = [], []
        ql, qh = drafted(q_logits), q_hidden
        for j in range(k):
            if greedy:
                d = ql.argmax(-1)
            else:
                q = probs_of(ql, params)
                d = draw(q, gen)
                qs.append(q)
            drafts.append(d)
            if j + 1 < k:  # d_{j+2} from the MTP slot c+j, which reads (its own last state, d_{j+1})
                pos = (c + j)[:, None]
                ml, mh = backend.draft(qh[:, None], d[:, None], pos, backend.cache.window(caches, max(cl) + j + 1))
                ql, qh = drafted(ml[:, -1]), mh[:, -1]
        D = torch.stack(drafts, 1) if drafts else torch.zeros(B, 0, dtype=torch.long)
        pos = c[:, None] + ar[: k + 1]
        vl, vh = backend.verify(torch.cat((cur[:, None], D), 1), pos, backend.cache.window(caches, max(cl) + k + 1))
        if greedy:
            a, last_tok = accept_greedy(D, vl)
        else:
            qk = torch.stack(qs, 1) if qs else torch.zeros(B, 0, vocab)
            a, last_tok = accept_sampled(D, qk, probs_of(vl, params), gen)
        a = a.masked_fill(torch.tensor(done), 0)  # a finished row stays where it is
        steps += 1
        new = torch.cat((D, last_tok[:, None]), 1)
        new[rows, a] = last_tok  # row b's new tokens: new[b, :a_b + 1]
        al, nl = a.tolist(), new.tolist()
        for b in active:
            for j in range(k):
                proposed[j] += 1
                accepted[j] += al[b] > j
            got = nl[b][: al[b] + 1][: params.max_new_tokens - len(out[b])]
            stop = next((i for i, t in enumerate(got) if t in eos), None)
            if stop is not None:
                got = got[: stop + 1]
                done[b] = True
            out[b] += got
            row_steps += 1
            new_in_steps += len(got)
            done[b] = done[b] or len(out[b]) >= params.max_new_tokens
        if all(done):
            break
        # the MTP layer over the accepted positions c..c+a: its cache holds the accepted prefix, and
        # slot c+a proposes the next d_1
        A = max(al) + 1
        ml, mh = backend.draft(vh[:, :A], new[:, :A], c[:, None] + ar[:A], backend.cache.window(caches, max(cl) + A))
        q_logits, q_hidden = ml[rows, a], mh[rows, a]
        fin = torch.tensor(done)
        cur = torch.where(fin, cur, last_tok)  # a finished row re-verifies its last token in place
        c = torch.where(fin, c, c + a + 1)
    decode_s = time.perf_counter() - t1
    n_new = sum(len(o) for o in out)
    stats = {
        "batch": B,
        "prompt_tokens": int(lens.sum()),
        "new_tokens": n_new,
        "speculative": n,
        "prefill_s": round(t_prefill, 4),
        "decode_s": round(decode_s, 4),
        "verify_steps": steps,
        "acceptance_rate": round(sum(accepted) / max(sum(proposed), 1), 4),
        # of the steps where a row drafted position j, the share where drafts 1..j+1 were all accepted
        "acceptance_per_position": [round(x / max(y, 1), 4) for x, y in zip(accepted, proposed)],
        "tokens_per_step": round(new_in_steps / max(row_steps, 1), 3),
        "ms_per_step": round(1000 * decode_s / max(steps, 1), 3),
        "tokens_per_s": round(n_new / max(t_prefill + decode_s, 1e-9), 2),
    }
    g = Generation(out, stats)
    if keep_state:
        g.state = {"caches": caches, "positions": c}
    return g
