"""Mistral (sliding-window attention) and Qwen2 (q/k/v biases) against transformers'
MistralForCausalLM and Qwen2ForCausalLM on random tiny checkpoints (fp32, CPU): logits, greedy
tokens alone and in a batch of unequal prompts, past the window in prefill and in decode; then through the CLI:
generate, chat, convert (K/V pooling) and download. Llama's own cases are in test_parity.py."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from typer.testing import CliRunner

from conftest import fixture, make_hf_checkpoint
from xllama_cli import load_model
from xllama_cli.build import build_model
from xllama_cli.chat import format_plain
from xllama_cli.cli import app
from xllama_cli.config import FAMILIES, ModelConfig
from xllama_cli.generation import continuation_text, generate_tokens
from xllama_cli.tokenizer import load_tokenizer

runner = CliRunner()
WINDOW = 5  # below every prompt of the greedy tests: prefill already reaches past it

# (family, transformers config overrides)
CASES = {
    "qwen2": ("qwen2", dict(num_key_value_heads=2)),
    "qwen2-tied-mqa": ("qwen2", dict(num_key_value_heads=1, tie_word_embeddings=True)),
    # windowed layers from max_window_layers on, the first one attending to everything
    "qwen2-window": ("qwen2", dict(num_key_value_heads=2, num_hidden_layers=3,
                                   use_sliding_window=True, sliding_window=WINDOW,
                                   max_window_layers=1)),
    "mistral-no-window": ("mistral", dict(num_key_value_heads=2, sliding_window=None)),
    "mistral-window": ("mistral", dict(num_key_value_heads=2, sliding_window=WINDOW)),
    # a window longer than the prompt, shorter than prompt and answer: decode crosses it
    "mistral-window-12-mha": ("mistral", dict(num_key_value_heads=8, sliding_window=12,
                                              head_dim=16)),
    "mistral-window-1-mqa": ("mistral", dict(num_key_value_heads=1, sliding_window=1)),
}
CLASSES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
           "qwen2": "Qwen2ForCausalLM"}


@pytest.fixture(scope="module", params=list(CASES))
def pair(request, tmp_path_factory):
    family, overrides = CASES[request.param]
    path = tmp_path_factory.mktemp(request.param)
    hf = make_hf_checkpoint(path, seed=len(request.param), family=family,
                            max_position_embeddings=128, **overrides)
    assert type(hf).__name__ == CLASSES[family]
    return request.param, hf, load_model(path, device="cpu", dtype="float32"), path


def hf_greedy(hf, prompt: list[int], n: int) -> list[int]:
    """transformers' greedy tokens. With a window of 1 its sliding cache keeps every key (it
    keeps `[-window + 1:]`, all of them when that is `[-0:]`) while its mask assumes it kept
    none, so its cached tokens there are not its own model's: that case runs without its cache."""
    use_cache = getattr(hf.config, "sliding_window", None) != 1
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n,
                          do_sample=False, eos_token_id=None, pad_token_id=0,
                          use_cache=use_cache)
    return out[0, len(prompt):].tolist()


def test_the_checkpoint_reads_as_its_family(pair):
    name, hf, ours, _ = pair
    cfg = ours.config
    assert cfg.family == hf.config.model_type
    assert cfg.sliding_window == getattr(hf.config, "sliding_window", None)
    q, o = ours.model.layers[0].self_attn.q_proj, ours.model.layers[0].self_attn.o_proj
    assert (q.bias is not None, o.bias is not None) == ((True, False) if cfg.family == "qwen2"
                                                        else (False, False))


def test_full_sequence_logits_match_transformers(pair):
    name, hf, ours, _ = pair
    tokens = torch.randint(0, 128, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, got = hf(tokens).logits, ours(tokens)
    assert got.shape == want.shape == (2, 40, 128)
    assert (got - want).abs().max().item() < 1e-4, name


def test_greedy_generation_with_cache_matches_transformers(pair):
    name, hf, ours, _ = pair
    prompt = torch.randint(3, 128, (7,), generator=torch.Generator().manual_seed(2)).tolist()
    assert generate_tokens(ours, [prompt], 32).tokens[0] == hf_greedy(hf, prompt, 32), name


def test_a_batch_of_unequal_prompts_gives_each_the_tokens_transformers_gives_it_alone(pair):
    name, hf, ours, _ = pair
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 128, (n,), generator=g).tolist() for n in (3, 16, 9)]
    got = generate_tokens(ours, prompts, 20).tokens
    assert got == [hf_greedy(hf, p, 20) for p in prompts], name


@pytest.mark.parametrize("other", [WINDOW - 1, WINDOW + 1, None])
def test_a_window_one_key_off_is_seen(tmp_path, other):
    """The window is a rule the tests can catch: a window one key shorter or longer than the
    checkpoint's (or none) gives other logits than transformers."""
    hf = make_hf_checkpoint(tmp_path, family="mistral", num_key_value_heads=2,
                            sliding_window=WINDOW)
    # plain layers (no CPU kernels swapped in), so that the state dict is the checkpoint's names
    ours = load_model(tmp_path, device="cpu", dtype="float32", pack=False)
    off = build_model(ours.config.replace(sliding_window=other), ours.state_dict(), "cpu",
                      torch.float32)
    tokens = torch.randint(0, 128, (1, 20), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = hf(tokens).logits
        assert (ours(tokens) - want).abs().max().item() < 1e-4
        assert (off(tokens) - want).abs().max().item() > 1e-3


# ---- config.json as transformers reads it ----
MINIMAL = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=30,
               num_attention_heads=32, vocab_size=128)


@pytest.mark.parametrize("family,extra", [
    ("llama", {}), ("mistral", {}), ("mistral", {"sliding_window": None}),
    ("qwen2", {"num_key_value_heads": None}), ("qwen2", {}),
    ("qwen2", {"use_sliding_window": True}),
    ("qwen2", {"use_sliding_window": True, "sliding_window": 7, "max_window_layers": 3}),
    ("qwen2", {"use_sliding_window": True, "max_window_layers": 0}),
    ("qwen2", {"use_sliding_window": True, "max_window_layers": 40}),
    ("qwen2", {"use_sliding_window": True, "sliding_window": 9,
               "layer_types": ["sliding_attention", "full_attention"] * 15}),
])
def test_a_config_json_with_keys_left_out_reads_as_transformers_reads_it(family, extra):
    from transformers import AutoConfig

    data = {"model_type": family, **MINIMAL, **extra}
    ours = ModelConfig.from_hf(data)
    hf = AutoConfig.for_model(**data)
    assert ours.family == hf.model_type == family
    assert ours.n_kv_heads == hf.num_key_value_heads
    assert ours.max_seq_len == hf.max_position_embeddings
    assert ours.norm_eps == hf.rms_norm_eps and ours.tie_embeddings == hf.tie_word_embeddings
    assert ours.rope_theta == hf.rope_parameters["rope_theta"]
    assert ours.bos_id == hf.bos_token_id
    assert ours.eos_id == ([] if hf.eos_token_id is None else [hf.eos_token_id])
    assert layer_windows(ours) == hf_layer_windows(hf)


def layer_windows(cfg: ModelConfig) -> list[int | None]:
    return [cfg.layer_window(i) for i in range(cfg.n_layers)]


def hf_layer_windows(hf) -> list[int | None]:
    """Each layer's window as transformers' attention takes it (Mistral: config.sliding_window
    in every layer; Qwen2: in its "sliding_attention" layers; Llama: none)."""
    n = hf.num_hidden_layers
    if hf.model_type == "mistral":
        return [hf.sliding_window] * n
    types = getattr(hf, "layer_types", None) or ["full_attention"] * n
    return [hf.sliding_window if t == "sliding_attention" else None for t in types]


@pytest.mark.parametrize("changes", [
    dict(family="llama", attention_bias=True, mlp_bias=True),
    dict(family="mistral", sliding_window=4096), dict(family="mistral"),
    dict(family="qwen2", qkv_bias=True, bos_id=None, eos_id=[]),
    dict(family="qwen2", qkv_bias=True, sliding_window=9, window_layers=[False] * 3 + [True]),
    dict(family="qwen2", qkv_bias=True, sliding_window=9, window_layers=[True, False] * 2),
    dict(family="qwen2", qkv_bias=True, sliding_window=9, window_layers=[False] * 4),
])
def test_to_hf_writes_what_transformers_loads_as_the_same_family(changes):
    from transformers import AutoConfig

    cfg = ModelConfig(dim=64, n_layers=4, n_heads=8, n_kv_heads=2, vocab_size=128, hidden_dim=96,
                      **changes)
    hf = AutoConfig.for_model(**cfg.to_hf())
    assert hf.model_type == cfg.family and hf.architectures == [CLASSES[cfg.family]]
    back = ModelConfig.from_hf(cfg.to_hf())
    assert layer_windows(back) == layer_windows(cfg) == hf_layer_windows(hf)
    if any(cfg.window_layers or [True]):
        assert back == cfg


@pytest.mark.parametrize("changes,needles", [
    (dict(family="llama", sliding_window=8), ["sliding_window", "null", "llama"]),
    (dict(family="llama", qkv_bias=True), ["qkv_bias", "false", "llama"]),
    (dict(family="mistral", attention_bias=True), ["attention_bias", "false", "mistral"]),
    (dict(family="qwen2"), ["qkv_bias", "true", "qwen2"]),
    (dict(family="qwen2", qkv_bias=True, sliding_window=4, window_layers=[True]),
     ["window_layers", "one entry per layer (2)", "got 1"]),
    (dict(family="gpt2"), ["family must be one of llama, mistral, qwen2", '"gpt2"']),
])
def test_a_config_its_family_cannot_express_is_refused(changes, needles):
    from xllama_cli.errors import XllamaError

    with pytest.raises(XllamaError) as e:
        ModelConfig(dim=64, n_layers=2, n_heads=8, n_kv_heads=2, **changes)
    for n in needles:
        assert n in str(e.value), str(e.value)


# ---- through the CLI ----
def tokenized_checkpoint(path, family, **overrides):
    """A random checkpoint of `family` with the fixture's 512-token SentencePiece tokenizer."""
    return make_hf_checkpoint(path, tokenizer=True, family=family, vocab_size=512,
                              max_position_embeddings=256, num_key_value_heads=4, **overrides)


CLI_FAMILIES = {"mistral": dict(sliding_window=6),
                "qwen2": dict(use_sliding_window=True, sliding_window=6, max_window_layers=1)}


@pytest.mark.parametrize("family", list(CLI_FAMILIES))
def test_generate_prints_transformers_greedy_continuation(tmp_path, family):
    hf = tokenized_checkpoint(tmp_path, family, **CLI_FAMILIES[family])
    tok = load_tokenizer(tmp_path)
    prompt = "Once upon a time, there was a little girl"
    ids = tok.encode(prompt, bos=True)
    assert len(ids) > 6
    r = runner.invoke(app, ["generate", "--model", str(tmp_path), "-n", "24", "--temperature",
                            "0", "--quiet", prompt])
    assert r.exit_code == 0, r.output
    assert r.stdout.rstrip("\n") == prompt + continuation_text(tok, hf_greedy(hf, ids, 24))


@pytest.mark.parametrize("family", list(CLI_FAMILIES))
def test_chat_answers_each_turn_as_transformers_over_the_whole_dialog(tmp_path, family):
    """The second turn reuses the cache of the first, past the window: its answer is still
    transformers' greedy answer to the whole dialog."""
    hf = tokenized_checkpoint(tmp_path, family, **CLI_FAMILIES[family])
    tok = load_tokenizer(tmp_path)
    r = runner.invoke(app, ["chat", "--model", str(tmp_path), "--template", "plain",
                            "--temperature", "0", "-n", "12"],
                      input="Once upon a time\nThe dog ran to the park\n")
    assert r.exit_code == 0, r.output
    dialog, answers = [], []
    for text in ("Once upon a time", "The dog ran to the park"):
        dialog.append({"role": "user", "content": text})
        ids = format_plain(dialog, tok)
        with torch.no_grad():
            out = hf.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False,
                              eos_token_id=tok.eos_ids, pad_token_id=0)[0, len(ids):].tolist()
        answer = continuation_text(tok, [t for t in out if t not in tok.eos_ids])
        answers.append(answer.strip())
        dialog.append({"role": "assistant", "content": answer})
    assert r.stdout == "".join(f"{a}\n\n" for a in answers).rstrip("\n") + "\n"


@pytest.mark.parametrize("family,flags,kv_after", [
    ("mistral", ["--groups", "2"], 2), ("qwen2", ["--groups", "2"], 2),
    ("qwen2", ["--attn", "MQA"], 1), ("mistral", ["--attn", "MHA"], 8),
])
def test_convert_pools_kv_heads_and_transformers_loads_the_result_as_the_same_class(
        tmp_path, family, flags, kv_after):
    from transformers import AutoModelForCausalLM

    src, out = tmp_path / "src", tmp_path / "out"
    tokenized_checkpoint(src, family, **CLI_FAMILIES[family])
    r = runner.invoke(app, ["convert", str(src), *flags, "--out", str(out)])
    assert r.exit_code == 0, r.output
    written = json.loads((out / "config.json").read_text())
    assert written["model_type"] == family and written["num_key_value_heads"] == kv_after
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(hf).__name__ == CLASSES[family]
    ours = load_model(out, device="cpu", dtype="float32")
    on_the_fly = load_model(src, device="cpu", dtype="float32",
                            attn=flags[1] if flags[0] == "--attn" else "GQA",
                            groups=int(flags[1]) if flags[0] == "--groups" else None)
    assert ours.config == on_the_fly.config and ours.config.sliding_window == 6
    tokens = torch.randint(0, 512, (2, 30), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want = hf(tokens).logits
        assert (ours(tokens) - want).abs().max().item() < 1e-4
        assert (on_the_fly(tokens) - want).abs().max().item() < 1e-4


def test_convert_pools_qwen2_kv_biases_per_group(tmp_path):
    from safetensors.torch import load_file

    tokenized_checkpoint(tmp_path / "src", "qwen2")
    r = runner.invoke(app, ["convert", str(tmp_path / "src"), "--groups", "2", "--out",
                            str(tmp_path / "out")])
    assert r.exit_code == 0, r.output
    before = load_file(tmp_path / "src" / "model.safetensors")
    after = load_file(tmp_path / "out" / "model.safetensors")
    for kind in "kv":
        name = f"model.layers.1.self_attn.{kind}_proj.bias"
        heads = before[name].view(2, 2, 8)  # 4 heads of 8 in 2 groups
        assert torch.allclose(after[name], heads.mean(1).reshape(-1))
    name = "model.layers.1.self_attn.q_proj.bias"
    assert torch.equal(after[name], before[name])
    assert "model.layers.1.self_attn.o_proj.bias" not in after


@pytest.mark.parametrize("family", list(CLI_FAMILIES))
def test_download_fetches_a_family_repo_and_generate_runs_it_by_repo_id(tmp_path, family):
    from fake_hub import FakeHub, FakeRepo
    from test_download import _env, _snapshot, xllama

    src = tmp_path / "src"
    tokenized_checkpoint(src, family, **CLI_FAMILIES[family])
    files = {p.name: p.read_bytes() for p in src.iterdir() if p.is_file()}
    hub = FakeHub().start()
    try:
        hub.add("owner/tiny", FakeRepo(files, lfs={"model.safetensors", "tokenizer.model"}))
        env = _env(tmp_path, hub.url)
        r = xllama(env, "download", "owner/tiny")
        assert r.returncode == 0, r.stderr
        assert json.loads((_snapshot(tmp_path) / "config.json").read_text())["model_type"] == family
    finally:
        hub.stop()
    args = ["generate", "-n", "8", "--temperature", "0", "--quiet", "Once upon a time"]
    by_id = xllama(dict(env, HF_HUB_OFFLINE="1"), *args, "--model", "owner/tiny")
    by_folder = runner.invoke(app, [*args, "--model", str(src)])
    assert by_id.returncode == 0, by_id.stderr
    assert by_id.stdout == by_folder.stdout and by_id.stdout.startswith("Once upon a time")


def test_download_refuses_another_model_type_naming_the_supported_ones(tmp_path):
    from fake_hub import FakeHub, FakeRepo
    from test_download import _assert_one_line_error, _env, xllama

    hub = FakeHub().start()
    try:
        hub.add("owner/tiny", FakeRepo({"config.json": b'{"model_type": "gemma"}',
                                        "model.safetensors": b"x" * 100},
                                       lfs={"model.safetensors"}))
        r = xllama(_env(tmp_path, hub.url), "download", "owner/tiny")
        _assert_one_line_error(r, "'gemma'", ", ".join(FAMILIES))
        assert hub.served["model.safetensors"] == 0
    finally:
        hub.stop()


def test_generate_refuses_another_model_type_naming_the_supported_ones(tmp_path):
    from conftest import cli_fails

    src = fixture("stories260K-hf")
    for f in src.iterdir():
        shutil.copy(f, tmp_path / f.name)
    config = json.loads((src / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "model_type": "gemma"}))
    cli_fails(["generate", "--model", str(tmp_path), "hello"], '"gemma"',
              "supported: llama, mistral, qwen2")
