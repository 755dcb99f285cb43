"""ModelConfig: the architecture of a Llama-family model, read from HF or Meta metadata."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from .errors import XllamaError


@dataclass
class ModelConfig:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int = 32
    vocab_size: int = 32000
    hidden_dim: int = 11008
    head_dim: int = 0  # 0: dim // n_heads
    norm_eps: float = 1e-5
    max_seq_len: int = 4096
    rope_theta: float = 10000.0
    # {"rope_type": "linear"|"dynamic"|"llama3", "factor": ..., ...}; None: plain rotary
    rope_scaling: dict[str, Any] | None = None
    tie_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    bos_id: int | None = 1
    eos_id: list[int] = field(default_factory=lambda: [2])

    def __post_init__(self) -> None:
        if not self.head_dim:
            self.head_dim = self.dim // self.n_heads
        if self.n_heads <= 0 or self.n_kv_heads <= 0 or self.n_heads % self.n_kv_heads:
            raise XllamaError(
                f"n_kv_heads={self.n_kv_heads} must be positive and divide n_heads={self.n_heads}"
            )

    @property
    def rope_type(self) -> str:
        return (self.rope_scaling or {}).get("rope_type", "rotary")

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    # ---- Hugging Face config.json ----
    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> "ModelConfig":
        if hf.get("model_type", "llama") not in ("llama", "mistral"):
            raise XllamaError(f"model_type {hf.get('model_type')!r} is not a Llama-family model")
        try:
            n_heads = hf["num_attention_heads"]
            eos = hf.get("eos_token_id", 2)
            rope_params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
            rope_theta = hf.get("rope_theta", rope_params.get("rope_theta", 10000.0))
            return cls(
                dim=hf["hidden_size"],
                n_layers=hf["num_hidden_layers"],
                n_heads=n_heads,
                n_kv_heads=hf.get("num_key_value_heads") or n_heads,
                vocab_size=hf["vocab_size"],
                hidden_dim=hf["intermediate_size"],
                head_dim=hf.get("head_dim") or 0,
                norm_eps=hf.get("rms_norm_eps", 1e-6),
                max_seq_len=hf.get("max_position_embeddings", 2048),
                rope_theta=float(rope_theta),
                rope_scaling=normalize_rope_scaling(rope_params),
                tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
                attention_bias=bool(hf.get("attention_bias", False)),
                mlp_bias=bool(hf.get("mlp_bias", False)),
                bos_id=hf.get("bos_token_id", 1),
                eos_id=list(eos) if isinstance(eos, (list, tuple)) else ([] if eos is None else [eos]),
            )
        except KeyError as e:
            raise XllamaError(f"config.json lacks the key {e.args[0]!r}") from None

    def to_hf(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": self.dim,
            "intermediate_size": self.hidden_dim,
            "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads,
            "head_dim": self.head_dim,
            "vocab_size": self.vocab_size,
            "max_position_embeddings": self.max_seq_len,
            "rms_norm_eps": self.norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": denormalize_rope_scaling(self.rope_scaling),
            "tie_word_embeddings": self.tie_embeddings,
            "attention_bias": self.attention_bias,
            "mlp_bias": self.mlp_bias,
            "hidden_act": "silu",
            "bos_token_id": self.bos_id,
            "eos_token_id": self.eos_id[0] if len(self.eos_id) == 1 else self.eos_id,
        }
        return out

    # ---- Meta params.json ----
    @classmethod
    def from_meta(cls, params: dict[str, Any], *, vocab_size: int, hidden_dim: int) -> "ModelConfig":
        """Meta's params.json; vocab and FFN sizes come from the weights (params may say -1)."""
        try:
            n_heads = params["n_heads"]
            scaling = None
            if params.get("use_scaled_rope"):  # Llama 3.1 layout
                scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                           "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
            return cls(
                dim=params["dim"],
                n_layers=params["n_layers"],
                n_heads=n_heads,
                n_kv_heads=params.get("n_kv_heads") or n_heads,
                vocab_size=vocab_size,
                hidden_dim=hidden_dim,
                norm_eps=params.get("norm_eps", 1e-5),
                max_seq_len=params.get("max_seq_len", 4096 if vocab_size == 32000 else 2048),
                rope_theta=float(params.get("rope_theta", 10000.0)),
                rope_scaling=scaling,
            )
        except KeyError as e:
            raise XllamaError(f"params.json lacks the key {e.args[0]!r}") from None


def normalize_rope_scaling(params: dict[str, Any]) -> dict[str, Any] | None:
    """HF's rope_scaling / rope_parameters -> our form, or None for plain rotary."""
    kind = params.get("rope_type", params.get("type", "default"))
    if kind in ("default", None):
        return None
    kind = {"linear": "linear", "dynamic": "dynamic", "llama3": "llama3"}.get(kind)
    if kind is None:
        raise XllamaError(f"rope scaling type {params.get('rope_type', params.get('type'))!r} is not supported "
                          "(supported: linear, dynamic, llama3)")
    out = {k: v for k, v in params.items() if k not in ("type", "rope_type", "rope_theta")}
    out["rope_type"] = kind
    return out


def denormalize_rope_scaling(scaling: dict[str, Any] | None) -> dict[str, Any] | None:
    if scaling is None:
        return None
    return dict(scaling)
