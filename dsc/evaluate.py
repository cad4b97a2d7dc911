"""Quality of a (trained) model on the held-out files: the figures the README reports for the demo model.

    python -m dsc.evaluate [MODEL] [--windows 48] [--seq-len 512] [--json]
    python -m dsc.evaluate --ship RUN_DIR   # train_state.pt -> dsc/assets/demo (bf16), then evaluate it

- bits per byte with DSA sparse attention (the model as trained and served) and with dense attention;
- indexer top-k recall: the share of the dense attention mass (summed over heads) that falls on the
  indexer's top-k keys, over queries that see more than k keys;
- MoE expert load: tokens per expert relative to the mean (max/mean and coefficient of variation);
- MTP first-draft acceptance: how often the MTP module's greedy guess for token i+2 equals the main
  model's greedy prediction at i+1 (what greedy speculative decoding accepts);
- greedy text: 200 new bytes from each of ``def ``, ``import ``, ``class ``, with the most times any
  8-byte sequence occurs in a row (``loop_repeats``; see ``loop_repeats``) and the Python keywords used.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import keyword
import math
import re
from pathlib import Path

import torch
import torch.nn.functional as F

from dsc.data import eval_windows, load_corpus
from dsc.model.model import MLA, DeepseekV32ForCausalLM, Gate

ASSETS = Path(__file__).parent / "assets" / "demo"
GREEDY_PROMPTS = ("def ", "import ", "class ")
KEYWORDS = re.compile(r"\b(" + "|".join(keyword.kwlist) + r")\b")


def loop_repeats(data: bytes, width: int = 8, max_period: int = 64) -> int:
    """The most times any ``width``-byte sequence occurs in a row: back to back (period ``width``),
    or at the stride of a shorter loop (a period-p stretch repeats each window every multiple of p
    that is >= width), or of a longer one (period p > width, every p bytes)."""
    best = 1 if len(data) >= width else 0
    for p in range(1, min(max_period, len(data) - 1) + 1):
        stride = p * -(-width // p)
        run = 0  # positions k with data[k] == data[k + p], consecutive
        for k in range(len(data) - p):
            run = run + 1 if data[k] == data[k + p] else 0
            if run + p >= width:
                best = max(best, (run + p - width) // stride + 1)
    return best


@torch.no_grad()
def greedy_text(model: DeepseekV32ForCausalLM, new_tokens: int = 200) -> dict:
    """Greedy continuations of GREEDY_PROMPTS by the reference model, with their loop and keyword counts."""
    from dsc.runtime import EagerBackend, SamplingParams, generate
    from dsc.tokenizer import ByteTokenizer

    tok = ByteTokenizer.for_config(model.config)
    backend, out = EagerBackend(model.eval()), {}
    for prompt in GREEDY_PROMPTS:
        ids = generate(backend, [tok.encode(prompt)], SamplingParams(new_tokens, stop_at_eos=False)).tokens[0]
        text = tok.decode(ids)
        out[prompt] = {
            "text": text,
            "loop_repeats": loop_repeats(tok.to_bytes(ids)),
            "keywords": sorted(set(KEYWORDS.findall(prompt + text))),
        }
    return out


def _set(model, sparse: bool, collect: bool):
    aux = [] if collect else None
    for m in model.modules():
        if isinstance(m, MLA):
            m.sparse, m.aux = sparse, aux
    return aux


@torch.no_grad()
def evaluate(model: DeepseekV32ForCausalLM, windows: torch.Tensor, batch: int = 8) -> dict:
    model.eval()
    cfg = model.config
    ce = {"sparse": 0.0, "dense": 0.0}
    n_tok = 0
    recall_num = recall_den = 0.0
    accept = accept_n = 0
    loads: dict[int, torch.Tensor] = {}
    gates = [(i, m) for i, m in enumerate(model.modules()) if isinstance(m, Gate)]
    hooks = [g.register_forward_hook(lambda mod, inp, out, i=i: loads.__setitem__(
        i, loads.get(i, 0) + torch.bincount(out[0].flatten(), minlength=cfg.n_routed_experts))) for i, g in gates]  # fmt: skip
    try:
        for start in range(0, len(windows), batch):
            toks = windows[start : start + batch]
            V = cfg.vocab_size
            # served form: sparse attention; main + MTP logits
            _set(model, sparse=True, collect=False)
            logits, mtp = model(toks)
            ce["sparse"] += F.cross_entropy(
                logits[:, :-1].reshape(-1, V), toks[:, 1:].reshape(-1), reduction="sum"
            ).item()
            if mtp is not None:
                main_next = logits[:, 1:-1].argmax(-1)  # main model's guess for t_{i+2}, given t_{i+1}
                draft = mtp[:, :-1].argmax(-1)
                accept += (draft == main_next).sum().item()
                accept_n += draft.numel()
            # dense attention, with the indexer's selection recorded per layer
            aux = _set(model, sparse=False, collect=True)
            loads_before = {k: v.clone() for k, v in loads.items()}
            logits_d, _ = model(toks)
            loads.update(loads_before)  # count expert loads once (sparse pass)
            ce["dense"] += F.cross_entropy(
                logits_d[:, :-1].reshape(-1, V), toks[:, 1:].reshape(-1), reduction="sum"
            ).item()
            n_tok += toks[:, 1:].numel()
            for layer, rec in enumerate(aux):
                if layer >= cfg.num_hidden_layers:
                    continue  # the MTP block's indexer is scored with the main layers' definition too, but kept apart
                p = rec["probs"].sum(2)
                p = p / p.sum(-1, keepdim=True)  # (B, S, T)
                model_layer = model.model.layers[layer].self_attn
                sel = model_layer.indexer.select_mask(rec["index_scores"], rec["visible"]) == 0
                busy = rec["visible"].sum(-1) > cfg.index_topk  # queries where selection drops keys
                recall_num += (p * sel).sum(-1)[busy].sum().item()
                recall_den += busy.sum().item()
            _set(model, sparse=True, collect=False)
    finally:
        for h in hooks:
            h.remove()
        _set(model, sparse=True, collect=False)
    load_stats = []
    for _, counts in sorted(loads.items()):
        c = counts.float()
        load_stats.append(
            {"max_over_mean": round((c.max() / c.mean()).item(), 3), "cv": round((c.std() / c.mean()).item(), 3)}
        )
    return {
        "tokens": n_tok,
        "bits_per_byte_sparse": round(ce["sparse"] / n_tok / math.log(2), 4),
        "bits_per_byte_dense": round(ce["dense"] / n_tok / math.log(2), 4),
        "indexer_topk_recall": round(recall_num / max(recall_den, 1), 4),
        "indexer_topk": cfg.index_topk,
        "expert_load_per_moe_layer": load_stats,
        "mtp_first_draft_acceptance": round(accept / max(accept_n, 1), 4) if accept_n else None,
    }


@torch.no_grad()
def program_bits_per_byte(program, windows: torch.Tensor, batch: int = 8) -> float:
    """Held-out bits per byte of a Program's prefill: its served numerics (absorbed or MHA attention,
    sparse where fuse_dsa made it so, FP8 after lower_fp8), each window's next bytes from its logits."""
    ce, n = 0.0, 0
    for start in range(0, len(windows), batch):
        toks = windows[start : start + batch, :-1]
        logits, _ = program.prefill(toks, program.cache.window(program.cache.allocate(*toks.shape), toks.shape[1]))
        target = windows[start : start + batch, 1:]
        ce += F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), target.reshape(-1), reduction="sum").item()
        n += target.numel()
    return round(ce / n / math.log(2), 4)


def ship(run_dir: Path, dest: Path = ASSETS) -> Path:
    """train_state.pt -> an HF directory with bf16 weights (fp32 gate biases), written atomically; the
    run's own config (runs from before it was recorded: the demo preset's at the depth of their weights,
    the MTP layers numbered after the main ones)."""
    from dsc.model import ModelConfig, preset
    from dsc.model.checkpoint import Checkpoint, save_hf

    st = torch.load(run_dir / "train_state.pt", weights_only=True)
    if "config" in st:
        cfg = ModelConfig.from_dict(st["config"])
    else:
        cfg = preset("demo")
        stored = {k.split(".")[2] for k in st["model"] if k.startswith("model.layers.")}
        cfg = dataclasses.replace(cfg, num_hidden_layers=len(stored) - cfg.num_nextn_predict_layers)
    cfg.torch_dtype = "bfloat16"
    tensors = {
        k: (v if k.endswith("e_score_correction_bias") else v.to(torch.bfloat16)) for k, v in st["model"].items()
    }
    save_hf(Checkpoint(cfg, tensors), dest, overwrite=True, marker="config.json")  # the demo directory is ours
    return dest


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?", help="checkpoint or preset (default: the built-in demo model)")
    ap.add_argument("--ship", metavar="RUN_DIR", help="write RUN_DIR/train_state.pt to dsc/assets/demo first")
    ap.add_argument("--windows", type=int, default=48, help="held-out windows (default 48)")
    ap.add_argument("--seq-len", type=int, default=512, help="window length (default 512)")
    ap.add_argument(
        "--program", metavar="DIR", help="also the bits per byte of a saved Program's prefill (dsc optimize -o DIR)"
    )
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    from dsc.frontends.reference import load_model

    if args.ship:
        ship(Path(args.ship))
    model, _ = load_model(args.model)
    cfg = model.config
    windows = eval_windows(load_corpus("heldout", cfg.bos_token_id, cfg.eos_token_id), args.seq_len, args.windows)
    res = evaluate(model, windows)
    res["greedy"] = greedy_text(model)
    if args.program:
        from dsc.program import Program

        res["bits_per_byte_program"] = program_bits_per_byte(Program.load(args.program), windows)
    if args.ship:
        (ASSETS / "metrics.json").write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res, indent=2) if args.json else "\n".join(f"{k}: {v}" for k, v in res.items()))


if __name__ == "__main__":
    main()
