"""Top-k and top-p filters keep exactly the tokens they should."""

from __future__ import annotations

import torch

from xllama_cli.sampling import Sampling, filter_logits, sample


def test_top_k_keeps_the_k_largest():
    logits = torch.tensor([[1.0, 5.0, 3.0, 4.0, 2.0]])
    kept = torch.isfinite(filter_logits(logits, 2, None))
    assert kept.tolist() == [[False, True, False, True, False]]


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    kept = torch.isfinite(filter_logits(probs.log(), None, 0.8))
    assert kept.tolist() == [[True, True, False, False]]
    kept = torch.isfinite(filter_logits(probs.log(), None, 0.81))
    assert kept.tolist() == [[True, True, True, False]]


def test_top_p_always_keeps_the_most_likely():
    kept = torch.isfinite(filter_logits(torch.tensor([[0.0, 9.0, 1.0]]), None, 0.01))
    assert kept.tolist() == [[False, True, False]]


def test_greedy_is_argmax():
    assert sample(torch.tensor([[0.1, 0.7, 0.2]]), Sampling(temperature=0)).tolist() == [1]


def test_sampled_tokens_stay_inside_top_k():
    logits = torch.randn(1, 100, generator=torch.Generator().manual_seed(0))
    allowed = set(torch.topk(logits, 3).indices[0].tolist())
    g = torch.Generator().manual_seed(1)
    seen = {int(sample(logits, Sampling(temperature=2.0, top_k=3), g)) for _ in range(200)}
    assert seen <= allowed and len(seen) == 3
