"""CPU kernels chosen by measurement: every candidate gives what F.linear gives (greedy tokens in
float32, logits within the precision's tolerance), a wrong candidate is never chosen, the choice
is kept in the user's cache folder for this CPU and torch and measured again when that file is
corrupt or another machine's, XLLAMA_KERNELS=plain turns it all off, half-precision and quantized
weights compute with float32 activations, and --dtype auto picks bfloat16 on the CPU only for a
half-precision checkpoint on a CPU with native bfloat16."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import ROOT, cli_fails, computing_layers, make_hf_checkpoint
from xllama_cli import gemv, kernel_cache, linear, load_model, loading
from xllama_cli.cli import DEMO_MODEL
from xllama_cli.generation import generate_tokens
from xllama_cli.kernel_cache import KernelCache
from xllama_cli.linear import (FLOAT_KINDS, MANY_ROWS, SMALL_ROWS, Choice, CpuLinear, Spec,
                               Tuner, best, fixed, measure, use_cpu_kernels)
from xllama_cli.quantize import INT4, INT8, quantize_model

KINDS = {k.name: k for k in (*FLOAT_KINDS.values(), INT8, INT4)}
DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16",
          "int8": "bfloat16", "int4": "bfloat16"}
# every layout and product, each product serving both sides (few rows and many)
CHOICES = [(kind.name, Choice(layout.name, p.name, p.name))
           for kind in KINDS.values() for layout in kind.layouts for p in layout.products]
PROMPTS = [[5, 9, 33, 70, 2, 11, 4, 17, 23, 99, 41, 8, 60, 3, 12, 77, 90, 1, 31, 52], [8, 41, 6]]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random checkpoint whose shapes every kernel serves (rows a multiple of 16 and of
    the thread count, inputs a multiple of the int4 group), with an attention bias."""
    path = tmp_path_factory.mktemp("tiny")
    make_hf_checkpoint(path, seed=11, num_key_value_heads=4, intermediate_size=128, attention_bias=True)
    return path


def plain_model(path, kind: str) -> nn.Module:
    """The model as its layers compute by themselves (F.linear; quantized: widened weights)."""
    model = load_model(path, device="cpu", dtype=DTYPES[kind], pack=False)
    return quantize_model(model, kind) if kind in ("int8", "int4") else model


def exact_model(path, kind: str) -> nn.Module:
    """The model in float32 through F.linear, its weights those `kind` holds (dequantized)."""
    model = load_model(path, device="cpu", dtype="float32", pack=False)
    if kind in ("int8", "int4"):
        quantized = dict(plain_model(path, kind).named_modules())
        for name, m in model.named_modules():
            if type(m) is nn.Linear:
                q = quantized[name]  # int4: the head is int8
                with torch.no_grad():
                    m.weight.copy_(q.kernel_kind.reference(torch.eye(m.in_features), q).t())
    return model


def logits(model: nn.Module) -> torch.Tensor:
    """Prefill logits (many rows) and one decode step's (few), as one float32 tensor."""
    model.setup_cache(1, 64)
    try:
        with torch.no_grad():
            first = model(torch.tensor([PROMPTS[0]]), start=0)
            step = model(torch.tensor([[7]]), start=len(PROMPTS[0]))
    finally:
        model.clear_cache()
    return torch.cat([first[0], step[0]]).float()


def logits_tolerance(kind: str, choice: Choice) -> float:
    """How near this tiny model's logits come to F.linear's in float32. Kernels that round the
    activations to int8 too, as llama.cpp's Q8_0 and Q4_0 products do (int8's; int4's vnni form's, in
    groups of 32), add that rounding: a few percent here, where each row has two groups, compounded
    over the layers. What it costs a trained model, the perplexity tests bound (test_quantize)."""
    if kind == "float32":
        return 1e-5
    if kind == "int8":
        return 5e-2
    if kind == "int4" and choice.layout == "vnni":
        return 7e-2
    return KINDS[kind].tol


@pytest.mark.parametrize("kind,choice", CHOICES, ids=[f"{k}-{c}" for k, c in CHOICES])
def test_every_kernel_gives_what_f_linear_gives(tiny, kind, choice):
    """float32: F.linear's greedy tokens; every kind: F.linear's float32 logits to its tolerance,
    prefill (many rows) and a decode step (one); int8 and int4 from the weights they hold."""
    model = plain_model(tiny, kind)
    ours = [name for name, m in model.named_modules() if getattr(m, "kernel_kind", KINDS[kind]) is KINDS[kind]
            and hasattr(m, "in_features")]  # int4: the head is int8's
    model = use_cpu_kernels(model, choose=fixed(choice))
    swapped = {name for name, m in model.named_modules() if isinstance(m, CpuLinear) and m.choice == choice}
    if not swapped:
        pytest.skip(f"{choice.layout} does not work on this CPU")
    assert set(ours) <= swapped and len(ours) >= 2 * 7
    exact = exact_model(tiny, kind)  # F.linear, float32
    got, want = logits(model), logits(exact)
    tol = logits_tolerance(kind, choice)
    assert torch.allclose(got, want, rtol=tol, atol=tol * want.abs().max().item()), (got - want).abs().max()
    if kind == "float32":  # half precision rounds differently at each step: tokens drift apart
        assert generate_tokens(model, PROMPTS, 12).tokens == generate_tokens(exact, PROMPTS, 12).tokens


def test_kernels_serve_shapes_they_do_not_divide(tmp_path):
    """Rows no multiple of the thread count or of 16, an input no multiple of 16 or of the int4
    group: the kernels that cannot take them are not candidates, the others pad or serve."""
    make_hf_checkpoint(tmp_path, seed=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                       intermediate_size=70, vocab_size=131)
    for kind in ("float32", "bfloat16", "int8", "int4"):
        model = plain_model(tmp_path, kind)
        want = logits(model)
        got = logits(use_cpu_kernels(model, Tuner()))
        assert all(isinstance(m, CpuLinear) for m in model.modules() if hasattr(m, "in_features"))
        tol = max(KINDS[kind].tol, 1e-5)
        assert torch.allclose(got, want, rtol=tol, atol=2 * tol * want.abs().max().item()), kind


# (the compiled layout is not among them: a compiled step keeps the weights' dtype)
HALF_CHOICES = [(kind, choice) for kind, choice in CHOICES if kind != "float32" and choice.layout != "compiled"]


@pytest.mark.parametrize("kind,choice", HALF_CHOICES, ids=[f"{k}-{c}" for k, c in HALF_CHOICES])
def test_every_kernel_takes_float32_inputs_beside_half_precision_weights(tiny, kind, choice):
    """Chosen for float32 activations (loading's choice on the CPU for half-precision and
    quantized weights), a layer gives float32 outputs, and the model computing in float32 gives
    the float32 logits of the weights it holds, to the precision's tolerance."""
    model = use_cpu_kernels(plain_model(tiny, kind), choose=fixed(choice), activations=torch.float32)
    if not any(isinstance(m, CpuLinear) and m.choice == choice for m in model.modules()):
        pytest.skip(f"{choice.layout} does not work on this CPU")
    use_cpu_kernels(model, Tuner(), activations=torch.float32)  # int4: its int8 head
    assert not any(linear.kind_of(m) for m in model.modules())
    model.compute_in(torch.float32)
    up = model.model.layers[0].mlp.up_proj
    assert up(torch.randn(1, 3, up.in_features)).dtype == torch.float32
    got, want = logits(model), logits(exact_model(tiny, kind))
    tol = logits_tolerance(kind, choice)
    assert torch.allclose(got, want, rtol=tol, atol=tol * want.abs().max().item()), (got - want).abs().max()


def bfloat16_weights_in_float32(path) -> nn.Module:
    """A float32 model whose weights are the bfloat16 ones, through F.linear."""
    return load_model(path, device="cpu", dtype="bfloat16", pack=False).float()


def test_half_precision_weights_on_the_cpu_compute_in_float32(tiny, cache_home, monkeypatch):
    """As llama.cpp: the weights stay bfloat16, the norms, the KV cache and the products' inputs
    are float32 (the kernels chosen for such inputs, kept apart in the cache), and the logits are
    nearer those of the same weights in float32 than bfloat16 activations give them.
    XLLAMA_KERNELS=plain keeps the model as it is built."""
    model = load_model(tiny, device="cpu", dtype="bfloat16")
    assert model.activation_dtype == torch.float32 and model.model.norm.weight.dtype == torch.float32
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    model.setup_cache(1, 8)
    assert model.cache.k.dtype == torch.float32
    model.clear_cache()
    keys = json.loads(next(cache_home.glob("kernels-*.json")).read_text())["entries"]
    products = [key for key in keys if not key.startswith(("attention ", "block "))]  # the steps' own
    assert products and all(key.startswith("bfloat16 ") and " float32 inputs " in key
                            for key in products)
    want = logits(bfloat16_weights_in_float32(tiny))
    plain = load_model(tiny, device="cpu", dtype="bfloat16", pack=False)
    assert plain.activation_dtype == torch.bfloat16
    ours, theirs = (logits(model) - want).abs().max(), (logits(plain) - want).abs().max()
    assert ours < theirs, (ours, theirs)
    monkeypatch.setenv("XLLAMA_KERNELS", "plain")
    assert load_model(tiny, device="cpu", dtype="bfloat16").activation_dtype == torch.bfloat16


def test_a_layer_no_kernel_serves_keeps_the_model_in_its_weights_dtype(tiny, cache_home, monkeypatch):
    """A layer left as it is computes in its own dtype only: the model then stays in it."""
    real = loading.use_cpu_kernels

    def none_for_down(model, choose, **kwargs):
        down = model.model.layers[0].mlp.down_proj  # the only layers of their shape

        def but_down(spec, kind, layers):
            if (spec.n, spec.k) == (down.out_features, down.in_features):
                return None, None
            return choose(spec, kind, layers)
        return real(model, choose=but_down, **kwargs)

    monkeypatch.setattr(loading, "use_cpu_kernels", none_for_down)
    model = load_model(tiny, device="cpu", dtype="bfloat16")
    mlp = model.model.layers[0].mlp
    assert type(mlp.down_proj) is nn.Linear and isinstance(mlp.gate_up.layer, CpuLinear)
    assert model.activation_dtype == torch.bfloat16
    got, want = logits(model), logits(load_model(tiny, device="cpu", dtype="bfloat16", pack=False))
    tol = KINDS["bfloat16"].tol
    assert torch.allclose(got, want, rtol=tol, atol=2 * tol * want.abs().max().item())


def test_a_few_row_loop_is_timed_for_decode_only():
    """numba's loop reads the weight once for few rows; for a prompt's many rows it is no
    candidate (its time would only be spent measuring)."""
    if not gemv.fits(48, 64):
        pytest.skip("numba with OpenMP threads is not available here")
    layer = nn.Linear(64, 48, bias=False)
    times = measure(FLOAT_KINDS[torch.float32], [layer], False, 1)
    assert "numba" in times["plain"]["few"]
    assert "numba" not in times["plain"]["many"] and times["plain"]["many"]


def test_the_bf16_loop_gives_float32s_product_of_the_bf16_weights_for_decode_only():
    """The activations are not rounded: its products are F.linear's in float32 over the bf16
    weights. Timed for few rows only, and only for rows of whole blocks (64 weights)."""
    if not gemv.bfloat16_fits(48, 128):
        pytest.skip("numba with OpenMP threads is not available here")
    gen = torch.Generator().manual_seed(0)
    w, x = torch.randn(48, 128, generator=gen).bfloat16(), torch.randn(3, 128, generator=gen)
    got = gemv.bfloat16_linear(x, w)
    want = F.linear(x, w.float())
    assert got.dtype == torch.float32 and torch.allclose(got, want, rtol=1e-5, atol=1e-5)
    assert gemv.bfloat16_linear(x.bfloat16(), w).dtype == torch.bfloat16
    times = measure(FLOAT_KINDS[torch.bfloat16], [nn.Linear(128, 48, bias=False).bfloat16()],
                    False, 1)
    assert "numba" in times["plain"]["few"] and "numba" not in times["plain"]["many"]
    odd = measure(FLOAT_KINDS[torch.bfloat16], [nn.Linear(96, 48, bias=False).bfloat16()], False, 1)
    assert "numba" not in odd["plain"]["few"]


def test_numba_threads_other_than_openmp_offer_no_loop():
    """numba's workqueue threads beside torch's made decode slower: no candidate then."""
    code = "from xllama_cli import gemv; print(gemv.fits(48, 64))"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, NUMBA_THREADING_LAYER="workqueue",
                                  PYTHONPATH=str(ROOT / "src")))
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["False"]


def test_starting_numbas_threads_keeps_the_users_thread_count():
    # numba's first parallel call sets torch's thread count to numba's (every logical CPU); the
    # count the user set (here OMP_NUM_THREADS=1) must survive it, for torch's ops and the kernel
    # cache's keys
    code = ("import torch; from xllama_cli import gemv; gemv.fits(48, 64); "
            "print(torch.get_num_threads())")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, OMP_NUM_THREADS="1", NUMBA_NUM_THREADS="2",
                                  PYTHONPATH=str(ROOT / "src")))
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["1"]


def test_a_kernel_that_gives_wrong_values_is_never_chosen(monkeypatch):
    real = linear.split_linear
    monkeypatch.setattr(linear, "split_linear", lambda x, w: real(x, w) + 1)
    kind = linear._float_kind(torch.float32)  # built anew: its split product is the wrong one
    layer = nn.Linear(64, 96, bias=False)
    times = measure(kind, [layer, nn.Linear(64, 96, bias=False)], tied=False, few_rows=1)
    assert "split" not in times["plain"]["few"] and "split" not in times["plain"]["many"]
    assert "aten" in times["plain"]["few"]
    choice = best({"plain": {"few": {"split": 1e-9, "aten": 1.0}, "many": {"aten": 1.0}}}, True)
    state = linear.prepared_if_right(kind, layer, choice)
    assert choice.few == "split" and state is None  # kept as fastest, refused when checked


def test_the_choice_weighs_decode_and_prefill():
    times = {"a": {"few": {"p": 1.0}, "many": {"p": 10.0}},    # fast decode, slow prefill
             "b": {"few": {"q": 1.5, "r": 1.05}, "many": {"q": 1.0}},
             "c": {"few": {"p": 0.1}}}                           # no product for many rows: none
    decoding = best(times, decoding=True)
    assert decoding == Choice("b", "r", "q")  # 1.05 * 128 + 1 * 2 < 1 * 128 + 10 * 2
    assert best(times, decoding=False) == Choice("b", "r", "q")
    assert best({"a": {"few": {"p": 1.0}, "many": {"p": 1.1}},
                 "b": {"few": {"q": 2.0}, "many": {"q": 0.01}}}, decoding=True) == Choice("a", "p", "p")
    assert best({}, decoding=True) is None


def test_a_tied_head_keeps_the_embedding_table(tmp_path):
    make_hf_checkpoint(tmp_path, seed=6, num_key_value_heads=2, tie_word_embeddings=True)
    model = load_model(tmp_path, device="cpu", dtype="float32")
    assert isinstance(model.lm_head, CpuLinear) and model.lm_head.choice.layout == "plain"
    assert model.lm_head.weight is model.model.embed_tokens.weight
    trained = load_model(tmp_path, device="cpu", dtype="float32", pack=False)  # to train: plain
    assert all(type(m) is nn.Linear for m in trained.modules() if hasattr(m, "in_features"))


def test_swapped_layers_keep_the_state_dict_keys_of_plain_ones(tiny):
    plain = load_model(tiny, device="cpu", dtype="float32", pack=False)
    for kind, choice in [("float32", Choice("plain", "aten", "aten")),
                         ("float32", Choice("onednn", "onednn", "onednn"))]:
        model = use_cpu_kernels(load_model(tiny, device="cpu", dtype="float32", pack=False),
                                choose=fixed(choice))
        assert any(isinstance(m, CpuLinear) for m in model.modules()), (kind, choice)
        assert list(model.state_dict()) == list(plain.state_dict()), (kind, choice)


# ---- the kernel cache ----
class Meter:
    """A machine.OtherWork whose other processes took `busy` of the CPUs."""

    busy = 0.0

    def share(self) -> float:
        return self.busy


@pytest.fixture
def cache_home(tmp_path, monkeypatch):
    """A fresh user cache folder, on a machine with nothing else running (as far as the kernels'
    measuring can tell: the tests' own machine may be busy)."""
    home = tmp_path / "cache"
    monkeypatch.setenv("XDG_CACHE_HOME", str(home))
    monkeypatch.setattr(loading, "OtherWork", Meter)
    return home / "xllama"


def shapes(model: nn.Module) -> list[str]:
    """Each distinct shape of a float32 model's linear layers, as load_counting names them."""
    return sorted({f"float32 {m.out_features}x{m.in_features}" for m in computing_layers(model)})


def load_counting(path, monkeypatch) -> tuple[nn.Module, list[str]]:
    """load_model, and the shapes its kernels were measured for (none: all taken from the cache)."""
    timed: list[str] = []
    real = linear.measure
    monkeypatch.setattr(linear, "measure", lambda kind, layers, *a: timed.append(
        f"{kind.name} {layers[0].out_features}x{layers[0].in_features}") or real(kind, layers, *a))
    return load_model(path, device="cpu", dtype="float32", decode_batch=1), timed


def test_kernels_are_measured_once_and_kept_for_this_machine(tiny, cache_home, monkeypatch):
    model, timed = load_counting(tiny, monkeypatch)
    assert sorted(timed) == shapes(model)  # each once
    files = list(cache_home.glob("kernels-*.json"))
    assert len(files) == 1
    doc = json.loads(files[0].read_text())
    assert doc["machine"] == kernel_cache.machine() and doc["machine"]["torch"] == torch.__version__
    assert all(f" threads {torch.get_num_threads()} " in key for key in doc["entries"])
    again, timed = load_counting(tiny, monkeypatch)
    assert timed == []  # taken from the cache
    assert [m.choice for m in again.modules() if isinstance(m, CpuLinear)] == [
        m.choice for m in model.modules() if isinstance(m, CpuLinear)]


@pytest.mark.parametrize("damage", ["not json", "truncated", "another cpu", "another torch", "bad times",
                                    "a list"])
def test_a_corrupt_or_foreign_kernel_cache_is_ignored_and_rebuilt(tiny, cache_home, monkeypatch, damage):
    load_counting(tiny, monkeypatch)
    path = next(cache_home.glob("kernels-*.json"))
    text = path.read_text()
    doc = json.loads(text)
    if damage == "not json":
        path.write_text("{not json")
    elif damage == "truncated":
        path.write_text(text[: len(text) // 2])
    elif damage in ("another cpu", "another torch"):
        field = "cpu" if damage == "another cpu" else "torch"
        doc["machine"][field] = "Some Other CPU 9000" if field == "cpu" else "1.0.0"
        path.write_text(json.dumps(doc))
    elif damage == "bad times":
        for entry in doc["entries"].values():
            for sides in entry["times"].values():
                for products in sides.values():
                    products.update(dict.fromkeys(products, "fast"))
        path.write_text(json.dumps(doc))
    else:
        path.write_text(json.dumps([1, 2, 3]))
    model, timed = load_counting(tiny, monkeypatch)
    assert sorted(timed) == shapes(model)  # every shape measured again
    rebuilt = json.loads(path.read_text())
    products = [key for key in rebuilt["entries"] if not key.startswith(("attention ", "block "))]
    assert rebuilt["machine"] == kernel_cache.machine() and len(products) == len(timed)
    assert all(isinstance(m, CpuLinear) for m in computing_layers(model))


def test_a_kept_choice_that_no_longer_checks_is_measured_again(tiny, cache_home, monkeypatch):
    """A kept choice is checked against F.linear at every load: a product that has gone wrong (a
    new torch under the same version string, say) is measured anew, not trusted."""
    load_counting(tiny, monkeypatch)
    path = next(cache_home.glob("kernels-*.json"))
    doc = json.loads(path.read_text())
    for entry in doc["entries"].values():  # the split product, kept as the fastest everywhere
        entry["times"] = {"plain": {"few": {"split": 1e-9}, "many": {"split": 1e-9}}}
    path.write_text(json.dumps(doc))
    real = linear.split_linear
    monkeypatch.setattr(linear, "split_linear", lambda x, w: real(x, w) * 2)
    monkeypatch.setattr(linear, "FLOAT_KINDS", {torch.float32: linear._float_kind(torch.float32)})
    model, timed = load_counting(tiny, monkeypatch)
    assert sorted(timed) == shapes(model)
    assert all(m.choice.few != "split" for m in model.modules() if isinstance(m, CpuLinear))


def test_times_measured_beside_other_work_serve_the_load_but_are_not_kept(tiny, cache_home, monkeypatch):
    monkeypatch.setattr(Meter, "busy", 0.5)
    model, timed = load_counting(tiny, monkeypatch)
    assert sorted(timed) == shapes(model) and all(isinstance(m, CpuLinear) for m in computing_layers(model))
    assert not list(cache_home.glob("kernels-*.json"))  # nothing kept
    assert sorted(load_counting(tiny, monkeypatch)[1]) == shapes(model)  # measured again
    monkeypatch.setattr(Meter, "busy", 0.05)
    load_counting(tiny, monkeypatch)
    assert load_counting(tiny, monkeypatch)[1] == []  # quiet enough: kept


def test_other_work_is_a_share_of_the_cpus_over_enough_clock_ticks():
    from xllama_cli.machine import OtherWork, cpu_jiffies

    meter = OtherWork()
    sum(range(10**4))
    assert meter.share() is None  # a few ticks at most: too short to tell a busy machine
    meter, start = OtherWork(), cpu_jiffies()[0]
    while start and cpu_jiffies()[0] - start <= OtherWork.MIN_TICKS * (os.cpu_count() or 1):
        sum(range(10**5))
    share = meter.share()
    assert share is None if start == 0 else 0 <= share <= 1  # None: no /proc here


def test_an_unwritable_cache_folder_keeps_the_choices_for_the_process(tiny, tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))  # a file where the folder should be
    model = load_model(tiny, device="cpu", dtype="float32")
    assert any(isinstance(m, CpuLinear) for m in model.modules())
    assert KernelCache().entries == {}


def test_the_cache_folder_follows_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert kernel_cache.cache_folder() == tmp_path / "xllama"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/ignored")
    assert kernel_cache.cache_folder().parent.name == ".cache"


# ---- turning it off ----
def test_xllama_kernels_plain_turns_every_kernel_off(tiny, monkeypatch):
    monkeypatch.setenv("XLLAMA_KERNELS", "plain")
    model = load_model(tiny, device="cpu", dtype="bfloat16", quantize="int8")
    assert not any(isinstance(m, CpuLinear) for m in model.modules())
    assert generate_tokens(model, PROMPTS, 4).tokens == generate_tokens(plain_model(tiny, "int8"), PROMPTS, 4).tokens


def test_a_bad_xllama_kernels_is_one_error_line(monkeypatch):
    monkeypatch.setenv("XLLAMA_KERNELS", "fastest")
    cli_fails(["generate", "--model", str(DEMO_MODEL), "-n", "2", "hi"],
              "XLLAMA_KERNELS='fastest' is not a setting", "auto", "measure", "plain")


def test_xllama_kernels_measure_measures_again_and_keeps_it(tiny, cache_home, monkeypatch):
    load_counting(tiny, monkeypatch)
    monkeypatch.setenv("XLLAMA_KERNELS", "measure")
    model, timed = load_counting(tiny, monkeypatch)
    assert sorted(timed) == shapes(model)
    monkeypatch.delenv("XLLAMA_KERNELS")
    assert load_counting(tiny, monkeypatch)[1] == []


# ---- --dtype auto on the CPU ----
@pytest.fixture
def said(monkeypatch):
    """What loading says on stderr, with its once-a-process memory cleared."""
    lines: list[str] = []
    monkeypatch.setattr(loading, "_SAID", set())
    monkeypatch.setattr(loading.report, "info", lines.append)
    return lines


@pytest.mark.parametrize("native", [True, False])
def test_dtype_auto_on_the_cpu_follows_the_checkpoint_and_the_cpu(tmp_path, said, monkeypatch, native):
    monkeypatch.setattr(loading, "native_bf16", lambda: native)
    cpu = torch.device("cpu")
    assert loading.resolve_dtype("auto", cpu, stored=torch.float32) == torch.float32
    assert said == []  # a float32 checkpoint stays float32 without a word
    for stored in (torch.bfloat16, torch.float16):
        want = torch.bfloat16 if native else torch.float32
        assert loading.resolve_dtype("auto", cpu, stored=stored) == want
        assert loading.resolve_dtype("auto", cpu, stored=stored) == want
    assert len(said) == 2 and all(line.startswith("--dtype auto: ") for line in said)  # once each
    assert ("natively" in said[0]) == native and ("no native bfloat16" in said[0]) == (not native)
    assert loading.resolve_dtype("auto", cpu, "int8", stored=torch.float32) == torch.bfloat16
    assert loading.resolve_dtype("float32", cpu, stored=torch.bfloat16) == torch.float32


@pytest.mark.parametrize("native", [True, False])
def test_a_bfloat16_checkpoint_loads_as_the_cpu_computes_best(tmp_path, said, monkeypatch, native):
    monkeypatch.setattr(loading, "native_bf16", lambda: native)
    hf = make_hf_checkpoint(tmp_path, seed=1)
    hf.to(torch.bfloat16).save_pretrained(tmp_path)
    model = load_model(tmp_path, device="cpu")
    assert model.model.embed_tokens.weight.dtype == (torch.bfloat16 if native else torch.float32)
    assert len(said) == 1
