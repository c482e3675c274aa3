import numpy as np
import pytest
from conftest import tiny_config

from charlm_jax.data import tokenizers
from charlm_jax.data.tokenizers import (
    BpeTokenizer,
    CharTokenizer,
    UnknownCharacterError,
    load_tokenizer,
)
from charlm_jax.errors import UserError


def test_round_trip():
    text = "Hello, world!\nÉtude ünïcode 😀"
    tok = CharTokenizer.from_text(text)
    ids = tok.encode(text)
    assert ids.dtype == np.int32 and ids.shape == (len(text),)
    assert tok.vocab_size == len(set(text))
    assert ids.max() < tok.vocab_size
    assert tok.decode(ids) == text


def test_ids_follow_sorted_characters():
    tok = CharTokenizer.from_text("cab")
    assert tok.encode("abc").tolist() == [0, 1, 2]


def test_unknown_character_is_a_clear_error():
    tok = CharTokenizer.from_text("abc")
    with pytest.raises(
        UnknownCharacterError, match=r"unknown character 'z' \(U\+007A\) at position 2"
    ):
        tok.encode("abzc")


def test_unknown_characters_map_to_unk_when_allowed():
    tok = CharTokenizer.from_text("abc", allow_unknown=True)
    assert tok.vocab_size == 4 and tok.unk_id == 3
    ids = tok.encode("azb")
    assert ids.tolist() == [0, 3, 1]
    assert tok.decode(ids) == "a\ufffdb"


def test_decode_out_of_range_id():
    with pytest.raises(ValueError, match="out of range"):
        CharTokenizer.from_text("ab").decode([5])


def test_save_and_load(tmp_path):
    tok = CharTokenizer.from_text("xyz \n\"'\\é", allow_unknown=True)
    tok.save(tmp_path / "tok.json")
    loaded = load_tokenizer(tmp_path / "tok.json")
    assert loaded.chars == tok.chars and loaded.allow_unknown
    assert loaded.encode("zé?").tolist() == tok.encode("zé?").tolist()


UNICODE_TEXT = "".join(
    f"Étude n°{i}: naïve café, ünïcode 😀 日本語 — {'ab' * (i % 5)} zz\n" for i in range(200)
)


@pytest.fixture(scope="module")
def bpe():
    return BpeTokenizer.train([UNICODE_TEXT], vocab_size=120)


def test_bpe_round_trip_with_unicode(bpe, tmp_path):
    ids = bpe.encode(UNICODE_TEXT)
    assert ids.dtype == np.int32 and bpe.vocab_size == 120 and ids.max() < 120
    assert len(ids) < len(UNICODE_TEXT) / 2  # merges happened
    assert bpe.decode(ids) == UNICODE_TEXT
    # Pieces of an id sequence decode to pieces of the text (streamed sampling relies on it).
    assert bpe.decode(ids[:7]) + bpe.decode(ids[7:]) == UNICODE_TEXT
    assert {"😀", "日", "\n"} <= set(bpe.chars)
    bpe.save(tmp_path / "tok.json")
    loaded = load_tokenizer(tmp_path / "tok.json")
    assert loaded.kind == "bpe" and loaded.vocab_size == 120
    assert loaded.encode(UNICODE_TEXT).tolist() == ids.tolist()


def test_bpe_encodes_long_text_in_pieces_like_whole(bpe, monkeypatch):
    whole = bpe.encode(UNICODE_TEXT)
    monkeypatch.setattr(tokenizers, "ENCODE_PIECE", 50)
    assert bpe.encode(UNICODE_TEXT).tolist() == whole.tolist()


def test_bpe_unknown_characters(bpe):
    with pytest.raises(UnknownCharacterError, match=r"'Q' \(U\+0051\) at position 3"):
        bpe.encode("abcQ")
    lenient = BpeTokenizer.train([UNICODE_TEXT], vocab_size=120, allow_unknown=True)
    ids = lenient.encode("café Q")
    assert lenient.decode(ids) == "café \ufffd"


@pytest.mark.parametrize(
    ("vocab_size", "message"),
    [(5000, "more than the training text supports"), (10, "leaves no room for merges")],
)
def test_bpe_vocabulary_size_the_text_cannot_support(vocab_size, message):
    with pytest.raises(UserError, match=message):
        BpeTokenizer.train([UNICODE_TEXT], vocab_size=vocab_size)


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_preprocessing_is_saved_with_the_tokenizer_and_applied_to_prompts(kind, tmp_path):
    config = tiny_config(
        **{"data.tokenizer": kind, "data.vocab_size": 30, "data.lowercase": True,
           "data.charset": "abcdefghijklmnopqrstuvwxyz \n", "data.charset_replacement": "#"}
    ).data  # fmt: skip
    text = "ROMEO: Wherefore art thou, Roméo?\n" * 40
    tokenizer = tokenizers.create_tokenizer(config, [text], [text])
    assert set(tokenizer.chars) <= set(config.charset + "#")
    tokenizer.save(tmp_path / "tok.json")
    loaded = load_tokenizer(tmp_path / "tok.json")
    assert loaded.decode(loaded.encode("ROMEO: Thou?")) == "romeo# thou#"
    assert loaded.decode(loaded.encode(text)) == "romeo# wherefore art thou# rom#o#\n" * 40
    config.charset_replacement = ""  # dropped instead
    dropped = tokenizers.create_tokenizer(config, [text], [text])
    assert dropped.decode(dropped.encode("Thou, Roméo?")) == "thou romo"
