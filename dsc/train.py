"""Train the built-in demo model: the full V3.2 architecture on the Python standard library's source.

    python -m dsc.train --out runs/demo [--minutes 45] [--steps 1200] [--init dsc/assets/demo]

Seeded and resumable (re-run the same command: it continues from ``OUT/train_state.pt``); ``--init``
starts a new run from a trained checkpoint's weights (a fresh optimizer and schedule); with ``--grow``
from a checkpoint with fewer main layers, each of its MoE layers repeated and every repeat starting as
the identity (``grow_from``). Losses:
next-byte cross-entropy; the MTP module's cross-entropy for the byte after next, weight 0.3 (spec §8;
``--mtp-weight``), of which ``--mtp-distill`` moves a share to the KL from the main model's own
(detached) distribution one position later: what greedy speculative decoding accepts is the main
model's guess, not the data's byte;
the indexer's KL to the main attention (summed over heads, L1-normalised; spec §5.4). The indexer
sees detached inputs, so it learns only from its KL and the model only from the LM losses. Stage 1
(dense warm-up) attends densely and fits the indexer to all visible keys; stage 2 (sparse) turns
the top-k selection on and restricts the KL to the selected keys. ``--leak-weight`` (default 0, not
in the spec) adds, in stage 2, the share of each head's dense attention that falls outside the
indexer's selection (as -log of the share inside): the model is served sparse, and without it
nothing keeps its dense attention, which the sparse one stands for, from spreading over keys the
selection drops (what the indexer recall figure measures). MoE balance is auxiliary-loss
free: after each step every gate's selection bias moves by ``bias_rate`` towards equal load (spec §6).
The result is written as an HF directory (config.json + bf16 model.safetensors) with its metrics.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from dsc.data import load_corpus, random_windows
from dsc.model import DeepseekV32ForCausalLM, preset
from dsc.model.model import MLA, Gate

MTP_WEIGHT = 0.3
KL_WEIGHT = 1.0


def indexer_kl(aux: list[dict], sparse: bool) -> torch.Tensor:
    """Mean over layers and queries of KL(p || softmax(I)) on the visible (dense) or selected (sparse) keys."""
    total = 0.0
    for rec in aux:
        p = rec["probs"].detach().sum(2)  # (B, S, T)
        p = p / p.sum(-1, keepdim=True)
        allowed = (rec["index_mask"] == 0) if sparse else rec["visible"]
        logq = rec["index_scores"].masked_fill(~allowed, float("-inf")).log_softmax(-1)
        keep = (p > 0) & allowed
        kl = torch.where(keep, p * (p.clamp_min(1e-30).log() - logq), torch.zeros_like(p)).sum(-1)
        total = total + kl.mean()
    return total / max(len(aux), 1)


def attention_leak(aux: list[dict]) -> torch.Tensor:
    """Mean over layers, queries and heads of -log(the share of the dense attention on the indexer's
    selection): 0 where the selection keeps every visible key, or where the attention is all on it."""
    total = 0.0
    for rec in aux:
        scores, visible = rec["scores"], rec["visible"].unsqueeze(2)  # (B, S, H, T), (B, S, 1, T)
        dense = scores.masked_fill(~visible, float("-inf")).logsumexp(-1)
        kept = (scores + rec["index_mask"].unsqueeze(2)).logsumexp(-1)
        total = total + (dense - kept).mean()
    return total / max(len(aux), 1)


def set_attention(model: DeepseekV32ForCausalLM, sparse: bool, collect: bool) -> list[dict] | None:
    aux = [] if collect else None
    for m in model.modules():
        if isinstance(m, MLA):
            m.sparse = sparse
            m.aux = aux
    return aux


def losses(
    model, tokens: torch.Tensor, sparse: bool, distill: bool = False, leak: bool = False
) -> dict[str, torch.Tensor]:
    """``lm``, ``mtp`` (cross-entropy on t_{i+2}), ``kl`` (the indexer's); with ``distill``
    ``mtp_kd``: KL(p_main(. | t_{<=i+1}) || q_mtp(. | h_i, t_{i+1})), the main model's side detached;
    with ``leak`` (sparse only) ``leak``: ``attention_leak``."""
    aux = set_attention(model, sparse, collect=True)
    logits, mtp = model(tokens)
    V = logits.shape[-1]
    out = {"lm": F.cross_entropy(logits[:, :-1].reshape(-1, V), tokens[:, 1:].reshape(-1))}
    if mtp is not None:
        q = mtp[:, :-1].reshape(-1, V).log_softmax(-1)
        out["mtp"] = F.nll_loss(q, tokens[:, 2:].reshape(-1))
        if distill:
            p = logits[:, 1:-1].detach().reshape(-1, V).log_softmax(-1)
            out["mtp_kd"] = F.kl_div(q, p, log_target=True, reduction="batchmean")
    out["kl"] = indexer_kl(aux, sparse)
    if leak and sparse:
        out["leak"] = attention_leak(aux)
    set_attention(model, sparse, collect=False)
    return out


@torch.no_grad()
def update_balance_bias(model, rate: float) -> float:
    """Aux-loss-free balancing; returns the worst max/mean expert load of this step."""
    worst = 0.0
    for g in model.modules():
        if isinstance(g, Gate) and hasattr(g, "last_counts"):
            load = g.last_counts.float()
            g.e_score_correction_bias += rate * torch.sign(load.mean() - load)
            worst = max(worst, (load.max() / load.mean().clamp_min(1e-9)).item())
    return worst


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(total - warmup, 1)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))


def init_from(model: DeepseekV32ForCausalLM, spec: str, grow: bool = False) -> None:
    """Copy a checkpoint's weights into ``model``; its config must be the preset's (shapes and math),
    or with ``grow`` the same but for fewer main layers (``grow_from``)."""
    from dsc.errors import DscError
    from dsc.frontends.reference import load_model

    src, _ = load_model(spec)
    mine, theirs = model.config.to_dict(), src.config.to_dict()
    differ = sorted(k for k in mine.keys() | theirs.keys() if k != "torch_dtype" and mine.get(k) != theirs.get(k))
    if grow and differ == ["num_hidden_layers"] and mine["num_hidden_layers"] > theirs["num_hidden_layers"]:
        grow_from(model, src)
        print(f"initialised from {spec}, grown from {theirs['num_hidden_layers']} to "
              f"{mine['num_hidden_layers']} main layers", flush=True)  # fmt: skip
        return
    if differ:
        hint = (
            "--grow needs a checkpoint that differs only in having fewer num_hidden_layers"
            if grow
            else "train from a checkpoint of the same architecture (or pick the matching --preset)"
        )
        raise DscError(f"--init {spec}: its config differs from the preset's in {', '.join(differ)}; {hint}")
    model.load_state_dict(src.state_dict())
    print(f"initialised from {spec}", flush=True)


def grown_layer_sources(n_dense: int, n_src: int, n_new: int) -> list[int]:
    """For each main layer of the grown model, the source layer it starts from: the first ``n_dense``
    one to one, then each source MoE layer repeated in place, as evenly as the counts allow."""
    m_src, m_new = n_src - n_dense, n_new - n_dense
    return list(range(n_dense)) + [n_dense + j * m_src // m_new for j in range(m_new)]


@torch.no_grad()
def grow_from(model: DeepseekV32ForCausalLM, src: DeepseekV32ForCausalLM) -> None:
    """Depth up-scaling by block expansion (LLaMA Pro, Wu et al. 2024): ``model`` has more main layers
    than ``src`` and is otherwise the same. Every new layer is a copy of a source layer
    (``grown_layer_sources``) whose output projections (attention ``o_proj``, the feed-forward's
    ``down_proj``s) start at zero, so it adds exactly 0 to the residual stream: the grown model computes
    exactly ``src``'s function, and training goes on from there. The MTP layer follows the main ones."""
    from dsc.errors import DscError

    cfg, n_src = model.config, src.config.num_hidden_layers
    if cfg.moe_layer_freq != 1 or n_src <= cfg.first_k_dense_replace:
        raise DscError("--grow repeats the source's MoE layers in place: it needs moe_layer_freq 1 and a source "
                       f"with MoE layers (it has {n_src} main layers, the first {cfg.first_k_dense_replace} dense)")  # fmt: skip
    sources = grown_layer_sources(cfg.first_k_dense_replace, n_src, cfg.num_hidden_layers)
    sources += [n_src + d for d in range(cfg.num_nextn_predict_layers)]  # the MTP layer(s)
    theirs = src.state_dict()
    state = {k: v for k, v in theirs.items() if not k.startswith("model.layers.")}
    for i, s in enumerate(sources):
        prefix = f"model.layers.{s}."
        state |= {f"model.layers.{i}.{k[len(prefix) :]}": v for k, v in theirs.items() if k.startswith(prefix)}
    model.load_state_dict(state)
    for i, s in enumerate(sources):
        if i and s == sources[i - 1]:  # a repeat: starts as the identity
            layer = model.model.layers[i]
            layer.self_attn.o_proj.weight.zero_()
            for name, p in layer.mlp.named_parameters():
                if name.endswith("down_proj.weight"):
                    p.zero_()


def _save_state(path: Path, state: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def train(args) -> Path:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    cfg = preset(args.preset)
    if args.layers:
        cfg = dataclasses.replace(cfg, num_hidden_layers=args.layers)
    model = DeepseekV32ForCausalLM(cfg).init_weights(args.seed)
    state_path = out / "train_state.pt"
    if args.init and not state_path.exists():
        init_from(model, args.init, grow=args.grow)
    model.train()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.95),
    )  # fmt: skip
    gen = torch.Generator().manual_seed(args.seed)
    step, history = 0, []
    if state_path.exists():
        st = torch.load(state_path, weights_only=True)
        model.load_state_dict(st["model"])
        opt.load_state_dict(st["opt"])
        gen.set_state(st["gen"])
        step, history = st["step"], st["history"]
        print(f"resumed at step {step}", flush=True)

    def snapshot() -> dict:
        return {
            "model": model.state_dict(),
            "opt": opt.state_dict(),
            "gen": gen.get_state(),
            "step": step,
            "history": history,
            "config": cfg.to_dict(),  # what `dsc.evaluate --ship` writes
        }

    stream = load_corpus("train", cfg.bos_token_id, cfg.eos_token_id)
    dense_steps = int(args.steps * args.dense_fraction)
    t_start = time.time()
    t_log, tokens_seen = time.time(), 0
    first = step
    while step < args.steps:
        if args.minutes and (time.time() - t_start) > 60 * args.minutes:
            print(f"time limit reached at step {step}", flush=True)
            break
        if args.stop_after and step - first >= args.stop_after:
            print(f"stopping after {args.stop_after} steps at step {step} (resumable)", flush=True)
            break
        sparse = step >= dense_steps
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr, args.warmup)
        batch = random_windows(stream, args.batch, args.seq_len + 1, gen)
        parts = losses(model, batch, sparse, distill=args.mtp_distill > 0, leak=args.leak_weight > 0)
        mtp = (
            (1 - args.mtp_distill) * parts["mtp"] + args.mtp_distill * parts["mtp_kd"]
            if "mtp_kd" in parts
            else parts.get("mtp", 0.0)
        )
        loss = parts["lm"] + args.mtp_weight * mtp + KL_WEIGHT * parts["kl"] + args.leak_weight * parts.get("leak", 0.0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        imbalance = update_balance_bias(model, args.bias_rate)
        step += 1
        tokens_seen += batch.numel()
        rec = {k: round(v.item(), 4) for k, v in parts.items()} | {
            "step": step,
            "sparse": sparse,
            "imbalance": round(imbalance, 3),
        }
        history.append(rec)
        if step % args.log_every == 0 or step == args.steps:
            dt = time.time() - t_log
            eta = (args.steps - step) * (time.time() - t_start) / max(step - (history[0]["step"] - 1), 1)
            print(
                f"step {step}/{args.steps} [{'sparse' if sparse else 'dense'}] lm {rec['lm']:.3f} "
                f"({rec['lm'] / math.log(2):.2f} bpb) mtp {rec.get('mtp', 0):.3f}"
                + (f" (kd {rec['mtp_kd']:.3f})" if "mtp_kd" in rec else "")
                + f" kl {rec['kl']:.3f}"
                + (f" leak {rec['leak']:.3f}" if "leak" in rec else "")
                + " "
                f"load max/mean {imbalance:.2f} | {tokens_seen / dt:.0f} tok/s, eta {eta / 60:.0f} min",
                flush=True,
            )
            t_log, tokens_seen = time.time(), 0
        if step % args.save_every == 0:
            _save_state(state_path, snapshot())
    _save_state(state_path, snapshot())
    (out / "history.json").write_text(json.dumps(history))
    return out


def _weight(text: str) -> float:
    try:
        w = float(text)
    except ValueError:
        w = float("nan")
    if not 0 <= w < float("inf"):  # NaN fails too
        raise argparse.ArgumentTypeError(f"a finite number >= 0, got {text!r}")
    return w


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"a whole number >= 1, got {text!r}")
    return int(text)


def _share(text: str) -> float:
    try:
        a = float(text)
    except ValueError:
        a = float("nan")
    if not 0 <= a <= 1:  # NaN fails too
        raise argparse.ArgumentTypeError(f"a share between 0 and 1, got {text!r}")
    return a


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="run directory (train_state.pt, history.json)")
    ap.add_argument("--preset", default="demo", help="model preset (default: demo)")
    ap.add_argument("--steps", type=int, default=1200, help="optimizer steps (default 1200)")
    ap.add_argument("--minutes", type=float, default=0, help="stop (resumably) after this many minutes (0: no limit)")
    ap.add_argument("--stop-after", type=int, default=0, help="stop (resumably) after this many steps in this run")
    ap.add_argument("--init", metavar="CHECKPOINT", help="start from this checkpoint's weights (same architecture)")
    ap.add_argument("--layers", type=_positive, default=0, metavar="N", help="main layers (default: the preset's)")
    ap.add_argument("--grow", action="store_true",
                    help="--init from a checkpoint with fewer main layers: repeat its MoE layers, each repeat "
                    "starting as the identity (zeroed output projections)")  # fmt: skip
    ap.add_argument("--batch", type=int, default=8, help="sequences per step (default 8)")
    ap.add_argument("--seq-len", type=int, default=512, help="training context (default 512)")
    ap.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (default 3e-3)")
    ap.add_argument("--warmup", type=int, default=50, help="warm-up steps (default 50)")
    ap.add_argument("--dense-fraction", type=float, default=0.3, help="share of steps in the dense warm-up stage")
    ap.add_argument("--bias-rate", type=float, default=1e-3, help="aux-loss-free balancing bias update speed")
    ap.add_argument("--mtp-weight", type=_weight, default=MTP_WEIGHT,
                    help=f"the MTP loss's weight beside the next-byte loss (default {MTP_WEIGHT})")  # fmt: skip
    ap.add_argument("--mtp-distill", type=_share, default=0.0, metavar="SHARE",
                    help="share of the MTP loss that is the KL from the main model's next-position distribution "
                         "instead of the cross-entropy on the data (default 0: the spec's loss)")  # fmt: skip
    ap.add_argument("--leak-weight", type=_weight, default=0.0, metavar="W",
                    help="weight of the dense attention outside the indexer's top-k, -log of the share inside, "
                         "in the sparse stage (default 0: the spec's losses)")  # fmt: skip
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: all cores)")
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--save-every", type=int, default=50)
    args = ap.parse_args(argv)
    if args.grow and not args.init:
        ap.error("--grow: grows the --init checkpoint; give one")
    train(args)


if __name__ == "__main__":
    main()
