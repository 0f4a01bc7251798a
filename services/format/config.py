"""ModelConfig: the one model configuration, read from a Hugging Face `config.json` (model_type deepseek_v3).

Both spellings seen in the wild are accepted:
  * DeepSeek's own (transformers 4.x): `rope_scaling` {type: yarn, ...}, `rope_theta` at top level, `torch_dtype`.
  * transformers 5.x: `rope_parameters` {rope_type: yarn, rope_theta, ...}, `dtype`.
Values the engine does not implement are rejected with a ConfigError naming the key.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from services.errors import ConfigError

FP8_BLOCK = 128


@dataclass(frozen=True)
class YarnScaling:
    factor: float = 40.0
    original_max_position_embeddings: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 1.0


@dataclass(frozen=True)
class Fp8Quantization:
    weight_block_size: tuple[int, int] = (FP8_BLOCK, FP8_BLOCK)
    fmt: str = "e4m3"
    activation_scheme: str = "dynamic"

    def to_dict(self) -> dict[str, Any]:
        return {
            "activation_scheme": self.activation_scheme,
            "fmt": self.fmt,
            "quant_method": "fp8",
            "weight_block_size": list(self.weight_block_size),
        }


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    moe_intermediate_size: int
    num_hidden_layers: int
    first_k_dense_replace: int
    num_attention_heads: int
    q_lora_rank: int | None
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    n_routed_experts: int
    n_shared_experts: int
    num_experts_per_tok: int
    n_group: int
    topk_group: int
    routed_scaling_factor: float = 2.5
    norm_topk_prob: bool = True
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 163840
    rope_theta: float = 10000.0
    yarn: YarnScaling | None = field(default_factory=YarnScaling)
    bos_token_id: int = 0
    eos_token_ids: tuple[int, ...] = (1,)
    dtype: str = "bfloat16"
    quantization: Fp8Quantization | None = None
    num_nextn_predict_layers: int = 0

    # ---- derived -------------------------------------------------------------------------
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def experts_per_group(self) -> int:
        return self.n_routed_experts // self.n_group

    def is_moe_layer(self, layer: int) -> bool:
        return layer >= self.first_k_dense_replace

    @property
    def mtp_layers(self) -> list[int]:
        """The multi-token-prediction layers' indices: num_hidden_layers, ... (one in DeepSeek-V3, index 61)."""
        return list(range(self.num_hidden_layers, self.num_hidden_layers + self.num_nextn_predict_layers))

    @property
    def moe_layers(self) -> list[int]:
        """Every layer with routed experts, the MTP layers included: what is placed on pools and load-tracked."""
        return [i for i in range(self.num_hidden_layers) if self.is_moe_layer(i)] + self.mtp_layers

    @property
    def softmax_scale(self) -> float:
        """qk_head_dim^-0.5, times mscale^2 under YaRN (mscale from mscale_all_dim, as HF and DeepSeek do)."""
        scale = self.qk_head_dim**-0.5
        if self.yarn is not None and self.yarn.mscale_all_dim:
            m = yarn_mscale(self.yarn.factor, self.yarn.mscale_all_dim)
            scale *= m * m
        return scale

    # ---- reading ---------------------------------------------------------------------------
    @classmethod
    def from_file(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.exists():
            raise ConfigError("", f"no such file: {path}")
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ConfigError("", f"not valid JSON: {exc}") from exc
        return cls.from_dict(raw)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ModelConfig:
        r = _Reader(raw)
        model_type = r.get("model_type", str, None)
        if model_type != "deepseek_v3":
            raise ConfigError("model_type", f"expected 'deepseek_v3', got {model_type!r}")
        r.require_value("scoring_func", "sigmoid", default="sigmoid")
        r.require_value("topk_method", "noaux_tc", default="noaux_tc")
        r.require_value("hidden_act", "silu", default="silu")
        r.require_value("moe_layer_freq", 1, default=1)
        r.require_value("attention_bias", False, default=False)
        if r.get("tie_word_embeddings", bool, False):
            raise ConfigError("tie_word_embeddings", "tied embeddings are not supported (DeepSeek-V3 unties them)")
        num_kv = r.get("num_key_value_heads", int, None)
        heads = r.get("num_attention_heads", int)
        if num_kv is not None and num_kv != heads:
            raise ConfigError(
                "num_key_value_heads", f"MLA needs num_key_value_heads == num_attention_heads ({heads}), got {num_kv}"
            )

        rope_theta, yarn = _read_rope(r)
        eos = raw.get("eos_token_id", 1)
        eos_ids = tuple(eos) if isinstance(eos, list) else (int(eos),)
        quant = _read_quantization(raw.get("quantization_config"))
        dtype = raw.get("dtype") or raw.get("torch_dtype") or "bfloat16"
        q_lora = r.get("q_lora_rank", int, None)

        cfg = cls(
            vocab_size=r.get("vocab_size", int),
            hidden_size=r.get("hidden_size", int),
            intermediate_size=r.get("intermediate_size", int),
            moe_intermediate_size=r.get("moe_intermediate_size", int),
            num_hidden_layers=r.get("num_hidden_layers", int),
            first_k_dense_replace=r.get("first_k_dense_replace", int, 0),
            num_attention_heads=heads,
            q_lora_rank=q_lora or None,
            kv_lora_rank=r.get("kv_lora_rank", int),
            qk_nope_head_dim=r.get("qk_nope_head_dim", int),
            qk_rope_head_dim=r.get("qk_rope_head_dim", int),
            v_head_dim=r.get("v_head_dim", int),
            n_routed_experts=r.get("n_routed_experts", int),
            n_shared_experts=r.get("n_shared_experts", int, 0),
            num_experts_per_tok=r.get("num_experts_per_tok", int),
            n_group=r.get("n_group", int, 1),
            topk_group=r.get("topk_group", int, 1),
            routed_scaling_factor=r.get("routed_scaling_factor", float, 1.0),
            norm_topk_prob=r.get("norm_topk_prob", bool, True),
            rms_norm_eps=r.get("rms_norm_eps", float, 1e-6),
            max_position_embeddings=r.get("max_position_embeddings", int),
            rope_theta=rope_theta,
            yarn=yarn,
            bos_token_id=r.get("bos_token_id", int, 0),
            eos_token_ids=eos_ids,
            dtype=str(dtype),
            quantization=quant,
            num_nextn_predict_layers=r.get("num_nextn_predict_layers", int, 0),
        )
        cfg.validate()
        return cfg

    def validate(self) -> None:
        for key in (
            "vocab_size",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "kv_lora_rank",
            "qk_nope_head_dim",
            "v_head_dim",
            "n_routed_experts",
            "num_experts_per_tok",
            "n_group",
        ):
            if getattr(self, key) <= 0:
                raise ConfigError(key, f"must be positive, got {getattr(self, key)}")
        if self.qk_rope_head_dim <= 0 or self.qk_rope_head_dim % 2:
            raise ConfigError("qk_rope_head_dim", f"must be a positive even number, got {self.qk_rope_head_dim}")
        if self.num_nextn_predict_layers < 0:
            raise ConfigError("num_nextn_predict_layers", f"must be >= 0, got {self.num_nextn_predict_layers}")
        if not 0 <= self.first_k_dense_replace <= self.num_hidden_layers:
            raise ConfigError(
                "first_k_dense_replace", f"must lie in [0, num_hidden_layers], got {self.first_k_dense_replace}"
            )
        if self.n_routed_experts % self.n_group:
            raise ConfigError(
                "n_group", f"n_routed_experts ({self.n_routed_experts}) must be divisible by n_group ({self.n_group})"
            )
        if self.n_group > 1 and self.experts_per_group < 2:
            raise ConfigError(
                "n_group", "group scores sum each group's top 2 experts: need at least 2 experts per group"
            )
        if not 1 <= self.topk_group <= self.n_group:
            raise ConfigError("topk_group", f"must lie in [1, n_group={self.n_group}], got {self.topk_group}")
        if self.topk_group * self.experts_per_group < self.num_experts_per_tok:
            raise ConfigError(
                "num_experts_per_tok",
                f"{self.num_experts_per_tok} experts cannot be chosen from "
                f"topk_group={self.topk_group} groups of {self.experts_per_group}",
            )
        if self.quantization is not None and tuple(self.quantization.weight_block_size) != (FP8_BLOCK, FP8_BLOCK):
            raise ConfigError(
                "quantization_config.weight_block_size",
                f"only [128, 128] is supported, got {list(self.quantization.weight_block_size)}",
            )

    # ---- writing ---------------------------------------------------------------------------
    def to_hf_dict(self, spelling: str = "deepseek") -> dict[str, Any]:
        """config.json contents. `deepseek`: DeepSeek's own keys; `transformers`: transformers 5.x keys."""
        d: dict[str, Any] = {
            "architectures": ["DeepseekV3ForCausalLM"],
            "model_type": "deepseek_v3",
            "attention_bias": False,
            "attention_dropout": 0.0,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_ids[0] if len(self.eos_token_ids) == 1 else list(self.eos_token_ids),
            "first_k_dense_replace": self.first_k_dense_replace,
            "hidden_act": "silu",
            "hidden_size": self.hidden_size,
            "initializer_range": 0.02,
            "intermediate_size": self.intermediate_size,
            "kv_lora_rank": self.kv_lora_rank,
            "max_position_embeddings": self.max_position_embeddings,
            "moe_intermediate_size": self.moe_intermediate_size,
            "moe_layer_freq": 1,
            "n_group": self.n_group,
            "n_routed_experts": self.n_routed_experts,
            "n_shared_experts": self.n_shared_experts,
            "norm_topk_prob": self.norm_topk_prob,
            "num_attention_heads": self.num_attention_heads,
            "num_experts_per_tok": self.num_experts_per_tok,
            "num_hidden_layers": self.num_hidden_layers,
            "num_key_value_heads": self.num_attention_heads,
            "num_nextn_predict_layers": self.num_nextn_predict_layers,
            "q_lora_rank": self.q_lora_rank,
            "qk_nope_head_dim": self.qk_nope_head_dim,
            "qk_rope_head_dim": self.qk_rope_head_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "routed_scaling_factor": self.routed_scaling_factor,
            "scoring_func": "sigmoid",
            "tie_word_embeddings": False,
            "topk_group": self.topk_group,
            "topk_method": "noaux_tc",
            "use_cache": True,
            "v_head_dim": self.v_head_dim,
            "vocab_size": self.vocab_size,
        }
        yarn = asdict(self.yarn) if self.yarn is not None else None
        if spelling == "deepseek":
            d["rope_theta"] = self.rope_theta
            d["rope_scaling"] = {"type": "yarn", **yarn} if yarn else None
            d["torch_dtype"] = self.dtype
        elif spelling == "transformers":
            params = {"rope_type": "yarn", **yarn} if yarn else {"rope_type": "default"}
            params["rope_theta"] = self.rope_theta
            d["rope_parameters"] = params
            d["dtype"] = self.dtype
        else:
            raise ValueError(f"unknown config spelling {spelling!r}")
        if self.quantization is not None:
            d["quantization_config"] = self.quantization.to_dict()
        return dict(sorted(d.items()))

    def write(self, directory: str | Path, spelling: str = "deepseek") -> None:
        Path(directory, "config.json").write_text(json.dumps(self.to_hf_dict(spelling), indent=2) + "\n")


def yarn_mscale(factor: float, mscale: float) -> float:
    """YaRN's attention temperature: 0.1 * mscale * ln(factor) + 1 (1 when factor <= 1)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


class _Reader:
    """Typed access to the raw dict; every failure names its key."""

    _MISSING = object()

    def __init__(self, raw: dict[str, Any]):
        self.raw = raw

    def get(self, key: str, typ: type, default: Any = _MISSING) -> Any:
        if key not in self.raw or self.raw[key] is None:
            if default is self._MISSING:
                raise ConfigError(key, "required key is missing")
            return default
        value = self.raw[key]
        if typ is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if typ is int and isinstance(value, float) and value.is_integer():
            return int(value)
        if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
            raise ConfigError(key, f"expected {typ.__name__}, got {value!r}")
        return value

    def require_value(self, key: str, expected: Any, default: Any) -> None:
        value = self.raw.get(key, default)
        if value is None:
            value = default
        if value != expected:
            raise ConfigError(key, f"unsupported value {value!r} (supported: {expected!r})")


def _read_rope(r: _Reader) -> tuple[float, YarnScaling | None]:
    raw = r.raw
    if raw.get("rope_parameters") is not None:
        key, params = "rope_parameters", dict(raw["rope_parameters"])
        kind = params.get("rope_type", params.get("type", "default"))
        theta = float(params.get("rope_theta", raw.get("rope_theta", 10000.0)))
    elif raw.get("rope_scaling") is not None:
        key, params = "rope_scaling", dict(raw["rope_scaling"])
        kind = params.get("type", params.get("rope_type"))
        theta = float(raw.get("rope_theta", 10000.0))
    else:
        return float(raw.get("rope_theta", 10000.0)), None
    if kind == "default":
        return theta, None
    if kind != "yarn":
        raise ConfigError(f"{key}.type", f"unsupported RoPE scaling {kind!r} (supported: 'yarn')")
    try:
        yarn = YarnScaling(
            factor=float(params["factor"]),
            original_max_position_embeddings=int(params.get("original_max_position_embeddings", 4096)),
            beta_fast=float(params.get("beta_fast", 32.0)),
            beta_slow=float(params.get("beta_slow", 1.0)),
            mscale=float(params.get("mscale", 1.0)),
            mscale_all_dim=float(params.get("mscale_all_dim", 0.0)),
        )
    except KeyError as exc:
        raise ConfigError(f"{key}.{exc.args[0]}", "required key is missing") from exc
    except (TypeError, ValueError) as exc:
        raise ConfigError(key, f"malformed YaRN parameters: {exc}") from exc
    return theta, yarn


def _read_quantization(q: Any) -> Fp8Quantization | None:
    if q is None:
        return None
    if not isinstance(q, dict):
        raise ConfigError("quantization_config", f"expected an object, got {q!r}")
    if q.get("quant_method") != "fp8":
        raise ConfigError(
            "quantization_config.quant_method", f"unsupported {q.get('quant_method')!r} (supported: 'fp8')"
        )
    if q.get("fmt", "e4m3") != "e4m3":
        raise ConfigError("quantization_config.fmt", f"unsupported {q.get('fmt')!r} (supported: 'e4m3')")
    block = q.get("weight_block_size", [FP8_BLOCK, FP8_BLOCK])
    return Fp8Quantization(
        weight_block_size=tuple(int(b) for b in block),
        fmt="e4m3",
        activation_scheme=q.get("activation_scheme", "dynamic"),
    )
