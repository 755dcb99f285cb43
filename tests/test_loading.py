"""Checkpoint formats and the Python API."""

from __future__ import annotations

import json

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


def test_load_gives_the_model_with_what_was_read_and_takes_an_opened_checkpoint():
    import pytest

    from xllama_cli.checkpoint import open_checkpoint
    from xllama_cli.loading import load

    ckpt = open_checkpoint(fixture("stories260K-hf"))
    loaded = load(ckpt, device="cpu")
    assert loaded.checkpoint is ckpt and loaded.step is None and loaded.tp is None
    tokens = torch.tensor([[1, 450, 483]])
    assert torch.equal(loaded.model(tokens), x.load_model(fixture("stories260K-hf"), device="cpu")(tokens))
    with pytest.raises(TypeError, match="use xllama_cli.loading.load"):  # the model alone has no place for it
        x.load_model(ckpt, device="cpu", compile=True)


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


def _rss_file() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssFile:"))


def test_released_pages_of_a_mapped_tensor_leave_rss_and_read_back_the_same(tmp_path):
    from xllama_cli.checkpoint import release_pages

    want = torch.randn(4, 1 << 20)  # 16 MiB
    torch.save({"w": want}, tmp_path / "w.bin")
    t = torch.load(tmp_path / "w.bin", mmap=True, weights_only=True)["w"]
    assert torch.equal(t, want)  # every page read: resident
    before = _rss_file()
    release_pages(t)
    assert before - _rss_file() > 12 << 20
    assert torch.equal(t, want)  # the mapping still reads the file


def test_release_pages_leaves_memory_that_no_file_backs_alone():
    from xllama_cli.checkpoint import release_pages

    t = torch.randn(4, 1 << 20)
    want = t.clone()
    release_pages(t)  # MADV_DONTNEED here would zero it
    assert torch.equal(t, want)


def test_packed_load_of_a_bin_checkpoint_peaks_near_the_weights_size(tmp_path):
    """A .bin file is one mapping that lives while any tensor of it does: without releasing the
    pages each packed matrix read, they stayed resident beside the packed copies (1.75x)."""
    from xllama_cli.config import ModelConfig
    from xllama_cli.model import Transformer

    cfg = ModelConfig(dim=512, n_layers=4, n_heads=8, n_kv_heads=8, hidden_dim=1536, vocab_size=512, max_seq_len=64)
    for name, c in (("tiny", cfg.replace(n_layers=1)), ("model", cfg)):
        torch.manual_seed(0)
        state = {k: v.contiguous() for k, v in Transformer(c).state_dict().items()}
        (tmp_path / name).mkdir()
        torch.save(state, tmp_path / name / "pytorch_model.bin")
        (tmp_path / name / "config.json").write_text(json.dumps(c.to_hf()))
    size = (tmp_path / "model" / "pytorch_model.bin").stat().st_size
    code = (f"from xllama_cli import linear, load_model\n"
            f"linear.best = lambda *_: linear.Choice('onednn', 'onednn', 'onednn')  # a copy of each matrix\n"
            f"def status(key):\n"
            f"    with open('/proc/self/status') as f:\n"
            f"        return next(int(l.split()[1]) * 1024 for l in f if l.startswith(key + ':'))\n"
            f"load_model({str(tmp_path / 'tiny')!r}, device='cpu', dtype='float32', decode_batch=None)  # warm-up\n"
            f"base = status('VmRSS')\n"
            f"open('/proc/self/clear_refs', 'w').write('5')\n"
            f"m = load_model({str(tmp_path / 'model')!r}, device='cpu', dtype='float32', decode_batch=None)\n"
            f"assert m.model.layers[0].mlp.gate_up.layer.choice.layout == 'onednn'\n"
            f"print(status('VmHWM') - base)")
    peak = int(_fresh_python(code))
    assert peak < 1.25 * size, (peak, size)
