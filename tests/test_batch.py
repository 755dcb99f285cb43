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


def test_batch_logits_of_padded_rows_match_unpadded(tmp_path):
    make_hf_checkpoint(tmp_path, num_key_value_heads=2)
    model = load_model(tmp_path, device="cpu")
    short, long = [5, 9, 17], [4, 8, 15, 16, 23, 42]
    model.setup_cache(2, 16)
    tokens = torch.tensor([[0, 0, 0] + short, long])
    padded = model(tokens, start=0, pad=torch.tensor([3, 0]))
    model.clear_cache()
    alone = model(torch.tensor([short]))
    assert (padded[0, 3:] - alone[0]).abs().max() < 1e-5


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
