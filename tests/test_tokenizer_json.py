"""The three tokenizer kinds against transformers: Llama 3.1's tokenizer.json (and the same tokenizer
as Meta's tiktoken tokenizer.model), Llama 2's SentencePiece tokenizer.model and its tokenizer.json;
special tokens from the checkpoint's files; streaming decode."""

from __future__ import annotations

import shutil

import pytest

from conftest import fixture, meta_tiktoken_file
from xllama_cli import XllamaError, load_tokenizer
from xllama_cli.tokenizer import SentencePieceTokenizer, TiktokenTokenizer, TokenizersTokenizer

TEXTS = {
    "multilingual": "Il était une fois, « naïve café » à Zürich. Жили-были дед и баба. 昔々、ある所におじいさんが"
                    "いました。옛날 옛적에. مرحبا بالعالم. नमस्ते दुनिया। Ελληνικά, Ångström, straße, ﬁ.",
    "emoji": "🦙 llamas 🦙🦙! family 👩‍👩‍👧‍👦, flags 🇫🇷🇯🇵, thumbs 👍🏽, keycap 1️⃣, heart ❤️‍🔥 — done 😀",
    "code": 'def f(x: int) -> dict[str, int]:\n    """Doc."""\n    return {"x": x ** 2, \'y\': [i for i in range(10)]}'
            '  # 2+2=4\n\nif __name__ == "__main__":\n\tprint(f(3))\r\n// C: for (int i=0;i<n;++i) { a[i] <<= 1; }\n',
    "whitespace": "  two leading spaces\n\n\nthree newlines\t\ttabs   \u00a0 nbsp,  trailing   \n \n  end",
}
SPECIAL_SPELLINGS = "say <|eot_id|> then <|start_header_id|>system<|end_header_id|> and </s> [INST] <s>"


def streamed(tok, ids: list[int]) -> list[str]:
    s = tok.stream()
    return [s.push(i) for i in ids] + [s.flush()]


def stream_prefixes(tok, ids: list[int]) -> list[str]:
    """The streamed text after each token."""
    s, out, text = tok.stream(), [], ""
    for i in ids:
        text += s.push(i)
        out.append(text)
    return out


def assert_streams_as_reference_decodes(prefixes: list[str], decode_prefix, full: str) -> None:
    """Streaming parity: after every token the text so far begins the whole text, holds no
    replacement character, and equals the reference's decode of the tokens so far wherever that
    decode holds only whole characters (its decoders write U+FFFD for unfinished bytes)."""
    whole = 0
    for k, so_far in enumerate(prefixes, 1):
        assert full.startswith(so_far) and "\ufffd" not in so_far
        reference = decode_prefix(k)
        if "\ufffd" not in reference:
            assert so_far == reference
            whole += 1
    assert whole >= len(prefixes) // 2  # the check is not vacuous


# ---- Llama 3.1: tokenizer.json ----
LLAMA3 = "tokenizers/llama3.1"


@pytest.fixture(scope="module")
def hf_llama3():
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(fixture(LLAMA3)))


@pytest.fixture(scope="module")
def llama3():
    return load_tokenizer(fixture(LLAMA3))


@pytest.fixture(scope="module")
def tiktoken_llama3(tmp_path_factory):
    pytest.importorskip("tiktoken")
    folder = tmp_path_factory.mktemp("meta-llama3")
    meta_tiktoken_file(fixture(LLAMA3) / "tokenizer.json", folder / "tokenizer.model")
    return folder


def test_a_folder_a_tokenizer_json_file_and_the_fixture_folder_give_the_llama3_tokenizer(llama3):
    assert isinstance(llama3, TokenizersTokenizer)
    direct = load_tokenizer(fixture(LLAMA3) / "tokenizer.json")
    assert (direct.bos_id, direct.eos_ids) == (llama3.bos_id, llama3.eos_ids) == (128000, [128009])
    assert llama3.special_text == {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}
    assert llama3.vocab_size == 128256


@pytest.mark.parametrize("name", list(TEXTS))
def test_llama3_encode_decode_and_streaming_equal_transformers(name, llama3, hf_llama3):
    text = TEXTS[name]
    ids = llama3.encode(text)
    assert ids == hf_llama3.encode(text) and ids[0] == 128000
    assert llama3.encode(text, bos=False) == hf_llama3.encode(text, add_special_tokens=False)
    assert llama3.encode(text, eos=True)[-1] == 128009
    reference = hf_llama3.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    assert llama3.decode(ids) == reference == text
    assert_streams_as_reference_decodes(
        stream_prefixes(llama3, ids[1:]), lambda k: hf_llama3.decode(ids[1:k + 1], clean_up_tokenization_spaces=False),
        text)
    parts = streamed(llama3, ids)
    assert "".join(parts) == text and not any("\ufffd" in p for p in parts)


def test_byte_level_streaming_holds_a_character_split_over_tokens_until_it_is_whole(llama3):
    ids = llama3.encode("🦙", bos=False)
    assert len(ids) > 1  # one character, several byte-level tokens
    parts = streamed(llama3, ids)
    assert parts[:-2] == [""] * (len(ids) - 1) and "".join(parts) == "🦙"


def test_text_that_spells_special_tokens_is_encoded_as_ordinary_text(llama3, hf_llama3):
    ids = llama3.encode(SPECIAL_SPELLINGS, bos=False)
    assert not set(ids) & set(range(128000, 128256))
    assert ids == hf_llama3.encode(SPECIAL_SPELLINGS, add_special_tokens=False, split_special_tokens=True)
    assert llama3.decode(ids) == SPECIAL_SPELLINGS
    # transformers' plain encode reads them as the special ids
    assert {128009, 128006, 128007} <= set(hf_llama3.encode(SPECIAL_SPELLINGS))


def test_decode_drops_special_tokens_and_ids_past_the_vocabulary(llama3):
    hi = llama3.encode("Hi there", bos=False)
    assert llama3.decode([128000, *hi, 128009, 128256, 130000]) == "Hi there"
    assert streamed(llama3, [128006, *hi, 128009, 129000]) == ["", "Hi", " there", "", "", ""]


# ---- Meta's tiktoken tokenizer.model ----
def test_meta_tiktoken_tokenizer_model_agrees_with_tokenizer_json(tiktoken_llama3, llama3):
    tok = load_tokenizer(tiktoken_llama3 / "tokenizer.model")
    assert isinstance(tok, TiktokenTokenizer) and tok.vocab_size == llama3.vocab_size
    for text in [*TEXTS.values(), SPECIAL_SPELLINGS]:
        ids = tok.encode(text)
        assert ids == llama3.encode(text)
        assert tok.decode(ids) == text and "".join(streamed(tok, ids)) == text
        assert stream_prefixes(tok, ids) == stream_prefixes(llama3, ids)


def test_meta_tiktoken_has_metas_special_tokens_and_stops_at_each_of_its_stop_tokens(tiktoken_llama3):
    tok = load_tokenizer(tiktoken_llama3)  # a folder with nothing but Meta's tokenizer.model
    assert tok.bos_id == 128000 and tok.eos_ids == [128001, 128008, 128009]  # end_of_text, eom_id, eot_id
    for name, i in [("<|start_header_id|>", 128006), ("<|end_header_id|>", 128007), ("<|eot_id|>", 128009),
                    ("<|python_tag|>", 128010), ("<|finetune_right_pad_id|>", 128004),
                    ("<|reserved_special_token_2|>", 128011),
                    ("<|reserved_special_token_246|>", 128255)]:
        assert tok.token_id(name) == i
    assert tok.special_text == {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>"}


def test_meta_tiktoken_takes_the_checkpoints_token_names_and_eos_from_its_config(tiktoken_llama3, tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(tiktoken_llama3, folder)
    shutil.copy(fixture(LLAMA3) / "tokenizer_config.json", folder)
    tok = load_tokenizer(folder)
    # the config's <|eot_id|> first, then Meta's stop tokens; this config names 128008 a reserved
    # token (Llama 3.0's layout), not <|eom_id|>, so that one is no stop token here
    assert tok.eos_ids == [128009, 128001]
    assert tok.token_id("<|reserved_special_token_4|>") == 128008 and tok.token_id("<|eom_id|>") is None


def test_a_file_that_is_neither_kind_is_one_clear_error(tmp_path):
    bad = tmp_path / "tokenizer.model"
    bad.write_text("IQ== 0\nnot base64 here\n")
    with pytest.raises(XllamaError, match=r"cannot read tokenizer .*tokenizer.model: line 2 is not 'base64-token rank'"):
        load_tokenizer(bad)
    junk = tmp_path / "tokenizer.json"
    junk.write_text("{not json")
    with pytest.raises(XllamaError, match="cannot read tokenizer"):
        load_tokenizer(junk)
    with pytest.raises(XllamaError, match="does not exist"):
        load_tokenizer(tmp_path / "x" / "tokenizer.json")


# ---- Llama 2: SentencePiece tokenizer.model and its tokenizer.json ----
@pytest.fixture(scope="module")
def llama2_folders(tmp_path_factory):
    """A folder with Meta's tokenizer.model only, and one with both it and the tokenizer.json that
    transformers' converter makes of it."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("google.protobuf", reason="transformers' converter reads the model with protobuf")
    model = tmp_path_factory.mktemp("llama2-model")
    shutil.copy(fixture("tokenizers/llama2-tokenizer.model"), model / "tokenizer.model")
    both = tmp_path_factory.mktemp("llama2-both")
    transformers.LlamaTokenizerFast.from_pretrained(str(model)).save_pretrained(str(both))
    shutil.copy(model / "tokenizer.model", both / "tokenizer.model")
    return model, both


@pytest.fixture(scope="module")
def hf_llama2_sp(llama2_folders):
    transformers = pytest.importorskip("transformers")
    if not hasattr(transformers, "SentencePieceBackend"):
        pytest.skip("this transformers has no SentencePieceBackend (the SentencePiece reference)")
    return transformers.SentencePieceBackend(vocab_file=str(llama2_folders[0] / "tokenizer.model"),
                                             bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def test_a_folder_with_both_files_uses_tokenizer_json(llama2_folders):
    model, both = llama2_folders
    assert isinstance(load_tokenizer(model), SentencePieceTokenizer)
    tok = load_tokenizer(both)
    assert isinstance(tok, TokenizersTokenizer)
    assert (tok.bos_id, tok.eos_ids, tok.vocab_size) == (1, [2], 32000)


@pytest.mark.parametrize("name", list(TEXTS))
def test_llama2_sentencepiece_equals_transformers_sentencepiece_tokenizer(name, llama2_folders, hf_llama2_sp):
    tok, text = load_tokenizer(llama2_folders[0]), TEXTS[name]
    ids = tok.encode(text)
    assert ids == [1] + hf_llama2_sp.encode(text, add_special_tokens=False)
    # decode as SentencePiece itself (Meta's reference) decodes: transformers' SentencePiece class
    # leaves byte-fallback pieces as "<0xE6>" text, so it is no reference for decode
    assert tok.decode(ids) == tok.sp.DecodeIds(ids[1:]) == text
    assert "".join(streamed(tok, ids)) == " " + text


@pytest.mark.parametrize("name", list(TEXTS))
def test_llama2_tokenizer_json_equals_transformers(name, llama2_folders):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(llama2_folders[1]))
    tok, text = load_tokenizer(llama2_folders[1]), TEXTS[name]
    ids = tok.encode(text, bos=False)
    assert ids == hf.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == hf.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    # streaming keeps the start-of-text space that decode drops, and holds byte-fallback pieces back
    # (not always the text itself: this BPE adds no start-of-text space before one the text has)
    assert_streams_as_reference_decodes([p[1:] for p in stream_prefixes(tok, ids)],
                                        lambda k: hf.decode(ids[:k], clean_up_tokenization_spaces=False),
                                        hf.decode(ids, clean_up_tokenization_spaces=False))


# SentencePiece keeps a run of spaces apart from the word after it ("▁", "▁b"); the BPE of the
# converted tokenizer.json merges across ("▁▁", "b"), as transformers' own Llama 2 tokenizer.json does
SINGLE_SPACED = {**{k: TEXTS[k] for k in ("multilingual", "emoji")},
                 "code": "def f(x):\n\treturn {'x': x ** 2} # 2+2=4\r\n// for (int i=0;i<n;++i) { a[i] <<= 1; }\n"}


@pytest.mark.parametrize("name", list(SINGLE_SPACED))
def test_llama2_sentencepiece_and_tokenizer_json_agree(name, llama2_folders):
    sp, fast = load_tokenizer(llama2_folders[0]), load_tokenizer(llama2_folders[1])
    text = SINGLE_SPACED[name]
    assert sp.encode(text) == fast.encode(text)
    assert sp.decode(sp.encode(text)) == fast.decode(fast.encode(text)) == text
    assert streamed(sp, sp.encode(text)) == streamed(fast, fast.encode(text))
