"""Tensor parallelism: CPU ranks (gloo) started by torchrun give what one process gives.

The single-process model is the reference here; test_parity.py checks it against transformers.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tp_worker
from typer.testing import CliRunner

from conftest import ROOT, STORY, fixture, make_hf_checkpoint
from xllama_cli import checkpoint
from xllama_cli.checkpoint import open_checkpoint
from xllama_cli.cli import app
from xllama_cli.config import ModelConfig
from xllama_cli.errors import XllamaError
from xllama_cli.layout import divisors
from xllama_cli.loading import load
from xllama_cli.parallel import plan_shard
from xllama_cli.tokenizer import load_tokenizer

PROMPT = "Once upon a time"


def torchrun(nproc: int, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    """`torchrun --standalone` (a free port) with this checkout's source; fails the test if it hangs."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"), str(ROOT / "tests"), env.get("PYTHONPATH")]))
    env["XLLAMA_DIST_TIMEOUT"] = "60"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            cwd=ROOT, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun and every rank it started
        out, err = proc.communicate()
        pytest.fail(f"torchrun hung for {timeout}s:\n{err[-3000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def run_ranks(tmp: Path, nproc: int, cases: list[dict]) -> list[dict]:
    """Every case loaded on `nproc` ranks by tp_worker.py; one result dict per rank."""
    spec = tmp / "cases.json"
    spec.write_text(json.dumps(cases))
    r = torchrun(nproc, str(ROOT / "tests" / "tp_worker.py"), str(spec), str(tmp / "out"))
    assert r.returncode == 0, r.stderr[-4000:]
    return [torch.load(f"{tmp / 'out'}.{rank}.pt", weights_only=True) for rank in range(nproc)]


def story_ids() -> list[int]:
    return load_tokenizer(fixture("stories260K-hf")).encode(PROMPT)


def broken_meta_mp2(dst: Path) -> Path:
    """The 2-shard Meta fixture with rank 1's half of one wq cut short: only rank 1 meets the fault."""
    src = fixture("stories260K-meta-mp2")
    dst.mkdir()
    for name in ("params.json", "tokenizer.model", "consolidated.00.pth"):
        (dst / name).write_bytes((src / name).read_bytes())
    shard = torch.load(src / "consolidated.01.pth", weights_only=True)
    shard["layers.2.attention.wq.weight"] = shard["layers.2.attention.wq.weight"][:24].clone()
    torch.save(shard, dst / "consolidated.01.pth")
    return dst


# ---- 2 ranks: every case in one torchrun launch ----
@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tp2")
    make_hf_checkpoint(tmp / "mqa", seed=3, num_key_value_heads=1, attention_bias=True, mlp_bias=True,
                       max_position_embeddings=16,
                       rope_parameters={"rope_type": "dynamic", "factor": 4.0, "rope_theta": 10000.0})
    gqa = make_hf_checkpoint(tmp / "gqa", seed=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=True,
                             rope_parameters={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                              "high_freq_factor": 4.0, "original_max_position_embeddings": 8,
                                              "rope_theta": 10000.0})
    make_hf_checkpoint(tmp / "qwen2", seed=5, family="qwen2", num_key_value_heads=2, num_hidden_layers=3,
                       use_sliding_window=True, sliding_window=4, max_window_layers=1)
    make_hf_checkpoint(tmp / "mistral", seed=6, family="mistral", num_key_value_heads=4, sliding_window=4)
    (tmp / "bin").mkdir()
    torch.save(gqa.state_dict(), tmp / "bin" / "pytorch_model.bin")
    (tmp / "bin" / "config.json").write_text((tmp / "gqa" / "config.json").read_text())
    story, ids = str(fixture("stories260K-hf")), story_ids()
    rand = [[5, 17, 99, 3, 42, 8, 77], [9, 1, 64]]  # a batch of unequal prompts
    probe = list(range(3, 40))
    cases = [
        dict(name="story_hf", model=story, prompts=[ids], n=60, sample=True),
        dict(name="story_meta_mp2", model=str(fixture("stories260K-meta-mp2")), prompts=[ids], n=30),
        dict(name="story_gqa2", model=story, attn="GQA", groups=2, prompts=[ids], n=30),
        dict(name="story_mqa", model=story, attn="MQA", prompts=[ids], n=30),
        dict(name="story_mha", model=story, attn="MHA", prompts=[ids], n=16),
        dict(name="story_packed", model=story, decode_batch=2, prompts=[ids, ids[:5]], n=30),  # oneDNN's products
        dict(name="random_mqa_bias_dynamic", model=str(tmp / "mqa"), prompts=rand, n=24, sample=True),
        dict(name="random_gqa_head_dim_tied_llama3", model=str(tmp / "gqa"), prompts=rand, n=24),
        dict(name="random_gqa_bin", model=str(tmp / "bin"), prompts=rand, n=24),
        dict(name="random_qwen2_window", model=str(tmp / "qwen2"), prompts=rand, n=24),
        dict(name="random_mistral_window", model=str(tmp / "mistral"), prompts=rand, n=24),
        dict(name="broken_meta", model=str(broken_meta_mp2(tmp / "broken")), prompts=[ids], n=4),
        dict(name="story_int8", model=story, quantize="int8", dtype="auto", prompts=[ids], n=30),
        dict(name="story_compiled", model=story, compile=True, prompts=[ids], n=30),
    ]
    for c in cases:
        c["logits_tokens"] = probe if c["name"].startswith("random") else [1] + list(range(3, 40))
    return {c["name"]: c for c in cases}, run_ranks(tmp, 2, cases)


def single(case: dict) -> dict:
    return tp_worker.run_case(case)


LOCAL = {  # (query heads, KV heads, FFN rows) on each of 2 ranks
    "story_hf": (4, 2, 86), "story_meta_mp2": (4, 2, 86), "story_gqa2": (4, 1, 86),
    "story_mqa": (4, 1, 86), "story_mha": (4, 4, 86), "story_packed": (4, 2, 86), "random_mqa_bias_dynamic": (4, 1, 48),
    "random_gqa_head_dim_tied_llama3": (4, 1, 48), "random_gqa_bin": (4, 1, 48),
    "random_qwen2_window": (4, 1, 48), "random_mistral_window": (4, 2, 48),
}


@pytest.mark.parametrize("name", list(LOCAL))
def test_two_ranks_give_the_single_process_tokens_and_logits(two_ranks, name):
    cases, ranks = two_ranks
    want = single(cases[name])
    for rank, results in enumerate(ranks):
        got = results[name]
        assert "error" not in got, got
        assert got["local"] == LOCAL[name]
        assert got["tokens"] == want["tokens"], (name, rank)
        diff = (got["logits"] - want["logits"]).abs().max().item()
        assert diff < 1e-4, (name, rank, diff)
        assert got["params"] < want["params"]


def test_ranks_swap_their_own_slices_for_cpu_kernels(two_ranks):
    _, ranks = two_ranks
    assert all(results[name]["kernels"] for results in ranks for name in ("story_packed", "story_hf"))


@pytest.mark.parametrize("name", ["story_int8", "story_compiled"])
def test_two_ranks_run_int8_weights_and_the_compiled_step(two_ranks, name):
    """int8: each rank quantizes its own slices (a row split by columns gets a scale per part), so
    the ranks' model is not bit for bit the single process's; a trained model's tokens still agree."""
    cases, ranks = two_ranks
    want = single(cases[name])
    for rank, results in enumerate(ranks):
        got = results[name]
        assert "error" not in got, got
        assert got["local"] == (4, 2, 86)
        assert got["tokens"] == want["tokens"], (name, rank)
        if name == "story_compiled":
            assert (got["logits"] - want["logits"]).abs().max().item() < 1e-4


def test_two_ranks_on_the_hf_fixture_tell_the_known_story(two_ranks):
    _, ranks = two_ranks
    tok = load_tokenizer(fixture("stories260K-hf"))
    text = tok.decode(story_ids() + ranks[0]["story_hf"]["tokens"][0])
    assert text.startswith(STORY)


def test_every_rank_samples_rank_0s_token(two_ranks):
    """Unseeded sampling draws differently on each rank; the broadcast keeps them on one text."""
    _, (r0, r1) = two_ranks
    for name in ("story_hf", "random_mqa_bias_dynamic"):
        assert len(r0[name]["sampled"][0]) > 1
        assert r0[name]["sampled"] == r1[name]["sampled"], name


def test_a_load_error_on_one_rank_reaches_every_rank(two_ranks):
    _, ranks = two_ranks
    for results in ranks:
        err = results["broken_meta"]["error"]
        assert err.startswith("rank 1: ") and "layers.2.self_attn.q_proj.weight" in err, err


# ---- 3 ranks: heads that do not split evenly into KV groups, and a world size that does not divide ----
def test_three_ranks_uneven_groups_and_a_world_size_that_does_not_divide(tmp_path):
    make_hf_checkpoint(tmp_path / "m", seed=5, hidden_size=96, num_attention_heads=12, num_key_value_heads=4,
                       intermediate_size=100)
    probe = list(range(3, 30))
    cases = [
        dict(name="uneven", model=str(tmp_path / "m"), prompts=[[4, 8, 15, 16, 23, 42]], n=20, logits_tokens=probe),
        dict(name="story", model=str(fixture("stories260K-hf")), prompts=[[1]], n=1, logits_tokens=[1]),
    ]
    ranks = run_ranks(tmp_path, 3, cases)
    want = single(cases[0])
    # 12 query heads, 4 KV heads, 3 ranks: rank 0 holds query heads 0-3, which use KV heads 0,0,0,1
    assert [r["uneven"]["local"] for r in ranks] == [(4, 4, 33), (4, 2, 33), (4, 4, 34)]
    for results in ranks:
        assert results["uneven"]["tokens"] == want["tokens"]
        assert (results["uneven"]["logits"] - want["logits"]).abs().max().item() < 1e-4
        assert results["story"]["error"].startswith("world size 3 does not divide the model's 8 query heads")


# ---- the command line under torchrun ----
def test_generate_under_torchrun_prints_once_what_one_process_prints():
    args = ["generate", "--model", str(fixture("stories260K-hf")), "--temperature", "0", "-n", "60", PROMPT]
    one = CliRunner().invoke(app, [*args, "--quiet"])
    assert one.exit_code == 0, one.output
    r = torchrun(2, "-m", "xllama_cli", *args)
    assert r.returncode == 0, r.stderr
    assert r.stdout == one.stdout and r.stdout.startswith(STORY)
    assert r.stderr.count("prompt tokens") == 1  # the summary, from rank 0 alone


def test_an_error_met_by_one_rank_alone_is_said_by_that_rank(tmp_path):
    """Rank 0 reports errors; a rank whose error rank 0 does not report says it, with its rank."""
    script = ("import sys, xllama_cli.parallel as p; p.GRACE_S = 0; from xllama_cli.cli import main; "
              f"sys.argv = ['xllama', 'generate', '--model', {str(tmp_path / 'none')!r}, 'hi']; main()")
    env = dict(os.environ, RANK="1", WORLD_SIZE="2", PYTHONPATH=str(ROOT / "src"))
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr == f"error: rank 1: model folder {str(tmp_path / 'none')!r} does not exist\n"


def test_bad_argument_under_two_ranks_exits_nonzero_without_hanging():
    r = torchrun(2, "-m", "xllama_cli", "generate", "--model", str(fixture("stories260K-hf")),
                 "--groups", "3", PROMPT, timeout=120)
    assert r.returncode != 0
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert errors == ["error: --groups 3 does not divide the 8 query heads; valid group counts: 1, 2, 4, 8"]


# ---- in one process: the shard plan and what each rank reads ----
@pytest.mark.parametrize("world", [3, 16])
def test_world_size_must_divide_the_query_heads(world):
    with pytest.raises(XllamaError, match=f"{world}"):
        plan_shard(ModelConfig(dim=64, n_heads=8, n_kv_heads=4, hidden_dim=172), 4, 0, world)


def test_every_local_query_head_meets_its_own_kv_head():
    """For every head layout and world size: local query head i, through the grouping the
    attention applies to the rank's own KV heads, reaches the KV head the whole model gives it."""
    for h in range(1, 17):
        for n_kv in divisors(h):
            for world in divisors(h):
                for source_kv in {n_kv, h}:  # the checkpoint's own layout, or regrouped from MHA
                    cfg = ModelConfig(dim=16 * h, n_heads=h, n_kv_heads=n_kv, hidden_dim=4 * world, head_dim=4)
                    for rank in range(world):
                        s = plan_shard(cfg, source_kv, rank, world)
                        local = s.config
                        lo = s.kv_read[0] if s.kv_read else 0
                        for i in range(local.n_heads):
                            kv = s.kv_pick[i // (local.n_heads // local.n_kv_heads)] + lo
                            assert kv == (s.q_heads[0] + i) // (h // n_kv), (h, n_kv, world, rank, i)


@pytest.mark.parametrize("folder", ["stories260K-meta-mp2", "stories260K-hf"])
def test_each_rank_reads_only_its_slices(folder, monkeypatch):
    ckpt = open_checkpoint(fixture(folder))
    full = dict(ckpt.tensors())
    # a memory-mapped tensor's bytes are read where a range of it is cut (checkpoint._narrow):
    # record which file each cut tensor came from
    owner: dict[int, tuple[str, str]] = {}
    cut: set[tuple[str, str]] = set()
    load, narrow = checkpoint._torch_load, checkpoint._narrow

    def recording_load(f):
        tensors = load(f)
        owner.update({id(t): (Path(f).name, k) for k, t in tensors.items()})
        return tensors

    def recording_narrow(t, part):
        cut.add(owner.get(id(t), ("?", "?")))
        return narrow(t, part)

    monkeypatch.setattr(checkpoint, "_torch_load", recording_load)
    monkeypatch.setattr(checkpoint, "_narrow", recording_narrow)
    for rank in range(2):
        cut.clear()
        shard = plan_shard(ckpt.config, ckpt.config.n_kv_heads, rank, 2)
        for name, t in ckpt.tensors(shard.select):
            part = shard.select(name)
            want = full[name] if part is None else full[name].narrow(part[0], part[1], part[2] - part[1])
            assert torch.equal(t, want), name
        if folder.endswith("mp2"):  # every projection comes from this rank's own consolidated.NN.pth
            assert {f for f, _ in cut} == {f"consolidated.0{rank}.pth"}
            assert len(cut) == 5 * 7  # 5 layers x q, k, v, o, gate, up, down


def test_single_process_model_has_no_parallel_parts():
    loaded = load(fixture("stories260K-hf"), device="cpu")
    assert loaded.tp is None
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in loaded.model.modules())


def test_a_row_parallel_bias_is_added_once_after_the_all_reduce(monkeypatch):
    """The hooks complete each rank's partial sums; o_proj's and down_proj's bias is added after
    the sum, once, not by every rank's own product."""
    import torch.distributed as dist

    from xllama_cli.model import Transformer
    from xllama_cli.parallel import TensorParallel, apply_tensor_parallel

    cfg = ModelConfig(dim=16, n_layers=1, n_heads=2, n_kv_heads=2, hidden_dim=24, vocab_size=32,
                      attention_bias=True, mlp_bias=True)
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    down_bias = mlp.down_proj.bias.detach().clone()
    world = 2  # a stand-in all-reduce: this rank's partial sum, as if the other rank sent the same
    monkeypatch.setattr(dist, "all_reduce", lambda t: t.mul_(world))
    x = torch.randn(1, 3, 16)
    with torch.no_grad():
        want = mlp.down_proj(torch.nn.functional.silu(mlp.gate_proj(x)) * mlp.up_proj(x)) - down_bias
    apply_tensor_parallel(model, TensorParallel(0, world, torch.device("cpu")))
    assert attn.o_proj.bias is None and mlp.down_proj.bias is None
    with torch.no_grad():
        assert torch.allclose(mlp(x), want * world + down_bias, atol=1e-6)
