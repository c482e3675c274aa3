"""Character tokenizer: a vocabulary of characters, saved as JSON beside the checkpoints."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from charlm_jax.errors import UserError

UNK_TEXT = "\ufffd"  # what an unknown-character id decodes to


class UnknownCharacterError(UserError):
    """Text holds a character that is not in the tokenizer's vocabulary."""


class CharTokenizer:
    """Maps each character of a fixed vocabulary to an id.

    Characters outside the vocabulary raise `UnknownCharacterError`, unless the tokenizer
    was built with `allow_unknown=True`: then they map to one extra `<unk>` id (the last).
    """

    kind = "char"

    def __init__(self, chars: Sequence[str], allow_unknown: bool = False):
        if len(set(chars)) != len(chars) or any(len(c) != 1 for c in chars):
            raise ValueError("chars must be distinct single characters")
        self.chars = list(chars)
        self.allow_unknown = allow_unknown
        self._codes = np.array([ord(c) for c in self.chars], dtype=np.uint32)
        self._order = np.argsort(self._codes)
        self._sorted_codes = self._codes[self._order]
        self._decode_table = self.chars + ([UNK_TEXT] if allow_unknown else [])

    @classmethod
    def from_text(cls, text: str, allow_unknown: bool = False) -> CharTokenizer:
        """Builds the vocabulary from the distinct characters of `text`, sorted."""
        return cls(sorted(set(text)), allow_unknown=allow_unknown)

    @property
    def vocab_size(self) -> int:
        return len(self._decode_table)

    @property
    def unk_id(self) -> int | None:
        return len(self.chars) if self.allow_unknown else None

    def encode(self, text: str) -> np.ndarray:
        """Returns the ids of `text` as an int32 array."""
        codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        pos = np.minimum(np.searchsorted(self._sorted_codes, codes), len(self._codes) - 1)
        known = self._sorted_codes[pos] == codes
        ids = self._order[pos].astype(np.int32)
        if not known.all():
            if not self.allow_unknown:
                i = int(np.argmin(known))
                raise UnknownCharacterError(
                    f"unknown character {text[i]!r} (U+{ord(text[i]):04X}) at position {i}: "
                    f"not in the tokenizer's vocabulary of {len(self.chars)} characters"
                )
            ids[~known] = self.unk_id
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        """Returns the text of `ids`; raises ValueError on an id outside the vocabulary."""
        table = self._decode_table
        try:
            return "".join(table[i] for i in np.asarray(ids, dtype=np.int64).reshape(-1))
        except IndexError:
            raise ValueError(
                f"token id out of range for vocabulary size {self.vocab_size}"
            ) from None

    def to_dict(self) -> dict:
        return {
            "kind": self.kind,
            "chars": "".join(self.chars),
            "allow_unknown": self.allow_unknown,
        }

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), ensure_ascii=True) + "\n")


def load_tokenizer(path: str | Path) -> CharTokenizer:
    """Loads a tokenizer saved with `save`."""
    try:
        spec = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read tokenizer {path}: {e}") from None
    if spec.get("kind") != CharTokenizer.kind:
        raise UserError(f"tokenizer {path} has unsupported kind {spec.get('kind')!r}")
    return CharTokenizer(list(spec["chars"]), allow_unknown=spec["allow_unknown"])
