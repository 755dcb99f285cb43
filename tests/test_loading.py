"""Checkpoint formats and the Python API."""

from __future__ import annotations

import torch

from conftest import fixture, make_hf_checkpoint
import xllama_cli as x


def test_pytorch_bin_checkpoint_loads_like_safetensors(tmp_path):
    hf = make_hf_checkpoint(tmp_path / "st", num_key_value_heads=2)
    (tmp_path / "bin").mkdir()
    torch.save(hf.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    (tmp_path / "bin" / "config.json").write_text((tmp_path / "st" / "config.json").read_text())
    tokens = torch.randint(0, 128, (1, 12))
    a = x.load_model(tmp_path / "st", device="cpu")(tokens)
    b = x.load_model(tmp_path / "bin", device="cpu")(tokens)
    assert torch.equal(a, b)


def test_sharded_safetensors_load(tmp_path):
    hf = make_hf_checkpoint(tmp_path / "one", num_key_value_heads=4)
    hf.save_pretrained(tmp_path / "many", max_shard_size="60KB")
    assert (tmp_path / "many" / "model.safetensors.index.json").exists()
    tokens = torch.randint(0, 128, (1, 12))
    a = x.load_model(tmp_path / "one", device="cpu")(tokens)
    b = x.load_model(tmp_path / "many", device="cpu")(tokens)
    assert torch.equal(a, b)


def test_load_model_api_returns_logits_and_config():
    m = x.load_model(fixture("stories260K-hf"), device="cpu")
    out = m(torch.tensor([[1, 450, 483]]))
    assert out.shape == (1, 3, 512)
    assert m.config.n_kv_heads == 4 and m.config.n_heads == 8
    assert x.load_model(fixture("stories260K-hf"), attn="MQA", device="cpu").config.n_kv_heads == 1


def test_generate_api_returns_the_new_text():
    m = x.load_model(fixture("stories260K-hf"), device="cpu")
    tok = x.load_tokenizer(fixture("stories260K-hf"))
    (text,) = x.generate(m, tok, ["Once upon a time"], max_new_tokens=8, temperature=0)
    assert text.startswith(", there was a little girl")


def test_bfloat16_load_keeps_dtype_and_runs():
    m = x.load_model(fixture("stories260K-hf"), device="cpu", dtype="bfloat16")
    assert m.lm_head.weight.dtype == torch.bfloat16
    assert m.model.embed_tokens.weight is m.lm_head.weight  # tied
    assert torch.isfinite(m(torch.tensor([[1, 450]]))).all()


def test_meta_mp2_tensors_equal_meta_single_shard():
    one = dict(x.load_model(fixture("stories260K-meta"), device="cpu", pack=False).state_dict())
    two = dict(x.load_model(fixture("stories260K-meta-mp2"), device="cpu", pack=False).state_dict())
    assert one.keys() == two.keys()
    assert all(torch.equal(one[k], two[k]) for k in one)


def _fresh_python(code: str) -> str:
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    return run.stdout.strip().splitlines()[-1]


def test_help_answers_without_importing_torch():
    code = ("import sys\nfrom xllama_cli.cli import main\nsys.argv = ['xllama', '--help']\n"
            "try:\n    main()\nexcept SystemExit:\n    pass\nprint('torch' in sys.modules)")
    assert _fresh_python(code) == "False"


def test_loading_and_generating_never_import_the_compiler(tmp_path):
    """Importing torch._dynamo takes about a second before the first token; only --compile needs it
    (building on the meta device, RoPE frequencies and packed products used to pull it in)."""
    make_hf_checkpoint(tmp_path, num_key_value_heads=2)
    code = (f"import sys\nfrom xllama_cli import load_model\nfrom xllama_cli.generation import generate_tokens\n"
            f"for dtype, batch in (('float32', 1), ('float32', 2), ('bfloat16', 1)):\n"
            f"    m = load_model({str(tmp_path)!r}, device='cpu', dtype=dtype, decode_batch=batch)\n"
            f"    generate_tokens(m, [[1, 2, 3]] * batch, 3)\n"
            f"print('torch._dynamo' in sys.modules)")
    assert _fresh_python(code) == "False"
