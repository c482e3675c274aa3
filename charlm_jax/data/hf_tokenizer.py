"""The project's tokenizers as Hugging Face `tokenizers` files, which `transformers`, vLLM and
benchmark clients load (`tokenizers.Tokenizer.from_file`, `AutoTokenizer`).

The file encodes and decodes as the project's tokenizer does: its preprocessing is the
normalizer, unknown characters become the `<unk>` id where the tokenizer allows them, and
every id decodes to its text (`<unk>` to U+FFFD), with no spaces added between tokens.
Known differences, all of texts the project's own tokenizer treats specially:
- a character tokenizer without `allow_unknown` raises on an unknown character, as the
  project's does; a BPE one maps it to `<unk>` where the project's raises;
- with `lowercase`, characters that Python's Unicode tables and the `tokenizers` library's
  case differently (those added to Unicode after the running Python's version);
- BPE over a run of more than `tokenizers.ENCODE_PIECE` characters without a space.
"""

from __future__ import annotations

import json
from pathlib import Path

import tokenizers as hf

from charlm_jax.data.preprocess import TextFilter
from charlm_jax.data.tokenizers import BPE_UNK, UNK_TEXT, BpeTokenizer, CharTokenizer, Tokenizer

HF_TOKENIZER_FILE = "hf_tokenizer.json"  # beside the run's own tokenizer.json
ANY_CHARACTER = r"[\s\S]"
# Python lowercases a capital sigma that ends a word to the final form; `tokenizers` does not.
FINAL_SIGMA = r"\p{Cased}\p{Case_Ignorable}*\K\u03a3(?!\p{Case_Ignorable}*\p{Cased})"


def _character_class(chars: str) -> str:
    """An Oniguruma class body matching exactly `chars` (each written as a code point)."""
    return "".join(f"\\x{{{ord(c):x}}}" for c in chars)


def _normalizer(text_filter: TextFilter) -> hf.normalizers.Normalizer | None:
    """`text_filter` (lowercase, then the charset) as a normalizer; None if it keeps all."""
    steps = []
    if text_filter.lowercase:
        steps += [
            hf.normalizers.Replace(hf.Regex(FINAL_SIGMA), "\u03c2"),
            hf.normalizers.Lowercase(),
        ]
    if text_filter.charset:
        outside = hf.Regex(f"[^{_character_class(text_filter.charset)}]")
        steps.append(hf.normalizers.Replace(outside, text_filter.replacement))
    return hf.normalizers.Sequence(steps) if steps else None


def _char_model(tokenizer: CharTokenizer) -> hf.Tokenizer:
    vocab = {c: i for i, c in enumerate(tokenizer.chars)}
    # Without `allow_unknown` there is no <unk> id, and encoding an unknown character raises.
    unk = BPE_UNK if tokenizer.allow_unknown else None
    if unk is not None:
        vocab[unk] = tokenizer.unk_id  # a token of many characters: no text spells it
    model = hf.Tokenizer(hf.models.WordLevel(vocab, unk_token=unk))
    model.pre_tokenizer = hf.pre_tokenizers.Split(hf.Regex(ANY_CHARACTER), behavior="isolated")
    return model


def _bpe_model(tokenizer: BpeTokenizer) -> hf.Tokenizer:
    spec = tokenizer.to_dict()["model"]
    # Decoders skip special tokens by default; the project decodes <unk> to U+FFFD.
    for token in spec["added_tokens"]:
        token["special"] = False
    return hf.Tokenizer.from_str(json.dumps(spec))


def to_hf(tokenizer: Tokenizer) -> hf.Tokenizer:
    """`tokenizer` as a Hugging Face tokenizer that encodes and decodes as it does."""
    if isinstance(tokenizer, CharTokenizer):
        model = _char_model(tokenizer)
    elif isinstance(tokenizer, BpeTokenizer):
        model = _bpe_model(tokenizer)
    else:
        raise TypeError(f"no Hugging Face form for tokenizer kind {tokenizer.kind!r}")
    normalizer = _normalizer(tokenizer.text_filter)
    if normalizer is not None:
        model.normalizer = normalizer
    # Also joins the tokens without spaces (as any decoder does: without one, with spaces).
    model.decoder = hf.decoders.Replace(hf.Regex(rf"\A{BPE_UNK}\z"), UNK_TEXT)
    return model


def save(tokenizer: Tokenizer, path: str | Path) -> None:
    """Writes `tokenizer`'s Hugging Face form to `path` (a tokenizer.json file)."""
    to_hf(tokenizer).save(str(path))
