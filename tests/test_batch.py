"""Batched generation: prompts of different lengths, each as if alone."""

from __future__ import annotations

import torch

from conftest import make_hf_checkpoint
from xllama_cli import load_model
from xllama_cli.generation import generate_tokens
from xllama_cli.sampling import Sampling


def test_batch_of_different_lengths_equals_each_alone(tmp_path):
    make_hf_checkpoint(tmp_path, num_key_value_heads=2)
    model = load_model(tmp_path, device="cpu")
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 128, (n,), generator=g).tolist() for n in (3, 11, 6, 1)]
    batch = generate_tokens(model, prompts, 24).tokens
    alone = [generate_tokens(model, [p], 24).tokens[0] for p in prompts]
    assert batch == alone


def test_rows_at_their_own_cache_slots_give_the_logits_of_each_alone(tmp_path):
    """Each row prefilled into its own cache row, then one decode step with every row at its own
    slot (a [B] start): the logits of each sequence run alone, without a cache."""
    make_hf_checkpoint(tmp_path, num_key_value_heads=2)
    model = load_model(tmp_path, device="cpu")
    short, long = [5, 9, 17, 3], [4, 8, 15, 16, 23, 42, 7]
    model.setup_cache(2, 16)
    with torch.no_grad():
        model(torch.tensor([short[:-1]]), start=0, row=0)
        model(torch.tensor([long[:-1]]), start=0, row=1)
        step = model(torch.tensor([[short[-1]], [long[-1]]]), start=torch.tensor([3, 6]), span=7)
        model.clear_cache()
        alone = [model(torch.tensor([p]))[0, -1] for p in (short, long)]
    for row in range(2):
        assert (step[row, 0] - alone[row]).abs().max() < 1e-5


def test_stops_at_eos_per_row(tmp_path):
    make_hf_checkpoint(tmp_path, num_key_value_heads=2)
    model = load_model(tmp_path, device="cpu")
    free = generate_tokens(model, [[5, 6, 7]], 10).tokens[0]
    stopped = generate_tokens(model, [[5, 6, 7]], 10, eos_ids=[free[3]]).tokens[0]
    assert stopped == free[: free.index(free[3])]


def test_sampling_is_seeded(tmp_path):
    make_hf_checkpoint(tmp_path, num_key_value_heads=2)
    model = load_model(tmp_path, device="cpu")
    s = Sampling(temperature=1.0, top_k=50, top_p=0.9, seed=7)
    a = generate_tokens(model, [[5, 6]], 20, s).tokens
    b = generate_tokens(model, [[5, 6]], 20, s).tokens
    assert a == b
