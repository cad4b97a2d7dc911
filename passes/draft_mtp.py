"""draft_mtp: the multi-token-prediction module becomes a speculative-decoding draft (spec §8.2).

The MTP block is found by its computation (``dsc.match.mtp``): ``eh_proj([enorm(E[t]) ; hnorm(h)])``
→ a transformer block → the shared final norm and head, fed by the main model's final hidden state.
The pass emits two entry points in place of ``mtp``:

    draft(hidden, tokens, positions, caches) -> (logits, mtp_hidden)
        the MTP layer at S >= 1 positions: slot i reads (h_i, t_{i+1}), writes the MTP layer's
        caches there and proposes t_{i+2}; ``mtp_hidden`` (the head's input, post-norm like the main
        model's) is the ``hidden`` of the next draft, so n drafts reuse the one MTP layer n times;
    verify(tokens, positions, caches) -> (logits, hidden)
        the main model extending the cache by 1 + n tokens in one call (decode's graph, its own
        entry so the other passes choose its forms for it), logits and final hidden states at
        every position.

``prefill`` and ``verify`` return the final hidden state the draft takes: the entry's own second
output where it has one (the frontend protocol), else the input of its output head (post final
norm, spec §8.1), added as a second output. Both new entries take the whole CacheSpec like every
entry; the draft reads and writes only the MTP layer's caches, verify only the main layers'. The
main ``decode`` computes nothing for MTP (it never did: the frontends capture MTP as its own entry).

Runs after ``normalize`` and before the passes that rewrite attention, weights and caches, so the
new entries are rewritten like any other. Numerics: exact (graph copies and an added output).
Not recognised: a training-form forward computing main and MTP logits in one graph (no frontend
captures one; the protocol's ``mtp`` entry is where the block is looked for).
"""

from __future__ import annotations

from dsc.fx_utils import finalize, set_user_outputs
from dsc.match.mtp import mtp_block, output_head, user_outputs
from dsc.program import clone_entry
from dsc.registry import register_pass
from dsc.verify import EXACT

NAME = "draft_mtp"


def _with_hidden(ep, what: str) -> str | None:
    """Make ``ep`` return (logits, final hidden); how it was found, or None when it cannot be."""
    outs = user_outputs(ep)
    if len(outs) >= 2:
        if len(outs) > 2:
            set_user_outputs(ep, outs[:2])
            finalize(ep)
        return f"{what}: its own hidden-state output"
    head = output_head(ep)
    if head is None:
        return None
    set_user_outputs(ep, [outs[0], head.hidden])
    finalize(ep)
    return f"{what}: the input of its output head (post final norm), added as an output"


@register_pass(
    NAME, order=15, purpose="MTP -> speculative decoding: `draft` (the MTP layer) and `verify` (1 + n tokens) entries",
    tolerance=EXACT, requires=("canonicalize", "normalize"),
)  # fmt: skip
def draft_mtp(program, ctx):
    if "draft" in program.entries:
        return 0, {"why": "already drafted: the Program has a draft entry"}
    if "mtp" not in program.entries:
        n = getattr(program.config, "num_nextn_predict_layers", None)
        return 0, {"why": f"no mtp entry (num_nextn_predict_layers = {n}): the model has no MTP module to draft with"}
    if not {"prefill", "decode"} <= set(program.entries):
        return 0, {"why": "speculative decoding needs prefill and decode entries beside mtp"}
    block = mtp_block(program.entries["mtp"])
    if block is None:
        return 0, {
            "why": "the mtp entry's computation is not an MTP block: no cat([RMSNorm(E[t]), RMSNorm(h)]) -> "
            "projection -> attention -> RMSNorm -> head from its token and hidden inputs"
        }
    draft = clone_entry(program.entries["mtp"])
    b = mtp_block(draft)
    set_user_outputs(draft, [user_outputs(draft)[0], b.head.hidden])
    finalize(draft)
    prefill, verify = clone_entry(program.entries["prefill"]), clone_entry(program.entries["decode"])
    how = [_with_hidden(prefill, "prefill"), _with_hidden(verify, "verify (from decode)")]
    if None in how:
        return 0, {
            "why": "the main model's output head (logits = RMSNorm(h)·Wᵀ) was not found: no hidden state to draft from"
        }
    entries = {k: v for k, v in program.entries.items() if k != "mtp"}
    entries["prefill"] = prefill
    program.entries.clear()
    program.entries.update(entries | {"draft": draft, "verify": verify})
    layers = sorted({t.layer for t in program.cache.tensors if t.layer >= program.config.num_hidden_layers})
    stats = {
        "draft": {
            "from": "mtp",
            "order": "[enorm(E[t]) ; hnorm(h)]" if block.embed_first else "[hnorm(h) ; enorm(E[t])]",
            "attention_sites": block.attention_sites,
            "chained_hidden": "the MTP head's input (post shared_head.norm)",
            "mtp_cache_layers": layers,
        },
        "verify": {"from": "decode"},
        "hidden": how,
    }
    return 1, stats
