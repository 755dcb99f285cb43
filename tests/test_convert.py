"""`xllama convert`: exact K/V pooling, Meta -> HF, re-sharding, dtype, and what it writes beside the weights."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from conftest import STORY, fixture, make_hf_checkpoint
from xllama_cli import load_model
from xllama_cli.cli import app
from xllama_cli.convert import convert_checkpoint
from xllama_cli.generation import generate_tokens
from xllama_cli.tokenizer import load_tokenizer

runner = CliRunner()


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of an HF folder's safetensors files, read with the safetensors library."""
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def convert(*args: str):
    r = runner.invoke(app, ["convert", *args])
    assert r.exit_code == 0, r.output
    return r


def kv_names(state: dict) -> list[str]:
    return [k for k in state if ".self_attn.k_proj." in k or ".self_attn.v_proj." in k]


# ---- exactness ----
@pytest.mark.parametrize("flags", [[], ["--groups", "4"], ["--attn", "GQA", "--groups", "4"]])
def test_same_group_count_writes_bit_identical_tensors(tmp_path, flags):
    src = fixture("stories260K-hf")
    convert(str(src), "--out", str(tmp_path / "out"), *flags)
    want, got = tensors(src), tensors(tmp_path / "out")
    assert got.keys() == want.keys()
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k


def test_mqa_kv_weights_are_the_mean_of_all_heads(tmp_path):
    src = fixture("stories260K-hf")
    convert(str(src), "--attn", "MQA", "--out", str(tmp_path / "mqa"))
    want, got = tensors(src), tensors(tmp_path / "mqa")
    head_dim = 8
    names = kv_names(want)
    assert len(names) == 10  # 5 layers, k and v
    for k in names:
        heads = [want[k][h * head_dim:(h + 1) * head_dim] for h in range(4)]
        mean = (heads[0].double() + heads[1].double() + heads[2].double() + heads[3].double()) / 4
        assert got[k].shape == (head_dim, 64)
        torch.testing.assert_close(got[k].double(), mean, rtol=0, atol=1e-7)
    for k in set(want) - set(names):
        assert torch.equal(got[k], want[k]), k


def test_gqa_biases_are_pooled_per_contiguous_group(tmp_path):
    make_hf_checkpoint(tmp_path / "src", num_key_value_heads=8, attention_bias=True)
    convert(str(tmp_path / "src"), "--groups", "2", "--out", str(tmp_path / "g2"))
    want, got = tensors(tmp_path / "src"), tensors(tmp_path / "g2")
    b = want["model.layers.1.self_attn.v_proj.bias"].view(8, 8)  # 8 heads of head_dim 8
    torch.testing.assert_close(got["model.layers.1.self_attn.v_proj.bias"].view(2, 8),
                               torch.stack([b[0:4].mean(0), b[4:8].mean(0)]), rtol=0, atol=1e-7)


CASES = [
    ("random-mha-bias", dict(num_key_value_heads=8, attention_bias=True), ["--groups", "4"]),
    ("random-mha-bias", dict(num_key_value_heads=8, attention_bias=True), ["--groups", "2"]),
    ("random-mha", dict(num_key_value_heads=8), ["--attn", "MQA"]),
    ("random-gqa-tied", dict(num_key_value_heads=4, tie_word_embeddings=True), ["--groups", "2"]),
    ("random-gqa-up", dict(num_key_value_heads=2), ["--attn", "MHA"]),
    ("stories", None, ["--groups", "2"]),
    ("stories", None, ["--attn", "MQA"]),
]


def _on_the_fly(flags: list[str]) -> dict:
    attn = flags[flags.index("--attn") + 1] if "--attn" in flags else "GQA"
    groups = int(flags[flags.index("--groups") + 1]) if "--groups" in flags else None
    return dict(attn=attn, groups=groups)


@pytest.mark.parametrize("name,overrides,flags", CASES, ids=[f"{c[0]}{''.join(c[2])}" for c in CASES])
def test_converted_checkpoint_loads_in_transformers_with_on_the_fly_logits(tmp_path, name, overrides, flags):
    """What convert writes, run by transformers, equals xllama's --attn/--groups applied to the source."""
    from transformers import LlamaForCausalLM

    if overrides is None:
        src = fixture("stories260K-hf")
    else:
        src = tmp_path / "src"
        make_hf_checkpoint(src, **overrides)
    convert(str(src), *flags, "--out", str(tmp_path / "out"))
    hf = LlamaForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    ours = load_model(src, device="cpu", dtype="float32", **_on_the_fly(flags))
    assert hf.config.num_key_value_heads == ours.config.n_kv_heads
    vocab = hf.config.vocab_size
    tokens = torch.randint(0, vocab, (2, 40), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        diff = (hf(tokens).logits - ours(tokens)).abs().max().item()
    assert diff < 1e-4


def test_meta_to_hf_round_trip_gives_the_same_greedy_tokens(tmp_path):
    from transformers import LlamaForCausalLM

    meta = fixture("stories260K-meta-mp2")
    convert(str(meta), "--out", str(tmp_path / "hf"))
    prompt = load_tokenizer(meta).encode("Once upon a time")
    want = generate_tokens(load_model(meta, device="cpu"), [prompt], 80).tokens[0]
    got = generate_tokens(load_model(tmp_path / "hf", device="cpu"), [prompt], 80).tokens[0]
    assert got == want
    # and transformers, reading what convert wrote, tells the fixture's known story
    hf = LlamaForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    out = hf.generate(torch.tensor([prompt]), max_new_tokens=60, do_sample=False)[0, len(prompt):].tolist()
    assert out == want[:60]
    assert load_tokenizer(tmp_path / "hf").decode(prompt + out).startswith(STORY)


@pytest.mark.parametrize("layout", ["stories260K-meta", "stories260K-meta-mp2"])
def test_meta_to_hf_gives_the_hf_fixtures_tensors(tmp_path, layout):
    """The fixture's HF folder holds the same weights: the q/k row permutation and the MP merge are exact."""
    convert(str(fixture(layout)), "--out", str(tmp_path / "hf"))
    want, got = tensors(fixture("stories260K-hf")), tensors(tmp_path / "hf")
    for k in want:
        assert torch.equal(got[k], want[k]), k


# ---- methods ----
def test_method_first_keeps_exactly_the_first_head_of_each_group(tmp_path):
    make_hf_checkpoint(tmp_path / "src", num_key_value_heads=8)
    convert(str(tmp_path / "src"), "--groups", "2", "--method", "first", "--out", str(tmp_path / "out"))
    want, got = tensors(tmp_path / "src"), tensors(tmp_path / "out")
    for k in kv_names(want):
        heads = want[k].view(8, 8, 64)
        assert torch.equal(got[k].view(2, 8, 64), torch.stack([heads[0], heads[4]])), k
    record = json.loads((tmp_path / "out" / "xllama_convert.json").read_text())
    assert record["method"] == "first"


def test_method_random_has_the_source_scale_and_follows_the_seed(tmp_path):
    make_hf_checkpoint(tmp_path / "src", num_key_value_heads=8)
    for name, seed in (("a", "7"), ("b", "7"), ("c", "8")):
        convert(str(tmp_path / "src"), "--groups", "2", "--method", "random", "--seed", seed, "--out", str(tmp_path / name))
    src, a, b, c = (tensors(tmp_path / n) for n in ("src", "a", "b", "c"))
    for k in kv_names(src):
        assert torch.equal(a[k], b[k]) and not torch.equal(a[k], c[k]), k
        ratio = a[k].std().item() / src[k].std().item()
        assert 0.8 < ratio < 1.2, (k, ratio)  # 1024 draws per tensor: the std is within a few percent
        for h in range(8):  # nothing copied from the source's heads
            assert not torch.allclose(a[k].view(2, 8, 64)[0], src[k].view(8, 8, 64)[h])
    record = json.loads((tmp_path / "a" / "xllama_convert.json").read_text())
    assert record["method"] == "random" and record["seed"] == 7


# ---- formats, shards, dtype ----
def test_bfloat16_dtype_stores_cast_tensors_and_says_so_in_config(tmp_path):
    src = fixture("stories260K-hf")
    convert(str(src), "--groups", "2", "--dtype", "bfloat16", "--out", str(tmp_path / "bf16"))
    convert(str(src), "--groups", "2", "--out", str(tmp_path / "fp32"))
    fp32, bf16 = tensors(tmp_path / "fp32"), tensors(tmp_path / "bf16")
    for k in fp32:  # pooled in float32, rounded once
        assert bf16[k].dtype == torch.bfloat16 and torch.equal(bf16[k], fp32[k].to(torch.bfloat16)), k
    cfg = json.loads((tmp_path / "bf16" / "config.json").read_text())
    assert cfg["torch_dtype"] == "bfloat16" and cfg["num_key_value_heads"] == 2


def test_bfloat16_source_is_pooled_in_float32_and_stays_bfloat16(tmp_path):
    hf = make_hf_checkpoint(tmp_path / "fp32", num_key_value_heads=8)
    hf.to(torch.bfloat16).save_pretrained(tmp_path / "bf16src")
    convert(str(tmp_path / "bf16src"), "--attn", "MQA", "--out", str(tmp_path / "out"))
    src, got = tensors(tmp_path / "bf16src"), tensors(tmp_path / "out")
    for k in kv_names(src):
        want = src[k].float().view(8, 8, 64).mean(0).to(torch.bfloat16)
        assert got[k].dtype == torch.bfloat16 and torch.equal(got[k], want), k


def test_sharded_source_resharded_keeps_every_tensor(tmp_path):
    hf = make_hf_checkpoint(tmp_path / "one", num_key_value_heads=4)
    hf.save_pretrained(tmp_path / "many", max_shard_size="60KB")
    assert len(list((tmp_path / "many").glob("*.safetensors"))) > 3
    convert(str(tmp_path / "many"), "--shard-size", "100KB", "--out", str(tmp_path / "re"))
    shards = sorted((tmp_path / "re").glob("*.safetensors"))
    n = len(shards)
    assert n > 2 and [s.name for s in shards] == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    for s in shards:  # every shard within the limit (no tensor here is bigger than it)
        assert s.stat().st_size <= 100_000 + 1000  # tensor bytes <= limit; the JSON header is extra
    index = json.loads((tmp_path / "re" / "model.safetensors.index.json").read_text())
    want, got = tensors(tmp_path / "one"), tensors(tmp_path / "re")
    assert set(index["weight_map"]) == set(want) == set(got)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in want.values())
    for k, f in index["weight_map"].items():
        assert k in load_file(tmp_path / "re" / f)
        assert torch.equal(got[k], want[k]), k


def test_one_shard_means_no_index(tmp_path):
    convert(str(fixture("stories260K-hf")), "--out", str(tmp_path / "out"))
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "config.json", "model.safetensors", "tokenizer.model", "xllama_convert.json"]


def test_pytorch_bin_source_becomes_safetensors(tmp_path):
    hf = make_hf_checkpoint(tmp_path / "st", num_key_value_heads=4)
    (tmp_path / "bin").mkdir()
    torch.save(hf.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    shutil.copy(tmp_path / "st" / "config.json", tmp_path / "bin")
    convert(str(tmp_path / "bin"), "--out", str(tmp_path / "out"))
    want, got = tensors(tmp_path / "st"), tensors(tmp_path / "out")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


# ---- what travels with the weights ----
def test_config_keeps_every_key_but_the_kv_head_count(tmp_path):
    make_hf_checkpoint(tmp_path / "src", num_key_value_heads=8)
    cfg = json.loads((tmp_path / "src" / "config.json").read_text())
    cfg["my_own_key"] = {"kept": True}
    (tmp_path / "src" / "config.json").write_text(json.dumps(cfg))
    convert(str(tmp_path / "src"), "--groups", "4", "--out", str(tmp_path / "out"))
    got = json.loads((tmp_path / "out" / "config.json").read_text())
    assert got == {**cfg, "num_key_value_heads": 4}


def test_record_holds_source_groups_version_and_sha256_of_every_file(tmp_path):
    import xllama_cli

    src = fixture("stories260K-hf")
    convert(str(src), "--groups", "2", "--shard-size", "300KB", "--out", str(tmp_path / "out"))
    record = json.loads((tmp_path / "out" / "xllama_convert.json").read_text())
    assert record["source"] == str(src.resolve()) and record["source_format"] == "hf"
    assert (record["kv_heads_before"], record["kv_heads_after"], record["method"]) == (4, 2, "mean")
    assert record["xllama_version"] == xllama_cli.__version__
    files = {p.name for p in (tmp_path / "out").iterdir()} - {"xllama_convert.json"}
    assert set(record["sha256"]) == files and "model.safetensors.index.json" in files
    for name, sha in record["sha256"].items():
        assert hashlib.sha256((tmp_path / "out" / name).read_bytes()).hexdigest() == sha, name


def test_hf_tokenizer_files_are_copied(tmp_path):
    make_hf_checkpoint(tmp_path / "src", tokenizer=True)
    extra = {"tokenizer_config.json": '{"add_bos_token": true}', "special_tokens_map.json": "{}",
             "generation_config.json": '{"do_sample": false}'}
    for name, text in extra.items():
        (tmp_path / "src" / name).write_text(text)
    convert(str(tmp_path / "src"), "--out", str(tmp_path / "out"))
    for name in ["tokenizer.model", *extra]:
        assert (tmp_path / "out" / name).read_bytes() == (tmp_path / "src" / name).read_bytes(), name


def test_meta_tokenizer_in_the_parent_folder_is_copied(tmp_path):
    """Meta's downloads keep tokenizer.model beside the model folders, not in them."""
    meta = tmp_path / "llama" / "7b"
    meta.mkdir(parents=True)
    for f in ("params.json", "consolidated.00.pth"):
        shutil.copy(fixture("stories260K-meta") / f, meta)
    shutil.copy(fixture("stories260K-meta") / "tokenizer.model", tmp_path / "llama")
    convert(str(meta), "--out", str(tmp_path / "hf"))
    assert (tmp_path / "hf" / "tokenizer.model").read_bytes() == (tmp_path / "llama" / "tokenizer.model").read_bytes()


# ---- --eval ----
def test_convert_eval_prints_source_and_result_perplexity(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text(STORY + " " + STORY.replace("Lily", "Tom"))
    r = convert(str(fixture("stories260K-hf")), "--attn", "MQA", "--out", str(tmp_path / "mqa"), "--eval", str(text),
                "--device", "cpu")
    src = runner.invoke(app, ["eval", "--model", str(fixture("stories260K-hf")), "--text", str(text), "--json"])
    dst = runner.invoke(app, ["eval", "--model", str(tmp_path / "mqa"), "--text", str(text), "--json"])
    want = [json.loads(src.stdout)["perplexity"], json.loads(dst.stdout)["perplexity"]]
    assert want[0] != want[1]
    rows = [line for line in r.stdout.splitlines() if line.startswith(("│ source", "│ result", "| source", "| result"))
            or line.lstrip("│| ").startswith(("source", "result"))]
    assert len(rows) == 2, r.stdout
    for row, ppl in zip(rows, want):
        assert f"{ppl:.4f}" in row, (row, ppl)


# ---- the library call ----
def test_convert_checkpoint_returns_what_it_wrote(tmp_path):
    res = convert_checkpoint(fixture("stories260K-hf"), tmp_path / "out", groups=2, progress=False)
    assert (res.kv_heads_before, res.kv_heads_after, res.method, res.shards) == (4, 2, "mean", ["model.safetensors"])
    assert res.out == tmp_path / "out" and set(res.files) == {"model.safetensors", "config.json", "tokenizer.model"}
