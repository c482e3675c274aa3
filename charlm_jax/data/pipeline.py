"""A run's data: the corpus the config names (a file, the embedded default, or TFDS), its
tokenizer, and the train/validation split by position. Batches are drawn by `batching`."""

from __future__ import annotations

from typing import NamedTuple

import ml_collections
import numpy as np

from charlm_jax.data.text_files import (
    DECODE_ERRORS,
    FileCorpus,
    TextCorpus,
    check_choice,
    data_file,
    read_text,
)
from charlm_jax.data.tokenizers import BpeTokenizer, CharTokenizer, Tokenizer, create_tokenizer
from charlm_jax.errors import UserError

CHUNK_TOKENS = 1 << 22  # token arrays are scanned on the host in chunks of this many
SOURCES = ("file", "tfds")
BATCHES = ("auto", "device", "host")
TOKENIZERS = (CharTokenizer.kind, BpeTokenizer.kind)


class Dataset(NamedTuple):
    """Everything training reads from the data: tokenizer, token splits and their traits."""

    tokenizer: Tokenizer
    train: np.ndarray  # token ids (a memory map for large files)
    val: np.ndarray
    chars_per_token: float  # of the validation split: loss per token / this = per character
    on_device: bool  # whether batches are drawn on the device (else on the host)


def check_config(config: ml_collections.ConfigDict) -> None:
    """Raises UserError naming the first field of `config` (the `data` section) that no data
    can be loaded with: a choice that is not one, or a size out of range. Nothing is read."""
    check_choice(config, "source", SOURCES)
    check_choice(config, "decode_errors", DECODE_ERRORS)
    check_choice(config, "batches", BATCHES)
    check_choice(config, "tokenizer", TOKENIZERS)
    if config.context_length < 1:
        raise UserError(f"data.context_length must be positive, got {config.context_length}")
    if not 0.0 < config.val_fraction < 1.0:
        raise UserError(f"data.val_fraction must be in (0, 1), got {config.val_fraction}")


def open_corpus(config: ml_collections.ConfigDict) -> TextCorpus | FileCorpus:
    """The corpus `config` (the `data` section, checked by `check_config`) names: a TFDS
    dataset, the embedded tiny Shakespeare, a text file, or a file over `memmap_above_mb`
    read through a token cache."""
    if config.source == "tfds":
        from charlm_jax.data import tfds_text  # imports tensorflow_datasets (seconds): only if used

        return TextCorpus(tfds_text.read_tfds_text(config))
    if config.path:
        path = data_file(config)
        if path.stat().st_size > config.memmap_above_mb * 2**20:
            return FileCorpus(path, config.decode_errors)
    return TextCorpus(read_text(config))


def load_dataset(config: ml_collections.ConfigDict, tokenizer: Tokenizer | None = None) -> Dataset:
    """The corpus of `config` (the `data` section), tokenized by `tokenizer` (None: a new one
    the config names, built from the corpus; BPE learns from the training part only), and
    split into at least one window of `context_length + 1` tokens each."""
    corpus = open_corpus(config)
    if tokenizer is None:
        train_part = corpus.chunks(1.0 - config.val_fraction)
        tokenizer = create_tokenizer(config, corpus.chunks(), train_part)
    tokens = corpus.tokens(tokenizer)
    train, val = split_tokens(tokens, config.val_fraction, config.context_length)
    return Dataset(
        tokenizer, train, val, chars_per_token(tokenizer, val), batches_on_device(config, tokens)
    )


def split_tokens(
    tokens: np.ndarray, val_fraction: float, context_length: int
) -> tuple[np.ndarray, np.ndarray]:
    """Splits by position: the first (1 - val_fraction) for training, the rest for validation.

    Both parts must hold at least one window of `context_length + 1` tokens.
    """
    n_train = int(len(tokens) * (1.0 - val_fraction))
    train, val = tokens[:n_train], tokens[n_train:]
    need = context_length + 1
    if len(train) < need or len(val) < need:
        raise UserError(
            f"data too short: {len(tokens)} tokens give {len(train)} for training and "
            f"{len(val)} for validation; each needs at least data.context_length + 1 = {need}"
        )
    return train, val


def chars_per_token(tokenizer: Tokenizer, tokens: np.ndarray) -> float:
    """Characters of text per token in `tokens` (1 for the character tokenizer): a loss per
    token divided by it is a loss per character."""
    lengths = np.array([len(tokenizer.decode([i])) for i in range(tokenizer.vocab_size)])
    chars = sum(
        int(lengths[tokens[i : i + CHUNK_TOKENS]].sum())
        for i in range(0, len(tokens), CHUNK_TOKENS)
    )
    return chars / len(tokens)


def batches_on_device(config: ml_collections.ConfigDict, tokens: np.ndarray) -> bool:
    """Whether to keep `tokens` on the device and draw batches there (`batches` "auto": all
    but memory-mapped corpora) rather than on the host."""
    if config.batches == "auto":
        return not isinstance(tokens, np.memmap)
    return config.batches == "device"
