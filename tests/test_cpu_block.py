"""cpu_block.py: a decode step's block as one numba call. For each numba product loop (float32,
bf16, int8's and int4's forms on every instruction set the CPU has) it gives the modules' logits
and cache (rows at one slot, rows each at their own slot, with biases), leaves more rows than few
to the modules, refuses a slot the cache lacks before writing anything, serves only blocks whose
every product is a loop and that carry no hooks, and is given only where it agrees with the
modules and was measured faster, its times kept."""

from __future__ import annotations

import pytest
import torch

from conftest import random_llama, rows_at_their_own_slots
from xllama_cli import cpu_attention, cpu_block, vnni
from xllama_cli.cpu_attention import give_fused_step
from xllama_cli.cpu_block import give_block_step, serves, use_block_step
from xllama_cli.jit import numba_module
from xllama_cli.linear import SMALL_ROWS, Choice, MemoryStore, Tuner, fixed
from xllama_cli.loading import use_cpu_path
from xllama_cli.model import Transformer
from xllama_cli.quantize import quantize_model

if numba_module() is None:
    pytest.skip("numba is not usable here", allow_module_level=True)

# (kind, the loop's choice): every numba loop a block's products can be here
LOOPS = [("float32", Choice("plain", "numba", "aten")), ("bfloat16", Choice("plain", "numba", "aten"))]
LOOPS += [(kind, Choice("vnni", isa, "widen-bf16")) for kind in ("int8", "int4") for isa in vnni.isas()]
# how near the modules' logits: the quantized loops round the activations to int8, and a norm
# summed in another order can move one activation a step (cpu_block.TOLERANCE)
TOLERANCE = {"float32": 1e-5, "bfloat16": 1e-5, "int8": 1e-2, "int4": 1e-2}
QWEN2 = dict(family="qwen2", qkv_bias=True)  # q, k and v with biases


def loop_model(kind: str, choice: Choice, tuner: Tuner | None = None, **changes) -> Transformer:
    """random_model in `kind`, every block's product on `choice` (the head on `tuner`'s choice),
    computing in float32 with the fused attention step."""
    model = random_llama(**changes).to(torch.float32 if kind == "float32" else torch.bfloat16)
    cfg = model.config
    if kind in ("int8", "int4"):
        quantize_model(model, kind)
    tuner, given = tuner or Tuner(), fixed(choice)

    def choose(spec, kind_, layers):
        picked = given(spec, kind_, layers) if spec.n != cfg.vocab_size else (None, None)
        return picked if picked[0] is not None else tuner.choose(spec, kind_, layers)

    use_cpu_path(model, choose)
    assert give_fused_step(model) == cfg.n_layers
    return model


def twins(kind: str, choice: Choice, **changes) -> tuple[Transformer, Transformer]:
    """The same model twice: through its modules, and with the block step. Built twice over one
    tuner (so the head's choice is the same), not copied: a head on oneDNN's packed weight
    cannot be deep-copied."""
    tuner = Tuner()
    plain = loop_model(kind, choice, tuner, **changes)
    fused = loop_model(kind, choice, tuner, **changes)
    assert give_block_step(fused) == fused.config.n_layers
    return plain, fused


def close(got: torch.Tensor, want: torch.Tensor, tol: float) -> bool:
    return torch.allclose(got, want, rtol=tol, atol=tol * want.abs().max().item())


@torch.inference_mode()
@pytest.mark.parametrize("kind,choice", LOOPS, ids=[f"{k}-{c.few}" for k, c in LOOPS])
@pytest.mark.parametrize("rows,family", [(1, {}), (3, QWEN2)], ids=["one-row", "three-rows-biases"])
def test_the_block_step_gives_the_modules_logits_and_cache(kind, choice, rows, family):
    plain, fused = twins(kind, choice, **family)
    tokens = torch.randint(0, 96, (rows, 12), generator=torch.Generator().manual_seed(1))
    for model in (plain, fused):
        model.setup_cache(rows, 32)
        model(tokens[:, :5], 0)  # the prompt: the modules in both
    for t in range(5, 12):
        want, got = plain(tokens[:, t:t + 1], t), fused(tokens[:, t:t + 1], t)
        assert close(got, want, TOLERANCE[kind]), (t, (got - want).abs().max())
    for a, b in zip(plain.model.layers, fused.model.layers):
        assert close(b.self_attn.kv_cache.k, a.self_attn.kv_cache.k, TOLERANCE[kind])
        assert close(b.self_attn.kv_cache.v, a.self_attn.kv_cache.v, TOLERANCE[kind])


@torch.inference_mode()
def test_rows_each_at_their_own_slot_decode_as_the_modules_masked_step():
    """The engine's step: rows of a bigger cache (from `row`), each at its own slot (a tensor
    start) over `span` slots, each attending only to the slots it filled."""
    for got, want in rows_at_their_own_slots(*twins(*LOOPS[0]), vocab=96):
        assert close(got, want, 1e-5), (got - want).abs().max()


@torch.inference_mode()
def test_more_rows_than_few_take_the_modules(monkeypatch):
    plain, fused = twins(*LOOPS[0])
    rows = SMALL_ROWS + 1
    tokens = torch.randint(0, 96, (rows, 4), generator=torch.Generator().manual_seed(3))
    monkeypatch.setattr(cpu_block, "_block", lambda name: pytest.fail("the block step ran"))
    for model in (plain, fused):
        model.setup_cache(rows, 8)
        model(tokens[:, :3], 0)
    assert close(fused(tokens[:, 3:], 3), plain(tokens[:, 3:], 3), 1e-6)


@torch.inference_mode()
def test_a_slot_outside_the_cache_is_refused_before_anything_is_written():
    _, fused = twins(*LOOPS[0])
    fused.setup_cache(1, 8)
    fused(torch.tensor([[1, 2, 3]]), 0)
    before = [layer.self_attn.kv_cache.k.clone() for layer in fused.model.layers]
    with pytest.raises(IndexError, match="not in a cache of 1 rows and 8 slots"):
        fused(torch.tensor([[4]]), 8)
    assert all(torch.equal(layer.self_attn.kv_cache.k, k) for layer, k in zip(fused.model.layers, before))


def test_only_blocks_of_loops_without_hooks_are_served():
    model = loop_model(*LOOPS[0])
    assert all(serves(block) for block in model.model.layers)
    onednn = loop_model("float32", Choice("plain", "aten", "aten"))  # a product that is not a loop
    assert not any(serves(block) for block in onednn.model.layers)
    model.model.layers[0].mlp.register_forward_hook(lambda module, args, out: out)  # as tensor parallelism's
    assert [serves(block) for block in model.model.layers] == [False, True]
    model.model.layers[1].self_attn.fused_step = None  # no fused attention
    assert give_block_step(model) == 0


@torch.inference_mode()
def test_it_is_given_where_its_kept_times_say_faster():
    """Measured at the first load and kept (cpu_attention.kept_or_timed, whose reuse of kept times
    test_cpu_attention checks); the verdict follows the kept times."""
    store = MemoryStore()
    use_block_step(loop_model(*LOOPS[0]), Tuner(store, 1))
    (key,) = [k for k in store.entries if k.startswith("block ")]
    assert key.startswith("block float32.float32.float32.float32 64x128 heads 4x16 kv 2 rows 1 ")
    assert set(store.entries[key]["times"]["block"]["few"]) == {"plain", "fused"}
    for fused, plain in ((1.0, 2.0), (2.0, 1.0)):
        store.put(key, {"times": {"block": {"few": {"plain": plain, "fused": fused}}}})
        model = loop_model(*LOOPS[0])
        assert use_block_step(model, Tuner(store, 1)) is (fused < plain)
        assert [layer.fused_step is not None for layer in model.model.layers] == [fused < plain] * 2


@torch.inference_mode()
def test_a_step_that_disagrees_with_the_modules_is_not_given(monkeypatch):
    def wrong(name):
        def step(x, out, *rest):
            out[:] = x  # the block's input: as if it computed nothing
            return True
        return step

    monkeypatch.setattr(cpu_block, "_block", wrong)
    model = loop_model(*LOOPS[0])
    assert not use_block_step(model, Tuner(MemoryStore(), 1))
    assert all(layer.fused_step is None for layer in model.model.layers)


@torch.inference_mode()
@pytest.mark.parametrize("loops_faster", [True, False])
def test_the_blocks_take_the_loops_where_the_block_step_over_them_was_measured_faster(monkeypatch, loops_faster):
    """The tuner times each shape's product alone: where it chose another product for a block's
    shape, the first blocks are timed both ways (the modules over its choices, the block step over
    the loops), and the faster way chosen; the verdict is kept, and reused. The head here has
    q/k/v's shape (one spec, whose first layer is the head), and the logits stay F.linear's."""
    store = MemoryStore()
    tokens = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(4))
    want = random_llama(vocab_size=128)(tokens)
    use_cpu_path(random_llama(vocab_size=128), Tuner(store, 1))  # every shape's times kept
    shapes = ("128x64", "64x64", "256x64", "64x128")  # q/k/v (and the head), o, gate/up, down
    block_keys = [k for k in store.entries if k.split()[1] in shapes]
    assert len(block_keys) == 4
    for key in block_keys:  # the loop slower alone than ATen's product, for each block shape
        store.put(key, {"times": {"plain": {"few": {"numba": 2.0, "aten": 1.0}, "many": {"aten": 1.0}}}})
    for key in [k for k in store.entries if k.startswith("block loops ")]:  # that first load's verdict
        del store.entries[key]
    timed = []

    def fake(paths):
        for path in paths.values():
            path()
        timed.append(1)
        return {"chosen": 2.0, "loops": 1.0} if loops_faster else {"chosen": 1.0, "loops": 2.0}

    monkeypatch.setattr(cpu_attention, "time_paths", fake)
    for _ in range(2):
        model = random_llama(vocab_size=128)
        use_cpu_path(model, Tuner(store, 1))
        assert close(model(tokens), want, 1e-5)
        fews = {layer.choice.few for b in model.model.layers for layer in cpu_block._block_layers(b)}
        assert fews == ({"numba"} if loops_faster else {"aten"}) == {model.lm_head.choice.few}
    assert timed == [1]  # measured once, then kept
    (key,) = [k for k in store.entries if k.startswith("block loops ")]
    assert "plain: aten / aten or plain: numba / aten" in key


def test_a_compiled_block_step_is_loaded_from_numbas_cache_by_the_next_process():
    """Compiling a block step takes about a second: the next process loads it from numba's cache
    (with its helpers in closure cells, it compiled again in every process)."""
    import subprocess
    import sys
    from pathlib import Path

    code = ("import sys, torch\n"
            f"sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
            "from test_cpu_block import LOOPS, twins\n"
            "from xllama_cli import cpu_block\n"
            "_, fused = twins(*LOOPS[0])\n"
            "fused.setup_cache(1, 8)\n"
            "with torch.inference_mode():\n"
            "    fused(torch.tensor([[1, 2]]), 0)\n"
            "    fused(torch.tensor([[3]]), 2)\n"
            "stats = cpu_block._block(fused.model.layers[0].fused_step.name).loop.stats\n"
            "print(sum(stats.cache_hits.values()), sum(stats.cache_misses.values()))")
    for _ in range(2):  # the first may compile (and keep) it
        run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr
    hits, misses = run.stdout.split()[-2:]
    assert hits != "0" and misses == "0", run.stdout
