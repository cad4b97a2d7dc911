"""Test fixture: a tiny DeepSeek-V3-style causal LM with a multi-token-prediction module.

Written from the architecture description only (deepseek-v32-spec.md sections 2-4, 6 and 8),
in plain fp32 PyTorch, the way someone outside the compiler project would write it:

* RMSNorm ``w * x / sqrt(mean(x^2) + eps)``, interleaved (GPT-J style) RoPE, no YaRN;
* MLA in "naive" mode over a latent cache: each layer keeps ONE tensor (B, T, kv_lora_rank +
  qk_rope_head_dim) holding ``[RMSNorm(c_kv) ; RoPE(k_pe)]`` per position, written in place at the
  call's positions, and re-expands every cached latent through ``kv_b_proj`` on every call;
* a dense SwiGLU MLP in every layer (no MoE, no DSA indexer);
* one MTP module (spec 8.1), stored as layer ``num_hidden_layers`` with HF checkpoint names:
  ``h' = eh_proj([enorm(Emb(t_{i+1})) ; hnorm(h_i)])`` -> one transformer block ->
  ``shared_head.norm`` -> the main output head.  ``h_i`` is the main model's hidden state after
  its final norm.  The MTP module owns no embedding / head copy: it reads the main model's
  ``embed_tokens`` and ``lm_head`` tensors.

Entry points (the compiler's module protocol):

* ``cache_spec()``                          -> {"tensors": [...]}, one latent per layer incl. MTP
* ``prefill(tokens, caches)``               -> (logits, hidden), tokens at positions 0..S-1
* ``decode(tokens, positions, caches)``     -> (logits, hidden), S >= 1 tokens per row
* ``mtp(hidden, tokens, positions, caches)`` -> logits for the token after ``tokens``

``caches`` is always the full list (main layers then the MTP layer); each is a view of the
first T positions.  Key slot t is visible to a query at position p iff t <= p.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

# ---------------------------------------------------------------------------------------------
# building blocks


class RMSNorm(nn.Module):
    """RMSNorm spelled out: x * rsqrt(mean(x^2) + eps) * w."""

    def __init__(self, width: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class FunctionalRMSNorm(nn.Module):
    """The same normalisation through torch.nn.functional.rms_norm."""

    def __init__(self, width: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (self.weight.shape[0],), self.weight, self.eps)


def rotate_pairs(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Interleaved RoPE on the last dim: pairs (x_2j, x_2j+1) rotated by angle j.

    ``cos`` / ``sin`` broadcast against ``x`` with the last dim halved.
    """
    pairs = x.unflatten(-1, (-1, 2))
    a = pairs[..., 0]
    b = pairs[..., 1]
    return torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1).flatten(-2)


class LatentAttention(nn.Module):
    """Multi-head latent attention (spec 4.1 / 4.3) with a packed [c_kv ; k_pe] cache."""

    def __init__(self, cfg: dict):
        super().__init__()
        d = cfg["hidden_size"]
        self.n_heads = cfg["num_attention_heads"]
        self.d_nope = cfg["qk_nope_head_dim"]
        self.d_rope = cfg["qk_rope_head_dim"]
        self.d_v = cfg["v_head_dim"]
        self.d_c = cfg["kv_lora_rank"]
        eps = cfg["rms_norm_eps"]
        q_width = self.n_heads * (self.d_nope + self.d_rope)
        self.q_lora_rank = cfg.get("q_lora_rank")
        if self.q_lora_rank:
            self.q_a_proj = nn.Linear(d, self.q_lora_rank, bias=False)
            self.q_a_layernorm = FunctionalRMSNorm(self.q_lora_rank, eps)
            self.q_b_proj = nn.Linear(self.q_lora_rank, q_width, bias=False)
        else:
            self.q_proj = nn.Linear(d, q_width, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(d, self.d_c + self.d_rope, bias=False)
        self.kv_a_layernorm = FunctionalRMSNorm(self.d_c, eps)
        self.kv_b_proj = nn.Linear(self.d_c, self.n_heads * (self.d_nope + self.d_v), bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.d_v, d, bias=False)
        self.softmax_scale = (self.d_nope + self.d_rope) ** -0.5  # no YaRN -> no mscale

    def forward(self, x, positions, cos, sin, cache):
        """x (B,S,d); positions (B,S) int64; cos/sin (B,S,d_rope/2); cache (B,T,d_c+d_rope) or None.

        With ``cache=None`` the keys are this call's own tokens at ``positions`` (no-cache forward).
        """
        B, S, _ = x.shape
        H = self.n_heads

        if self.q_lora_rank:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        else:
            q = self.q_proj(x)
        q = q.view(B, S, H, self.d_nope + self.d_rope)
        q_nope, q_pe = torch.split(q, [self.d_nope, self.d_rope], dim=-1)
        q_pe = rotate_pairs(q_pe, cos.unsqueeze(2), sin.unsqueeze(2))

        kv_a = self.kv_a_proj_with_mqa(x)
        c_new, k_pe_new = torch.split(kv_a, [self.d_c, self.d_rope], dim=-1)
        latent_new = torch.cat((self.kv_a_layernorm(c_new), rotate_pairs(k_pe_new, cos, sin)), dim=-1)

        if cache is None:
            latent = latent_new
            key_pos = positions  # (B, T=S)
        else:
            rows = torch.arange(B, device=x.device).unsqueeze(1).expand(B, S)
            cache.index_put_((rows, positions), latent_new)
            latent = cache
            key_pos = torch.arange(cache.shape[1], device=x.device).unsqueeze(0)  # slot t = position t
        T = latent.shape[1]

        c_all = latent[..., : self.d_c]  # (B,T,d_c)
        k_pe_all = latent[..., self.d_c :]  # (B,T,d_rope), shared by every head
        kv = self.kv_b_proj(c_all).view(B, T, H, self.d_nope + self.d_v)
        k_nope, v = torch.split(kv, [self.d_nope, self.d_v], dim=-1)

        q_nope_h = q_nope.transpose(1, 2)  # (B,H,S,dn)
        q_pe_h = q_pe.transpose(1, 2)  # (B,H,S,dr)
        k_nope_t = k_nope.permute(0, 2, 3, 1)  # (B,H,dn,T)
        k_pe_t = k_pe_all.transpose(1, 2).unsqueeze(1)  # (B,1,dr,T)
        scores = (torch.matmul(q_nope_h, k_nope_t) + torch.matmul(q_pe_h, k_pe_t)) * self.softmax_scale

        visible = key_pos.unsqueeze(1) <= positions.unsqueeze(-1)  # (B,S,T)
        scores = scores.masked_fill(~visible.unsqueeze(1), float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        out = torch.matmul(probs, v.transpose(1, 2))  # (B,H,S,dv)
        return self.o_proj(out.transpose(1, 2).reshape(B, S, H * self.d_v))


class SwiGLU(nn.Module):
    def __init__(self, d: int, inter: int):
        super().__init__()
        self.gate_proj = nn.Linear(d, inter, bias=False)
        self.up_proj = nn.Linear(d, inter, bias=False)
        self.down_proj = nn.Linear(inter, d, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg["hidden_size"], cfg["rms_norm_eps"])
        self.self_attn = LatentAttention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg["hidden_size"], cfg["rms_norm_eps"])
        self.mlp = SwiGLU(cfg["hidden_size"], cfg["intermediate_size"])

    def forward(self, h, positions, cos, sin, cache):
        h = h + self.self_attn(self.input_layernorm(h), positions, cos, sin, cache)
        return h + self.mlp(self.post_attention_layernorm(h))


class SharedHead(nn.Module):
    """Only the norm lives here; the head matrix is the main model's lm_head (shared)."""

    def __init__(self, cfg: dict):
        super().__init__()
        self.norm = FunctionalRMSNorm(cfg["hidden_size"], cfg["rms_norm_eps"])


class MTPLayer(DecoderLayer):
    """Spec 8.1: enorm, hnorm, eh_proj, one full block, shared_head.norm."""

    def __init__(self, cfg: dict):
        super().__init__(cfg)
        d = cfg["hidden_size"]
        self.enorm = FunctionalRMSNorm(d, cfg["rms_norm_eps"])
        self.hnorm = RMSNorm(d, cfg["rms_norm_eps"])
        self.eh_proj = nn.Linear(2 * d, d, bias=False)
        self.shared_head = SharedHead(cfg)


class _Backbone(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        L = cfg["num_hidden_layers"]
        n_mtp = cfg.get("num_nextn_predict_layers") or 0
        self.embed_tokens = nn.Embedding(cfg["vocab_size"], cfg["hidden_size"])
        self.layers = nn.ModuleList([DecoderLayer(cfg) for _ in range(L)] + [MTPLayer(cfg) for _ in range(n_mtp)])
        self.norm = RMSNorm(cfg["hidden_size"], cfg["rms_norm_eps"])


# ---------------------------------------------------------------------------------------------
# the model


class SpecDeepseekMTP(nn.Module):
    def __init__(self, config: dict):
        super().__init__()
        self.config = dict(config)
        cfg = self.config
        self.n_layers = cfg["num_hidden_layers"]
        self.model = _Backbone(cfg)
        self.lm_head = nn.Linear(cfg["hidden_size"], cfg["vocab_size"], bias=False)
        r = cfg["qk_rope_head_dim"]
        freqs = cfg["rope_theta"] ** (-torch.arange(0, r, 2, dtype=torch.float32) / r)
        self.register_buffer("rope_freqs", freqs, persistent=False)

    # -- protocol ---------------------------------------------------------------------------
    def cache_spec(self) -> dict:
        width = self.config["kv_lora_rank"] + self.config["qk_rope_head_dim"]
        specs = []
        for i in range(len(self.model.layers)):
            kind = "MTP layer" if i >= self.n_layers else "decoder layer"
            specs.append(
                {
                    "name": f"model.layers.{i}.latent_cache",
                    "shape": ["batch", "T", width],
                    "dtype": "float32",
                    "meaning": (
                        f"{kind} {i} MLA latent per position: [kv_a_layernorm(c_kv) "
                        f"({self.config['kv_lora_rank']}) ; interleaved-RoPE k_pe "
                        f"({self.config['qk_rope_head_dim']})], slot t = position t"
                    ),
                    "layer": i,
                }
            )
        return {"tensors": specs}

    def prefill(self, tokens, caches):
        B, S = tokens.shape
        positions = torch.arange(S, device=tokens.device).unsqueeze(0).expand(B, S)
        return self._main(tokens, positions, caches)

    def decode(self, tokens, positions, caches):
        return self._main(tokens, positions, caches)

    def mtp(self, hidden, tokens, positions, caches):
        """Draft logits for t_{i+2} from (post-norm h_i, t_{i+1}) at positions i."""
        return self._mtp(hidden, tokens, positions, caches[self.n_layers])

    def forward(self, tokens, positions, caches):
        return self.decode(tokens, positions, caches)

    # -- bodies -----------------------------------------------------------------------------
    def _angles(self, positions):
        theta = positions.to(torch.float32).unsqueeze(-1) * self.rope_freqs  # (B,S,r/2)
        return torch.cos(theta), torch.sin(theta)

    def _main(self, tokens, positions, caches):
        cos, sin = self._angles(positions)
        h = self.model.embed_tokens(tokens)
        for i in range(self.n_layers):
            h = self.model.layers[i](h, positions, cos, sin, None if caches is None else caches[i])
        hidden = self.model.norm(h)
        return self.lm_head(hidden), hidden

    def _mtp(self, hidden, tokens, positions, cache):
        layer = self.model.layers[self.n_layers]
        cos, sin = self._angles(positions)
        emb = self.model.embed_tokens.weight[tokens]  # shared embedding, looked up by indexing
        h = layer.eh_proj(torch.cat((layer.enorm(emb), layer.hnorm(hidden)), dim=-1))
        h = layer(h, positions, cos, sin, cache)  # the MTP block: attention + MLP, residuals
        h = layer.shared_head.norm(h)
        return h @ self.lm_head.weight.T  # shared output head as a plain matmul


# ---------------------------------------------------------------------------------------------
# helpers for tests


def tiny_mtp_config() -> dict:
    return {
        "model_type": "deepseek_v3",
        "architectures": ["DeepseekV3ForCausalLM"],
        "vocab_size": 96,
        "hidden_size": 48,
        "intermediate_size": 80,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "q_lora_rank": 24,
        "kv_lora_rank": 16,
        "qk_nope_head_dim": 16,
        "qk_rope_head_dim": 8,
        "v_head_dim": 16,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "rope_scaling": None,
        "rope_interleave": True,
        "max_position_embeddings": 512,
        "num_nextn_predict_layers": 1,
        "first_k_dense_replace": 2,
        "moe_layer_freq": 1,
        # MoE keys as HF configs carry them; every layer here is dense (the MTP layer too)
        "n_routed_experts": 4,
        "n_shared_experts": 1,
        "num_experts_per_tok": 2,
        "n_group": 2,
        "topk_group": 1,
        "moe_intermediate_size": 16,
        "hidden_act": "silu",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
    }


def init_random(model: nn.Module, seed: int) -> nn.Module:
    """Seeded weights: N(0, 0.02) for every matrix, ones for every norm weight."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.02)
            else:
                p.fill_(1.0)
    return model


def new_caches(model: SpecDeepseekMTP, batch: int, length: int) -> list[torch.Tensor]:
    out = []
    for t in model.cache_spec()["tensors"]:
        shape = [batch if s == "batch" else length if s == "T" else s for s in t["shape"]]
        out.append(torch.zeros(shape, dtype=getattr(torch, t["dtype"])))
    return out


def reference_mtp_logits(model: SpecDeepseekMTP, tokens: torch.Tensor):
    """No-cache ground truth over the whole sequence (full causal attention).

    Returns (main_logits (B,S,V), mtp_logits (B,S-1,V)); mtp_logits[:, i] predicts t_{i+2}
    from the post-norm hidden h_i and the token t_{i+1}, i = 0..S-2.
    """
    B, S = tokens.shape
    positions = torch.arange(S, device=tokens.device).unsqueeze(0).expand(B, S)
    with torch.no_grad():
        logits, hidden = model._main(tokens, positions, None)
        mtp_logits = model._mtp(hidden[:, :-1], tokens[:, 1:], positions[:, :-1], None)
    return logits, mtp_logits
