"""Text preprocessing before tokenizing: lowercasing, and a restricted character set (other
characters dropped or replaced). Tokenizers hold one and apply it in `encode`, so it is saved
with them and prompts are preprocessed as the training text was."""

from __future__ import annotations

import dataclasses
import re
from functools import cached_property

import ml_collections


@dataclasses.dataclass(frozen=True)
class TextFilter:
    lowercase: bool = False
    charset: str = ""  # the characters kept; "" keeps all
    replacement: str = ""  # what each character outside `charset` becomes; "" drops it

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict) -> TextFilter:
        """The filter of the `data` section's `lowercase`, `charset`, `charset_replacement`."""
        return cls(config.lowercase, config.charset, config.charset_replacement)

    @cached_property
    def _outside(self) -> re.Pattern:
        return re.compile(f"[^{re.escape(self.charset)}]")

    def __call__(self, text: str) -> str:
        if self.lowercase:
            text = text.lower()
        if self.charset:
            text = self._outside.sub(self.replacement, text)
        return text

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
