"""DeepSeek-V3 / V3.2 model configuration: the HF ``config.json`` keys of ``model_type`` ``deepseek_v32``
and ``deepseek_v3`` (V3 / V3.1 / R1: the same model without the DSA indexer).

Field names are the HF keys (spec §1.1) so a config round-trips through ``config.json`` unchanged;
keys we do not interpret (``auto_map``, ``transformers_version`` ...) are kept in ``extra`` and
written back. Every spelling transformers writes is read: the rope as ``rope_scaling`` (DeepSeek's
files, transformers 4) or ``rope_parameters`` (transformers 5), with transformers' meaning of an
absent sub-key; a config without any rope scaling has none. ``from_dict`` records which fields the
file did not set (``absent``), so the checkpoint loader can infer them from the weights instead of
assuming. ``validate`` turns inconsistent values into a ``ConfigError`` that says what to fix.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dsc.errors import ConfigError

MODEL_TYPE = "deepseek_v32"
MODEL_TYPES = {"deepseek_v32": "DeepseekV32ForCausalLM", "deepseek_v3": "DeepseekV3ForCausalLM"}


@dataclass
class ModelConfig:
    vocab_size: int = 129280
    hidden_size: int = 7168
    intermediate_size: int = 18432
    moe_intermediate_size: int = 2048
    num_hidden_layers: int = 61
    first_k_dense_replace: int = 3
    moe_layer_freq: int = 1
    num_attention_heads: int = 128
    num_key_value_heads: int = 128
    q_lora_rank: int = 1536
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    n_routed_experts: int = 256
    n_shared_experts: int = 1
    num_experts_per_tok: int = 8
    n_group: int = 8
    topk_group: int = 4
    routed_scaling_factor: float = 2.5
    scoring_func: str = "sigmoid"
    topk_method: str = "noaux_tc"
    norm_topk_prob: bool = True
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # YaRN parameters, or None: plain RoPE
    max_position_embeddings: int = 163840
    index_n_heads: int = 64
    index_head_dim: int = 128
    index_topk: int = 2048
    num_nextn_predict_layers: int = 1
    tie_word_embeddings: bool = False
    bos_token_id: int = 0
    eos_token_id: int | list = 1  # one id, or a list of ids that each end a sequence
    quantization_config: dict | None = None
    torch_dtype: str = "bfloat16"
    attention_bias: bool = False
    model_type: str = MODEL_TYPE
    architectures: list = field(default_factory=lambda: ["DeepseekV32ForCausalLM"])
    extra: dict = field(default_factory=dict)
    # fields the config file did not set (their defaults apply unless a loader infers them)
    absent: frozenset = field(default_factory=frozenset, compare=False, repr=False)

    # ---- derived quantities -------------------------------------------------------------------
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def num_layers_total(self) -> int:
        """Main layers plus MTP layers (MTP sits at index ``num_hidden_layers`` onwards)."""
        return self.num_hidden_layers + self.num_nextn_predict_layers

    def is_moe_layer(self, layer: int) -> bool:
        return layer >= self.first_k_dense_replace and layer % self.moe_layer_freq == 0

    @property
    def has_indexer(self) -> bool:
        """DeepSeek-V3.2's DSA lightning indexer; V3 attends densely."""
        return self.model_type == "deepseek_v32"

    @property
    def yarn(self) -> dict | None:
        rs = self.rope_scaling
        if rs and rs.get("type", rs.get("rope_type")) == "yarn":
            return rs
        return None

    @property
    def softmax_scale(self) -> float:
        """MLA softmax scale: qk_head_dim^-0.5 times the YaRN mscale squared (spec §4.5). As in
        transformers, an absent (or zero) ``mscale_all_dim`` means no mscale."""
        scale = self.qk_head_dim**-0.5
        if self.yarn is not None and self.yarn.get("mscale_all_dim"):
            m = yarn_mscale(float(self.yarn["factor"]), float(self.yarn["mscale_all_dim"]))
            scale *= m * m
        return scale

    @property
    def rope_attention_factor(self) -> float:
        """YaRN's cos/sin magnitude (transformers' ``attention_factor``): mscale(s, mscale) /
        mscale(s, mscale_all_dim) when both are set (1 for DeepSeek's configs, spec §3), else
        mscale(s, 1)."""
        ys = self.yarn
        if ys is None:
            return 1.0
        if ys.get("attention_factor") is not None:
            return float(ys["attention_factor"])
        factor = float(ys["factor"])
        if ys.get("mscale") and ys.get("mscale_all_dim"):
            return yarn_mscale(factor, float(ys["mscale"])) / yarn_mscale(factor, float(ys["mscale_all_dim"]))
        return yarn_mscale(factor)

    # ---- (de)serialisation --------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        d = dict(d)
        if d.get("model_type") not in MODEL_TYPES:
            raise ConfigError(
                f"config model_type is {d.get('model_type')!r}; dsc compiles {' and '.join(map(repr, MODEL_TYPES))} "
                "models (DeepSeek-V3.2 / V3.2-Exp, DeepSeek-V3 / V3.1 / R1). Check that this is a DeepSeek config.json."
            )
        _read_rope(d)
        if d.get("num_nextn_predict_layers", 0) is None:  # transformers writes null for "not set"
            del d["num_nextn_predict_layers"]
        if d.get("torch_dtype") is None and d.get("dtype") is not None:  # transformers 5's spelling
            d["torch_dtype"] = d.pop("dtype")
        if "architectures" not in d or not d["architectures"]:
            d["architectures"] = [MODEL_TYPES[d["model_type"]]]
        if d.get("num_key_value_heads") is None and "num_attention_heads" in d:  # transformers' default
            d["num_key_value_heads"] = d["num_attention_heads"]
        known = {f.name for f in dataclasses.fields(cls)} - {"extra", "absent"}
        kwargs = {k: d.pop(k) for k in list(d) if k in known}
        required = SHAPE_KEYS + (INDEXER_KEYS if kwargs["model_type"] == "deepseek_v32" else ())
        missing = [k for k in required if kwargs.get(k) is None]
        if missing:
            raise ConfigError(
                f"config is missing {', '.join(missing)}: these keys define the weights' shapes (or the routing) "
                "and have no safe default; copy them from the checkpoint's original config.json"
            )
        cfg = cls(**kwargs, extra=d, absent=frozenset(known - set(kwargs)))
        cfg.validate()
        return cfg

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("extra", "absent")}
        d = json.loads(json.dumps(d))  # a deep copy of plain data
        if d["quantization_config"] is None:
            d.pop("quantization_config")
        return {**d, **self.extra}

    @classmethod
    def from_json(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path} does not exist; an HF checkpoint directory needs a config.json") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON ({e}); fix or regenerate the config") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path} must hold a JSON object, got {type(data).__name__}")
        try:
            return cls.from_dict(data)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    # ---- validation ---------------------------------------------------------------------------
    @property
    def eos_ids(self) -> tuple[int, ...]:
        """The ids that end a sequence (``eos_token_id`` may be one id or a list)."""
        e = self.eos_token_id
        return tuple(e) if isinstance(e, list) else (e,)

    def validate(self) -> None:
        """Every value against the field's type (all wrong keys named at once), then the ranges and
        the relations between keys; a ``ConfigError`` lists every problem found."""
        wrong = schema_problems(self)
        if wrong:
            raise ConfigError("invalid config: " + "; ".join(wrong))
        problems: list[str] = []

        def need(cond: bool, msg: str) -> None:
            if not cond:
                problems.append(msg)

        self._validate_values(need)
        if problems:
            raise ConfigError("invalid config: " + "; ".join(problems))

    def _validate_values(self, need) -> None:
        ints = [
            "vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
            "num_attention_heads", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
            "v_head_dim", "n_routed_experts", "num_experts_per_tok", "n_group", "topk_group", "index_n_heads",
            "index_head_dim", "index_topk", "max_position_embeddings", "moe_layer_freq",
        ]  # fmt: skip
        for name in ints:
            v = getattr(self, name)
            need(v > 0, f"{name} must be a positive integer, got {v!r}")
        for name in ["first_k_dense_replace", "n_shared_experts", "num_nextn_predict_layers"]:
            v = getattr(self, name)
            need(v >= 0, f"{name} must be a non-negative integer, got {v!r}")
        bad_ids = [i for i in (self.bos_token_id, *self.eos_ids) if not 0 <= i < self.vocab_size]
        need(
            not bad_ids and len(self.eos_ids) > 0,
            f"bos_token_id / eos_token_id must be ids in 0..{self.vocab_size - 1} (vocab_size {self.vocab_size}), "
            f"got bos {self.bos_token_id!r}, eos {self.eos_token_id!r}",
        )
        need(self.torch_dtype in DTYPES, f"torch_dtype must be one of {', '.join(DTYPES)}, got {self.torch_dtype!r}")
        for name in ("rope_theta", "routed_scaling_factor"):
            v = getattr(self, name)
            need(v > 0, f"{name} must be a positive number, got {v!r}")
        if (
            min(self.n_group, self.topk_group, self.n_routed_experts, self.num_experts_per_tok, self.moe_layer_freq)
            <= 0
        ):
            return  # the relations below divide by these
        need(self.qk_rope_head_dim % 2 == 0, f"qk_rope_head_dim must be even, got {self.qk_rope_head_dim}")
        need(
            self.n_routed_experts % self.n_group == 0,
            f"n_routed_experts ({self.n_routed_experts}) must be divisible by n_group ({self.n_group})",
        )
        need(self.topk_group <= self.n_group, f"topk_group ({self.topk_group}) must be <= n_group ({self.n_group})")
        per_group = self.n_routed_experts // self.n_group
        need(
            self.num_experts_per_tok <= self.topk_group * per_group,
            f"num_experts_per_tok ({self.num_experts_per_tok}) exceeds the experts in the kept groups "
            f"(topk_group {self.topk_group} x {per_group} experts per group)",
        )
        need(
            per_group >= 2 or self.n_group == 1,
            "group-limited routing needs >= 2 experts per group (top-2 group score)",
        )
        self._validate_layer_types(need)
        need(
            self.scoring_func == "sigmoid",
            f"scoring_func must be 'sigmoid' for deepseek_v32, got {self.scoring_func!r}",
        )
        need(self.topk_method == "noaux_tc", f"topk_method must be 'noaux_tc', got {self.topk_method!r}")
        need(self.hidden_act == "silu", f"hidden_act must be 'silu', got {self.hidden_act!r}")
        need(self.num_key_value_heads == self.num_attention_heads, "MLA has num_key_value_heads == num_attention_heads")
        if self.has_indexer:
            d = self.index_head_dim
            need(d & (d - 1) == 0, f"index_head_dim must be a power of two (Hadamard rotation), got {d}")
            need(
                d >= self.qk_rope_head_dim,
                f"index_head_dim ({d}) must be >= qk_rope_head_dim ({self.qk_rope_head_dim})",
            )
        need(0 < self.rms_norm_eps < 1, f"rms_norm_eps must be in (0, 1), got {self.rms_norm_eps}")
        need(not self.tie_word_embeddings, "tie_word_embeddings must be false for DeepSeek-V3.2")
        rs = self.rope_scaling
        if rs is not None:
            kind = rs.get("type", rs.get("rope_type"))
            need(kind == "yarn", f"rope_scaling type must be 'yarn' (or none at all), got {kind!r}")
            for k in ("factor", "original_max_position_embeddings"):
                need(rs.get(k) is not None, f"rope_scaling is missing {k!r}")
            for k, want in ROPE_SCALING_KEYS.items():
                v = rs.get(k)
                if v is not None and not _is(v, want):
                    need(False, f"rope_scaling.{k}: expected {_DESCRIBE[want]}, got {_got(v)}")
                elif v is not None:
                    need(
                        v >= (1 if k == "factor" else 0),
                        f"rope_scaling.{k} must be >= {1 if k == 'factor' else 0}, got {v}",
                    )
        qc = self.quantization_config
        if qc is not None:
            need(
                qc.get("quant_method") == "fp8", f"only quant_method 'fp8' is supported, got {qc.get('quant_method')!r}"
            )
            need(qc.get("fmt", "e4m3") == "e4m3", f"only fp8 fmt 'e4m3' is supported, got {qc.get('fmt')!r}")
            need(qc.get("weight_block_size", [128, 128]) == [128, 128], "weight_block_size must be [128, 128]")

    def _validate_layer_types(self, need) -> None:
        """transformers 5 spells the layer kinds out per layer; they must agree with the fields dsc reads."""
        n = self.num_hidden_layers
        mlp = self.extra.get("mlp_layer_types")
        if mlp is not None:
            want = ["sparse" if self.is_moe_layer(i) else "dense" for i in range(n)]
            need(
                list(mlp) == want,
                f"mlp_layer_types {mlp} disagrees with first_k_dense_replace={self.first_k_dense_replace} / "
                f"moe_layer_freq={self.moe_layer_freq} (which give {want}); make them agree",
            )
        kinds = self.extra.get("layer_types")
        if kinds is not None:
            want_kind = "indexed_attention" if self.has_indexer else "full_attention"
            need(
                len(kinds) == n and set(kinds) <= {want_kind},
                f"layer_types must be {n} x {want_kind!r} for {self.model_type}, got {sorted(set(kinds))}",
            )


# Keys that define the weights' shapes or the routing: a config without one is refused, never given
# the 671B model's value. The others take transformers' defaults (the dataclass's), as HF does.
SHAPE_KEYS = (
    "vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
    "first_k_dense_replace", "num_attention_heads", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim",
    "qk_rope_head_dim", "v_head_dim", "n_routed_experts", "n_shared_experts", "num_experts_per_tok", "n_group",
    "topk_group", "max_position_embeddings",
)  # fmt: skip
INDEXER_KEYS = ("index_n_heads", "index_head_dim", "index_topk")  # deepseek_v32 only
DTYPES = ("bfloat16", "float16", "float32")
ROPE_SCALING_KEYS = {
    "factor": "float", "original_max_position_embeddings": "int", "beta_fast": "float", "beta_slow": "float",
    "mscale": "float", "mscale_all_dim": "float", "attention_factor": "float",
}  # fmt: skip
_DESCRIBE = {
    "int": "an integer", "float": "a number", "bool": "true or false", "str": "a string",
    "dict | None": "an object or null", "list": "a list", "int | list": "an integer or a list of integers",
}  # fmt: skip


def _is(v: Any, kind: str) -> bool:
    """JSON value ``v`` against a field's annotation (booleans are not numbers; numbers are finite)."""
    if kind == "int":
        return isinstance(v, int) and not isinstance(v, bool)
    if kind == "float":
        return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
    if kind == "bool":
        return isinstance(v, bool)
    if kind == "str":
        return isinstance(v, str)
    if kind == "dict | None":
        return v is None or isinstance(v, dict)
    if kind == "list":
        return isinstance(v, list)
    if kind == "int | list":
        return _is(v, "int") or (isinstance(v, list) and all(_is(x, "int") for x in v))
    raise AssertionError(kind)


def _got(v: Any) -> str:
    kind = {bool: "the boolean", str: "the string", dict: "an object", list: "the list", type(None): "null"}
    return f"{kind.get(type(v), 'the number' if isinstance(v, int | float) else type(v).__name__)} {json.dumps(v)}"


def schema_problems(cfg: ModelConfig) -> list[str]:
    """Each field whose value is not of its annotated type: ``key: expected ..., got ...``."""
    out = []
    for f in dataclasses.fields(cfg):
        if f.name in ("extra", "absent"):
            continue
        v = getattr(cfg, f.name)
        if not _is(v, f.type):
            out.append(f"{f.name}: expected {_DESCRIBE[f.type]}, got {_got(v)}")
    return out


def _read_rope(d: dict) -> None:
    """Fold transformers 5's ``rope_parameters`` into ``rope_theta`` / ``rope_scaling`` (in place).
    No rope spelling at all means plain RoPE, never a default YaRN."""
    rp = d.pop("rope_parameters", None)
    if rp is None:
        d.setdefault("rope_scaling", None)
        return
    if not isinstance(rp, dict):
        raise ConfigError(f"rope_parameters must be an object, got {rp!r}")
    if "rope_theta" in rp:
        if "rope_theta" in d and float(d["rope_theta"]) != float(rp["rope_theta"]):
            raise ConfigError(
                f"rope_theta {d['rope_theta']} disagrees with rope_parameters.rope_theta {rp['rope_theta']}; keep one"
            )
        d["rope_theta"] = rp["rope_theta"]
    kind = rp.get("rope_type", rp.get("type", "default"))
    scaling = None if kind == "default" else {k: v for k, v in rp.items() if k != "rope_theta"} | {"type": kind}
    old = d.get("rope_scaling")
    if old is not None:
        clash = sorted(k for k in old if k not in ("type", "rope_type") and (scaling or {}).get(k, old[k]) != old[k])
        if scaling is None or clash:
            raise ConfigError(f"rope_scaling {old} disagrees with rope_parameters {rp} ({clash or 'type'}); keep one")
    d["rope_scaling"] = old if old is not None else scaling


def yarn_mscale(factor: float, mscale_all_dim: float = 1.0) -> float:
    """YaRN attention temperature 0.1·m·ln(s) + 1 (1 when the factor is <= 1), spec §3."""
    if factor <= 1:
        return 1.0
    return 0.1 * mscale_all_dim * math.log(factor) + 1.0


def _yarn(factor: int, original: int) -> dict:
    return {
        "type": "yarn",
        "factor": factor,
        "original_max_position_embeddings": original,
        "beta_fast": 32,
        "beta_slow": 1,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
    }


PRESETS: dict[str, dict[str, Any]] = {
    # Tests: well under 1M parameters, 2 layers (first dense) + 1 MTP layer, sparse attention active
    # beyond 16 tokens, YaRN active (256 -> 1024 positions).
    "tiny": dict(
        vocab_size=320,
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=32,
        num_hidden_layers=2,
        first_k_dense_replace=1,
        num_attention_heads=4,
        num_key_value_heads=4,
        q_lora_rank=32,
        kv_lora_rank=32,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        v_head_dim=16,
        n_routed_experts=8,
        n_shared_experts=1,
        num_experts_per_tok=2,
        n_group=4,
        topk_group=2,
        index_n_heads=4,
        index_head_dim=16,
        index_topk=16,
        max_position_embeddings=1024,
        rope_scaling=_yarn(4, 256),
        bos_token_id=256,
        eos_token_id=257,
        torch_dtype="float32",
    ),  # fmt: skip
    # CPU benchmarks: the full model's ratios at reduced width.
    "small": dict(
        vocab_size=8192,
        hidden_size=1024,
        intermediate_size=2816,
        moe_intermediate_size=256,
        num_hidden_layers=4,
        first_k_dense_replace=1,
        num_attention_heads=16,
        num_key_value_heads=16,
        q_lora_rank=384,
        kv_lora_rank=512,
        qk_nope_head_dim=128,
        qk_rope_head_dim=64,
        v_head_dim=128,
        n_routed_experts=16,
        n_shared_experts=1,
        num_experts_per_tok=4,
        n_group=4,
        topk_group=2,
        index_n_heads=16,
        index_head_dim=128,
        index_topk=2048,
        max_position_embeddings=65536,
        rope_scaling=_yarn(16, 4096),
        bos_token_id=256,
        eos_token_id=257,
        torch_dtype="float32",
    ),  # fmt: skip
    # The built-in demo model (trained by `python -m dsc.train`, shipped in dsc/assets/demo): byte-level,
    # 512-token training context, DSA active beyond 64 visible tokens. 10 main layers since run 5
    # (grown from run 4's 4 by `--layers 10 --grow`).
    "demo": dict(
        vocab_size=264,
        hidden_size=192,
        intermediate_size=512,
        moe_intermediate_size=96,
        num_hidden_layers=10,
        first_k_dense_replace=1,
        num_attention_heads=4,
        num_key_value_heads=4,
        q_lora_rank=96,
        kv_lora_rank=64,
        qk_nope_head_dim=32,
        qk_rope_head_dim=16,
        v_head_dim=32,
        n_routed_experts=8,
        n_shared_experts=1,
        num_experts_per_tok=2,
        n_group=4,
        topk_group=2,
        index_n_heads=4,
        index_head_dim=32,
        index_topk=64,
        max_position_embeddings=2048,
        rope_scaling=_yarn(4, 512),
        bos_token_id=256,
        eos_token_id=257,
        torch_dtype="float32",
    ),  # fmt: skip
    # The exact 671B config (spec §1.1): meta device only, for shape and cost analysis.
    "deepseek-v3.2": dict(
        rope_scaling=_yarn(40, 4096),
        quantization_config={
            "activation_scheme": "dynamic",
            "fmt": "e4m3",
            "quant_method": "fp8",
            "weight_block_size": [128, 128],
            "scale_fmt": "ue8m0",
        },
    ),  # fmt: skip
}


def preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    cfg = ModelConfig(**PRESETS[name])
    cfg.validate()
    return cfg
