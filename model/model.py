"""Reference DeepSeek-V3.2 in its naive, training-form formulation (spec §2-§8).

One ``nn.Module`` per concept, module and weight names equal to the HF checkpoint names. This is
the model dsc *compiles*: it is written the way a training codebase writes it — MLA decompresses
K/V through ``kv_b_proj`` and caches per-head K/V, the DSA indexer's top-k masks a dense score
matrix, MTP runs beside the main model — and the passes turn it into the inference forms.

Entry points take the KV cache explicitly, as a flat list of tensors laid out by ``cache_layout``:
per layer (main layers, then MTP layers) ``k`` (B, T, H, qk_head_dim), ``v`` (B, T, H, v_head_dim)
and ``index_k`` (B, T, index_head_dim). T is the length of the cache *view* handed in: the runtime
allocates (B, max_len, ...) once and passes ``cache[:, :T]`` so a step costs O(T), and writes land
in place at ``positions`` only (no cache copy).

- ``prefill(tokens, caches)``: positions 0..S-1.
- ``decode(tokens, positions, caches)``: extend by S >= 1 tokens at per-sequence positions (B, S);
  S = 1 is plain decoding, S > 1 at a non-zero position is speculative verification. Attention and
  the indexer are causal by position, so rows of different lengths batch together.
- ``forward(tokens)``: training form, returns main logits and MTP logits.
"""

from __future__ import annotations

from dataclasses import dataclass

import dsc.kernels.moe  # noqa: F401  (registers dsc::moe_experts)
import torch
import torch.nn.functional as F
from dsc.model.config import ModelConfig
from dsc.model.rope import apply_rope_half, apply_rope_interleaved, rope_table
from torch import Tensor, nn

from dsc.errors import ConfigError

NEG_INF = float("-inf")


@dataclass(frozen=True)
class CacheEntry:
    name: str  # e.g. "layers.0.k"
    layer: int
    tail: tuple[int, ...]  # shape after (batch, length)
    meaning: str


def cache_layout(cfg: ModelConfig) -> list[CacheEntry]:
    """The reference model's cache tensors, in the order entry points take them (V3 has no indexer keys)."""
    H = cfg.num_attention_heads
    out = []
    for layer in range(cfg.num_layers_total):
        out += [
            CacheEntry(f"layers.{layer}.k", layer, (H, cfg.qk_head_dim), "per-head key: [k_nope ; RoPE(k_pe)]"),
            CacheEntry(f"layers.{layer}.v", layer, (H, cfg.v_head_dim), "per-head value"),
        ]
        if cfg.has_indexer:
            out.append(
                CacheEntry(f"layers.{layer}.index_k", layer, (cfg.index_head_dim,),
                           "indexer key: Hadamard(RoPE(LayerNorm(wk x)))")
            )  # fmt: skip
    return out


def caches_per_layer(cfg: ModelConfig) -> int:
    return 3 if cfg.has_indexer else 2


def hadamard_matrix(n: int) -> Tensor:
    """Orthonormal Sylvester Walsh-Hadamard matrix of order n (a power of two)."""
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat((torch.cat((h, h), 1), torch.cat((h, -h), 1)), 0)
    return h / n**0.5


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        return (self.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps))).to(x.dtype)


def _linear(i: int, o: int) -> nn.Linear:
    return nn.Linear(i, o, bias=False)


def write_cache(cache: Tensor, positions: Tensor, value: Tensor) -> None:
    """cache[b, positions[b, s]] = value[b, s] in place. cache (B, T, ...), positions (B, S)."""
    rows = torch.arange(cache.shape[0], device=cache.device).unsqueeze(1).expand_as(positions)
    cache.index_put_((rows, positions), value.to(cache.dtype))


class Indexer(nn.Module):
    """Lightning indexer (spec §5): per query, the top-k keys by Σ_h w_h · ReLU(q_h · k)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.head_dim, self.rope_dim = cfg.index_n_heads, cfg.index_head_dim, cfg.qk_rope_head_dim
        self.topk = cfg.index_topk
        self.wq_b = _linear(cfg.q_lora_rank, self.n_heads * self.head_dim)
        self.wk = _linear(cfg.hidden_size, self.head_dim)
        self.k_norm = nn.LayerNorm(self.head_dim, eps=cfg.rms_norm_eps)
        self.weights_proj = _linear(cfg.hidden_size, self.n_heads)
        self.register_buffer("hadamard", hadamard_matrix(self.head_dim), persistent=False)

    def init_buffers(self, device=None) -> None:
        self.hadamard = hadamard_matrix(self.head_dim).to(device)

    def _rope(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        # rope part FIRST (MLA has it last), non-interleaved layout (spec §3, §11.1)
        r = self.rope_dim
        return torch.cat((apply_rope_half(x[..., :r], cos, sin), x[..., r:]), dim=-1)

    def scores(self, x: Tensor, qr: Tensor, cos: Tensor, sin: Tensor, positions: Tensor, cache_k: Tensor) -> Tensor:
        """Index scores I (B, S, T) of each new query against every cached key; writes this chunk's keys."""
        B, S, _ = x.shape
        q = self.wq_b(qr).view(B, S, self.n_heads, self.head_dim)  # (B, S, HI, dI)
        q = self._rope(q, cos.unsqueeze(2), sin.unsqueeze(2)) @ self.hadamard
        k = self._rope(self.k_norm(self.wk(x)), cos, sin) @ self.hadamard  # (B, S, dI)
        write_cache(cache_k, positions, k)
        w = self.weights_proj(x) * (self.n_heads**-0.5 * self.head_dim**-0.5)  # (B, S, HI)
        logits = torch.einsum("bshd,btd->bsht", q, cache_k).relu()  # (B, S, HI, T)
        return torch.einsum("bsht,bsh->bst", logits, w)

    def select_mask(self, index_scores: Tensor, visible: Tensor) -> Tensor:
        """Additive mask (B, S, T): 0 on the top-min(k, visible) visible keys of each query, -inf elsewhere.

        ``k`` stays static for export: k columns of -inf are appended so top-k always has k
        candidates, and whatever it picks outside the visible set is dropped by ``visible``.
        Ties are broken towards the earlier token (a stable sort), so prefill, chunked extend and
        single-step decode select the same set even where ReLU makes many scores exactly 0.
        """
        B, S, T = index_scores.shape
        scores = index_scores.masked_fill(~visible, NEG_INF)
        padded = torch.cat((scores, scores.new_full((B, S, self.topk), NEG_INF)), dim=-1)
        idx = padded.sort(dim=-1, descending=True, stable=True).indices[..., : self.topk]
        chosen = torch.zeros_like(padded, dtype=torch.bool).scatter(-1, idx, True)[..., :T]
        return torch.zeros_like(scores).masked_fill(~(chosen & visible), NEG_INF)


class MLA(nn.Module):
    """Multi-head latent attention, naive (MHA) form with a per-head K/V cache (spec §4.1, §4.3)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads = cfg.num_attention_heads
        self.nope, self.rope, self.v_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.kv_lora_rank = cfg.kv_lora_rank
        self.softmax_scale = cfg.softmax_scale
        self.q_a_proj = _linear(cfg.hidden_size, cfg.q_lora_rank)
        self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, cfg.rms_norm_eps)
        self.q_b_proj = _linear(cfg.q_lora_rank, self.n_heads * cfg.qk_head_dim)
        self.kv_a_proj_with_mqa = _linear(cfg.hidden_size, cfg.kv_lora_rank + self.rope)
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank, cfg.rms_norm_eps)
        self.kv_b_proj = _linear(cfg.kv_lora_rank, self.n_heads * (self.nope + self.v_dim))
        self.o_proj = _linear(self.n_heads * self.v_dim, cfg.hidden_size)
        self.indexer = Indexer(cfg) if cfg.has_indexer else None  # V3: dense attention
        # Training / analysis switches (plain attributes, constant under export):
        self.sparse = True  # False: dense attention (the indexer still scores, for its KL warm-up)
        self.aux: list | None = None  # when a list, each forward appends its attention and index scores

    def forward(self, x, cos, sin, positions, visible, cache_k, cache_v, cache_ik=None) -> Tensor:
        B, S, _ = x.shape
        H = self.n_heads
        qr = self.q_a_layernorm(self.q_a_proj(x))  # (B, S, q_lora_rank)
        q = self.q_b_proj(qr).view(B, S, H, self.nope + self.rope)
        q_nope, q_pe = q.split([self.nope, self.rope], dim=-1)
        q_pe = apply_rope_interleaved(q_pe, cos.unsqueeze(2), sin.unsqueeze(2))
        c_kv, k_pe = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.rope], dim=-1)
        c_kv = self.kv_a_layernorm(c_kv)  # (B, S, kv_lora_rank)
        k_pe = apply_rope_interleaved(k_pe, cos, sin)  # (B, S, rope): one key shared by all heads
        kv = self.kv_b_proj(c_kv).view(B, S, H, self.nope + self.v_dim)
        k_nope, v = kv.split([self.nope, self.v_dim], dim=-1)
        k = torch.cat((k_nope, k_pe.unsqueeze(2).expand(B, S, H, self.rope)), dim=-1)
        write_cache(cache_k, positions, k)
        write_cache(cache_v, positions, v)

        # In training the indexer learns only from its KL loss: its inputs are detached (spec §5.4).
        xi, qri = (x.detach(), qr.detach()) if self.training else (x, qr)
        index_scores = None
        if self.indexer is not None:
            index_scores = self.indexer.scores(xi, qri, cos, sin, positions, cache_ik)  # (B, S, T)
        if self.sparse and self.indexer is not None:
            index_mask = self.indexer.select_mask(index_scores, visible)
        else:
            index_mask = torch.zeros(visible.shape, dtype=torch.float32, device=x.device).masked_fill(~visible, NEG_INF)
        q = torch.cat((q_nope, q_pe), dim=-1)
        scores = torch.einsum("bshd,bthd->bsht", q.float(), cache_k.float()) * self.softmax_scale
        probs = (scores + index_mask.unsqueeze(2)).softmax(dim=-1)  # (B, S, H, T)
        if self.aux is not None:
            self.aux.append(
                {
                    "scores": scores,
                    "probs": probs,
                    "index_scores": index_scores,
                    "index_mask": index_mask,
                    "visible": visible,
                }
            )
        o = torch.einsum("bsht,bthd->bshd", probs, cache_v.float()).to(x.dtype)
        return self.o_proj(o.flatten(2))


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate x) ⊙ up x)."""

    def __init__(self, dim: int, inter: int):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = _linear(dim, inter), _linear(dim, inter), _linear(inter, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Gate(nn.Module):
    """DeepSeekMoE router (spec §6): sigmoid scores, bias for selection only, group-limited top-k."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.hidden_size))
        # Aux-loss-free balancing bias: nudged by the trainer, never by gradients.
        self.register_buffer("e_score_correction_bias", torch.zeros(cfg.n_routed_experts))
        self.top_k, self.n_group, self.topk_group = cfg.num_experts_per_tok, cfg.n_group, cfg.topk_group
        self.norm_topk_prob, self.scale = cfg.norm_topk_prob, cfg.routed_scaling_factor

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x (N, D) -> (expert ids (N, K), mixture weights (N, K))."""
        scores = F.linear(x.float(), self.weight.float()).sigmoid()  # (N, E) unbiased
        biased = scores + self.e_score_correction_bias
        if self.n_group > 1:
            g = biased.unflatten(-1, (self.n_group, -1))  # (N, G, E/G)
            group_score = g.topk(2, dim=-1).values.sum(-1)  # (N, G)
            keep = group_score.topk(self.topk_group, dim=-1).indices
            dropped = torch.ones_like(group_score, dtype=torch.bool).scatter(-1, keep, False)
            biased = g.masked_fill(dropped.unsqueeze(-1), NEG_INF).flatten(1)
        idx = biased.topk(self.top_k, dim=-1).indices
        if self.training:  # expert loads, for the trainer's bias update
            self.last_counts = torch.bincount(idx.flatten(), minlength=scores.shape[-1]).detach()
        wts = scores.gather(-1, idx)
        if self.norm_topk_prob:
            wts = wts / wts.sum(-1, keepdim=True)
        return idx, wts * self.scale


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate = Gate(cfg)
        self.experts = nn.ModuleList(
            MLP(cfg.hidden_size, cfg.moe_intermediate_size) for _ in range(cfg.n_routed_experts)
        )
        self.shared_experts = (
            MLP(cfg.hidden_size, cfg.n_shared_experts * cfg.moe_intermediate_size) if cfg.n_shared_experts else None
        )

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        idx, wts = self.gate(x)
        y = torch.ops.dsc.moe_experts(
            x, idx, wts,
            [e.gate_proj.weight for e in self.experts],
            [e.up_proj.weight for e in self.experts],
            [e.down_proj.weight for e in self.experts],
        )  # fmt: skip
        if self.shared_experts is not None:
            y = y + self.shared_experts(x)
        return y.view(shape)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = MLA(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MoE(cfg) if cfg.is_moe_layer(layer) else MLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, h, cos, sin, positions, visible, caches) -> Tensor:
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, positions, visible, *caches)
        return h + self.mlp(self.post_attention_layernorm(h))


class SharedHead(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.head = _linear(cfg.hidden_size, cfg.vocab_size)


class MTPLayer(DecoderLayer):
    """Multi-token prediction module (spec §8.1): h' = eh_proj([enorm(emb(t_i+1)) ; hnorm(h_i)]), one block, head."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__(cfg, layer)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.enorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.hnorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.eh_proj = _linear(2 * cfg.hidden_size, cfg.hidden_size)
        self.shared_head = SharedHead(cfg)

    def predict(self, hidden, next_tokens, cos, sin, positions, visible, caches) -> tuple[Tensor, Tensor]:
        """hidden (B, S, D): main model's final (post-norm) states; next_tokens (B, S): t_{i+1}.
        -> (logits of t_{i+2}, the normed state the head reads: what a chained draft takes as hidden)."""
        e = self.enorm(self.embed_tokens(next_tokens))
        h = self.eh_proj(torch.cat((e, self.hnorm(hidden)), dim=-1))  # embedding first (spec §11.10)
        h = self.shared_head.norm(super().forward(h, cos, sin, positions, visible, caches))
        return self.shared_head.head(h), h


class DeepseekV32Model(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        n = cfg.num_hidden_layers
        self.layers = nn.ModuleList(
            [DecoderLayer(cfg, i) for i in range(n)]
            + [MTPLayer(cfg, n + j) for j in range(cfg.num_nextn_predict_layers)]
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class DeepseekV32ForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.validate()
        if cfg.extra.get("rope_interleave", True) is False:
            raise ConfigError(
                "rope_interleave is false: this checkpoint's MLA rope is laid out half-split, which dsc's reference "
                "model does not implement (DeepSeek's checkpoints are interleaved); compile it with --frontend transformers"
            )
        self.config = cfg
        self.model = DeepseekV32Model(cfg)
        self.lm_head = _linear(cfg.hidden_size, cfg.vocab_size)
        cos, sin = rope_table(cfg)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def init_buffers(self, device=None) -> None:
        """(Re)compute the derived, non-persistent buffers, e.g. after building on the meta device."""
        self.rope_cos, self.rope_sin = rope_table(self.config, device)
        for m in self.modules():
            if isinstance(m, Indexer):
                m.init_buffers(device)

    # ---- initialisation -----------------------------------------------------------------------
    @torch.no_grad()
    def init_weights(self, seed: int = 0, std: float = 0.02) -> DeepseekV32ForCausalLM:
        """Seeded random weights (normal(0, std) matrices, unit norms, zero biases)."""
        gen = torch.Generator().manual_seed(seed)
        for name, p in self.named_parameters():
            if p.ndim == 1:
                p.fill_(0.0 if name.endswith(".bias") else 1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * std)
        for layer in self.model.layers[self.config.num_hidden_layers :]:
            layer.embed_tokens.weight.copy_(self.model.embed_tokens.weight)
            layer.shared_head.head.weight.copy_(self.lm_head.weight)
        return self

    # ---- cache --------------------------------------------------------------------------------
    def new_cache(self, batch: int, length: int, dtype=torch.float32, device=None) -> list[Tensor]:
        return [torch.zeros(batch, length, *e.tail, dtype=dtype, device=device) for e in cache_layout(self.config)]

    # ---- forward pieces -----------------------------------------------------------------------
    def _rope_at(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        return self.rope_cos[positions], self.rope_sin[positions]  # (B, S, r/2)

    @staticmethod
    def _visible(positions: Tensor, length: int) -> Tensor:
        """(B, S, T): key slot t is visible to the query at positions[b, s] iff t <= that position."""
        return torch.arange(length, device=positions.device) <= positions.unsqueeze(-1)

    def _main(self, tokens: Tensor, positions: Tensor, caches: list[Tensor]) -> tuple[Tensor, Tensor]:
        """-> logits (B, S, V), final post-norm hidden (B, S, D)."""
        cos, sin = self._rope_at(positions)
        visible = self._visible(positions, caches[0].shape[1])
        h = self.model.embed_tokens(tokens)
        n = caches_per_layer(self.config)
        for i in range(self.config.num_hidden_layers):
            h = self.model.layers[i](h, cos, sin, positions, visible, caches[n * i : n * (i + 1)])
        h = self.model.norm(h)
        return self.lm_head(h), h

    def mtp(
        self, hidden: Tensor, next_tokens: Tensor, positions: Tensor, caches: list[Tensor], depth: int = 0
    ) -> Tensor:
        """MTP logits for position i from the main hidden state h_i and the token t_{i+1}."""
        return self.draft(hidden, next_tokens, positions, caches, depth)[0]

    def draft(
        self, hidden: Tensor, next_tokens: Tensor, positions: Tensor, caches: list[Tensor], depth: int = 0
    ) -> tuple[Tensor, Tensor]:
        """(MTP logits, MTP hidden state) at position i: a speculative draft from h_i and t_{i+1}."""
        layer = self.config.num_hidden_layers + depth
        cos, sin = self._rope_at(positions)
        visible = self._visible(positions, caches[0].shape[1])
        n = caches_per_layer(self.config)
        return self.model.layers[layer].predict(
            hidden, next_tokens, cos, sin, positions, visible, caches[n * layer : n * (layer + 1)]
        )

    # ---- entry points -------------------------------------------------------------------------
    def prefill(self, tokens: Tensor, caches: list[Tensor]) -> tuple[Tensor, Tensor]:
        B, S = tokens.shape
        positions = torch.arange(S, device=tokens.device).unsqueeze(0).expand(B, S)
        return self._main(tokens, positions, caches)

    def decode(self, tokens: Tensor, positions: Tensor, caches: list[Tensor]) -> tuple[Tensor, Tensor]:
        return self._main(tokens, positions, caches)

    def forward(self, tokens: Tensor) -> tuple[Tensor, Tensor | None]:
        """Training form: (main logits (B, S, V), MTP logits (B, S-1, V) for t_{i+2}, or None)."""
        B, S = tokens.shape
        caches = self.new_cache(B, S, dtype=self.lm_head.weight.dtype, device=tokens.device)
        logits, hidden = self.prefill(tokens, caches)
        if not self.config.num_nextn_predict_layers or S < 2:
            return logits, None
        positions = torch.arange(S - 1, device=tokens.device).unsqueeze(0).expand(B, S - 1)
        mtp_caches = [c[:, : S - 1] for c in caches]
        return logits, self.mtp(hidden[:, :-1], tokens[:, 1:], positions, mtp_caches)
