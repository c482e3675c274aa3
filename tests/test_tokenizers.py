import numpy as np
import pytest

from charlm_jax.tokenizers import CharTokenizer, UnknownCharacterError, load_tokenizer


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
