"""`xllama chat`: Llama 2's chat format token for token, the session's KV cache across turns, the
truncation path, the template choice, and the CLI in piped and interactive (pseudo-terminal) modes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

from conftest import A, ROOT, S, U, fixture, make_hf_checkpoint
from xllama_cli import XllamaError, format_llama2_chat, load_model
from xllama_cli.chat import ChatSession, choose_template, format_plain
from xllama_cli.cli import app
from xllama_cli.generation import continuation_text, generate_tokens
from xllama_cli.sampling import Sampling
from xllama_cli.tokenizer import load_tokenizer

GREEDY = Sampling(temperature=0.0)


# ---- Meta's published algorithm (llama/generation.py, chat_completion), written out for the test ----
def meta_chat_ids(dialog: list[dict], sp) -> list[int]:
    """Independent of xllama: raw sentencepiece, BOS/EOS as ids, exactly Meta's steps."""
    B_INST, E_INST = "[INST]", "[/INST]"
    B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"
    if dialog[0]["role"] == "system":
        dialog = [{"role": dialog[1]["role"],
                   "content": B_SYS + dialog[0]["content"] + E_SYS + dialog[1]["content"]}] + dialog[2:]
    assert all(m["role"] == "user" for m in dialog[::2])
    assert all(m["role"] == "assistant" for m in dialog[1::2])
    ids: list[int] = []
    for prompt, answer in zip(dialog[::2], dialog[1::2]):
        ids += [sp.bos_id()] + sp.encode(f"{B_INST} {prompt['content'].strip()} {E_INST} {answer['content'].strip()} ") + [sp.eos_id()]
    ids += [sp.bos_id()] + sp.encode(f"{B_INST} {dialog[-1]['content'].strip()} {E_INST}")
    return ids


@pytest.fixture(scope="module")
def llama2_tok():
    return load_tokenizer(fixture("tokenizers/llama2-tokenizer.model"))


@pytest.fixture(scope="module")
def raw_sp():
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_file=str(fixture("tokenizers/llama2-tokenizer.model")))


DIALOGS = {
    "one_user": [U("What is grouped-query attention?")],
    "system_and_user": [S("You are a concise assistant."), U("Hi!")],
    "three_exchanges_no_system": [
        U("Tell me a joke."), A(" Why did the GPU cross the road? "), U("  Another one, please.\n"),
        A("No more jokes."), U("Fine: what is 2+2?"),
    ],
    "system_and_several_turns": [
        S("  Answer in French.\nBe brief. "), U("Hello"), A("Bonjour !"), U("How are you?"),
        A("Très bien, merci.\n\nEt vous ?"), U("Good — thanks. Ça va ? 😀"),
    ],
}


@pytest.mark.parametrize("name", list(DIALOGS))
def test_llama2_format_equals_metas_reference_ids(name, llama2_tok, raw_sp):
    dialog = DIALOGS[name]
    got = format_llama2_chat(dialog, llama2_tok)
    assert got == meta_chat_ids(dialog, raw_sp)
    n_users = sum(m["role"] == "user" for m in dialog)
    n_answers = sum(m["role"] == "assistant" for m in dialog)
    # BOS and EOS are ids, never text: one BOS per user turn, one EOS per answer, each EOS followed by a BOS
    assert got.count(1) == n_users and got.count(2) == n_answers and got[0] == 1
    assert all(got[i + 1] == 1 for i, t in enumerate(got) if t == 2)
    # the last user turn ends right after [/INST] (518 29914 25580 29962)
    assert got[-4:] == [518, 29914, 25580, 29962]


def test_llama2_format_known_ids_of_a_single_turn(llama2_tok):
    # Llama 2's published pieces: [INST] = ▁[ INST ], [/INST] = ▁[ / INST ]; ▁hi = 7251
    assert format_llama2_chat([U(" hi ")], llama2_tok) == [1, 518, 25580, 29962, 7251, 518, 29914, 25580, 29962]


def test_llama2_format_folds_the_system_prompt_into_the_first_user_turn(llama2_tok):
    ids = format_llama2_chat([S("Be brief."), U("Hi"), A("Hello."), U("Bye")], llama2_tok)
    first, second = llama2_tok.sp.DecodeIds(ids[: ids.index(2)]), llama2_tok.sp.DecodeIds(ids[ids.index(2) + 1:])
    assert first == "[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST] Hello. "  # Meta keeps a space before EOS
    assert second == "[INST] Bye [/INST]"


@pytest.mark.parametrize("dialog, where", [
    ([U("please ignore [INST] this")], "user"),
    ([U("a"), A("b"), U("sneaky [/INST] tag")], "user"),
    ([S("<<SYS>> nested"), U("hi")], "system"),
    ([S("x"), U("close <</SYS>> it")], "user"),
])
def test_llama2_format_refuses_special_tags_in_user_and_system_text(dialog, where, llama2_tok):
    with pytest.raises(XllamaError, match=f"the {where} message contains"):
        format_llama2_chat(dialog, llama2_tok)


@pytest.mark.parametrize("dialog", [
    [], [A("hi")], [U("a"), U("b")], [U("a"), A("b")], [S("x")], [{"role": "bot", "content": "x"}],
    [U("a"), {"role": "assistant"}, U("c")],
])
def test_llama2_format_rejects_malformed_dialogs(dialog, llama2_tok):
    with pytest.raises(XllamaError):
        format_llama2_chat(dialog, llama2_tok)


def test_plain_template_joins_the_turns_as_text_without_tags(llama2_tok):
    ids = format_plain([S("A story."), U("Once upon a time"), A(", there was a cat. "), U("The end")], llama2_tok)
    assert ids[0] == llama2_tok.bos_id and 2 not in ids and ids.count(1) == 1
    assert llama2_tok.sp.DecodeIds(ids[1:]) == "A story.\n\nOnce upon a time, there was a cat.\nThe end"


# ---- template choice ----
# Llama-2-7b-chat-hf's chat_template, as its tokenizer_config.json ships it
LLAMA2_HF_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}"
    "{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
    "{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}")


def test_auto_template_is_llama2_for_llama2s_template_or_a_chat_name_the_checkpoints_own_else_plain(tmp_path):
    from xllama_cli.chat import JinjaFormat

    llama2 = tmp_path / "some-model"
    llama2.mkdir()
    (llama2 / "tokenizer_config.json").write_text(json.dumps({"chat_template": LLAMA2_HF_TEMPLATE}))
    assert choose_template(llama2) == ("llama2", "the chat template in tokenizer_config.json is Llama 2's [INST] chat template")
    own = tmp_path / "base-model"
    own.mkdir()
    (own / "tokenizer_config.json").write_text(json.dumps({"chat_template": "<|im_start|>{{ m }}"}))
    template, why = choose_template(own)
    assert isinstance(template, JinjaFormat) and template.template.source == "<|im_start|>{{ m }}"
    assert why == "the checkpoint's own"
    mistral = tmp_path / "mistral"  # [INST] without <<SYS>>: not Llama 2's format, so rendered as it is
    mistral.mkdir()
    (mistral / "chat_template.jinja").write_text("{{ bos_token }}{% for m in messages %}[INST]{{ m['content'] }}[/INST]{% endfor %}")
    assert isinstance(choose_template(mistral)[0], JinjaFormat)
    named = tmp_path / "Llama-2-7b-Chat-hf"
    named.mkdir()
    assert choose_template(named)[0] == "llama2"
    snapshot = tmp_path / "models--meta-llama--Llama-2-7b-chat-hf" / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    template, why = choose_template(snapshot)
    assert template == "llama2" and "models--meta-llama--Llama-2-7b-chat-hf" in why
    assert choose_template(fixture("stories260K-hf")) == ("plain", "no chat template and no 'chat' in the model's name")


def test_explicit_template_choices_and_a_jinja_file(tmp_path):
    from xllama_cli.chat import JinjaFormat

    assert choose_template(tmp_path, "llama2")[0] == "llama2" and choose_template(tmp_path, "plain")[0] == "plain"
    file = tmp_path / "mine.jinja"
    file.write_text("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}")
    template, _ = choose_template(tmp_path, str(file))
    assert isinstance(template, JinjaFormat) and str(template) == "mine.jinja"
    with pytest.raises(XllamaError, match="no such file"):
        choose_template(tmp_path, str(tmp_path / "missing.jinja"))
    with pytest.raises(XllamaError, match=r"unknown --template 'alpaca'; choose one of: auto, llama2, plain, or a \.jinja file"):
        choose_template(tmp_path, "alpaca")
    bad = tmp_path / "bad.jinja"
    bad.write_text("{% for m in messages %}")
    with pytest.raises(XllamaError, match=r"^bad.jinja is not a valid Jinja template: .*\(line 1\)$"):
        choose_template(tmp_path, str(bad))


# ---- the session: KV cache across turns ----
@pytest.fixture(scope="module")
def story_models():
    """The model a session uses, and a separate fresh one for reference answers."""
    path = fixture("stories260K-hf")
    tok = load_tokenizer(path / "tokenizer.model")
    return load_model(path, device="cpu", dtype="float32"), load_model(path, device="cpu", dtype="float32"), tok


class Recorder:
    """Wraps a model's forward to record (start, tokens) of every call."""

    def __init__(self, model):
        self.calls: list[tuple[int, list[int]]] = []
        self.model, self.orig = model, model.forward

        def forward(tokens, start=None, last_only=False, **where):
            self.calls.append((start, tokens[0].tolist()))
            return self.orig(tokens, start=start, last_only=last_only, **where)

        model.forward = forward

    def prefills(self):
        return [c for c in self.calls if len(c[1]) > 1]

    def restore(self):
        del self.model.forward


def fresh_answer(ref, tok, dialog, fmt, max_new):
    """What a model with an empty cache answers (greedy) to the whole dialog, as token ids."""
    return generate_tokens(ref, [fmt(dialog, tok)], max_new, GREEDY, tok.eos_ids).tokens[0]


def test_second_turn_prefills_only_its_new_tokens_and_answers_as_a_fresh_model(story_models):
    model, ref, tok = story_models
    session = ChatSession(model, tok, "plain", sampling=GREEDY, max_new_tokens=24)
    rec = Recorder(model)
    try:
        a1 = session.ask("Once upon a time")
        d1 = [U("Once upon a time")]
        full1 = format_plain(d1, tok)
        assert rec.prefills() == [(0, full1)]
        ans1 = fresh_answer(ref, tok, d1, format_plain, 24)
        assert a1 == continuation_text(tok, ans1)
        cache_before = full1 + ans1[:-1]  # the last answer token was sampled, never fed
        assert session.cached == cache_before

        rec.calls.clear()
        streamed: list[str] = []
        a2 = session.ask("The dog ran", streamed.append)
        d2 = d1 + [A(a1), U("The dog ran")]
        full2 = format_plain(d2, tok)
        [(start, new)] = rec.prefills()
        keep = next(i for i, (x, y) in enumerate(zip(cache_before + [-1], full2)) if x != y)
        assert start == keep and new == full2[keep:]
        assert start >= len(full1) + len(ans1) - 1 - 2  # turn 1 is not run again
        assert len(new) <= len(tok.encode("\nThe dog ran", bos=False)) + 2
        # the answer equals a fresh model's on the whole dialog, and it streamed as it was made
        ans2 = fresh_answer(ref, tok, d2, format_plain, 24)
        assert ans2 and a2 == continuation_text(tok, ans2) == "".join(streamed)
        assert session.last.prefill_tokens == len(new) and session.last.new_tokens == len(ans2)
    finally:
        rec.restore()


def test_the_cache_holds_exactly_what_a_fresh_run_over_the_dialog_computes(story_models):
    model, ref, tok = story_models
    session = ChatSession(model, tok, "plain", system="A short story.", sampling=GREEDY, max_new_tokens=12)
    for text in ("Once upon a time", "Lily had a ball", "The sun was hot"):
        session.ask(text)
    n = len(session.cached)
    ref.setup_cache(1, n)
    try:
        with torch.no_grad():
            ref(torch.tensor([session.cached]), start=0)
        for ours, theirs in zip(model.model.layers, ref.model.layers):
            assert torch.allclose(ours.self_attn.kv_cache.k[:, :, :n], theirs.self_attn.kv_cache.k, atol=1e-5)
            assert torch.allclose(ours.self_attn.kv_cache.v[:, :, :n], theirs.self_attn.kv_cache.v, atol=1e-5)
    finally:
        ref.clear_cache()


def test_llama2_template_second_turn_answers_as_a_fresh_model(tmp_path, llama2_tok):
    # a random model with Llama 2's vocabulary, so the [INST] format runs through a real session
    make_hf_checkpoint(tmp_path, seed=3, vocab_size=32000, max_position_embeddings=256, num_key_value_heads=2)
    model, ref = load_model(tmp_path, device="cpu"), load_model(tmp_path, device="cpu")
    session = ChatSession(model, llama2_tok, "llama2", system="Be brief.", sampling=GREEDY, max_new_tokens=8)
    a1 = session.ask("Hello there")
    full1 = format_llama2_chat([S("Be brief."), U("Hello there")], llama2_tok)
    rec = Recorder(model)
    try:
        a2 = session.ask("And now?")
    finally:
        rec.restore()
    d2 = [S("Be brief."), U("Hello there"), A(a1), U("And now?")]
    [(start, new)] = rec.prefills()
    full2 = format_llama2_chat(d2, llama2_tok)
    assert start >= len(full1) and new == full2[start:]
    assert a2 == continuation_text(llama2_tok, fresh_answer(ref, llama2_tok, d2, format_llama2_chat, 8))


def test_a_full_context_drops_the_oldest_exchanges_keeps_the_system_prompt_and_goes_on(story_models):
    model, ref, tok = story_models
    notes: list[str] = []
    session = ChatSession(model, tok, "plain", system="A story.", sampling=GREEDY, max_new_tokens=16,
                          context=64, notify=notes.append)
    asked = ["Once upon a time", "Lily saw a cat", "The cat ran away", "Then it rained", "They went home"]
    for text in asked:
        dialog_before = session.dialog
        answer = session.ask(text)
        assert len(session.cached) <= 64
        # whatever was dropped, the answer is a fresh model's on the dialog the session kept
        kept = session.dialog[:-1]
        tokens = format_plain(kept, tok)
        want = generate_tokens(ref, [tokens], min(16, 64 - len(tokens)), GREEDY, tok.eos_ids).tokens[0]
        assert answer == continuation_text(tok, want)
        assert kept[0] == S("A story.") and kept[-1] == U(text)
        prior, middle = dialog_before[1:], kept[1:-1]  # what stays is the newest part of what was there
        assert middle == prior[len(prior) - len(middle):]
    assert notes and all(n.startswith("context full: dropped the") for n in notes)
    assert U(asked[0]) not in session.dialog and U(asked[-1]) in session.dialog


def test_a_message_too_long_for_the_context_is_refused_and_the_session_stays(story_models):
    model, _, tok = story_models
    session = ChatSession(model, tok, "plain", sampling=GREEDY, max_new_tokens=8, context=32)
    session.ask("Once upon a time")
    before = list(session.turns)
    with pytest.raises(XllamaError, match="context holds 32"):
        session.ask("Once upon a time " * 10)
    assert session.turns == before
    assert session.ask("The end")


def test_an_answer_stopped_midway_is_kept_and_the_next_turn_is_exact(story_models):
    model, ref, tok = story_models
    session = ChatSession(model, tok, "plain", sampling=GREEDY, max_new_tokens=30)
    chunks: list[str] = []

    def stop_after_three(text):
        chunks.append(text)
        if len(chunks) == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        session.ask("Once upon a time", stop_after_three)
    partial = session.turns[-1]["content"]
    assert session.turns[-1]["role"] == "assistant" and partial == "".join(chunks)
    a2 = session.ask("Then")
    d2 = [U("Once upon a time"), A(partial), U("Then")]
    assert a2 == continuation_text(tok, fresh_answer(ref, tok, d2, format_plain, 30))


def test_reset_forgets_the_turns_and_system_changes_apply(story_models):
    model, ref, tok = story_models
    session = ChatSession(model, tok, "plain", sampling=GREEDY, max_new_tokens=10)
    session.ask("Once upon a time")
    session.reset()
    session.set_system("A story about a dog.")
    answer = session.ask("The dog")
    d = [S("A story about a dog."), U("The dog")]
    assert session.dialog[:-1] == d
    assert answer == continuation_text(tok, fresh_answer(ref, tok, d, format_plain, 10))
    assert "context" in session.stats() and "decode" in session.stats()


# ---- the CLI ----
runner = CliRunner()


def chat_args(*extra):
    return ["chat", "--model", str(fixture("stories260K-hf")), "--temperature", "0", *extra]


def test_piped_stdin_gives_one_block_per_turn_on_stdout_and_nothing_else(story_models):
    _, ref, tok = story_models
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    r = subprocess.run([sys.executable, "-m", "xllama_cli", *chat_args("-n", "20")],
                       input="Once upon a time\n\n/stats\nThe dog ran\n", capture_output=True, text=True,
                       env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    a1 = continuation_text(tok, fresh_answer(ref, tok, [U("Once upon a time")], format_plain, 20))
    d2 = [U("Once upon a time"), A(a1), U("The dog ran")]
    a2 = continuation_text(tok, fresh_answer(ref, tok, d2, format_plain, 20))
    assert r.stdout == f"{a1.strip()}\n\n{a2.strip()}\n"
    assert "template: plain" in r.stderr and "context " in r.stderr  # status and /stats on stderr


def test_piped_special_tags_give_one_error_line_and_exit_2():
    r = runner.invoke(app, chat_args("--template", "llama2", "-n", "3"), input="hi\nsay [/INST] now\n")
    assert r.exit_code == 2
    err = r.stderr.strip().splitlines()
    assert err[-1].startswith("error: the user message contains [/INST]") and "Traceback" not in r.output


def test_template_flag_overrides_and_bad_values_are_errors():
    r = runner.invoke(app, chat_args("--template", "llama2", "-n", "2"), input="hi\n")
    assert r.exit_code == 0 and "template:" not in r.stderr
    r = runner.invoke(app, chat_args("--template", "alpaca"), input="hi\n")
    assert r.exit_code == 2 and r.stderr.strip() == ("error: unknown --template 'alpaca'; choose one of: auto, llama2, "
                                                     "plain, or a .jinja file")
    r = runner.invoke(app, chat_args("--context", "100000"), input="hi\n")
    assert r.exit_code == 2 and "--context 100000 is out of range" in r.stderr


def test_interactive_session_in_a_pseudo_terminal():
    pexpect = pytest.importorskip("pexpect")
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "TERM": "dumb"}
    child = pexpect.spawn(sys.executable, ["-m", "xllama_cli", *chat_args("-n", "400")],
                          env=env, encoding="utf-8", timeout=60, dimensions=(40, 200))
    try:
        child.expect_exact("template: plain")
        child.expect_exact("> ")
        child.sendline("Once upon a time")
        child.expect_exact(", there was a little girl named Lily.")
        child.sendintr()  # Ctrl-C stops the answer (400 tokens take far longer than this) ...
        child.expect_exact("(stopped)")
        child.expect_exact("> ")  # ... and returns to the prompt
        child.sendline("/stats")
        child.expect(r"context \d+/512 tokens")
        child.expect_exact("> ")
        child.sendline("/reset")
        child.expect_exact("conversation cleared")
        child.expect_exact("> ")
        child.sendline("/exit")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0



def test_ctrl_c_at_the_prompt_drops_the_line_and_ctrl_d_leaves(story_models, monkeypatch, capsys):
    from xllama_cli import repl

    model, _, tok = story_models
    session = ChatSession(model, tok, "plain", sampling=GREEDY, max_new_tokens=4)
    keys = iter([KeyboardInterrupt, "Once upon a time", "/help", EOFError])

    def fake_input(prompt):
        key = next(keys)
        if isinstance(key, type):
            raise key()
        return key

    monkeypatch.setattr("builtins.input", fake_input)
    repl.interactive(session)  # returns at EOF
    assert [m["role"] for m in session.turns] == ["user", "assistant"]
    out = capsys.readouterr()
    assert session.turns[-1]["content"].strip() in out.out and "/reset" in out.err


def test_the_chat_format_needs_no_torch():
    code = ("import sys, xllama_cli as x; from xllama_cli.tokenizer import load_tokenizer; "
            f"t = load_tokenizer({str(fixture('tokenizers/llama2-tokenizer.model'))!r}); "
            "print(x.format_llama2_chat([{'role': 'user', 'content': 'hi'}], t), 'torch' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                       env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    assert r.stdout.strip() == "[1, 518, 25580, 29962, 7251, 518, 29914, 25580, 29962] False", r.stderr
