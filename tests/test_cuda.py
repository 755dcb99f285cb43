"""CUDA paths. On a GPU (benchmarks/cuda_check.sh runs this file there): tokens against
transformers, the compiled step with CUDA graphs (no graph skipped), int8 compiled without ATen's
int8 kernel, a compiler that cannot run as one error line. Anywhere, with torch.cuda stood in for:
a device this machine lacks is refused before any reading, NCCL's group is bound to the rank's GPU,
and tensor parallelism compiles without CUDA graphs. The tests that need a GPU skip without one."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from torch._dynamo.utils import counters

from conftest import cli_fails, make_hf_checkpoint
from xllama_cli import load_model
from xllama_cli.cli import DEMO_MODEL
from xllama_cli.evaluate import evaluate_text
from xllama_cli.generation import generate_tokens
from xllama_cli.loading import load, resolve_device
from xllama_cli.quantize import int8_matmul, quantize_int8
from xllama_cli.tokenizer import load_tokenizer

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

PROMPTS = [[5, 9, 33, 70, 2, 11, 4], [8, 41, 6]]
# (family, overrides): the windows are shorter than the prompts, so every mask path meets them
FAMILIES = {"llama": ("llama", {}), "mistral-window": ("mistral", dict(sliding_window=4)),
            "qwen2-window": ("qwen2", dict(use_sliding_window=True, sliding_window=4, max_window_layers=1))}
# compiled and eager bfloat16 may round a near-tie differently: tokens are compared up to the first
# step where eager's top-2 logits are closer than this share of its largest |logit|
NEAR_TIE = 0.02


def tokens_until_near_tie(logits: torch.Tensor, eps: float = NEAR_TIE) -> int:
    """How many of the steps' logits [n, vocab] come before the first near-tie: a step whose top-2
    margin is below eps x its largest |logit|; greedy tokens past it may differ by rounding."""
    top2 = logits.float().topk(2, dim=-1).values
    tie = (top2[:, 0] - top2[:, 1]) < eps * logits.float().abs().amax(-1)
    return int(tie.nonzero()[0, 0]) if tie.any() else logits.shape[0]


def eager_logits(model, prompt: list[int], tokens: list[int]) -> torch.Tensor:
    """The logits [len(tokens), vocab] from which eager greedy decoding chose `tokens` after
    `prompt`: one forward pass over the prompt and the tokens (teacher forcing)."""
    ids = torch.tensor([prompt + tokens[:-1]], device=model.lm_head.weight.device)
    with torch.inference_mode():
        return model(ids)[0, len(prompt) - 1:]


def assert_same_until_near_tie(model, prompts: list[list[int]], want: list[list[int]],
                               got: list[list[int]]) -> None:
    """got's tokens equal want's (eager greedy of `model`) up to each row's first near-tie; and
    enough tokens are compared for that to mean something."""
    compared = 0
    for prompt, w, g in zip(prompts, want, got):
        n = tokens_until_near_tie(eager_logits(model, prompt, w))
        assert g[:n] == w[:n], (n, g, w)
        compared += n
    assert compared >= sum(len(w) for w in want) // 4, f"only {compared} tokens clear of near-ties"


def test_near_ties_end_the_comparison():
    logits = torch.tensor([[9.0, 1.0, 0.0], [5.0, 4.0, 0.0], [3.0, 2.99, 0.0], [7.0, 0.0, 1.0]])
    assert tokens_until_near_tie(logits) == 2  # 3.0 vs 2.99: a near-tie at step 2
    assert tokens_until_near_tie(logits[:2]) == 2 and tokens_until_near_tie(logits[2:]) == 0


def test_tokens_are_compared_up_to_the_first_near_tie(tmp_path):
    make_hf_checkpoint(tmp_path, seed=4, num_key_value_heads=2)
    model = load_model(tmp_path, device="cpu", dtype="float32")
    want = generate_tokens(model, PROMPTS, 12).tokens
    assert_same_until_near_tie(model, PROMPTS, want, want)
    flipped = [w[:1] + [(w[1] + 1) % 128] + w[2:] for w in want]  # a clear choice changed
    with pytest.raises(AssertionError):
        assert_same_until_near_tie(model, PROMPTS, want, flipped)


# ---- devices, ranks and graphs, proven with torch.cuda stood in for ----
@pytest.fixture
def gpus(monkeypatch):
    """torch.cuda as on a machine with `n` GPUs (set by calling the fixture's value)."""
    def have(n: int) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
    return have


@pytest.mark.parametrize("value, count, needle", [
    ("cuda:5", 1, "--device cuda:5: this machine has 1 CUDA device (cuda:0); use one of them"),
    ("cuda:4", 4, "--device cuda:4: this machine has 4 CUDA devices (cuda:0 to cuda:3)"),
    ("cuda:1", 0, "--device cuda:1 asked for, but CUDA is not available here; use --device cpu"),
    ("cuda:x", 1, "unknown --device 'cuda:x'; choose auto, cpu, cuda or cuda:N"),
    ("cuda:-1", 1, "unknown --device 'cuda:-1'"),
    ("cuda:", 1, "unknown --device 'cuda:'"),
    ("cuda0", 1, "unknown --device 'cuda0'"),
    ("gpu", 1, "unknown --device 'gpu'"),
    ("cuda:99999999", 1, "unknown --device 'cuda:99999999'"),
])
def test_a_device_this_machine_lacks_is_one_error_before_any_reading(gpus, monkeypatch, value,
                                                                     count, needle):
    gpus(count)
    from xllama_cli import checkpoint

    monkeypatch.setattr(checkpoint, "open_checkpoint",
                        lambda *a, **k: pytest.fail("the checkpoint was opened"))
    cli_fails(["generate", "--model", str(DEMO_MODEL), "--device", value, "hello"], needle)


def test_an_existing_cuda_index_is_taken_as_given(gpus):
    gpus(4)
    assert resolve_device("cuda:3") == torch.device("cuda", 3)
    assert resolve_device("cuda") == torch.device("cuda") and resolve_device("auto").type == "cuda"


def joining(monkeypatch, rank: int) -> dict:
    """parallel.setup's view of a 2-process group that this process joins as `rank`, without
    joining one: what init_process_group was given (and set_device), in the returned dict."""
    from xllama_cli import parallel

    joined = {}
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(parallel.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(parallel.dist, "init_process_group",
                        lambda backend, **kw: joined.update(backend=backend, **kw))
    monkeypatch.setattr(parallel.dist, "get_rank", lambda: rank)
    monkeypatch.setattr(parallel.dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(parallel.atexit, "register", lambda fn: None)
    return joined


def test_nccl_group_is_bound_to_the_ranks_gpu(gpus, monkeypatch):
    from xllama_cli import parallel

    gpus(2)
    joined = joining(monkeypatch, 1)
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: joined.setdefault("set", d))
    tp = parallel.setup(torch.device("cuda"))
    assert tp.device == torch.device("cuda", 1) and joined["set"] == torch.device("cuda", 1)
    assert joined["backend"] == "nccl" and joined["device_id"] == torch.device("cuda", 1)


def test_gloo_group_has_no_device_id(monkeypatch):
    from xllama_cli import parallel

    joined = joining(monkeypatch, 0)
    parallel.setup(torch.device("cpu"))
    assert joined["backend"] == "gloo" and joined["device_id"] is None


def test_tensor_parallel_compiles_the_step_without_cuda_graphs(tmp_path, monkeypatch):
    """No all-reduce inside a captured graph: loading under tensor parallelism asks
    compile_decode for a step without CUDA graphs (generation.compile_options drops them)."""
    from xllama_cli import generation
    from xllama_cli.loading import for_inference

    asked = []
    monkeypatch.setattr(generation, "compile_decode", lambda model, **kw: asked.append(kw))
    make_hf_checkpoint(tmp_path, seed=1)
    model = load_model(tmp_path, device="cpu", dtype="float32", pack=False)
    for_inference(model, compile=True, pack=False, tensor_parallel=True)
    for_inference(model, compile=True, pack=False)
    assert asked == [{"tensor_parallel": True}, {"tensor_parallel": False}]
    options = generation.compile_options(torch.device("cuda"), tensor_parallel=True)
    assert options["triton.cudagraphs"] is False


# ---- on a GPU ----
@needs_cuda
@pytest.mark.parametrize("family", list(FAMILIES))
def test_float32_greedy_tokens_on_cuda_match_transformers(tmp_path, family):
    kind, overrides = FAMILIES[family]
    hf = make_hf_checkpoint(tmp_path, seed=3, num_key_value_heads=2, family=kind, **overrides)
    ours = load_model(tmp_path, device="cuda", dtype="float32")
    for prompt in PROMPTS:
        with torch.no_grad():
            want = hf.generate(torch.tensor([prompt]), max_new_tokens=24, min_new_tokens=24, do_sample=False,
                               eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
        assert generate_tokens(ours, [prompt], 24).tokens[0] == want


@needs_cuda
@pytest.mark.parametrize("family, dtype", [("llama", "float32"), ("llama", "bfloat16"),
                                           ("mistral-window", "bfloat16"),
                                           ("qwen2-window", "bfloat16")])
def test_compiled_step_with_cuda_graphs_gives_the_eager_tokens(tmp_path, dtype, family):
    kind, overrides = FAMILIES[family]
    make_hf_checkpoint(tmp_path, seed=4, num_key_value_heads=2, family=kind, **overrides)
    eager = load_model(tmp_path, device="cuda", dtype=dtype)
    compiled = load(tmp_path, device="cuda", dtype=dtype, compile=True)
    want = generate_tokens(eager, PROMPTS, 20).tokens
    counters.clear()
    first = generate_tokens(compiled.model, PROMPTS, 20, step=compiled.step)
    assert first.stats.compile_s > 0
    assert counters["inductor"]["cudagraph_skips"] == 0
    if dtype == "float32":
        assert first.tokens == want
    else:
        assert_same_until_near_tie(eager, PROMPTS, want, first.tokens)
    # replayed graphs: the same computation as the recorded one, token for token
    assert generate_tokens(compiled.model, PROMPTS, 20, step=compiled.step).tokens == first.tokens


@needs_cuda
def test_int8_compiled_step_on_cuda_reads_int8_in_fused_kernels(tmp_path):
    from torch._inductor.utils import run_and_get_code

    make_hf_checkpoint(tmp_path, seed=4, num_key_value_heads=2)
    eager = load_model(tmp_path, device="cuda", quantize="int8")
    compiled = load(tmp_path, device="cuda", quantize="int8", compile=True)
    want = generate_tokens(eager, PROMPTS, 20).tokens
    counters.clear()
    got, code = run_and_get_code(generate_tokens, compiled.model, PROMPTS, 20, step=compiled.step)
    code = "\n".join(code)
    assert "_weight_int8pack_mm" not in code
    assert "extern_kernels.mm(" not in code and "extern_kernels.addmm(" not in code
    assert counters["inductor"]["cudagraph_skips"] == 0
    assert_same_until_near_tie(eager, PROMPTS, want, got.tokens)


@needs_cuda
def test_int8_product_on_cuda_equals_the_dequantised_product():
    w = torch.randn(256, 512, device="cuda")
    q, scales = quantize_int8(w)
    x = torch.randn(3, 512, device="cuda", dtype=torch.bfloat16)
    want = x.float() @ (q.float() * scales[:, None]).t()
    got = int8_matmul(x, q, scales.bfloat16()).float()
    assert (got - want).abs().max() <= 2e-2 * want.abs().max()


@needs_cuda
def test_int8_perplexity_on_cuda_within_one_percent():
    tok = load_tokenizer(DEMO_MODEL)
    text = DEMO_MODEL / "heldout.txt"
    base = evaluate_text(load_model(DEMO_MODEL, device="cuda", dtype="float32"), tok, text, 256, 255, progress=False)
    int8 = evaluate_text(load_model(DEMO_MODEL, device="cuda", quantize="int8"), tok, text, 256, 255, progress=False)
    assert abs(int8.perplexity / base.perplexity - 1) < 0.01


@needs_cuda
def test_cuda_compile_without_a_c_compiler_is_never_a_traceback(tmp_path):
    """Triton builds its launchers with $CC (inductor's CPU kernels use $CXX): with neither
    present, --compile on CUDA either needs none (a prebuilt launcher) or fails as one line."""
    missing = str(tmp_path / "no-such-compiler")
    env = {**os.environ, "CC": missing, "CXX": missing,
           "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor"),
           "TRITON_CACHE_DIR": str(tmp_path / "triton")}
    run = subprocess.run([sys.executable, "-m", "xllama_cli", "generate", "--device", "cuda",
                          "-n", "4", "--compile", "Once"], capture_output=True, text=True, env=env,
                         timeout=300)
    assert "Traceback" not in run.stderr, run.stderr[-2000:]
    if run.returncode != 0:
        assert run.returncode == 2
        err = run.stderr.strip().splitlines()[-1]
        assert err.startswith("error: --compile failed (") and "run without --compile" in err
