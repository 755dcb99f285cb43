"""The training loop behind `uptrain` and the demo model: it learns, and resumes exactly."""

from __future__ import annotations

import signal

import pytest
import torch

from conftest import make_hf_checkpoint
from xllama_cli import load_model
from xllama_cli.evaluate import perplexity
from xllama_cli.train import StepInfo, Stopped, TrainConfig, lr_at, train


def tiny_model(tmp_path):
    make_hf_checkpoint(tmp_path, num_key_value_heads=2, hidden_size=32, intermediate_size=48, num_attention_heads=4)
    return load_model(tmp_path, device="cpu", pack=False)  # trained: plain weights


def mean_loss(model, data: torch.Tensor) -> float:
    return perplexity(model, data.tolist(), bos_id=1, context=33).nll


def pattern_data(n: int = 4000) -> torch.Tensor:
    """A learnable stream: a repeated phrase of 20 tokens."""
    return torch.arange(3, 23).repeat(n // 20)


def test_training_lowers_the_loss_in_a_few_steps(tmp_path):
    model = tiny_model(tmp_path)
    data = pattern_data()
    before = mean_loss(model, data)
    losses = train(model, data, TrainConfig(steps=30, lr=3e-3, batch=4, context=32, seed=0))
    after = mean_loss(model, data)
    assert after < before * 0.5 and losses[-1] < losses[0]


def interrupt_at(step: int, times: int = 1):
    """An on_step callback that sends this process SIGINT (Ctrl-C) `times` times after `step`."""
    def on_step(info: StepInfo) -> None:
        if info.step == step:
            for _ in range(times):
                signal.raise_signal(signal.SIGINT)
    return on_step


def test_ctrl_c_stops_after_a_whole_step_and_the_resumed_run_equals_an_uninterrupted_one(tmp_path):
    data = pattern_data()
    cfg = TrainConfig(steps=12, lr=1e-3, batch=2, context=16, seed=3, save_every=4)
    straight = tiny_model(tmp_path / "a")
    train(straight, data, cfg)

    resumed = tiny_model(tmp_path / "b")
    state = tmp_path / "state.pt"
    handler = signal.getsignal(signal.SIGINT)
    with pytest.raises(Stopped) as stopped:
        train(resumed, data, cfg, state_path=state, on_step=interrupt_at(6))
    assert (stopped.value.step, stopped.value.signum, stopped.value.saved) == (6, signal.SIGINT, True)
    assert signal.getsignal(signal.SIGINT) is handler  # Ctrl-C means Ctrl-C again once training ends
    assert torch.load(state, weights_only=True)["step"] == 6  # saved at the stop, between the saves
    fresh = tiny_model(tmp_path / "c")  # a new process: the weights come from the state file alone
    train(fresh, data, cfg, state_path=state, resume=True)
    for (name, a), b in zip(straight.state_dict().items(), fresh.state_dict().values()):
        assert (a - b).abs().max() <= 1e-6, name


def test_a_second_ctrl_c_stops_training_at_once(tmp_path):
    cfg = TrainConfig(steps=12, lr=1e-3, batch=2, context=16, seed=3, save_every=4)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_model(tmp_path), pattern_data(), cfg, state_path=tmp_path / "state.pt",
              on_step=interrupt_at(2, times=2))
    assert not (tmp_path / "state.pt").exists()  # stopped before any save


def test_learning_rate_warms_up_then_decays_to_the_floor():
    cfg = TrainConfig(steps=100, lr=1.0, warmup=10, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == 0.1 and lr_at(9, cfg) == 1.0
    assert lr_at(55, cfg) < lr_at(20, cfg)
    assert abs(lr_at(99, cfg) - 0.1) < 1e-3
