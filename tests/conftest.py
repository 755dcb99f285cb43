"""Shared test helpers: fixture paths and tiny random checkpoints built with transformers."""

from __future__ import annotations

import base64
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT.parent / "shared" / "fixtures"
STORY = ("Once upon a time, there was a little girl named Lily. She loved to play outside in the park. "
         "One day, she saw a big, red ball. She wanted to play with it, but it was too high.")


def benchmark(name: str):
    """benchmarks/NAME.py imported as a module (the folder is no package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"{name}_benchmark", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # as an import does: dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


# benchmarks/decode.py's shape flags (add_shape_flags) for a tiny random model, shared by the
# benchmark scripts' tests
TINY_SHAPE = ["--dim", "64", "--layers", "2", "--heads", "4", "--kv-heads", "2", "--ffn", "128",
              "--vocab", "256"]


def computing_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The layers that compute a model's linear products: its linear layers, but for the parts of
    a stacked one (fuse.py), which compute through it."""
    from xllama_cli.fuse import Part

    return [m for m in model.modules() if hasattr(m, "in_features") and not isinstance(m, Part)]


def random_llama(**changes):
    """A random float32 GQA model (4 query heads over 2 K/V heads, dim 64, 2 layers), its weights
    drawn at std 0.2 so that its logits spread; RoPE on the CPU."""
    from xllama_cli.config import ModelConfig
    from xllama_cli.model import Transformer

    torch.manual_seed(0)
    cfg = ModelConfig(**{**dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=96,
                                hidden_dim=128, max_seq_len=64), **changes})
    model = Transformer(cfg)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.2)
    model.init_rope("cpu")
    return model.eval()


def rows_at_their_own_slots(plain: torch.nn.Module, fused: torch.nn.Module, vocab: int
                            ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The engine's step on two copies of a model: rows of a bigger cache (from `row`), each at
    its own slot (a tensor start) over `span` slots, each attending only to the slots it filled;
    each of three steps' logits from `fused` and from `plain`."""
    gen = torch.Generator().manual_seed(2)
    lengths = [7, 3, 5]
    for model in (plain, fused):
        model.setup_cache(4, 16)
        for r, n in enumerate(lengths):  # rows 1..3 of the cache; row 0 stays unused
            prompt = torch.randint(0, vocab, (1, n), generator=torch.Generator().manual_seed(r))
            model(prompt, 0, row=1 + r)
    start, steps = torch.tensor(lengths), []
    with torch.inference_mode():
        for _ in range(3):
            token = torch.randint(0, vocab, (3, 1), generator=gen)
            span = int(start.max()) + 1
            steps.append((fused(token, start, row=1, span=span), plain(token, start, row=1, span=span)))
            start = start + 1
    return steps


def fixture(name: str) -> Path:
    """A path under ../shared/fixtures, or skip the test when the folder is absent (a user's clone)."""
    path = FIXTURES / name
    if not path.exists():
        pytest.skip(f"{path} not present: ../shared/fixtures is the project's test data beside the checkout "
                    "(see README, Set up)")
    return path


def pytest_report_header(config) -> str:
    if FIXTURES.is_dir():
        return f"test data: {FIXTURES}"
    return (f"test data: {FIXTURES} not found; the tests that read it (trained stories260K, real tokenizers "
            "and chat templates, kept beside the checkout on the project's machines) will skip")


def cli_fails(args: list[str], *needles: str) -> str:
    """Run the CLI and check the failure shape: exit 2, one `error:` line on stderr holding every
    needle, no traceback. Returns the line."""
    from typer.testing import CliRunner

    from xllama_cli.cli import app

    r = CliRunner().invoke(app, args)
    assert r.exit_code == 2, r.output
    err = r.stderr.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert "Traceback" not in r.output
    for n in needles:
        assert n in err, err
    return err


def tiny_hf_config(family: str = "llama", **overrides):
    """A tiny transformers config of `family` (its model_type: llama, mistral, qwen2)."""
    from transformers import AutoConfig

    base = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=8,
                num_key_value_heads=8, vocab_size=128, max_position_embeddings=64,
                rms_norm_eps=1e-5, tie_word_embeddings=False)
    base.update(overrides)
    return AutoConfig.for_model(family, **base)


def make_hf_checkpoint(path: Path, seed: int = 0, tokenizer: bool = False, family: str = "llama",
                       **overrides):
    """Save a random model of `family` (LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM;
    float32) as an HF folder; returns the transformers model."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_hf_config(family, **overrides)).float().eval()
    with torch.no_grad():  # HF's init gives near-zero logits; widen so greedy choices are clear-cut
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.15)
        for name, p in model.named_parameters():  # after the weights, which keep their draws
            if name.endswith(".bias"):  # HF's init zeroes them: a bias not loaded would pass
                p.normal_(0, 0.3)
    model.save_pretrained(path)
    if tokenizer:
        shutil.copy(fixture("llama2c/tok512.model"), path / "tokenizer.model")
    return model


@pytest.fixture
def story_hf() -> Path:
    return fixture("stories260K-hf")


# chat messages of each role, for the dialog tables of the chat tests
def U(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def A(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


def S(text: str) -> dict[str, str]:
    return {"role": "system", "content": text}


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def meta_tiktoken_file(tokenizer_json: Path, out: Path) -> Path:
    """Meta's Llama 3 tokenizer.model (base64 token bytes and rank a line) from its tokenizer.json,
    whose byte-level vocabulary is the same ranks."""
    from xllama_cli.tokenizer import _byte_decoder

    vocab = json.loads(tokenizer_json.read_text())["model"]["vocab"]
    byte_of = _byte_decoder()
    lines = [base64.b64encode(bytes(byte_of[c] for c in piece)).decode() + f" {rank}"
             for piece, rank in sorted(vocab.items(), key=lambda kv: kv[1])]
    out.write_text("\n".join(lines) + "\n")
    return out
