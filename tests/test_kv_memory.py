"""The KV cache holds what a request needs, not the whole context.

Peak memory: `generate` and `chat` run in a subprocess on a random model whose config claims a
131,072-token context (a full-context cache would be 1 GiB, the weights are about 1.5 MB). Their
peak resident memory is compared with the same run on a twin whose config says 2,048 tokens: the
extra may not come near a full-context cache. A control run allocates the full-context cache, so
the probe is shown to see it.

Growth: a cache that grows keeps its contents, so what follows equals a model that had the big
cache from the start; a chat that outgrows its cache answers as before, compiled or not.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from conftest import ROOT, fixture, make_hf_checkpoint
from xllama_cli import load_model
from xllama_cli.chat import ChatSession, format_plain
from xllama_cli.generation import continuation_text, generate_tokens
from xllama_cli.kv_cache import cache_capacity
from xllama_cli.loading import load
from xllama_cli.sampling import Sampling
from xllama_cli.tokenizer import load_tokenizer

MiB = 1 << 20
LONG, SHORT = 131_072, 2_048
# 2 layers x K and V x 4 KV heads x head_dim 128 x float32: 8 KiB a token
LAYERS, KV_HEADS, HEAD_DIM = 2, 4, 128
BYTES_PER_TOKEN = 2 * LAYERS * KV_HEADS * HEAD_DIM * 4
FULL_CACHE = BYTES_PER_TOKEN * LONG  # 1 GiB
# The twins run the same work, so their peaks differ by noise (allocator, page rounding) plus,
# here, nothing: both caches are sized to the request. An eighth of the full-context cache is far
# above that noise and far below what a cache sized to the context adds.
MARGIN = FULL_CACHE // 8
GREEDY = Sampling(temperature=0.0)

# Runs in a fresh process: the CLI (`python -m xllama_cli ARGS`), or with "full" a full-context
# cache set up by hand (the control). Writes the peak resident memory to the file named first.
# VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss over exec from the forking parent,
# so it would report pytest's own size.
PROBE = textwrap.dedent("""
    import runpy, sys

    def peak():
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))

    out, args = sys.argv[1], sys.argv[2:]
    code = 0
    if args[0] == "full":
        from xllama_cli import load_model
        model = load_model(args[1], device="cpu", dtype="float32")
        model.setup_cache(1, model.config.max_seq_len)
    else:
        sys.argv = ["xllama", *args]
        try:
            runpy.run_module("xllama_cli", run_name="__main__", alter_sys=True)
        except SystemExit as e:
            code = e.code or 0
    with open(out, "w") as f:
        f.write(str(peak()))
    sys.exit(code)
""")


def make_model(folder: Path, context: int) -> Path:
    """A random 2-layer model with a 512-piece tokenizer whose config claims `context` tokens."""
    make_hf_checkpoint(folder, tokenizer=True, vocab_size=512, hidden_size=64, num_hidden_layers=LAYERS,
                       num_attention_heads=KV_HEADS, num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM,
                       max_position_embeddings=context)
    return folder


@pytest.fixture(scope="module")
def twins(tmp_path_factory) -> dict[int, Path]:
    """The same weights (same seed) under a long and a short context."""
    root = tmp_path_factory.mktemp("kv")
    return {n: make_model(root / f"ctx{n}", n) for n in (LONG, SHORT)}


def peak_rss(tmp_path: Path, *args: str, stdin: str = "") -> int:
    out = tmp_path / "peak"
    # no CPU kernels: a load that measures them (on a machine whose kernel cache lacks the
    # shapes, until a load keeps their times) compiles numba's loop and times candidates' copies,
    # 100-200 MiB that one twin would pay and the other not; the cache's size is the same either way
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1", "XLLAMA_KERNELS": "plain"}
    r = subprocess.run([sys.executable, "-c", PROBE, str(out), *args], input=stdin, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return int(out.read_text())


RUNS = {
    "generate": (["generate", "-n", "64", "--temperature", "0", "Once upon a time"], ""),
    "chat": (["chat", "-n", "64", "--temperature", "0"], "hi\n"),
}


@pytest.mark.parametrize("command", RUNS)
def test_a_131072_token_context_costs_no_more_memory_than_a_short_one(command, twins, tmp_path):
    args, stdin = RUNS[command]
    long = peak_rss(tmp_path, *args, "--model", str(twins[LONG]), stdin=stdin)
    short = peak_rss(tmp_path, *args, "--model", str(twins[SHORT]), stdin=stdin)
    assert long - short < MARGIN, (f"{command}: peak {long / MiB:.0f} MiB with a {LONG}-token context, "
                                   f"{short / MiB:.0f} MiB with {SHORT}; a full cache is {FULL_CACHE / MiB:.0f} MiB")


def test_the_probe_sees_a_full_context_cache(twins, tmp_path):
    """The control: the same probe, a cache set up for the whole context, shows it all resident."""
    full = peak_rss(tmp_path, "full", str(twins[LONG]))
    short = peak_rss(tmp_path, "full", str(twins[SHORT]))
    assert full - short > FULL_CACHE - MARGIN


# ---- sizing and growth ----
def test_capacity_is_the_next_power_of_two_from_256_capped_by_the_limit():
    assert [cache_capacity(n, LONG) for n in (1, 256, 257, 1000, 1024, 1025, 70_000)] == \
           [256, 256, 512, 1024, 1024, 2048, LONG]
    assert cache_capacity(40, 64) == 64 and cache_capacity(300, 400) == 400


def test_a_grown_cache_keeps_its_contents_and_gives_the_logits_of_a_big_one(tmp_path):
    make_hf_checkpoint(tmp_path, num_key_value_heads=2, max_position_embeddings=64)
    small, big = load_model(tmp_path, device="cpu"), load_model(tmp_path, device="cpu")
    g = torch.Generator().manual_seed(0)
    first, more = torch.randint(3, 128, (1, 10), generator=g), torch.randint(3, 128, (1, 20), generator=g)
    small.setup_cache(1, 16)
    big.setup_cache(1, 48)
    with torch.no_grad():
        assert torch.equal(small(first, start=0), big(first, start=0))
        kept = small.model.layers[1].self_attn.kv_cache
        before = kept.k.clone()
        small.setup_cache(1, 48)  # room for 48: grows, keeping the 10 slots filled so far
        assert small.cache_len == 48 and small.model.layers[1].self_attn.kv_cache is kept
        assert torch.equal(kept.k[:, :, :16], before)
        ours, theirs = small(more, start=10), big(more, start=10)
        assert (ours - theirs).abs().max() < 1e-6
        for a, b in zip(small.model.layers, big.model.layers):
            assert torch.equal(a.self_attn.kv_cache.k[:, :, :30], b.self_attn.kv_cache.k[:, :, :30])
            assert torch.equal(a.self_attn.kv_cache.v[:, :, :30], b.self_attn.kv_cache.v[:, :, :30])
        steps = [(small(t, start=30 + i), big(t, start=30 + i)) for i, t in enumerate(more[:, :5].T[:, :, None])]
    assert all((a - b).abs().max() < 1e-6 for a, b in steps)


def test_a_cache_of_another_batch_is_replaced_not_grown(tmp_path):
    make_hf_checkpoint(tmp_path, max_position_embeddings=64)
    model = load_model(tmp_path, device="cpu")
    model.setup_cache(1, 32)
    old = model.cache
    model.setup_cache(2, 16)
    assert model.cache is not old and model.cache.k.shape[0] == 2 and model.cache_len == 16
    model.setup_cache(2, 8)  # big enough: kept
    assert model.cache_len == 16


def chat_grows(model, ref, tok, max_new: int, step=None) -> list[int]:
    """Three turns of a greedy chat (decoded by `step`, None: eagerly); each answer must be a fresh
    model's on the whole dialog. Returns the session's cache length after each turn."""
    session = ChatSession(model, tok, "plain", sampling=GREEDY, max_new_tokens=max_new, step=step)
    lengths = []
    for text in ("Once upon a time", "Lily had a ball", "The sun was hot"):
        answer = session.ask(text)
        lengths.append(model.cache_len)
        dialog = session.dialog[:-1]
        want = generate_tokens(ref, [format_plain(dialog, tok)], max_new, GREEDY, tok.eos_ids).tokens[0]
        assert answer == continuation_text(tok, want)
    assert len(session.cached) <= model.cache_len
    session.close()
    return lengths


def test_a_chat_grows_its_cache_as_the_dialog_grows_and_answers_as_a_fresh_model():
    path = fixture("stories260K-hf")
    tok = load_tokenizer(path / "tokenizer.model")
    model, ref = load_model(path, device="cpu", dtype="float32"), load_model(path, device="cpu", dtype="float32")
    lengths = chat_grows(model, ref, tok, max_new=100)
    assert lengths[0] == 256 and lengths[-1] == 512  # the story model's context caps it


def test_a_compiled_chat_recompiles_for_the_grown_cache_and_answers_as_eager():
    path = fixture("stories260K-hf")
    tok = load_tokenizer(path / "tokenizer.model")
    compiled = load(path, device="cpu", dtype="float32", compile=True)
    ref = load_model(path, device="cpu", dtype="float32")
    lengths = chat_grows(compiled.model, ref, tok, max_new=100, step=compiled.step)
    assert lengths[0] < lengths[-1]
