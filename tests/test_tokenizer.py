"""SentencePiece encoding and streaming decode with Meta's Llama 2 tokenizer."""

from __future__ import annotations

import pytest

from conftest import fixture
from xllama_cli.tokenizer import Tokenizer, load_tokenizer


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return load_tokenizer(fixture("tokenizers/llama2-tokenizer.model"))


def stream(tok: Tokenizer, ids: list[int]) -> list[str]:
    s = tok.stream()
    return [s.push(i) for i in ids] + [s.flush()]


def test_bos_is_prepended(tok):
    ids = tok.encode("Hello")
    assert ids[0] == 1 and tok.encode("Hello", bos=False) == ids[1:]


@pytest.mark.parametrize("text", [
    " leading space and  double  spaces",
    "naïve café — 日本語 🦙 emoji",
    "line one\nline two\ttab",
])
def test_streaming_decode_rebuilds_the_text_exactly(tok, text):
    ids = tok.encode(text, bos=False)
    # sentencepiece adds a dummy prefix space to the first piece; streamed continuations keep it
    assert "".join(stream(tok, ids)) == " " + text


def test_multibyte_characters_are_held_back_until_complete(tok):
    ids = tok.encode("🦙", bos=False)
    assert any(tok.sp.IsByte(i) for i in ids)  # byte fallback: 4 pieces for one character
    parts = stream(tok, ids)
    assert all("\ufffd" not in p for p in parts)
    assert [p for p in parts if p] == [" ", "🦙"] or "".join(parts) == " 🦙"
    assert "".join(parts) == " 🦙"


def test_decode_drops_bos_and_eos(tok):
    ids = tok.encode("Hi there", eos=True)
    assert tok.decode(ids) == "Hi there"


def test_ids_past_the_tokenizer_stand_for_no_text(tok):
    """A model's vocabulary may be padded past its tokenizer's pieces (32000 -> 32016, say): an id
    there, should a model emit it, decodes to nothing instead of stopping generation."""
    hello = tok.encode("Hello", bos=False)
    assert stream(tok, [*hello, tok.vocab_size, tok.vocab_size + 15]) == stream(tok, hello)[:-1] + ["", "", ""]
    assert tok.decode([*hello, tok.vocab_size + 3]) == "Hello"
