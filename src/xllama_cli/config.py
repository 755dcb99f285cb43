"""ModelConfig: the architecture of a Llama-family model (Llama, Mistral, Qwen2: FAMILIES), read
from HF or Meta metadata, or one of the named architectures (ARCHITECTURES,
`ModelConfig.from_name`).

Every value is checked against one table (RULES) before a ModelConfig is made, wherever it comes
from (config.json, params.json, bench's --config, code), so a bad value is one clear error here
and never a failure deep in the model.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from .errors import XllamaError, is_real


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
    attention_bias: bool = False  # bias on q, k, v and o (Llama's attention_bias)
    qkv_bias: bool = False  # bias on q, k and v only (Qwen2's)
    mlp_bias: bool = False
    bos_id: int | None = 1
    eos_id: list[int] = field(default_factory=lambda: [2])
    family: str = "llama"  # a key of FAMILIES: the model_type written back to config.json
    # a query at position p attends to the keys at (p - sliding_window, p]; None: all before it
    sliding_window: int | None = None
    # per layer, whether it uses sliding_window (Qwen2 windows some layers only); None: all do
    window_layers: list[bool] | None = None

    def __post_init__(self) -> None:
        check_values({**self.values(), "head_dim": self.head_dim or None}, "model config")
        if not self.head_dim:
            self.head_dim = self.dim // self.n_heads

    @property
    def rope_type(self) -> str:
        return (self.rope_scaling or {}).get("rope_type", "rotary")

    def layer_window(self, layer: int) -> int | None:
        """The sliding window of layer `layer`, or None when it attends to every earlier key."""
        if self.window_layers is not None and not self.window_layers[layer]:
            return None
        return self.sliding_window

    def values(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    @classmethod
    def checked(cls, values: Mapping[str, Any], source: str) -> "ModelConfig":
        """A ModelConfig from some of its fields (the others: defaults), each checked first; errors
        name `source`. head_dim 0 or absent: dim // n_heads."""
        full = {f.name: f.default if f.default_factory is dataclasses.MISSING
                else f.default_factory() for f in dataclasses.fields(cls)}
        full.update(values)
        full["head_dim"] = full["head_dim"] or None
        check_values(full, source)
        return cls(**{**full, "head_dim": full["head_dim"] or 0})

    @classmethod
    def from_name(cls, name: str) -> "ModelConfig":
        """A named architecture of ARCHITECTURES, such as "llama2-7b" (the sizes only: no
        weights)."""
        if name not in ARCHITECTURES:
            raise XllamaError(f"unknown architecture {name!r}; choose one of: "
                              f"{', '.join(ARCHITECTURES)}")
        return cls(**copy.deepcopy(ARCHITECTURES[name].fields))

    def n_params(self) -> int:
        """Exact parameter count of the architecture, from its sizes alone (nothing is built)."""
        d, f = self.dim, self.hidden_dim
        q, kv = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        qkv_bias = self.attention_bias or self.qkv_bias
        attn = (d * (2 * q + 2 * kv) + (q + 2 * kv if qkv_bias else 0)  # q, k, v, o
                + (d if self.attention_bias else 0))
        mlp = 3 * d * f + (2 * f + d if self.mlp_bias else 0)  # gate, up, down
        layer = attn + mlp + 2 * d  # and two RMSNorm weights
        # tok_embeddings and lm_head
        embeddings = self.vocab_size * d * (1 if self.tie_embeddings else 2)
        return embeddings + self.n_layers * layer + d  # the final norm

    # ---- Hugging Face config.json ----
    @classmethod
    def from_hf(cls, hf: Any, source: str = "config.json") -> "ModelConfig":
        """config.json as transformers reads it for the checkpoint's model_type: a key left out
        takes that family's default (FAMILIES)."""
        hf = json_object(hf, source)
        family = hf.get("model_type", "llama")
        if not isinstance(family, str) or family not in FAMILIES:
            raise XllamaError(f"{source}: model_type {show_json(family)} is not a family xllama "
                              f"runs (supported: {', '.join(FAMILIES)})")
        act = hf.get("hidden_act", "silu")
        # the MLP is SwiGLU; another activation would load and be wrong
        if act not in ("silu", "swish"):
            raise XllamaError(f"{source}: hidden_act {show_json(act)} is not supported "
                              '(Llama-family models use "silu")')
        rope_key = "rope_parameters" if hf.get("rope_parameters") is not None else "rope_scaling"
        rope_params = hf.get(rope_key)
        if rope_params is not None and not isinstance(rope_params, dict):
            raise XllamaError(f"{source}: {rope_key} must be an object such as "
                              f'{{"rope_type": "linear", "factor": 2.0}} or null, got '
                              f"{show_json(rope_params)}")
        rope_params = rope_params or {}
        kind = FAMILIES[family]
        # the family's own fields (its biases) have no key: transformers' class fixes them
        keys = {name: key for name, key in HF_KEYS.items() if name not in kind.fixed}
        data = {**{keys[name]: v for name, v in kind.absent.items()}, **hf}
        if "rope_theta" not in hf and "rope_theta" in rope_params:  # transformers 5 keeps it there
            keys["rope_theta"] = f"{rope_key}.rope_theta"
            data[keys["rope_theta"]] = rope_params["rope_theta"]
        values = _read(data, keys, {**HF_DEFAULTS, **kind.defaults}, source)
        values.update(kind.fixed, family=family, sliding_window=_hf_window_size(hf, family, source))
        values["rope_scaling"] = normalize_rope_scaling(rope_params, f"{source}: {rope_key}")
        keys.update(rope_scaling=rope_key, sliding_window="sliding_window")
        check_values(values, source, keys)
        if family == "qwen2" and values["sliding_window"] is not None:
            windowed = _qwen2_window_layers(hf, values["n_layers"], source)
            values["sliding_window"] = values["sliding_window"] if any(windowed) else None
            values["window_layers"] = None if all(windowed) or not any(windowed) else windowed
        eos = values["eos_id"]
        values["eos_id"] = list(eos) if isinstance(eos, list) else ([] if eos is None else [eos])
        return cls._derived(values)

    @classmethod
    def _derived(cls, values: dict[str, Any]) -> "ModelConfig":
        """From checked values: derived fields filled in, numbers as floats."""
        return cls(**{**values, "rope_theta": float(values["rope_theta"]),
                      "head_dim": values.get("head_dim") or 0,
                      "n_kv_heads": values["n_kv_heads"] or values["n_heads"]})

    def to_hf(self) -> dict[str, Any]:
        """config.json of this config, which transformers loads as the family's own class."""
        out: dict[str, Any] = {
            "architectures": [FAMILIES[self.family].architecture],
            "model_type": self.family,
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
            "rope_scaling": None if self.rope_scaling is None else dict(self.rope_scaling),
            "tie_word_embeddings": self.tie_embeddings,
            "hidden_act": "silu",
            "bos_token_id": self.bos_id,
            "eos_token_id": self.eos_id[0] if len(self.eos_id) == 1 else self.eos_id,
        }
        if self.family == "llama":
            out.update(attention_bias=self.attention_bias, mlp_bias=self.mlp_bias)
        elif self.family == "mistral":
            out["sliding_window"] = self.sliding_window
        else:
            out.update(self._qwen2_window_keys())
        return out

    def _qwen2_window_keys(self) -> dict[str, Any]:
        """Qwen2's keys for its sliding window: which layers use it is max_window_layers (the
        layers from that one on) where that can say it, else layer_types, one entry per layer."""
        windowed = self.window_layers or [True] * self.n_layers
        if self.sliding_window is None or not any(windowed):
            return {"use_sliding_window": False, "sliding_window": None}
        first = windowed.index(True)
        out = {"use_sliding_window": True, "sliding_window": self.sliding_window,
               "max_window_layers": first}
        if not all(windowed[first:]):
            out["layer_types"] = [QWEN2_LAYER_TYPES[w] for w in windowed]
        return out

    # ---- Meta params.json ----
    @classmethod
    def from_meta(cls, params: Any, *, vocab_size: int, hidden_dim: int,
                  source: str = "params.json") -> "ModelConfig":
        """Meta's params.json, read as Meta's own code reads it. The vocabulary and FFN sizes are
        the weights' (params.json may say -1; what it says must agree). What a params.json leaves
        out (the context, the RoPE base and scaling, the special ids, a tied head) is its
        release's: META_RELEASES. tie_embeddings says the release ties its head; the caller keeps
        it only when the weights agree."""
        params = json_object(params, source)
        _check_meta_params(params, source)
        data = {**params, META_KEYS["vocab_size"]: vocab_size, META_KEYS["hidden_dim"]: hidden_dim}
        # the release's fields are read only when params.json has them: the release decides
        # the rest, once the sizes it is told by are seen to be good
        keys = {name: key for name, key in META_KEYS.items()
                if name not in ("max_seq_len", "rope_theta") or key in data}
        values = _read(data, keys, META_DEFAULTS, source)
        check_values(values, source, META_KEYS)
        _check_meta_sizes(params, values, source)
        scaled = params.get("use_scaled_rope", False)
        release = meta_release({**values, "use_scaled_rope": scaled})
        bos, eos = META_SPECIAL_IDS.get(vocab_size, (1, [2]))
        values = {"max_seq_len": release.max_seq_len, "rope_theta": release.rope_theta,
                  "bos_id": bos, "eos_id": list(eos), **values}
        values["rope_scaling"] = _meta_rope_scaling(params, release) if scaled else None
        check_values(values, source, META_KEYS)
        return cls._derived({**values, "tie_embeddings": release.tied})


# ---- what Meta's params.json leaves to the release ----
@dataclass(frozen=True)
class MetaRelease:
    """The values a Meta release's params.json leaves out, as Meta's conversion to HF
    (transformers' convert_llama_weights_to_hf.py, --llama_version) fills them in."""

    name: str
    # is a params.json this release? (its checked values, and use_scaled_rope)
    test: Callable[[Mapping[str, Any]], bool]
    max_seq_len: int
    rope_theta: float = 10000.0  # Meta's ModelArgs default for the release
    rope_factor: float | None = None  # the llama3 RoPE factor, with use_scaled_rope
    tied: bool = False  # its head is its embedding


LLAMA3_VOCAB = 128256  # Llama 3's tiktoken tokenizer: 128,000 ranks and 256 special tokens
# A params.json names no release. The first row whose test holds is the release; rows go from the
# most to the least specific. Llama 3.2's text models (1B: dim 2048, 3B: dim 3072) are the only
# use_scaled_rope checkpoints narrower than 4096, and the only ones with factor 32 and a tied head
# (transformers' --llama_version 3.2; torchtune's llama3_2 builders); 3.1 and 3.3 are 4096 wide or
# wider, with factor 8 (so is 3.2 Vision's text model, but its params.json is refused).
# params.json's own max_seq_len, rope_theta and rope_scaling_factor / rope_high_freq_factor (Meta's
# later ModelArgs names) win.
META_RELEASES: tuple[MetaRelease, ...] = (
    MetaRelease("Llama 3.2 1B/3B", lambda v: v["use_scaled_rope"] and v["dim"] < 4096,
                max_seq_len=131072, rope_theta=500000.0, rope_factor=32.0, tied=True),
    MetaRelease("Llama 3.1, 3.3", lambda v: v["use_scaled_rope"],
                max_seq_len=131072, rope_theta=500000.0, rope_factor=8.0),
    MetaRelease("Llama 3", lambda v: v["vocab_size"] == LLAMA3_VOCAB,
                max_seq_len=8192, rope_theta=500000.0),
    MetaRelease("Code Llama", lambda v: v.get("rope_theta", 10000.0) > 10000.0, max_seq_len=16384),
    # Llama 1's params.json says norm_eps 1e-06, Llama 2's 1e-05
    MetaRelease("Llama 1", lambda v: v["vocab_size"] == 32000 and v["norm_eps"] == 1e-6,
                max_seq_len=2048),
    MetaRelease("Llama 2", lambda v: v["vocab_size"] == 32000, max_seq_len=4096),
    MetaRelease("another Llama", lambda v: True, max_seq_len=2048),
)
# Meta's llama3 apply_scaling: the bands' constants, fixed in the code, not in params.json
META_LLAMA3_BANDS = {"low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192}
# the vocabulary's BOS and EOS ids (transformers' conversion of a base model; an instruct model's
# end-of-turn ids come from its tokenizer); any other vocabulary: Llama 1/2's 1 and 2
META_SPECIAL_IDS: dict[int, tuple[int, list[int]]] = {LLAMA3_VOCAB: (128000, [128001])}


def meta_release(values: Mapping[str, Any]) -> MetaRelease:
    """The release of a Meta checkpoint, from its checked params.json values (the vocabulary: the
    weights') and use_scaled_rope."""
    return next(r for r in META_RELEASES if r.test(values))


def meta_ffn_size(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    """Meta's FeedForward size: 2/3 of 4 * dim, times ffn_dim_multiplier, rounded up to a multiple
    of multiple_of (transformers' compute_intermediate_size)."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def _meta_rope_scaling(params: Mapping[str, Any], release: MetaRelease) -> dict[str, Any]:
    """The llama3 scaling of a use_scaled_rope params.json: its own factors, else the release's
    (a use_scaled_rope params.json is always a release with a factor)."""
    factor = params.get("rope_scaling_factor")
    high = params.get("rope_high_freq_factor")
    return {"rope_type": "llama3", **META_LLAMA3_BANDS,
            "factor": float(factor if factor is not None else release.rope_factor),
            **({"high_freq_factor": float(high)} if high is not None else {})}


def _check_meta_params(params: Mapping[str, Any], source: str) -> None:
    """The keys of params.json that are no ModelConfig field, against META_RULES; the kinds of
    checkpoint xllama does not run, refused by name."""
    for key, what in META_REFUSED.items():
        if params.get(key) is not None:
            raise XllamaError(f"{source}: {key} {show_json(params[key])} marks {what}, which is "
                              "not supported; use a Llama text model's bf16 or fp16 checkpoint")
    for key, rule in META_RULES.items():
        if key in params and not rule.ok(params[key]):
            raise XllamaError(f"{source}: {key} must be {rule.allowed}, got "
                              f"{show_json(params[key])}")


def _check_meta_sizes(params: Mapping[str, Any], values: Mapping[str, Any], source: str) -> None:
    """params.json's vocab_size and FFN settings against the weights' sizes: they must agree."""
    vocab, hidden = values["vocab_size"], values["hidden_dim"]
    if params.get("vocab_size", -1) not in (-1, vocab):
        raise XllamaError(f"{source}: vocab_size {params['vocab_size']} must equal the rows of "
                          f"tok_embeddings.weight, {vocab} (or be -1)")
    if "multiple_of" not in params and params.get("ffn_dim_multiplier") is None:
        return  # nothing said: the weights' size stands
    multiple_of = params.get("multiple_of", 256)
    multiplier = params.get("ffn_dim_multiplier")
    want = meta_ffn_size(values["dim"], multiple_of, multiplier)
    if want != hidden:
        raise XllamaError(f"{source}: multiple_of {multiple_of} and ffn_dim_multiplier "
                          f"{show_json(multiplier)} with dim {values['dim']} give a feed-forward "
                          f"size of {want} (Meta's rule), but feed_forward.w1.weight has {hidden} "
                          "rows; params.json and the weights must agree")


# ---- families ----
@dataclass(frozen=True)
class Family:
    architecture: str  # transformers' class, written to config.json's "architectures"
    fixed: dict[str, Any]  # fields the family's class fixes: config.json has no key for them
    defaults: dict[str, Any] = field(default_factory=dict)  # for a key left out or null
    absent: dict[str, Any] = field(default_factory=dict)  # for a key left out (null: derived)


# What transformers' LlamaConfig, MistralConfig and Qwen2Config give for a key left out; the rest
# are HF_DEFAULTS. A sliding window is read by _hf_window_size.
FAMILIES: dict[str, Family] = {
    "llama": Family("LlamaForCausalLM", dict(qkv_bias=False)),
    "mistral": Family("MistralForCausalLM",
                      dict(attention_bias=False, qkv_bias=False, mlp_bias=False),
                      dict(max_seq_len=4096 * 32), dict(n_kv_heads=8)),
    "qwen2": Family("Qwen2ForCausalLM", dict(attention_bias=False, qkv_bias=True, mlp_bias=False),
                    dict(max_seq_len=32768, bos_id=None, eos_id=None), dict(n_kv_heads=32)),
}
QWEN2_LAYER_TYPES = {False: "full_attention", True: "sliding_attention"}
WINDOW_DEFAULT = 4096  # Mistral's and Qwen2's sliding_window when the key is left out


def _hf_window_size(hf: dict[str, Any], family: str, source: str) -> Any:
    """config.json's sliding window (unchecked), as the family's class reads it: Mistral's
    sliding_window; Qwen2's only under use_sliding_window (false when left out); Llama has none."""
    if family == "llama":
        return None
    if family == "qwen2":
        use = hf.get("use_sliding_window", False)
        if not FLAG.ok(use):
            raise XllamaError(f"{source}: use_sliding_window must be {FLAG.allowed}, got "
                              f"{show_json(use)}")
        if not use:
            return None
    return hf.get("sliding_window", WINDOW_DEFAULT)


def _qwen2_window_layers(hf: dict[str, Any], n_layers: int, source: str) -> list[bool]:
    """Which of Qwen2's layers use its window: layer_types when given, else the layers from
    max_window_layers on (28 when left out), as Qwen2Config decides."""
    types = hf.get("layer_types")
    if types is not None:
        if (not isinstance(types, list) or len(types) != n_layers
                or any(t not in QWEN2_LAYER_TYPES.values() for t in types)):
            raise XllamaError(f"{source}: layer_types must be a list of {n_layers} entries (one "
                              'per layer), each "full_attention" or "sliding_attention", got '
                              f"{show_json(types)}")
        return [t == QWEN2_LAYER_TYPES[True] for t in types]
    first = hf.get("max_window_layers", 28)
    if not LAYER_INDEX.ok(first):
        raise XllamaError(f"{source}: max_window_layers must be {LAYER_INDEX.allowed}, got "
                          f"{show_json(first)}")
    return [i >= first for i in range(n_layers)]


# ---- named architectures ----
@dataclass(frozen=True)
class Architecture:
    description: str  # one line, shown beside the name where architectures are listed
    fields: dict[str, Any]  # ModelConfig fields; the others keep their defaults


# The one table of named architectures: bench's presets, the benchmarks' model, the demo model.
ARCHITECTURES: dict[str, Architecture] = {
    "small": Architecture("laptop CPU size", dict(
        dim=1024, n_layers=12, n_heads=16, n_kv_heads=16, vocab_size=32000, hidden_dim=2560,
        max_seq_len=2048)),
    "tinyllama-1.1b": Architecture("TinyLlama 1.1B", dict(
        dim=2048, n_layers=22, n_heads=32, n_kv_heads=4, vocab_size=32000, hidden_dim=5632,
        max_seq_len=2048)),
    "llama2-7b": Architecture("Llama 2 7B", dict(
        dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, vocab_size=32000, hidden_dim=11008,
        max_seq_len=4096)),
    "llama2-13b": Architecture("Llama 2 13B", dict(
        dim=5120, n_layers=40, n_heads=40, n_kv_heads=40, vocab_size=32000, hidden_dim=13824,
        max_seq_len=4096)),
    "llama2-70b": Architecture("Llama 2 70B", dict(
        dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, vocab_size=32000, hidden_dim=28672,
        max_seq_len=4096)),
    "llama3-8b": Architecture("Llama 3 8B", dict(
        dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, vocab_size=128256, hidden_dim=14336,
        max_seq_len=8192, rope_theta=500000.0, bos_id=128000, eos_id=[128001])),
    "bench-220m": Architecture("the random model of benchmarks/decode.py and load.py", dict(
        dim=1024, n_layers=12, n_heads=16, n_kv_heads=16, vocab_size=32000, hidden_dim=2816,
        max_seq_len=2048)),
    "demo": Architecture("the built-in demo model's architecture (scripts/train_demo.py)", dict(
        dim=128, n_layers=6, n_heads=8, n_kv_heads=8, vocab_size=1024, hidden_dim=352,
        max_seq_len=256, norm_eps=1e-5, rope_theta=10000.0, tie_embeddings=True, bos_id=1,
        eos_id=[2])),
}


def normalize_rope_scaling(params: dict[str, Any],
                           where: str = "rope_scaling") -> dict[str, Any] | None:
    """HF's rope_scaling / rope_parameters -> our form, or None for plain rotary."""
    kind = params.get("rope_type", params.get("type", "default"))
    if kind in ("default", None):
        return None
    if kind not in ROPE_TYPES:
        raise XllamaError(f"{where}: rope type {show_json(kind)} is not supported "
                          f"(supported: default, {', '.join(ROPE_TYPES)})")
    out = {k: v for k, v in params.items() if k not in ("type", "rope_type", "rope_theta")}
    out["rope_type"] = kind
    return out


# ---- the rules every value meets ----
@dataclass(frozen=True)
class Rule:
    allowed: str  # said in the error: "must be <allowed>"
    ok: Callable[[Any], bool]


def _ints(lo: int, hi: int, even: bool = False) -> Rule:
    return Rule(f"an {'even ' if even else ''}integer from {lo} to {hi}",
                lambda v: type(v) is int and lo <= v <= hi and not (even and v % 2))


def _token_ids(v: Any) -> bool:
    ids = v if isinstance(v, list) else [v]
    return v is None or all(type(i) is int and i >= 0 for i in ids)


POSITIVE = Rule("a finite number > 0", lambda v: is_real(v) and math.isfinite(v) and v > 0)
FLAG = Rule("true or false", lambda v: type(v) is bool)
MAX_CONTEXT = 1 << 30
# upper bounds far above any released Llama-family model: an absurd size is refused here, before
# a model of it is built or its memory is asked for
RULES: dict[str, Rule] = {
    "dim": _ints(1, 1 << 17),
    "n_layers": _ints(1, 1 << 12),
    "n_heads": _ints(1, 1 << 12),
    "n_kv_heads": _ints(1, 1 << 12),
    "vocab_size": _ints(1, 1 << 22),
    "hidden_dim": _ints(1, 1 << 20),
    "head_dim": _ints(2, 1 << 12, even=True),  # RoPE rotates pairs of values
    "norm_eps": POSITIVE,
    "max_seq_len": _ints(1, MAX_CONTEXT),
    "rope_theta": POSITIVE,
    "tie_embeddings": FLAG,
    "attention_bias": FLAG,
    "qkv_bias": FLAG,
    "mlp_bias": FLAG,
    "bos_id": Rule("a token id (an integer >= 0) or null",
                   lambda v: v is None or _token_ids(v) and type(v) is int),
    "eos_id": Rule("a token id (an integer >= 0), a list of them, or null", _token_ids),
    "family": Rule("one of " + ", ".join(FAMILIES), lambda v: isinstance(v, str) and v in FAMILIES),
    "sliding_window": Rule(f"an integer from 1 to {MAX_CONTEXT} or null",
                           lambda v: v is None or _ints(1, MAX_CONTEXT).ok(v)),
    "window_layers": Rule("a list of true or false, one per layer, or null",
                          lambda v: v is None or isinstance(v, list)
                          and all(type(w) is bool for w in v)),
}
LAYER_INDEX = _ints(0, 1 << 12)
# fields that may be left out (or null): derived from others
DERIVED = ("n_kv_heads", "head_dim")
ROPE_TYPES = ("linear", "dynamic", "llama3")
ROPE_RULES: dict[str, Rule] = {
    # bounded: the context it gives (max_seq_len * factor) must stay a number
    "factor": Rule("a finite number > 0 and at most 1048576",
                   lambda v: POSITIVE.ok(v) and v <= 1 << 20),
    "low_freq_factor": POSITIVE,
    "high_freq_factor": POSITIVE,
    "original_max_position_embeddings": _ints(1, MAX_CONTEXT),
}
ROPE_DEFAULTS = {"low_freq_factor": 1.0, "high_freq_factor": 4.0,
                 "original_max_position_embeddings": 8192}

HF_KEYS = {
    "dim": "hidden_size", "n_layers": "num_hidden_layers", "n_heads": "num_attention_heads",
    "n_kv_heads": "num_key_value_heads", "vocab_size": "vocab_size",
    "hidden_dim": "intermediate_size", "head_dim": "head_dim", "norm_eps": "rms_norm_eps",
    "max_seq_len": "max_position_embeddings", "rope_theta": "rope_theta",
    "tie_embeddings": "tie_word_embeddings", "attention_bias": "attention_bias",
    "mlp_bias": "mlp_bias", "bos_id": "bos_token_id", "eos_id": "eos_token_id",
}
HF_DEFAULTS = {"n_kv_heads": None, "head_dim": None, "norm_eps": 1e-6, "max_seq_len": 2048,
               "rope_theta": 10000.0, "tie_embeddings": False, "attention_bias": False,
               "mlp_bias": False, "bos_id": 1, "eos_id": 2}
META_KEYS = {
    "dim": "dim", "n_layers": "n_layers", "n_heads": "n_heads", "n_kv_heads": "n_kv_heads",
    "vocab_size": "the rows of tok_embeddings.weight",
    "hidden_dim": "the rows of feed_forward.w1.weight",
    "norm_eps": "norm_eps", "max_seq_len": "max_seq_len", "rope_theta": "rope_theta",
}
META_DEFAULTS = {"n_kv_heads": None, "norm_eps": 1e-5}
# params.json's keys that are no ModelConfig field (null: not given)
META_RULES: dict[str, Rule] = {
    "vocab_size": Rule("-1 or an integer from 1 to 4194304",
                       lambda v: v == -1 and type(v) is int or RULES["vocab_size"].ok(v)),
    "multiple_of": _ints(1, 1 << 20),
    "ffn_dim_multiplier": Rule("null or a finite number > 0",
                               lambda v: v is None or POSITIVE.ok(v)),
    "use_scaled_rope": FLAG,
    "rope_scaling_factor": Rule(f"null or {ROPE_RULES['factor'].allowed}",
                                lambda v: v is None or ROPE_RULES["factor"].ok(v)),
    "rope_high_freq_factor": Rule("null or a finite number > 1 (low_freq_factor is 1)",
                                  lambda v: v is None or POSITIVE.ok(v) and v > 1),
}
# keys of Meta's ModelArgs that mark checkpoints these weights' names do not describe
META_REFUSED = {
    "quantization_args": "a quantized checkpoint (int4/fp8 weights and scales)",
    "lora_args": "a checkpoint with LoRA adapters",
    "vision_chunk_size": "a Llama 3.2 Vision checkpoint",
    "vision_num_cross_attention_layers": "a Llama 3.2 Vision checkpoint",
    "vision_args": "a Llama 4 checkpoint",
    "moe_args": "a Llama 4 (mixture of experts) checkpoint",
}


def show_json(value: Any, limit: int = 40) -> str:
    """A value as the JSON file spells it (null, true, "64", NaN), cut short to keep one line."""
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def read_json(path: Path) -> dict[str, Any]:
    """A metadata file that must hold a JSON object, or one error line saying why it does not."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise XllamaError(f"{path} is not valid JSON ({e}); fix it or download it again") from None
    except OSError as e:
        raise XllamaError(f"cannot read {path}: {e.strerror or e}") from None
    return json_object(data, str(path))


def json_object(data: Any, source: str) -> dict[str, Any]:
    """`data` if it is a JSON object, else one error naming `source` and what it holds instead."""
    if not isinstance(data, dict):
        raise XllamaError(f"{source} must hold a JSON object ({{...}}), got {show_json(data)}")
    return data


def _read(data: dict[str, Any], keys: Mapping[str, str], defaults: Mapping[str, Any],
          source: str) -> dict[str, Any]:
    """Field values from `data` (keyed by `keys`), unchecked; a derived field's null is its
    default."""
    values = {}
    for name, key in keys.items():
        if key in data and not (data[key] is None and name in DERIVED):
            values[name] = data[key]
        elif name in defaults:
            values[name] = defaults[name]
        else:
            raise XllamaError(f"{source} lacks the key {key!r}")
    return values


def check_values(values: Mapping[str, Any], source: str,
                 keys: Mapping[str, str] | None = None) -> None:
    """Every field that is given against RULES, then the rules between fields; one XllamaError
    naming `source`, the key (`keys[field]`, else the field's name), the bad value and what is
    allowed.
    A derived field (DERIVED) that is None is left to be derived."""
    def key(name: str) -> str:
        return (keys or {}).get(name, name)

    for name, rule in RULES.items():
        derived = values.get(name) is None and name in DERIVED
        if name in values and not derived and not rule.ok(values[name]):
            raise XllamaError(f"{source}: {key(name)} must be {rule.allowed}, got "
                              f"{show_json(values[name])}")
    n_heads, n_kv = values["n_heads"], values.get("n_kv_heads") or values["n_heads"]
    if n_heads % n_kv:
        raise XllamaError(f"{source}: {key('n_kv_heads')} {n_kv} must divide {key('n_heads')} "
                          f"{n_heads}")
    head_dim = values.get("head_dim") or values["dim"] // n_heads
    if values.get("head_dim") is None and (head_dim < 2 or head_dim % 2):
        raise XllamaError(f"{source}: {key('dim')} {values['dim']} / {key('n_heads')} {n_heads} "
                          f"gives a head size of {head_dim}, but RoPE needs an even head size of "
                          f"at least 2; fix the sizes or set {key('head_dim')}")
    _check_family(values, source, key)
    vocab = values["vocab_size"]
    for name in ("bos_id", "eos_id"):
        ids = values.get(name)
        for i in ids if isinstance(ids, list) else [] if ids is None else [ids]:
            if i >= vocab:
                which = f"{show_json(ids)}: token {i}" if isinstance(ids, list) else f"{i}"
                raise XllamaError(f"{source}: {key(name)} {which} is not in the vocabulary "
                                  f"({key('vocab_size')} {vocab}: ids 0 to {vocab - 1})")
    check_rope_scaling(values.get("rope_scaling"), head_dim, f"{source}: {key('rope_scaling')}")


def _check_family(values: Mapping[str, Any], source: str, key: Callable[[str], str]) -> None:
    """The fields a family fixes hold its values (so that config.json can say them), and a
    per-layer window list has one entry per layer."""
    family = values.get("family", "llama")
    fixed = {**FAMILIES[family].fixed,
             **({"sliding_window": None} if family == "llama" else {}),
             **({"window_layers": None} if family != "qwen2" else {})}
    for name, value in fixed.items():
        if values.get(name, value) != value:
            raise XllamaError(f"{source}: {key(name)} must be {show_json(value)} for the family "
                              f"{family} (its transformers class fixes it), got "
                              f"{show_json(values[name])}")
    layers = values.get("window_layers")
    if layers is not None and len(layers) != values["n_layers"]:
        raise XllamaError(f"{source}: {key('window_layers')} must have one entry per layer "
                          f"({values['n_layers']}), got {len(layers)}")


def check_rope_scaling(scaling: Any, head_dim: int, where: str) -> None:
    """A normalized rope_scaling (or None): a known type, and each of its numbers in range."""
    if scaling is None:
        return
    if not isinstance(scaling, dict) or scaling.get("rope_type") not in ROPE_TYPES:
        raise XllamaError(f"{where} must be null or an object with rope_type one of "
                          f"{', '.join(ROPE_TYPES)}, got {show_json(scaling)}")
    if "factor" not in scaling:
        raise XllamaError(f"{where} of type {scaling['rope_type']} lacks the key 'factor' "
                          f"({ROPE_RULES['factor'].allowed})")
    for name, rule in ROPE_RULES.items():
        if name in scaling and not rule.ok(scaling[name]):
            raise XllamaError(f"{where}.{name} must be {rule.allowed}, got "
                              f"{show_json(scaling[name])}")
    if scaling["rope_type"] == "llama3":
        bands = {**ROPE_DEFAULTS, **scaling}
        if bands["high_freq_factor"] <= bands["low_freq_factor"]:
            raise XllamaError(f"{where}: high_freq_factor {bands['high_freq_factor']} must be "
                              f"greater than low_freq_factor {bands['low_freq_factor']}")
    if scaling["rope_type"] == "dynamic" and head_dim <= 2:
        raise XllamaError(f"{where}: dynamic scaling needs a head size above 2 (its base grows as "
                          f"d / (d - 2)), got {head_dim}")
