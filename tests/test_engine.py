"""The engine: continuous batching in one KV cache, each request as if alone; cancelling; stop
strings; penalties and min-p against references; per-request seeds; log-probabilities; one
device-to-host read per decode step; a cache that grows by doubling and keeps what idle rows
hold."""

from __future__ import annotations

import pytest
import torch

from conftest import STORY, cli_fails, fixture, make_hf_checkpoint
from xllama_cli import engine as engine_module
from xllama_cli import load_model
from xllama_cli.engine import Engine, Request, StopStrings
from xllama_cli.errors import XllamaError
from xllama_cli.generation import continuation_text, generate_tokens
from xllama_cli.options import DEMO_MODEL
from xllama_cli.sampling import Sampler, Sampling, apply_penalties, filter_logits
from xllama_cli.tokenizer import load_tokenizer

GREEDY = Sampling(temperature=0.0)
TEXTS = ["Once upon a time", "The little dog ran to the park and saw a big red ball", "Lily",
         "Tom and his mom went to the store to buy some milk. They", "One day, a bird",
         "The sun was hot and the children played in the water all day long until",
         "Ben had a toy car", "A cat sat on a mat. It was a very happy cat and it"]


def story():
    path = fixture("stories260K-hf")
    return load_model(path, device="cpu", dtype="float32"), load_tokenizer(path)


def demo():
    return load_model(DEMO_MODEL, device="cpu", dtype="float32"), load_tokenizer(DEMO_MODEL)


class Collected:
    """Each request's events, in order."""

    def __init__(self) -> None:
        self.events: dict[int, list] = {}

    def request(self, key: int, prompt: list[int], n: int, **kw) -> Request:
        self.events[key] = []
        return Request(prompt, n, on_event=self.events[key].append, **kw)

    def tokens(self, key: int) -> list[int]:
        return [t for e in self.events[key] for t in e.tokens]

    def text(self, key: int) -> str:
        return "".join(e.text for e in self.events[key])

    def finish(self, key: int) -> str | None:
        return self.events[key][-1].finish_reason if self.events[key] else None


def run_arrivals(engine: Engine, requests: list[Request], arrivals: dict[int, list[int]]) -> int:
    """Add request i at the step `arrivals` names for it and step until all have ended; returns
    the number of steps."""
    steps = 0
    while steps <= max(arrivals) or engine.live or engine.waiting:
        for i in arrivals.get(steps, []):
            engine.add(requests[i])
        engine.step()
        steps += 1
    return steps


# ---- continuous batching: each request as if alone ----
ARRIVALS = {0: [0], 1: [1, 2], 3: [3], 4: [4], 7: [5, 6], 12: [7]}


@pytest.mark.parametrize("max_batch", [8, 3])
@pytest.mark.parametrize("load", [story, demo], ids=["stories260K", "demo"])
def test_eight_prompts_arriving_at_different_steps_each_get_their_tokens_alone(load, max_batch):
    """Greedy, float32: with slots for all (each joins the running batch) and with 3 (the others
    wait, and a slot another request held is reused from its shared prefix)."""
    model, tok = load()
    prompts = [tok.encode(t) for t in TEXTS]
    lengths = [12 + 5 * i for i in range(8)]  # requests end at different steps
    alone = [generate_tokens(model, [p], n, GREEDY, tok.eos_ids).tokens[0]
             for p, n in zip(prompts, lengths)]
    got = Collected()
    requests = [got.request(i, p, n, sampling=GREEDY) for i, (p, n) in enumerate(zip(prompts, lengths))]
    engine = Engine(model, tok, max_batch=max_batch)
    run_arrivals(engine, requests, ARRIVALS)
    assert [got.tokens(i) for i in range(8)] == alone
    assert [got.text(i) for i in range(8)] == [continuation_text(tok, a) for a in alone]
    assert all(got.finish(i) in ("stop", "length") for i in range(8))


def test_prompts_of_one_length_prefill_as_one_batch_and_each_gets_its_tokens_alone(monkeypatch):
    model, tok = story()
    prompts = [tok.encode(TEXTS[i])[:6] for i in (1, 3, 5, 7)] + [tok.encode(TEXTS[0])]
    alone = [generate_tokens(model, [p], 20, GREEDY, []).tokens[0] for p in prompts]
    prefills, forward = [], model.forward

    def recorded(tokens, **kw):
        if tokens.shape[1] > 1:
            prefills.append(tuple(tokens.shape))
        return forward(tokens, **kw)

    monkeypatch.setattr(model, "forward", recorded)
    assert generate_tokens(model, prompts, 20, GREEDY, []).tokens == alone
    assert prefills == [(4, 6), (1, len(prompts[4]))]


def test_rows_at_different_positions_past_a_sliding_window_get_their_tokens_alone(tmp_path):
    """Per-row masks keep each row's own window, in prefill and in decode."""
    make_hf_checkpoint(tmp_path, seed=5, family="mistral", num_key_value_heads=2, sliding_window=4)
    model = load_model(tmp_path, device="cpu", dtype="float32")
    prompts = [[5, 9, 33, 70, 2, 11, 4], [8, 41, 6], [7, 7, 7, 7, 7, 7, 7, 7, 7, 1], [3]]
    alone = [generate_tokens(model, [p], 16).tokens[0] for p in prompts]
    got = Collected()
    requests = [got.request(i, p, 16, eos_ids=[]) for i, p in enumerate(prompts)]
    run_arrivals(Engine(model, max_batch=4), requests, {0: [0], 2: [1], 3: [2], 9: [3]})
    assert [got.tokens(i) for i in range(4)] == alone


def test_a_cancelled_request_frees_its_slot_and_the_next_waiting_one_runs():
    model, tok = story()
    prompts = [tok.encode(TEXTS[0]), tok.encode(TEXTS[1])]
    want = generate_tokens(model, [prompts[1]], 20, GREEDY, []).tokens[0]
    got = Collected()
    engine = Engine(model, tok, max_batch=1)
    first = engine.add(got.request(0, prompts[0], 200, eos_ids=[]))
    engine.add(got.request(1, prompts[1], 20, eos_ids=[]))
    for _ in range(5):
        engine.step()
    assert engine.live == 1 and engine.waiting == 1
    made = got.tokens(0)
    engine.cancel(first)
    engine.step()  # the cancel frees the slot; the waiting request is prefilled into it
    assert got.finish(0) == "cancelled" and got.tokens(0) == made and engine.waiting == 0
    engine.run()
    assert got.tokens(1) == want and got.finish(1) == "length"


def test_a_request_cancelled_while_waiting_never_runs():
    model, tok = story()
    got = Collected()
    engine = Engine(model, tok, max_batch=1)
    engine.add(got.request(0, tok.encode(TEXTS[0]), 5))
    waiting = engine.add(got.request(1, tok.encode(TEXTS[1]), 5))
    engine.cancel(waiting)
    engine.run()
    assert got.finish(1) == "cancelled" and got.tokens(1) == [] and got.finish(0) is not None


# ---- stop strings ----
def test_stop_strings_held_back_across_pieces_never_appear():
    stops = StopStrings(["o w", "xyz"])
    assert stops.push("Hel") == ("Hel", False)
    assert stops.push("lo") == ("l", False)  # "o" may start "o w": held
    assert stops.push(" wo") == ("", True)
    stops = StopStrings(["xyz"])
    assert stops.push("abx") == ("ab", False) and stops.push("y") == ("", False)
    assert stops.flush() == "xy"  # the request ended another way: what was held is shown
    assert StopStrings(["b", "abc"]).push("zabc") == ("z", True)  # the earliest stop wins


@pytest.mark.parametrize("stop", ["tle gir", "Lily.", " there"])
def test_a_stop_string_spanning_tokens_ends_the_text_before_it(stop):
    """The known greedy story: the text is the story up to the stop string, streamed in pieces
    that never show any of it."""
    model, tok = story()
    story_text = STORY.removeprefix("Once upon a time")
    got = Collected()
    engine = Engine(model, tok, max_batch=2)
    engine.add(got.request(0, tok.encode("Once upon a time"), 60, stop=[stop, "never there"]))
    engine.add(got.request(1, tok.encode("Once upon a time"), 60, eos_ids=[]))  # no stop
    engine.run()
    assert got.text(0) == story_text[:story_text.index(stop)] and got.finish(0) == "stop"
    assert all(stop not in e.text for e in got.events[0])
    assert got.text(1).startswith(story_text) and got.finish(1) == "length"


def test_a_held_back_prefix_of_a_stop_string_is_shown_when_the_text_ends_otherwise():
    model, tok = story()
    ids = tok.encode("Once upon a time")
    plain = continuation_text(tok, generate_tokens(model, [ids], 8, GREEDY, []).tokens[0])
    got = Collected()
    engine = Engine(model, tok, max_batch=1)
    engine.add(got.request(0, ids, 8, eos_ids=[], stop=[plain[-3:] + "@"]))
    engine.run()
    assert got.text(0) == plain and got.finish(0) == "length"
    assert "".join(e.text for e in got.events[0][:-1]) == plain[:-3]  # held until the end


def test_generate_cli_stop_flag_cuts_the_printed_text():
    from typer.testing import CliRunner

    from xllama_cli.cli import app

    args = ["generate", "--model", str(fixture("stories260K-hf")), "-t", "0", "-n", "60", "-q"]
    one = CliRunner().invoke(app, [*args, "--stop", "girl", "--stop", "zzz", "Once upon a time"])
    assert one.exit_code == 0 and one.stdout == "Once upon a time, there was a little \n"
    batch = CliRunner().invoke(app, [*args, "--stop", "Lily", "Once upon a time", "Lily"])
    assert batch.stdout.split("\n\n")[0] == "Once upon a time, there was a little girl named "


def test_chat_cli_stop_flag_ends_each_answer_before_it():
    from typer.testing import CliRunner

    from xllama_cli.cli import app

    args = ["chat", "--model", str(fixture("stories260K-hf")), "-t", "0", "-n", "40",
            "--template", "plain", "--stop", "girl"]
    r = CliRunner().invoke(app, args, input="Once upon a time\nThe little dog\n")
    assert r.exit_code == 0, r.output
    first, second = r.stdout.split("\n\n")
    assert first.strip() == ", there was a little" and "girl" not in second


# ---- sampling: penalties, min-p, seeds ----
def test_penalties_match_a_hand_computed_reference():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, -2.0]])
    s = Sampling(repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25)
    sampler = Sampler(s, prompt=[1], vocab_size=5, device=torch.device("cpu"))
    for token in (0, 3, 0):  # the output so far: token 0 twice, token 3 once
        sampler.observe(torch.tensor([token]))
    got = apply_penalties(logits, s, sampler.seen, sampler.counts)
    # seen (prompt 1, output 0 and 3): positive / 2, negative * 2; then count * 0.5 + 0.25
    want = torch.tensor([[2.0 / 2 - 2 * 0.5 - 0.25, -1.0 * 2, 0.5, 3.0 / 2 - 0.5 - 0.25, -2.0]])
    assert torch.allclose(got, want)
    assert torch.equal(apply_penalties(logits, Sampling(), sampler.seen, sampler.counts), logits)


def test_repetition_penalty_matches_transformers():
    from transformers import RepetitionPenaltyLogitsProcessor

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 50, generator=g) * 3
    prompt, output = [4, 9, 9, 17, 30], [2, 9, 41]
    for penalty in (1.3, 0.7):
        s = Sampling(repetition_penalty=penalty)
        sampler = Sampler(s, prompt, 50, torch.device("cpu"))
        for t in output:
            sampler.observe(torch.tensor([t]))
        want = RepetitionPenaltyLogitsProcessor(penalty)(torch.tensor([prompt + output]), logits)
        assert torch.allclose(apply_penalties(logits, s, sampler.seen), want)


def test_min_p_matches_transformers():
    transformers = pytest.importorskip("transformers")
    if not hasattr(transformers, "MinPLogitsWarper"):
        pytest.skip("this transformers has no MinPLogitsWarper")
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(4, 100, generator=g) * 2
    for min_p in (0.05, 0.3, 1.0):
        want = transformers.MinPLogitsWarper(min_p)(None, logits.clone())
        got = filter_logits(logits, None, None, min_p)
        assert torch.equal(torch.isinf(got), torch.isinf(want)), min_p
        assert torch.equal(got[~torch.isinf(got)], want[~torch.isinf(want)])


def test_greedy_with_a_repetition_penalty_repeats_less():
    model, tok = story()
    ids = tok.encode("Once upon a time")
    plain = generate_tokens(model, [ids], 60, GREEDY, []).tokens[0]
    penalized = generate_tokens(model, [ids], 60, Sampling(repetition_penalty=2.0), []).tokens[0]
    assert penalized != plain
    assert len(set(penalized)) > len(set(plain))


def test_a_seeded_request_gets_the_same_tokens_whatever_decodes_beside_it():
    model, tok = story()
    ids = tok.encode("Once upon a time")
    seeded = Sampling(temperature=1.0, top_p=0.9, min_p=0.05, seed=7, presence_penalty=0.5)
    got = Collected()
    alone = Engine(model, tok, max_batch=1)
    alone.add(got.request(0, ids, 40, sampling=seeded, eos_ids=[]))
    alone.run()
    engine = Engine(model, tok, max_batch=4)
    engine.add(got.request(1, tok.encode(TEXTS[1]), 30, sampling=Sampling(1.0, seed=1), eos_ids=[]))
    engine.step()
    engine.add(got.request(2, ids, 40, sampling=seeded, eos_ids=[]))  # joins mid-way
    engine.add(got.request(3, ids, 40, sampling=seeded, eos_ids=[]))  # a twin: its own generator
    engine.add(got.request(4, ids, 40, sampling=Sampling(1.0, seed=8), eos_ids=[]))
    engine.run()
    assert got.tokens(2) == got.tokens(3) == got.tokens(0)
    assert got.tokens(4) != got.tokens(0)


# ---- log-probabilities ----
def test_logprobs_are_those_of_the_raw_logits_with_the_top_k_best_first():
    model, tok = story()
    ids = tok.encode("Once upon a time")
    got = Collected()
    engine = Engine(model, tok, max_batch=2)
    hot = Sampling(temperature=1.5, seed=3, frequency_penalty=1.0)  # neither changes logprobs
    engine.add(got.request(0, ids, 6, sampling=hot, eos_ids=[], logprobs=3))
    engine.add(got.request(1, tok.encode(TEXTS[1]), 6, eos_ids=[]))  # asks none
    engine.run()
    tokens = got.tokens(0)
    logprobs = [lp for e in got.events[0] for lp in e.logprobs]
    assert [lp.token for lp in logprobs] == tokens
    assert all(e.logprobs is None for e in got.events[1])
    with torch.no_grad():
        want = model(torch.tensor([ids + tokens]))[0, len(ids) - 1:-1].log_softmax(-1)
    for i, lp in enumerate(logprobs):
        assert abs(lp.logprob - want[i, lp.token].item()) < 1e-4
        top = want[i].topk(3)
        assert [t for t, _ in lp.top] == top.indices.tolist()
        assert all(abs(v - w) < 1e-4 for (_, v), w in zip(lp.top, top.values.tolist()))


# ---- the decode loop's reads ----
SYNCS = ("tolist", "item", "__bool__", "__int__", "__float__")


def test_each_decode_step_reads_the_device_once(monkeypatch, tmp_path):
    """The chosen ids (and the log-probabilities asked for) come back in one read a step; a
    prefill reads once for its first token. No other read happens anywhere in a step: tensor
    methods that wait for the device are watched too (dynamic RoPE past the trained length,
    penalties, sampling and log-probabilities included)."""
    make_hf_checkpoint(tmp_path, seed=2, num_key_value_heads=2, max_position_embeddings=16,
                       rope_parameters={"rope_type": "dynamic", "factor": 4.0, "rope_theta": 1e4})
    model = load_model(tmp_path, device="cpu", dtype="float32")
    reads, others, inside = [], [], [False]
    real_read = engine_module.to_host

    def read(t):
        inside[0] = True
        try:
            reads.append(t.numel())
            return real_read(t)
        finally:
            inside[0] = False

    def watch(name):
        real = getattr(torch.Tensor, name)

        def method(self, *a, **kw):
            if not inside[0]:
                others.append(name)
            return real(self, *a, **kw)
        return method

    monkeypatch.setattr(engine_module, "to_host", read)
    engine = Engine(model, max_batch=4)
    engine.add(Request([5, 9, 33], 30, eos_ids=[]))
    engine.add(Request([8, 41, 6, 7, 1], 30, Sampling(1.0, top_k=20, min_p=0.1, seed=1,
                                                     repetition_penalty=1.2), eos_ids=[4]))
    engine.add(Request([3, 3], 30, Sampling(presence_penalty=1.0), eos_ids=[], logprobs=2))
    for name in SYNCS:
        monkeypatch.setattr(torch.Tensor, name, watch(name))
    engine.step()
    assert len(reads) == 3 + 1  # three prefills, then one decode step
    steps = 1
    while engine.step():
        steps += 1
        assert len(reads) == 3 + steps
    assert steps >= 20 and others == []


def test_a_given_step_like_compile_decodes_sees_rows_and_spans_rounded_to_powers_of_two():
    """A step given to the engine (compile_decode's, here the eager forward recorded) gets every
    row's slot as a tensor, a power-of-two row count and a span of cache_capacity's sizes, and
    the tokens stay each request's own."""
    model, tok = story()
    prompts = [tok.encode(t) for t in TEXTS[:5]]
    lengths = [300, 20, 30, 8, 40]
    alone = [generate_tokens(model, [p], n, GREEDY, []).tokens[0] for p, n in zip(prompts, lengths)]
    shapes = set()

    def step(tokens, starts, span):
        assert isinstance(starts, torch.Tensor) and starts.shape == (tokens.shape[0],)
        assert span > int(starts.max())
        shapes.add((tokens.shape[0], span))
        return model(tokens, start=starts, span=span)

    got = Collected()
    requests = [got.request(i, p, n, eos_ids=[]) for i, (p, n) in enumerate(zip(prompts, lengths))]
    engine = Engine(model, tok, max_batch=5, step=step)
    run_arrivals(engine, requests, {0: [0], 2: [1, 2], 5: [3], 6: [4]})
    assert [got.tokens(i) for i in range(5)] == alone
    assert {rows for rows, _ in shapes} <= {1, 2, 4, 5} and {span for _, span in shapes} == {256, 512}
    assert engine.compile_s > 0  # each new shape was run apart first


# ---- the cache ----
def test_the_cache_grows_by_doubling_and_an_idle_row_keeps_its_prefix():
    """Two short requests fit 256 slots. A third continues the second's dialog in its row and
    needs 300 more tokens: the cache doubles, contents kept, while row 0 holds the first's tokens
    and sits idle in every decode step. Row 0's keys stay untouched, and a follow-up of the first
    lands there, prefills only what is new and answers as a fresh model."""
    model, tok = story()
    engine = Engine(model, tok, max_batch=2)
    got = Collected()
    first, second = tok.encode("Once upon a time"), tok.encode(TEXTS[3])
    engine.add(got.request(0, first, 12, eos_ids=[]))
    engine.add(got.request(1, second, 20, eos_ids=[]))
    capacities = []
    while engine.step():
        capacities.append(model.cache_len)
    held = list(engine.held[0])
    keys = [layer.self_attn.kv_cache.k[0, :, :len(held)].clone() for layer in model.model.layers]
    more = second + got.tokens(1) + tok.encode(" The end", bos=False)
    engine.add(got.request(2, more, 300, eos_ids=[]))
    while engine.step():
        capacities.append(model.cache_len)
    assert capacities[0] == 256 and capacities[-1] == 512 and set(capacities) == {256, 512}
    assert got.events[2][-1].request.row == 1
    for layer, k in zip(model.model.layers, keys):
        assert torch.equal(layer.self_attn.kv_cache.k[0, :, :len(held)], k)
    follow = first + got.tokens(0) + tok.encode(" Then", bos=False)
    engine.add(got.request(3, follow, 10, eos_ids=[]))
    engine.run()
    handle = got.events[3][-1].request
    assert handle.row == 0 and handle.prefill_tokens == len(follow) - len(held)
    fresh = load_model(fixture("stories260K-hf"), device="cpu", dtype="float32")
    assert got.tokens(3) == generate_tokens(fresh, [follow], 10, GREEDY, []).tokens[0]


# ---- bad requests ----
@pytest.mark.parametrize("change,needle", [
    (dict(prompt=[]), "the prompt is empty"),
    (dict(prompt=[1, 2.5]), "token ids"),
    (dict(prompt=[1, 999]), "token id 999"),
    (dict(prompt=[1] * 512), "the prompt has 512 tokens but the context holds 512"),
    (dict(max_new_tokens=0), "max new tokens 0 is out of range"),
    (dict(max_new_tokens=True), "max new tokens True is out of range"),
    (dict(stop="abc"), "stop strings must be a list"),
    (dict(stop=["ok", ""]), "non-empty"),
    (dict(logprobs=-1), "logprobs -1 is out of range"),
    (dict(logprobs=513), "logprobs 513 is out of range"),
    (dict(eos_ids=["2"]), "EOS ids"),
    (dict(sampling={"temperature": 1}), "sampling must be a Sampling"),
])
def test_a_request_that_can_never_run_is_refused_in_one_line(change, needle):
    model, tok = story()
    engine = Engine(model, tok, max_batch=1)
    request = Request(**{"prompt": [1, 2, 3], "max_new_tokens": 4, **change})
    with pytest.raises(XllamaError, match=needle) as e:
        engine.add(request)
    assert "\n" not in str(e.value) and engine.waiting == 0


def test_stop_strings_need_a_tokenizer_and_the_engine_checks_its_own_settings():
    model, _ = story()
    with pytest.raises(XllamaError, match="need the engine's tokenizer"):
        Engine(model, max_batch=1).add(Request([1, 2], 3, stop=["x"]))
    for kw, needle in ((dict(max_batch=0), "max batch 0"), (dict(context=1), "context 1"),
                       (dict(context=10_000), "context 10000")):
        with pytest.raises(XllamaError, match=needle):
            Engine(model, **kw)


@pytest.mark.parametrize("flag,value,needle", [
    ("--min-p", "1.5", "min-p 1.5 is out of range"), ("--min-p", "-0.1", "min-p -0.1"),
    ("--min-p", "nan", "min-p nan"), ("--repetition-penalty", "0", "repetition penalty 0.0"),
    ("--repetition-penalty", "inf", "repetition penalty inf"),
    ("--repetition-penalty", "-1", "repetition penalty -1.0"),
    ("--frequency-penalty", "2.5", "frequency penalty 2.5 is out of range"),
    ("--frequency-penalty", "nan", "frequency penalty nan"),
    ("--presence-penalty", "-3", "presence penalty -3.0 is out of range"),
    ("--stop", "", "--stop needs a non-empty string"),
])
@pytest.mark.parametrize("command", ["generate", "chat"])
def test_cli_refuses_bad_decoding_controls_in_one_line(command, flag, value, needle):
    prompt = ["Once"] if command == "generate" else []
    cli_fails([command, "--model", str(DEMO_MODEL), flag, value, *prompt], needle)
