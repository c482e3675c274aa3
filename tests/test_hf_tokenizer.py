"""The Hugging Face form of the tokenizers encodes and decodes exactly as they do."""

import sys

import numpy as np
import pytest
import tokenizers as hf
from conftest import tiny_config
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from charlm_jax.data import hf_tokenizer
from charlm_jax.data.preprocess import TextFilter
from charlm_jax.data.text_files import embedded_tiny_shakespeare
from charlm_jax.data.tokenizers import BpeTokenizer, CharTokenizer
from charlm_jax.workdir import checkpoints

SHAKESPEARE = embedded_tiny_shakespeare().read_text(encoding="utf-8")
FILTER = TextFilter(lowercase=True, charset="abcdefghijklmnopqrstuvwxyzσς \n.,", replacement="#")


def _reloaded(tokenizer, tmp_path) -> hf.Tokenizer:
    """The tokenizer's Hugging Face file, written and read back."""
    hf_tokenizer.save(tokenizer, tmp_path / "hf.json")
    return hf.Tokenizer.from_file(str(tmp_path / "hf.json"))


def _assert_same(tokenizer, hf_form: hf.Tokenizer, text: str) -> None:
    ids = tokenizer.encode(text)
    np.testing.assert_array_equal(np.asarray(hf_form.encode(text).ids, np.int32), ids)
    same_text = hf_form.decode(ids.tolist()) == tokenizer.decode(ids)
    assert same_text  # (pytest's diff of two whole books would take minutes)


@pytest.fixture(scope="module")
def bpe() -> BpeTokenizer:
    return BpeTokenizer.train([SHAKESPEARE], vocab_size=300, allow_unknown=True)


@pytest.mark.parametrize("text_filter", [TextFilter(), FILTER], ids=["plain", "filtered"])
def test_char_tokenizer_whole_shakespeare(tmp_path, text_filter):
    tokenizer = CharTokenizer.from_text(SHAKESPEARE[:5000], True, text_filter)
    _assert_same(tokenizer, _reloaded(tokenizer, tmp_path), SHAKESPEARE)  # with unknowns


def test_bpe_tokenizer_whole_shakespeare(tmp_path, bpe):
    _assert_same(bpe, _reloaded(bpe, tmp_path), SHAKESPEARE + " <unk> 日本")


def test_bpe_unknown_decodes_to_replacement_character(tmp_path, bpe):
    # `tokenizers` skips special tokens when decoding, unless told not to.
    assert _reloaded(bpe, tmp_path).decode([bpe.unk_id]) == "\ufffd"


def test_char_tokenizer_without_unknowns_raises(tmp_path):
    hf_form = _reloaded(CharTokenizer.from_text("abc"), tmp_path)
    assert hf_form.encode("cab").ids == [2, 0, 1]
    with pytest.raises(Exception, match="WordLevel"):
        hf_form.encode("abz")


def test_lowercase_final_sigma(tmp_path):
    tokenizer = CharTokenizer.from_text("αβσς '", text_filter=TextFilter(lowercase=True))
    _assert_same(tokenizer, _reloaded(tokenizer, tmp_path), "ΑΣ ΑΣΑ Σ ΒΑΣ'Α")


def test_run_writes_the_hf_tokenizer(tmp_path):
    tokenizer = CharTokenizer.from_text(SHAKESPEARE[:1000])
    checkpoints.save_run_files(tmp_path, tiny_config(), tokenizer)
    hf_form = hf.Tokenizer.from_file(str(tmp_path / hf_tokenizer.HF_TOKENIZER_FILE))
    _assert_same(tokenizer, hf_form, SHAKESPEARE[:1000])


def _cased_alike(c: str) -> bool:
    """Whether Python and `tokenizers` lowercase `c` alike (not so for characters newer than
    this Python's Unicode tables: a documented difference)."""
    return hf.normalizers.Lowercase().normalize_str(c) == c.lower()


CASED_DIFFERENTLY = "".join(
    c
    for c in map(chr, range(sys.maxunicode + 1))
    if not 0xD800 <= ord(c) < 0xE000 and not _cased_alike(c)
)
# Any character but surrogates and those; replacements without backslashes, which `re.sub`
# (TextFilter) reads as escapes.
CHARACTERS = st.characters(exclude_categories=["Cs"], exclude_characters=CASED_DIFFERENTLY)
TEXT = st.text(CHARACTERS)


@settings(max_examples=100, deadline=None)
@given(
    vocabulary=TEXT,
    text=TEXT,
    lowercase=st.booleans(),
    charset=TEXT,
    replacement=st.text(CHARACTERS.filter(lambda c: c != "\\"), max_size=2),
)
def test_random_unicode(tmp_path_factory, vocabulary, text, lowercase, charset, replacement):
    text_filter = TextFilter(lowercase, "".join(sorted(set(charset))), replacement)
    tokenizer = CharTokenizer.from_text(vocabulary + text[: len(text) // 2], True, text_filter)
    assume(tokenizer.chars)  # an empty vocabulary encodes nothing
    _assert_same(tokenizer, _reloaded(tokenizer, tmp_path_factory.mktemp("hf")), text)


def test_transformers_loads_it_alike(tmp_path, bpe):
    transformers = pytest.importorskip("transformers")
    hf_tokenizer.save(bpe, tmp_path / "tokenizer.json")
    loaded = transformers.PreTrainedTokenizerFast(
        tokenizer_file=str(tmp_path / "tokenizer.json"), clean_up_tokenization_spaces=False
    )
    text = SHAKESPEARE[:5000] + " <unk> 日本 ."
    ids = bpe.encode(text)
    assert loaded(text)["input_ids"] == ids.tolist()
    assert loaded.decode(ids) == bpe.decode(ids)


@pytest.fixture(scope="module")
def bpe_file(bpe, tmp_path_factory) -> hf.Tokenizer:
    return _reloaded(bpe, tmp_path_factory.mktemp("bpe"))


@settings(max_examples=50, deadline=None)
@given(text=TEXT)
def test_random_unicode_bpe(bpe, bpe_file, text):
    _assert_same(bpe, bpe_file, text)
