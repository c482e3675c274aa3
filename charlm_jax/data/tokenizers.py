"""Tokenizers behind one interface (`encode`, `decode`, `vocab_size`, `chars`, `save`):
characters, or BPE trained with HuggingFace `tokenizers`. Each applies its text
preprocessing (`preprocess.TextFilter`) in `encode`. Saved as JSON beside the checkpoints and
loaded back with `load_tokenizer`."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Protocol

import ml_collections
import numpy as np
import tokenizers as hf

from charlm_jax.data.preprocess import TextFilter
from charlm_jax.errors import UserError

UNK_TEXT = "\ufffd"  # what an unknown-character id decodes to
BPE_UNK = "<unk>"
# BPE words: a run of non-space characters with at most one leading space, or one space
# character. Every whitespace character starts a word, so text split before one encodes
# to the same tokens as the whole.
BPE_WORD = r" ?[^\s]+|\s"
ENCODE_PIECE = 1 << 16  # BPE encodes long texts in pieces of about this many characters


class UnknownCharacterError(UserError):
    """Text holds a character that is not in the tokenizer's vocabulary."""


class Tokenizer(Protocol):
    """What training, sampling and checkpoints use of a tokenizer."""

    kind: str
    chars: list[str]  # the characters it can encode
    allow_unknown: bool
    text_filter: TextFilter  # applied to text in `encode`

    @property
    def vocab_size(self) -> int: ...

    def encode(self, text: str) -> np.ndarray: ...

    def decode(self, ids: Iterable[int]) -> str: ...

    def to_dict(self) -> dict: ...

    def save(self, path: str | Path) -> None: ...


def _unknown_character(text: str, known: Iterable[str], vocab: str) -> UnknownCharacterError:
    known = set(known)
    i = next(i for i, c in enumerate(text) if c not in known)
    return UnknownCharacterError(
        f"unknown character {text[i]!r} (U+{ord(text[i]):04X}) at position {i}: "
        f"not in the tokenizer's vocabulary of {vocab}"
    )


def _decode_with(table: Sequence[str], ids: Iterable[int]) -> str:
    try:
        return "".join(table[i] for i in np.asarray(ids, dtype=np.int64).reshape(-1))
    except IndexError:
        raise ValueError(f"token id out of range for vocabulary size {len(table)}") from None


def _save(tokenizer: Tokenizer, path: str | Path) -> None:
    Path(path).write_text(json.dumps(tokenizer.to_dict(), ensure_ascii=True) + "\n")


class CharTokenizer:
    """Maps each character of a fixed vocabulary to an id.

    Characters outside the vocabulary raise `UnknownCharacterError`, unless the tokenizer
    was built with `allow_unknown=True`: then they map to one extra `<unk>` id (the last).
    """

    kind = "char"

    def __init__(
        self,
        chars: Sequence[str],
        allow_unknown: bool = False,
        text_filter: TextFilter = TextFilter(),  # noqa: B008 (frozen)
    ):
        if len(set(chars)) != len(chars) or any(len(c) != 1 for c in chars):
            raise ValueError("chars must be distinct single characters")
        self.chars = list(chars)
        self.allow_unknown = allow_unknown
        self.text_filter = text_filter
        self._codes = np.array([ord(c) for c in self.chars], dtype=np.uint32)
        self._order = np.argsort(self._codes)
        self._sorted_codes = self._codes[self._order]
        self._decode_table = self.chars + ([UNK_TEXT] if allow_unknown else [])

    @classmethod
    def from_text(
        cls,
        text: str | Iterable[str],
        allow_unknown: bool = False,
        text_filter: TextFilter = TextFilter(),  # noqa: B008 (frozen)
    ) -> CharTokenizer:
        """Builds the vocabulary from the distinct characters of `text` (or of an iterable
        of text chunks) after `text_filter`, sorted."""
        chunks = map(text_filter, [text] if isinstance(text, str) else text)
        return cls(sorted(set().union(*map(set, chunks))), allow_unknown, text_filter)

    @property
    def vocab_size(self) -> int:
        return len(self._decode_table)

    @property
    def unk_id(self) -> int | None:
        return len(self.chars) if self.allow_unknown else None

    def encode(self, text: str) -> np.ndarray:
        """Returns the ids of `text` as an int32 array."""
        text = self.text_filter(text)
        codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        pos = np.minimum(np.searchsorted(self._sorted_codes, codes), len(self._codes) - 1)
        known = self._sorted_codes[pos] == codes
        ids = self._order[pos].astype(np.int32)
        if not known.all():
            if not self.allow_unknown:
                raise _unknown_character(text, self.chars, f"{len(self.chars)} characters")
            ids[~known] = self.unk_id
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        """Returns the text of `ids`; raises ValueError on an id outside the vocabulary."""
        return _decode_with(self._decode_table, ids)

    def to_dict(self) -> dict:
        return {
            "kind": self.kind,
            "chars": "".join(self.chars),
            "allow_unknown": self.allow_unknown,
            "preprocess": self.text_filter.to_dict(),
        }

    def save(self, path: str | Path) -> None:
        _save(self, path)


def _pieces(text: str, size: int) -> Iterable[str]:
    """Consecutive pieces of `text` of about `size` characters, each cut before a newline
    (else a space) where there is one."""
    start = 0
    while len(text) - start > size:
        end = start + size
        cut = text.rfind("\n", start + 1, end)
        cut = cut if cut > start else text.rfind(" ", start + 1, end)
        cut = cut if cut > start else end
        yield text[start:cut]
        start = cut
    yield text[start:]


class BpeTokenizer:
    """Byte-pair encoding over characters (HuggingFace `tokenizers`).

    The base vocabulary is the characters of the training text; a token is a run of them,
    so `decode` is exact and decoding pieces of an id sequence gives pieces of its text.
    Unknown characters raise `UnknownCharacterError` unless `allow_unknown`: then they map
    to `<unk>` (id 0), which decodes to U+FFFD.
    """

    kind = "bpe"

    def __init__(
        self,
        model: hf.Tokenizer,
        allow_unknown: bool = False,
        text_filter: TextFilter = TextFilter(),  # noqa: B008 (frozen)
    ):
        self._model = model
        self.allow_unknown = allow_unknown
        self.text_filter = text_filter
        self.unk_id = model.token_to_id(BPE_UNK)
        tokens = [model.id_to_token(i) for i in range(model.get_vocab_size())]
        self.chars = [t for i, t in enumerate(tokens) if len(t) == 1 and i != self.unk_id]
        self._decode_table = [UNK_TEXT if i == self.unk_id else t for i, t in enumerate(tokens)]

    @classmethod
    def train(
        cls,
        texts: Iterable[str],
        vocab_size: int,
        allow_unknown: bool = False,
        text_filter: TextFilter = TextFilter(),  # noqa: B008 (frozen)
    ) -> BpeTokenizer:
        """Learns merges from `texts` (chunks of the training text, put through
        `text_filter`) up to `vocab_size` tokens, `<unk>` and every character included."""
        model = hf.Tokenizer(hf.models.BPE(unk_token=BPE_UNK))
        model.pre_tokenizer = hf.pre_tokenizers.Split(hf.Regex(BPE_WORD), behavior="isolated")
        trainer = hf.trainers.BpeTrainer(
            vocab_size=vocab_size, special_tokens=[BPE_UNK], show_progress=False
        )
        model.train_from_iterator(
            (p for text in map(text_filter, texts) for p in _pieces(text, ENCODE_PIECE)), trainer
        )
        tokenizer = cls(model, allow_unknown, text_filter)
        if model.get_vocab_size() < vocab_size:
            raise UserError(
                f"data.vocab_size={vocab_size} is more than the training text supports: BPE "
                f"stops at {model.get_vocab_size()} tokens ({len(tokenizer.chars)} characters "
                "and every merge seen); lower data.vocab_size"
            )
        if len(tokenizer.chars) + 1 >= vocab_size:
            raise UserError(
                f"data.vocab_size={vocab_size} leaves no room for merges: the text has "
                f"{len(tokenizer.chars)} distinct characters (plus <unk>); raise it"
            )
        return tokenizer

    @property
    def vocab_size(self) -> int:
        return len(self._decode_table)

    def encode(self, text: str) -> np.ndarray:
        """Returns the ids of `text` as an int32 array (long texts encode in parallel)."""
        text = self.text_filter(text)
        encodings = self._model.encode_batch_fast(list(_pieces(text, ENCODE_PIECE)))
        ids = np.concatenate([np.asarray(e.ids, dtype=np.int32) for e in encodings])
        if not self.allow_unknown and (ids == self.unk_id).any():
            raise _unknown_character(text, self.chars, f"{self.vocab_size} BPE tokens")
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        """Returns the text of `ids`; raises ValueError on an id outside the vocabulary."""
        return _decode_with(self._decode_table, ids)

    def to_dict(self) -> dict:
        return {
            "kind": self.kind,
            "allow_unknown": self.allow_unknown,
            "preprocess": self.text_filter.to_dict(),
            "model": json.loads(self._model.to_str()),
        }

    def save(self, path: str | Path) -> None:
        _save(self, path)


def create_tokenizer(
    config: ml_collections.ConfigDict, all_text: Iterable[str], train_text: Iterable[str]
) -> Tokenizer:
    """The tokenizer `config` (the `data` section) names: characters of `all_text`, or BPE
    trained on `train_text` (both iterables of text chunks)."""
    text_filter = TextFilter.from_config(config)
    if config.tokenizer == "char":
        return CharTokenizer.from_text(all_text, config.allow_unknown, text_filter)
    if config.tokenizer == "bpe":
        return BpeTokenizer.train(train_text, config.vocab_size, config.allow_unknown, text_filter)
    raise UserError(f"data.tokenizer must be 'char' or 'bpe', got {config.tokenizer!r}")


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Loads a tokenizer saved with `save`."""
    try:
        spec = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read tokenizer {path}: {e}") from None
    text_filter = TextFilter(**spec.get("preprocess", {}))
    if spec.get("kind") == CharTokenizer.kind:
        return CharTokenizer(list(spec["chars"]), spec["allow_unknown"], text_filter)
    if spec.get("kind") == BpeTokenizer.kind:
        model = hf.Tokenizer.from_str(json.dumps(spec["model"]))
        return BpeTokenizer(model, spec["allow_unknown"], text_filter)
    raise UserError(f"tokenizer {path} has unsupported kind {spec.get('kind')!r}")
