"""Meta's Llama 3 layout: params.json read as each release means it, the conversion to HF that
Meta's own conversion gives, and one tiny random Llama 3-style checkpoint (the fixture's
tokenizer.json, llama3 RoPE, tied head) run end to end -- generate, chat, eval, convert -- in
the Hugging Face layout and in Meta's, which must give the same tokens.

The reference for the conversion is transformers' convert_llama_weights_to_hf.py (`write_model`,
--llama_version). transformers 5 no longer ships the conversion scripts in its wheel, so it cannot
run here: the expected config.json is written out from that script's rules (its
CONTEXT_LENGTH_FOR_VERSION, compute_intermediate_size, rope_scaling and special ids per version,
tie_word_embeddings for 3.2) and its q/k `permute`, and transformers' LlamaForCausalLM loading the
result is the reference for the logits."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from conftest import fixture, make_hf_checkpoint, meta_tiktoken_file
from xllama_cli import XllamaError, load_model, load_tokenizer
from xllama_cli.checkpoint import open_checkpoint
from xllama_cli.cli import app
from xllama_cli.config import ModelConfig
from xllama_cli.generation import generate_tokens

runner = CliRunner()
LLAMA3_TOKENIZER = "tokenizers/llama3.1"
BOS, END_OF_TEXT, EOM, EOT = 128000, 128001, 128008, 128009


def llama3_rope(factor: float) -> dict:
    """Llama 3.1's (factor 8) or 3.2's (factor 32) rope_scaling, as their HF config.json has it."""
    return {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192}


# ---- params.json, release by release ----
# params.json as Meta ships it (llama-models' sku_list), with the weights' vocabulary and FFN rows,
# and what the HF config.json of the same model says (context, RoPE base and scaling, tied head,
# BOS/EOS of the base model).
RELEASES = {
    "llama3-8b": (dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, vocab_size=128256, multiple_of=1024,
                       ffn_dim_multiplier=1.3, norm_eps=1e-5, rope_theta=500000.0), 128256, 14336,
                  dict(max_seq_len=8192, rope_theta=500000.0, rope_scaling=None, tie_embeddings=False,
                       bos_id=BOS, eos_id=[END_OF_TEXT])),
    "llama3.1-8b": (dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, vocab_size=128256, multiple_of=1024,
                         ffn_dim_multiplier=1.3, norm_eps=1e-5, rope_theta=500000.0, use_scaled_rope=True),
                    128256, 14336,
                    dict(max_seq_len=131072, rope_theta=500000.0, rope_scaling=llama3_rope(8.0),
                         tie_embeddings=False, bos_id=BOS, eos_id=[END_OF_TEXT])),
    "llama3.1-405b": (dict(dim=16384, n_layers=126, n_heads=128, n_kv_heads=8, vocab_size=128256, multiple_of=4096,
                           ffn_dim_multiplier=1.2, norm_eps=1e-5, rope_theta=500000.0, use_scaled_rope=True),
                      128256, 53248, dict(max_seq_len=131072, rope_scaling=llama3_rope(8.0), tie_embeddings=False)),
    "llama3.3-70b": (dict(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, vocab_size=128256, multiple_of=4096,
                          ffn_dim_multiplier=1.3, norm_eps=1e-5, rope_theta=500000.0, use_scaled_rope=True),
                     128256, 28672, dict(max_seq_len=131072, rope_scaling=llama3_rope(8.0), tie_embeddings=False)),
    "llama3.2-1b": (dict(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, vocab_size=128256, multiple_of=256,
                         ffn_dim_multiplier=1.5, norm_eps=1e-5, rope_theta=500000.0, use_scaled_rope=True),
                    128256, 8192,
                    dict(max_seq_len=131072, rope_theta=500000.0, rope_scaling=llama3_rope(32.0),
                         tie_embeddings=True, bos_id=BOS, eos_id=[END_OF_TEXT], head_dim=64)),
    "llama3.2-3b": (dict(dim=3072, n_layers=28, n_heads=24, n_kv_heads=8, vocab_size=128256, multiple_of=256,
                         ffn_dim_multiplier=1.0, norm_eps=1e-5, rope_theta=500000.0, use_scaled_rope=True),
                    128256, 8192, dict(max_seq_len=131072, rope_scaling=llama3_rope(32.0), tie_embeddings=True,
                                       head_dim=128)),
    # Meta's llama3 ModelArgs: rope_theta 500000 when params.json has none
    "llama3.1-no-theta": (dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, vocab_size=128256, multiple_of=1024,
                               ffn_dim_multiplier=1.3, norm_eps=1e-5, use_scaled_rope=True), 128256, 14336,
                          dict(rope_theta=500000.0, rope_scaling=llama3_rope(8.0))),
    # Meta's own names for the scaling (llama-models' later ModelArgs) and an explicit context win
    "explicit-scaling": (dict(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, vocab_size=128256, multiple_of=256,
                              ffn_dim_multiplier=1.5, norm_eps=1e-5, rope_theta=500000.0, use_scaled_rope=True,
                              rope_scaling_factor=16, rope_high_freq_factor=2.0, max_seq_len=65536),
                         128256, 8192,
                         dict(max_seq_len=65536, rope_scaling={**llama3_rope(16.0), "high_freq_factor": 2.0})),
    # 3.2's sizes without use_scaled_rope: plain Llama 3
    "llama3.2-dims-unscaled": (dict(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, vocab_size=128256,
                                    multiple_of=256, ffn_dim_multiplier=1.5, norm_eps=1e-5, rope_theta=500000.0,
                                    use_scaled_rope=False), 128256, 8192,
                               dict(max_seq_len=8192, rope_scaling=None, tie_embeddings=False)),
    "llama2-7b": (dict(dim=4096, multiple_of=256, n_heads=32, n_layers=32, norm_eps=1e-5, vocab_size=-1), 32000, 11008,
                  dict(max_seq_len=4096, rope_theta=10000.0, rope_scaling=None, bos_id=1, eos_id=[2], n_kv_heads=32)),
    "llama2-70b": (dict(dim=8192, multiple_of=4096, ffn_dim_multiplier=1.3, n_heads=64, n_kv_heads=8, n_layers=80,
                        norm_eps=1e-5, vocab_size=-1), 32000, 28672, dict(max_seq_len=4096, n_kv_heads=8)),
    "llama1-7b": (dict(dim=4096, multiple_of=256, n_heads=32, n_layers=32, norm_eps=1e-6, vocab_size=-1), 32000, 11008,
                  dict(max_seq_len=2048, rope_theta=10000.0, bos_id=1, eos_id=[2])),
    "codellama-7b": (dict(dim=4096, n_layers=32, n_heads=32, multiple_of=256, ffn_dim_multiplier=1.0, norm_eps=1e-5,
                          rope_theta=1000000, vocab_size=32016), 32016, 11008,
                     dict(max_seq_len=16384, rope_theta=1000000.0, rope_scaling=None)),
}


@pytest.mark.parametrize("name", list(RELEASES))
def test_params_json_of_each_release_gives_its_hf_config(name):
    params, vocab, hidden, want = RELEASES[name]
    cfg = ModelConfig.from_meta(params, vocab_size=vocab, hidden_dim=hidden)
    got = cfg.values()
    assert {k: got[k] for k in want} == want
    assert (cfg.vocab_size, cfg.hidden_dim, cfg.dim, cfg.n_layers) == (vocab, hidden, params["dim"], params["n_layers"])
    hf = cfg.to_hf()
    assert hf["max_position_embeddings"] == cfg.max_seq_len and hf["rope_scaling"] == cfg.rope_scaling


@pytest.mark.parametrize("change,needles", [
    (dict(vocab_size=128000), ["vocab_size 128000 must equal the rows of tok_embeddings.weight, 128256"]),
    (dict(multiple_of=3000), ["multiple_of 3000", "ffn_dim_multiplier 1.5", "feed-forward size of 9000",
                             "feed_forward.w1.weight has 8192 rows"]),
    (dict(ffn_dim_multiplier=1.3), ["ffn_dim_multiplier 1.3", "size of 7168"]),
    (dict(rope_high_freq_factor=1.0), ["rope_high_freq_factor must be null or a finite number > 1", "got 1.0"]),
    (dict(rope_scaling_factor=0), ["rope_scaling_factor must be null or a finite number > 0", "got 0"]),
    (dict(use_scaled_rope="yes"), ["use_scaled_rope must be true or false", 'got "yes"']),
    (dict(quantization_args={"group_size": 256}),
     ['quantization_args {"group_size": 256} marks a quantized checkpoint', "not supported"]),
    (dict(vision_chunk_size=560), ["vision_chunk_size 560 marks a Llama 3.2 Vision checkpoint"]),
    (dict(moe_args={"num_experts": 16}), ['moe_args {"num_experts": 16} marks a Llama 4']),
])
def test_params_json_that_disagrees_with_the_weights_or_cannot_run_is_one_error(change, needles):
    params, vocab, hidden, _ = RELEASES["llama3.2-1b"]
    with pytest.raises(XllamaError) as e:
        ModelConfig.from_meta({**params, **change}, vocab_size=vocab, hidden_dim=hidden)
    message = str(e.value)
    assert message.startswith("params.json: ") and "\n" not in message
    for n in needles:
        assert n in message, message


# ---- writing a checkpoint in Meta's layout ----
META_LAYER = {"self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk",
              "self_attn.v_proj": "attention.wv", "self_attn.o_proj": "attention.wo",
              "mlp.gate_proj": "feed_forward.w1", "mlp.down_proj": "feed_forward.w2", "mlp.up_proj": "feed_forward.w3",
              "input_layernorm": "attention_norm", "post_attention_layernorm": "ffn_norm"}
# model-parallel split of each Meta tensor in Llama 3 (llama-models: Column/RowParallelLinear,
# VocabParallelEmbedding); norms are copies
SPLIT = {"wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "output": 0, "tok_embeddings": 0, "wo": 1, "w2": 1}


def to_interleaved(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """HF's half-split q/k rows -> Meta's interleaved pairs: the inverse of the conversion script's
    permute, w.view(n, hd // 2, 2, dim).transpose(1, 2).reshape(n * hd, dim)."""
    rows, dim = w.shape
    return w.view(n_heads, 2, rows // n_heads // 2, dim).transpose(1, 2).reshape(rows, dim)


def meta_state(hf_state: dict[str, torch.Tensor], n_heads: int, n_kv: int, head: str = "shared"
               ) -> dict[str, torch.Tensor]:
    """An HF Llama state dict under Meta's names and RoPE row order. head: "shared" (output.weight
    is the embedding's own tensor, as Llama 3.2's files hold it), "copy" (equal values, its own
    storage), "absent" (no output.weight) or "own" (the HF lm_head)."""
    out = {}
    for name, t in hf_state.items():
        if name == "model.embed_tokens.weight":
            out["tok_embeddings.weight"] = t
        elif name == "model.norm.weight":
            out["norm.weight"] = t
        elif name.startswith("model.layers."):
            i, rest = name.removeprefix("model.layers.").split(".", 1)
            module = rest.removesuffix(".weight")
            if module == "self_attn.q_proj":
                t = to_interleaved(t, n_heads)
            elif module == "self_attn.k_proj":
                t = to_interleaved(t, n_kv)
            out[f"layers.{i}.{META_LAYER[module]}.weight"] = t.clone()
    embedding = out["tok_embeddings.weight"]
    if head == "shared":
        out["output.weight"] = embedding
    elif head == "copy":
        out["output.weight"] = embedding.clone()
    elif head == "own":
        out["output.weight"] = hf_state["lm_head.weight"].clone()
    return out


def write_meta(folder: Path, state: dict[str, torch.Tensor], params: dict, shards: int = 1) -> Path:
    """consolidated.NN.pth (split over `shards` as Llama 3's model-parallel files are) and
    params.json."""
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(shards):
        part = {}
        for name, t in state.items():
            split = SPLIT.get(name.split(".")[-2])
            part[name] = t if split is None or shards == 1 else t.chunk(shards, dim=split)[k].clone()
        torch.save(part, folder / f"consolidated.{k:02d}.pth")
    (folder / "params.json").write_text(json.dumps(params))
    return folder


# ---- the tiny Llama 3-style checkpoint ----
DIM, LAYERS, HEADS, KV_HEADS, MULTIPLE_OF, FFN_MULTIPLIER = 32, 2, 4, 2, 32, 1.5


def script_intermediate_size(n: int, ffn_dim_multiplier: float, multiple_of: int) -> int:
    """transformers' convert_llama_weights_to_hf.compute_intermediate_size."""
    return multiple_of * ((int(ffn_dim_multiplier * int(8 * n / 3)) + multiple_of - 1) // multiple_of)


PARAMS = dict(dim=DIM, n_layers=LAYERS, n_heads=HEADS, n_kv_heads=KV_HEADS, vocab_size=128256,
              multiple_of=MULTIPLE_OF, ffn_dim_multiplier=FFN_MULTIPLIER, norm_eps=1e-5, rope_theta=500000.0,
              use_scaled_rope=True)
# What convert_llama_weights_to_hf.write_model(..., llama_version="3.2") puts in config.json for
# PARAMS (base model): the keys that define the model.
SCRIPT_CONFIG = dict(hidden_size=DIM, num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
                     intermediate_size=script_intermediate_size(DIM, FFN_MULTIPLIER, MULTIPLE_OF), vocab_size=128256,
                     rms_norm_eps=1e-5, rope_theta=500000.0, max_position_embeddings=131072,
                     rope_scaling=llama3_rope(32.0), bos_token_id=BOS, eos_token_id=END_OF_TEXT,
                     tie_word_embeddings=True, hidden_act="silu")

# The answer the weights are made to give in a chat: after the assistant header's "\n\n" come
# " Hello", " world", "!" and <|eot_id|>; past <|eot_id|> they would go on with " again" forever,
# so an answer that does not stop there shows it. Each token's embedding holds a vector in two
# coordinates that no layer writes and only the final norm reads: (length, angle in degrees),
# each next in the chain longer and 50 degrees on, so that the last token alone picks the next.
CHAIN_TEXT = ["\n\n", " Hello", " world", "!", "<|eot_id|>", " again"]
CHAIN_VECTORS = [(0.3, -50), (1, 0), (2, 50), (4, 100), (8, 150), (16, 200)]


def chain_ids(tok) -> list[int]:
    ids = [tok.token_id(t) if t.startswith("<|") else tok.encode(t, bos=False) for t in CHAIN_TEXT]
    ids = [i[0] if isinstance(i, list) and len(i) == 1 else i for i in ids]
    assert all(isinstance(i, int) for i in ids), ids
    return ids


def make_llama3_hf(folder: Path):
    """A tiny random Llama 3.2-style HF checkpoint: the fixture's tokenizer.json and
    tokenizer_config.json (its chat template), llama3 RoPE (factor 32), tied head, and the chain."""
    tok = load_tokenizer(fixture(LLAMA3_TOKENIZER))
    model = make_hf_checkpoint(
        folder, seed=3, hidden_size=DIM, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS, intermediate_size=SCRIPT_CONFIG["intermediate_size"], vocab_size=128256,
        max_position_embeddings=131072, rms_norm_eps=1e-5, tie_word_embeddings=True,
        rope_parameters={**llama3_rope(32.0), "rope_theta": 500000.0},
        bos_token_id=BOS, eos_token_id=[END_OF_TEXT, EOM, EOT])
    with torch.no_grad():
        plane = [DIM - 2, DIM - 1]
        embedding = model.model.embed_tokens.weight
        embedding[:, plane] = 0
        for i, (length, degrees) in zip(chain_ids(tok), CHAIN_VECTORS):
            a = math.radians(degrees)
            embedding[i, plane] = 10 * length * torch.tensor([math.cos(a), math.sin(a)])
        for layer in model.model.layers:  # nothing writes the two coordinates
            layer.self_attn.o_proj.weight[plane] = 0
            layer.mlp.down_proj.weight[plane] = 0
    model.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(fixture(LLAMA3_TOKENIZER) / name, folder)
    return model, tok


@pytest.fixture(scope="module")
def llama3(tmp_path_factory):
    """(HF folder, Meta folder, transformers model, tokenizer, chat template file): the same
    weights in both layouts; the Meta one with a tiktoken tokenizer.model made from the fixture's
    tokenizer.json, as Meta's original/ folder holds it."""
    pytest.importorskip("tiktoken")
    root = tmp_path_factory.mktemp("llama3")
    hf, tok = make_llama3_hf(root / "hf")
    state = {k: v.detach().clone() for k, v in hf.state_dict().items()}
    meta = write_meta(root / "original", meta_state(state, HEADS, KV_HEADS), PARAMS)
    meta_tiktoken_file(fixture(LLAMA3_TOKENIZER) / "tokenizer.json", meta / "tokenizer.model")
    template = root / "llama3.jinja"
    template.write_text(json.loads((fixture(LLAMA3_TOKENIZER) / "tokenizer_config.json").read_text())["chat_template"])
    return root / "hf", meta, hf, tok, template


def test_the_meta_folder_reads_as_llama_3_2_with_metas_tokenizer(llama3):
    hf_dir, meta, _, _, _ = llama3
    ckpt = open_checkpoint(meta)
    assert ckpt.format == "meta"
    assert ckpt.config == open_checkpoint(hf_dir).config.replace(eos_id=[END_OF_TEXT])
    cfg = ckpt.config
    assert (cfg.max_seq_len, cfg.rope_theta, cfg.rope_scaling, cfg.tie_embeddings) == (
        131072, 500000.0, llama3_rope(32.0), True)
    assert (cfg.bos_id, cfg.eos_id, cfg.hidden_dim) == (BOS, [END_OF_TEXT], SCRIPT_CONFIG["intermediate_size"])
    tok = load_tokenizer(meta)
    assert tok.kind == "tiktoken" and tok.bos_id == BOS and tok.eos_ids == [END_OF_TEXT, EOM, EOT]
    assert load_tokenizer(hf_dir).eos_ids[0] == EOT  # tokenizer_config.json's eos_token, then config.json's


def test_the_weights_answer_with_the_chain_and_would_go_past_eot(llama3):
    """The model itself (transformers, no stop token) after the chat prompt: " Hello world!",
    <|eot_id|>, then " again" on and on."""
    hf_dir, _, hf, tok, _ = llama3
    prompt = tok.encode_chat([("<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
                               "<|start_header_id|>assistant<|end_header_id|>\n\n", False)])
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False, eos_token_id=None,
                          pad_token_id=0)[0, len(prompt):].tolist()
    _, hello, world, bang, eot, again = chain_ids(tok)
    assert out == [hello, world, bang, eot, again, again]


def test_generate_gives_the_same_tokens_in_both_layouts_and_in_transformers(llama3):
    hf_dir, meta, hf, tok, _ = llama3
    prompt = "The llama is a domesticated South American camelid"
    args = ["generate", "--temperature", "0", "-n", "16", "--quiet", prompt]
    a = runner.invoke(app, [*args, "--model", str(hf_dir)])
    b = runner.invoke(app, [*args, "--model", str(meta)])
    assert a.exit_code == b.exit_code == 0, a.output + b.output
    assert a.stdout == b.stdout and a.stdout.startswith(prompt) and len(a.stdout) > len(prompt) + 8
    ids = tok.encode(prompt)
    assert ids[0] == BOS
    with torch.no_grad():
        want = hf.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False, eos_token_id=None,
                           pad_token_id=0)[0, len(ids):].tolist()
    for folder in (hf_dir, meta):
        got = generate_tokens(load_model(folder, device="cpu", dtype="float32"), [ids], 16).tokens[0]
        assert got == want, folder.name


def test_both_layouts_give_transformers_logits(llama3):
    hf_dir, meta, hf, _, _ = llama3
    tokens = torch.randint(0, 128256, (2, 40), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want = hf(tokens).logits
        for folder in (hf_dir, meta):
            got = load_model(folder, device="cpu", dtype="float32")(tokens)
            assert (got - want).abs().max().item() < 1e-4, folder.name


@pytest.mark.parametrize("layout", ["hf", "meta"])
def test_chat_answer_stops_at_eot(llama3, layout):
    hf_dir, meta, _, _, template = llama3
    # the HF folder's own template (tokenizer_config.json); Meta's folder has none: the same file
    args = (["--model", str(hf_dir)] if layout == "hf"
            else ["--model", str(meta), "--template", str(template)])
    r = runner.invoke(app, ["chat", *args, "--temperature", "0", "-n", "12"], input="Hi\nHi again\n")
    assert r.exit_code == 0, r.output
    assert r.stdout == "Hello world!\n\nHello world!\n"


def test_eval_gives_transformers_perplexity_in_both_layouts(llama3, tmp_path):
    from transformers import AutoTokenizer

    hf_dir, meta, hf, _, _ = llama3
    text = "Llamas live in herds. 🦙 They hum, and they spit when annoyed!\n\tNo more."
    path = tmp_path / "text.txt"
    path.write_text(text)
    ids = AutoTokenizer.from_pretrained(str(hf_dir)).encode(text)  # BOS first
    with torch.no_grad():
        want = math.exp(hf(torch.tensor([ids]), labels=torch.tensor([ids])).loss.item())
    for folder in (hf_dir, meta):
        r = runner.invoke(app, ["eval", "--model", str(folder), "--text", str(path), "--context", "64", "--json"])
        assert r.exit_code == 0, r.output
        got = json.loads(r.stdout)
        assert got["tokens_scored"] == len(ids) - 1
        assert abs(got["perplexity"] - want) / want < 1e-4, (folder.name, got["perplexity"], want)


def test_convert_from_metas_layout_writes_what_metas_conversion_writes(llama3, tmp_path):
    from safetensors.torch import load_file
    from transformers import LlamaForCausalLM

    hf_dir, meta, hf, _, _ = llama3
    r = runner.invoke(app, ["convert", str(meta), "--out", str(tmp_path / "out")])
    assert r.exit_code == 0, r.output
    out = tmp_path / "out"
    config = json.loads((out / "config.json").read_text())
    assert {k: config.get(k) for k in SCRIPT_CONFIG} == SCRIPT_CONFIG
    # the tensors: the script's permute of q/k, everything else as it is; the tied head not written
    tensors = load_file(out / "model.safetensors")
    original = hf.state_dict()
    assert set(tensors) == set(original) - {"lm_head.weight"}
    for name, t in tensors.items():
        assert torch.equal(t, original[name]), name
    assert (out / "tokenizer.model").read_bytes() == (meta / "tokenizer.model").read_bytes()
    # transformers loads it and computes what the model it came from computes
    tokens = torch.randint(0, 128256, (1, 24), generator=torch.Generator().manual_seed(6))
    loaded = LlamaForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        assert torch.equal(loaded(tokens).logits, hf(tokens).logits)
    # and xllama runs the result as it runs both sources
    args = ["generate", "--temperature", "0", "-n", "10", "--quiet", "A llama"]
    outputs = {runner.invoke(app, [*args, "--model", str(folder)]).stdout for folder in (hf_dir, meta, out)}
    assert len(outputs) == 1 and outputs.pop().startswith("A llama")


def test_convert_of_the_hf_layout_keeps_its_tokenizer_and_config(llama3, tmp_path):
    hf_dir, _, _, _, _ = llama3
    r = runner.invoke(app, ["convert", str(hf_dir), "--groups", "1", "--out", str(tmp_path / "mqa")])
    assert r.exit_code == 0, r.output
    config = json.loads((tmp_path / "mqa" / "config.json").read_text())
    assert config["num_key_value_heads"] == 1 and config["tie_word_embeddings"] is True
    assert config["rope_parameters"]["factor"] == 32.0
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "mqa" / name).read_bytes() == (hf_dir / name).read_bytes()
    r = runner.invoke(app, ["chat", "--model", str(tmp_path / "mqa"), "--temperature", "0", "-n", "3"], input="Hi\n")
    assert r.exit_code == 0 and "the checkpoint's own" in r.stderr, r.output


# ---- Meta's files as each release lays them out ----
SMALL = dict(dim=DIM, n_layers=LAYERS, n_heads=HEADS, n_kv_heads=KV_HEADS, vocab_size=256, multiple_of=MULTIPLE_OF,
             ffn_dim_multiplier=FFN_MULTIPLIER, norm_eps=1e-5, rope_theta=500000.0, use_scaled_rope=True)


@pytest.fixture(scope="module")
def small_state(tmp_path_factory):
    path = tmp_path_factory.mktemp("small")
    model = make_hf_checkpoint(path, seed=4, hidden_size=DIM, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                               num_key_value_heads=KV_HEADS, vocab_size=256,
                               intermediate_size=SCRIPT_CONFIG["intermediate_size"], tie_word_embeddings=False)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("head,params,tied", [
    ("shared", SMALL, True),  # Llama 3.2's files: output.weight is the embedding's own storage
    ("copy", SMALL, True),  # the same values stored twice
    ("absent", SMALL, True),
    ("own", SMALL, False),  # a head of its own: kept, whatever the release
    ("copy", {**SMALL, "dim": DIM, "use_scaled_rope": False}, False),  # no release that ties: not compared
])
def test_a_meta_head_is_tied_when_the_weights_say_so(tmp_path, small_state, head, params, tied):
    folder = write_meta(tmp_path / "m", meta_state(small_state, HEADS, KV_HEADS, head=head), params)
    assert open_checkpoint(folder).config.tie_embeddings is tied
    model = load_model(folder, device="cpu", pack=False)
    head_weight = small_state["lm_head.weight" if head == "own" else "model.embed_tokens.weight"]
    assert torch.equal(model.lm_head.weight, head_weight)


def test_llama3_model_parallel_shards_split_the_embedding_over_the_vocabulary(tmp_path, small_state):
    state = meta_state(small_state, HEADS, KV_HEADS, head="own")
    one = write_meta(tmp_path / "one", state, SMALL)
    two = write_meta(tmp_path / "two", state, SMALL, shards=2)
    assert torch.load(two / "consolidated.01.pth")["tok_embeddings.weight"].shape == (128, DIM)
    assert open_checkpoint(two).config == open_checkpoint(one).config
    a = load_model(one, device="cpu", pack=False).state_dict()
    b = load_model(two, device="cpu", pack=False).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(a["model.embed_tokens.weight"], small_state["model.embed_tokens.weight"])


def test_metas_tokenizer_in_the_parent_folder_gives_llama3_ids(tmp_path, small_state):
    pytest.importorskip("tiktoken")
    folder = write_meta(tmp_path / "Llama3.2-1B" / "original", meta_state(small_state, HEADS, KV_HEADS), SMALL)
    meta_tiktoken_file(fixture(LLAMA3_TOKENIZER) / "tokenizer.json", folder.parent / "tokenizer.model")
    tok = load_tokenizer(folder)
    assert (tok.bos_id, tok.eos_ids) == (BOS, [END_OF_TEXT, EOM, EOT])
    assert tok.encode("Hi") == [BOS, 13347]


# ---- llama3 RoPE against transformers at Llama 3.1's and 3.2's settings ----
@pytest.mark.parametrize("factor", [8.0, 32.0])
def test_llama3_rope_of_31_and_32_matches_transformers(tmp_path, factor):
    tied = factor == 32.0
    hf = make_hf_checkpoint(tmp_path, seed=int(factor), num_key_value_heads=2, max_position_embeddings=131072,
                            tie_word_embeddings=tied, rope_parameters={**llama3_rope(factor), "rope_theta": 500000.0})
    ours = load_model(tmp_path, device="cpu", dtype="float32")
    assert ours.config.rope_scaling == llama3_rope(factor) and ours.config.rope_theta == 500000.0
    tokens = torch.randint(0, 128, (2, 40), generator=torch.Generator().manual_seed(1))
    plain = load_model(tmp_path, rope="rotary", device="cpu", dtype="float32")
    with torch.no_grad():
        want = hf(tokens).logits
        assert (ours(tokens) - want).abs().max().item() < 1e-4
        assert (plain(tokens) - want).abs().max().item() > 1e-3  # the scaling changes these logits
        greedy = hf.generate(tokens[:1, :7], max_new_tokens=24, min_new_tokens=24, do_sample=False,
                             eos_token_id=None, pad_token_id=0)[0, 7:].tolist()
    assert generate_tokens(ours, [tokens[0, :7].tolist()], 24).tokens[0] == greedy
