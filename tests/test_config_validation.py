"""Malformed checkpoint metadata and absurd sizes through the CLI: one `error:` line naming the
file, the key, the bad value and what is allowed; exit code 2; no traceback; nothing built.

The tables set every field of config.json and params.json that xllama reads to each wrong type
and each out-of-range value, one at a time, over a real checkpoint whose weight files are linked,
not copied."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch

from conftest import cli_fails, fixture
from xllama_cli.config import RULES, ModelConfig, show_json
from xllama_cli.errors import XllamaError

MISSING = object()  # the key left out
ALLOWED = re.compile(r"must|lacks|supported|ids 0 to|not valid JSON")  # every message says what would be right
NAN, INF = float("nan"), float("inf")

# wrong types and out-of-range values, by the kind of field
SIZE = ["64", 64.0, None, True, [64], {}, 0, -1]
DERIVED = ["4", 4.0, True, [4], {}, 0, -1]
NUMBER = ["1e-5", None, True, [1.0], {}, NAN, INF, -INF, 0, -1e-5]
FLAG = ["true", 1, 0, None, [True]]
NOT_AN_OBJECT = ["[]", "[1, 2]", '"llama"', "5", "null", "true"]

HF_CASES: list[tuple[str, object]] = [
    *[(key, v) for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size",
                           "intermediate_size", "max_position_embeddings") for v in SIZE],
    # absurd sizes: refused from the number alone, before any model of that size is planned
    ("hidden_size", 10**7), ("num_hidden_layers", 10**5), ("num_hidden_layers", 10**6),
    ("num_attention_heads", 10**5), ("vocab_size", 10**9), ("intermediate_size", 10**8),
    ("max_position_embeddings", 2**40),
    *[(key, v) for key in ("num_key_value_heads", "head_dim") for v in DERIVED],
    ("num_key_value_heads", 3), ("num_key_value_heads", 10**5), ("head_dim", 3), ("head_dim", 10**5),
    *[(key, v) for key in ("rms_norm_eps", "rope_theta") for v in NUMBER],
    *[(key, v) for key in ("tie_word_embeddings", "attention_bias", "mlp_bias") for v in FLAG],
    *[("bos_token_id", v) for v in ["1", 1.0, True, [1], {}, -1, 512]],
    *[("eos_token_id", v) for v in ["2", 2.0, True, {}, -1, 512, [2, "x"], [2, -1], [2, 600], [[2]]]],
    *[("model_type", v) for v in ["gpt2", 5, None, ["llama"]]],
    *[(key, MISSING) for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size",
                                 "intermediate_size")],
]
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64}
# (rope value, the sub-key the message names, or "" for the object itself)
ROPE_CASES: list[tuple[object, str]] = [
    *[(v, "") for v in ["linear", [1], 5, True]],
    ({"rope_type": "yarn", "factor": 2.0}, ""), ({"rope_type": 3, "factor": 2.0}, ""),
    ({"rope_type": "linear"}, "factor"), ({"type": "dynamic"}, "factor"),
    *[({"rope_type": "linear", "factor": v}, "factor") for v in ["2", None, True, [2], NAN, INF, 0, -2.0, 1e300]],
    *[({"rope_type": "dynamic", "factor": v}, "factor") for v in [NAN, -INF, 0]],
    *[({**LLAMA3, "factor": v}, "factor") for v in [INF, 0]],
    *[({**LLAMA3, "low_freq_factor": v}, "low_freq_factor") for v in ["1", 0, NAN]],
    *[({**LLAMA3, "high_freq_factor": v}, "high_freq_factor") for v in [None, -1, 1.0, 0.5]],
    *[({**LLAMA3, "original_max_position_embeddings": v}, "original_max_position_embeddings")
      for v in [0, -1, 8192.0, "8192", None]],
]
META_CASES: list[tuple[str, object]] = [
    *[(key, v) for key in ("dim", "n_layers", "n_heads", "max_seq_len") for v in SIZE],
    ("dim", 10**7), ("n_layers", 10**5), ("n_layers", 10**6), ("n_heads", 10**5),
    *[("n_kv_heads", v) for v in [*DERIVED, 3, 10**5]],
    *[(key, v) for key in ("norm_eps", "rope_theta") for v in NUMBER],
    *[("use_scaled_rope", v) for v in ["true", 1, None, [True]]],
    # the keys that are no ModelConfig field; vocab_size and the FFN's must agree with the weights
    *[("vocab_size", v) for v in ["512", 512.0, None, True, [512], {}, 0, -2, 513, 10**9]],
    *[("multiple_of", v) for v in ["4", 4.0, None, True, 0, -1, 3, 10**7]],
    *[("ffn_dim_multiplier", v) for v in ["1", True, [1.0], NAN, INF, 0, -1, 1.5]],
    *[("rope_scaling_factor", v) for v in ["8", True, NAN, 0, -8, 1e300]],
    *[("rope_high_freq_factor", v) for v in ["4", True, NAN, 0, 1.0, 0.5]],
    *[(key, v) for key, v in [("quantization_args", {"group_size": 256}), ("lora_args", {"rank": 16}),
                              ("vision_chunk_size", 560), ("moe_args", {})]],
    *[(key, MISSING) for key in ("dim", "n_layers", "n_heads")],
]
# keys of one family: (model_type, the other keys set, the key, a bad value)
QWEN2_WINDOW = {"use_sliding_window": True, "sliding_window": 4}
FAMILY_CASES: list[tuple[str, dict, str, object]] = [
    *[("mistral", {}, "sliding_window", v) for v in ["4096", 4096.0, True, [4], {}, 0, -1, 2**31]],
    *[("qwen2", {}, "use_sliding_window", v) for v in ["true", 1, None, [True]]],
    *[("qwen2", {"use_sliding_window": True}, "sliding_window", v) for v in ["4", 4.0, False, 0]],
    *[("qwen2", QWEN2_WINDOW, "max_window_layers", v) for v in ["1", 1.0, None, True, -1, 10**5]],
    *[("qwen2", QWEN2_WINDOW, "layer_types", v) for v in [
        "sliding_attention", 5, {}, ["full_attention"], ["full_attention"] * 6, ["local"] * 5]],
    *[(v, {}, "model_type", v) for v in ["gemma", "qwen3", "Mistral", "qwen2_moe"]],
]
INDEX_CASES: list[object] = [
    "[]", '"model.safetensors"', "{not json", {}, {"weight_map": None}, {"weight_map": []},
    {"weight_map": "model.safetensors"}, {"weight_map": {}},
    *[{"weight_map": {"model.norm.weight": v}} for v in [
        5, None, ["model.safetensors"], "", ".", "../model.safetensors", "/etc/passwd", "sub/../../x.safetensors",
        "..\\model.safetensors", "C:\\model.safetensors", "/"]],
]


def gen(model: Path, *extra: str) -> list[str]:
    return ["generate", "--model", str(model), "--temperature", "0", "-n", "2", *extra, "hello"]


def case_folder(tmp_path: Path, source: str, files: dict[str, str]) -> Path:
    """A checkpoint folder: the fixture's files linked, `files` (name -> text) written over them."""
    src = fixture(source)
    out = tmp_path / "case"
    out.mkdir()
    for f in src.iterdir():
        if f.name not in files:
            (out / f.name).symlink_to(f)
    for name, text in files.items():
        (out / name).write_text(text)
    return out


def with_key(base: dict, key: str, value: object) -> str:
    data = dict(base)
    if value is MISSING:
        del data[key]
    else:
        data[key] = value
    return json.dumps(data)


def refused(args: list[str], *needles: str) -> str:
    err = cli_fails(args, *needles)
    assert ALLOWED.search(err), err
    return err


def shown(value: object) -> list[str]:
    return [] if value is MISSING else [show_json(value)]


def hf_config() -> dict:
    return json.loads((fixture("stories260K-hf") / "config.json").read_text())


def meta_params() -> dict:
    return json.loads((fixture("stories260K-meta") / "params.json").read_text())


@pytest.mark.parametrize("key,value", HF_CASES, ids=[f"{k}={show_json(v) if v is not MISSING else '-'}"
                                                      for k, v in HF_CASES])
def test_each_bad_config_json_value_is_one_error_line(tmp_path, key, value):
    folder = case_folder(tmp_path, "stories260K-hf", {"config.json": with_key(hf_config(), key, value)})
    refused(gen(folder), str(folder / "config.json"), key, *shown(value))


@pytest.mark.parametrize("family,others,key,value", FAMILY_CASES,
                         ids=[f"{f}-{k}={show_json(v)}" for f, _, k, v in FAMILY_CASES])
def test_each_bad_family_key_is_one_error_line(tmp_path, family, others, key, value):
    config = {**hf_config(), "model_type": family, **others, key: value}
    folder = case_folder(tmp_path, "stories260K-hf", {"config.json": json.dumps(config)})
    refused(gen(folder), str(folder / "config.json"), key, show_json(value))


@pytest.mark.parametrize("rope_key", ["rope_scaling", "rope_parameters"])
@pytest.mark.parametrize("value,sub", ROPE_CASES, ids=[f"{show_json(v)}" for v, _ in ROPE_CASES])
def test_each_bad_rope_scaling_is_one_error_line(tmp_path, rope_key, value, sub):
    folder = case_folder(tmp_path, "stories260K-hf", {"config.json": with_key(hf_config(), rope_key, value)})
    if not isinstance(value, dict):
        needles = [show_json(value)]
    elif not sub:  # an unknown type
        needles = [show_json(value.get("rope_type"))]
    else:
        needles = [sub, *([show_json(value[sub])] if sub in value else [])]
    refused(gen(folder), str(folder / "config.json"), rope_key, *needles)


def test_dynamic_rope_needs_a_head_size_above_two(tmp_path):
    config = {**hf_config(), "head_dim": 2, "rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}
    folder = case_folder(tmp_path, "stories260K-hf", {"config.json": json.dumps(config)})
    cli_fails(gen(folder), "config.json", "rope_scaling", "dynamic", "got 2")


def test_rope_theta_inside_rope_parameters_is_checked(tmp_path):
    config = {**hf_config(), "rope_parameters": {"rope_type": "default", "rope_theta": 0}}
    del config["rope_theta"]
    folder = case_folder(tmp_path, "stories260K-hf", {"config.json": json.dumps(config)})
    refused(gen(folder), "config.json", "rope_parameters.rope_theta", "got 0")


def test_a_head_size_that_rope_cannot_rotate_is_one_error_line(tmp_path):
    config = {**hf_config(), "hidden_size": 72}  # 72 / 8 heads: 9, odd
    folder = case_folder(tmp_path, "stories260K-hf", {"config.json": json.dumps(config)})
    cli_fails(gen(folder), "config.json", "hidden_size 72", "num_attention_heads 8", "head size of 9", "even")


@pytest.mark.parametrize("text", NOT_AN_OBJECT)
@pytest.mark.parametrize("name,source", [("config.json", "stories260K-hf"), ("params.json", "stories260K-meta")])
def test_a_metadata_file_that_is_not_a_json_object_is_one_error_line(tmp_path, text, name, source):
    folder = case_folder(tmp_path, source, {name: text})
    refused(gen(folder), str(folder / name), "JSON object", show_json(json.loads(text)))


@pytest.mark.parametrize("key,value", META_CASES, ids=[f"{k}={show_json(v) if v is not MISSING else '-'}"
                                                        for k, v in META_CASES])
def test_each_bad_params_json_value_is_one_error_line(tmp_path, key, value):
    folder = case_folder(tmp_path, "stories260K-meta", {"params.json": with_key(meta_params(), key, value)})
    refused(gen(folder), str(folder / "params.json"), key, *shown(value))


@pytest.mark.parametrize("index_name", ["model.safetensors.index.json", "pytorch_model.bin.index.json"])
@pytest.mark.parametrize("index", INDEX_CASES, ids=[show_json(v) for v in INDEX_CASES])
def test_each_malformed_shard_index_is_one_error_line(tmp_path, index_name, index):
    text = index if isinstance(index, str) else json.dumps(index)
    folder = case_folder(tmp_path, "stories260K-hf", {index_name: text})
    refused(gen(folder), str(folder / index_name))


def test_a_shard_index_naming_a_file_outside_the_folder_reads_nothing_there(tmp_path):
    outside = tmp_path / "outside.safetensors"
    outside.symlink_to(fixture("stories260K-hf") / "model.safetensors")  # loadable, were it read
    folder = case_folder(tmp_path, "stories260K-hf", {
        "model.safetensors.index.json": json.dumps({"weight_map": {"model.norm.weight": "../outside.safetensors"}})})
    (folder / "model.safetensors").unlink()
    refused(gen(folder), "weight_map", "../outside.safetensors", "inside the folder")


# ---- values from the command line that reach the model ----
@pytest.mark.parametrize("args,needles", [
    *[(("--rope", rope, "--rope-factor", f), ("rope factor must be a finite number > 0", f"got {float(f)}"))
      for rope in ("linear", "dynamic", "llama3") for f in ("nan", "inf", "-inf", "0", "-2", "1e300")],
    (("--groups", "0"), ("--groups 0", "valid group counts")), (("--groups", "-2"), ("--groups -2", "valid group counts")),
    (("--attn", "GQA", "--groups", "0"), ("--groups 0", "valid group counts")),
])
def test_bad_rope_factor_and_group_flags_are_one_error_line(args, needles):
    cli_fails(gen(fixture("stories260K-hf"), *args), *needles)


@pytest.mark.parametrize("factor", ["nan", "inf", "0", "-1", "1e300"])
def test_rope_factor_over_the_checkpoints_own_scaling_is_checked(tmp_path, factor):
    config = {**hf_config(), "rope_scaling": {"rope_type": "linear", "factor": 2.0}}
    folder = case_folder(tmp_path, "stories260K-hf", {"config.json": json.dumps(config)})
    refused(gen(folder, "--rope-factor", factor), "rope factor", f"got {float(factor)}")


def test_convert_of_a_malformed_config_writes_nothing(tmp_path):
    folder = case_folder(tmp_path, "stories260K-hf", {"config.json": with_key(hf_config(), "hidden_size", "64")})
    out = tmp_path / "out"
    refused(["convert", str(folder), "--out", str(out)], "hidden_size", '"64"')
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["case"]


# ---- absurd sizes: refused from the config's arithmetic, before a model is built ----
@pytest.fixture
def never_built(monkeypatch):
    """Fails the test if any Transformer (even on the meta device) is made."""
    from xllama_cli import model

    def refuse(*args, **kwargs):
        pytest.fail("a model was built for a config that should have been refused")

    monkeypatch.setattr(model.Transformer, "__init__", refuse)


@pytest.mark.parametrize("key,value", [("hidden_size", 10**7), ("num_hidden_layers", 10**5),
                                       ("num_hidden_layers", 10**6)])
def test_absurd_sizes_are_refused_before_a_model_is_built(tmp_path, never_built, key, value):
    folder = case_folder(tmp_path, "stories260K-hf", {"config.json": with_key(hf_config(), key, value)})
    refused(gen(folder), key, str(value), "must be an integer from 1 to")


def test_a_config_larger_than_its_weight_files_is_refused_before_a_model_is_built(tmp_path, never_built):
    folder = case_folder(tmp_path, "stories260K-hf", {"config.json": with_key(hf_config(), "num_hidden_layers", 4000)})
    n = ModelConfig.from_hf({**hf_config(), "num_hidden_layers": 4000}).n_params()
    size = (fixture("stories260K-hf") / "model.safetensors").stat().st_size
    cli_fails(gen(folder), f"{n:,} parameters", f"{size:,} bytes", "do not match")


def test_a_model_larger_than_free_memory_is_refused_with_the_sizes(tmp_path, never_built, monkeypatch):
    from xllama_cli import loading

    monkeypatch.setattr(loading, "available_bytes", lambda device: 100_000)
    n = ModelConfig.from_hf(hf_config()).n_params()
    err = cli_fails(gen(fixture("stories260K-hf"), "--dtype", "float32", "--device", "cpu"), f"({n:,})", "float32",
                    "97.7 KiB is free on cpu")
    assert f"need {n * 4 / 1024:.1f} KiB" in err, err
    err = cli_fails(gen(fixture("stories260K-hf"), "--dtype", "bfloat16", "--device", "cpu"), "bfloat16")
    assert f"need {n * 2 / 1024:.1f} KiB" in err, err


def sparse_safetensors(path: Path, rows: int, cols: int) -> None:
    """A valid safetensors file of one float32 [rows, cols] tensor whose data is a hole in the
    file: as large as a real checkpoint to every check, taking no disk (never read here)."""
    header = json.dumps({"model.embed_tokens.weight": {"dtype": "F32", "shape": [rows, cols],
                                                       "data_offsets": [0, rows * cols * 4]}}).encode()
    header += b" " * (-len(header) % 8)
    with open(path, "wb") as f:
        f.write(len(header).to_bytes(8, "little") + header)
        f.truncate(8 + len(header) + rows * cols * 4)


def test_a_model_larger_than_this_machines_memory_is_refused_before_a_model_is_built(tmp_path, never_built):
    """No stand-in for the memory: a config of four times the machine's memory in float32, over a
    weight file of that size (sparse), is refused by the real free-memory figure."""
    from xllama_cli.machine import total_memory as _total_memory

    dim = 1 << 16
    vocab = -(-_total_memory() // dim)  # the embedding alone: as many parameters as the memory has bytes
    if not RULES["vocab_size"].ok(vocab):
        pytest.skip(f"a machine of {_total_memory():,} bytes needs a vocabulary above the largest allowed")
    config = {**hf_config(), "hidden_size": dim, "vocab_size": vocab, "num_hidden_layers": 1,
              "num_attention_heads": 128, "num_key_value_heads": 128, "intermediate_size": 64}
    folder = case_folder(tmp_path, "stories260K-hf", {"config.json": json.dumps(config)})
    (folder / "model.safetensors").unlink()
    try:
        sparse_safetensors(folder / "model.safetensors", vocab, dim)
    except OSError as e:
        pytest.skip(f"this filesystem takes no sparse file of {vocab * dim * 4:,} bytes: {e}")
    n = ModelConfig.from_hf(config).n_params()
    cli_fails(gen(folder, "--dtype", "float32", "--device", "cpu"), f"({n:,})", "float32", "is free on cpu")


def test_free_memory_is_a_positive_number_of_bytes_below_the_machines_total():
    from xllama_cli.machine import total_memory as _total_memory
    from xllama_cli.loading import available_bytes

    free = available_bytes(torch.device("cpu"))
    assert 0 < free <= _total_memory()


# ---- the one parameter count, against the model it describes ----
@pytest.mark.parametrize("changes", [
    {}, {"tie_embeddings": True}, {"attention_bias": True}, {"mlp_bias": True}, {"n_kv_heads": 1},
    {"head_dim": 6, "n_kv_heads": 2}, {"attention_bias": True, "mlp_bias": True, "tie_embeddings": True},
    {"family": "qwen2", "qkv_bias": True, "n_kv_heads": 2},
])
def test_parameter_count_from_the_arithmetic_equals_the_built_models(changes):
    from xllama_cli.model import Transformer

    cfg = ModelConfig(dim=24, n_layers=3, n_heads=4, n_kv_heads=4, vocab_size=37, hidden_dim=40,
                      bos_id=0, eos_id=[1]).replace(**changes)
    with torch.device("meta"):
        model = Transformer(cfg)
    assert cfg.n_params() == sum(p.numel() for p in model.parameters())


def test_every_rule_refuses_what_it_says_it_refuses():
    """The table itself: each field's rule takes a good value and refuses a string, null and NaN."""
    good = ModelConfig(bos_id=0, eos_id=[1]).values()
    for name, rule in RULES.items():
        assert rule.ok(good[name]), name
        assert not rule.ok("1") and not rule.ok(NAN) and not rule.ok({}), name
        assert rule.ok(None) == (name in ("bos_id", "eos_id", "sliding_window", "window_layers")), name


def test_programmatic_configs_are_checked_too():
    with pytest.raises(XllamaError, match="n_kv_heads 3 must divide n_heads 8"):
        ModelConfig(dim=64, n_heads=8, n_kv_heads=3)
    with pytest.raises(XllamaError, match="rope_scaling.factor must be a finite number > 0 and at most 1048576, got NaN"):
        ModelConfig().replace(rope_scaling={"rope_type": "linear", "factor": math.nan})

