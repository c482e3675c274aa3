"""Token files for corpora too large to hold: a text file is tokenized once, in chunks, into
DIR/NAME.TEXT.KEY.DTYPE.tokens beside it (raw little-endian integers, nanoGPT's train.bin
idea), and read back as a memory map. TEXT hashes the file's size and modification time, KEY
the tokenizer: a changed tokenizer writes another file, a changed text also removes the
files of its old version."""

from __future__ import annotations

import glob
import hashlib
import json
import os
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from absl import logging

from charlm_jax.errors import UserError

SUFFIX = ".tokens"


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned integer type that holds every id."""
    for dtype in (np.uint8, np.uint16, np.uint32):
        if vocab_size <= np.iinfo(dtype).max + 1:
            return np.dtype(dtype)
    raise ValueError(f"vocabulary too large: {vocab_size}")


def _digest(spec: dict) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]


def _text_prefix(text_path: Path) -> str:
    stat = text_path.stat()
    return f"{text_path.name}.{_digest({'size': stat.st_size, 'mtime_ns': stat.st_mtime_ns})}."


def cache_path(text_path: Path, key: dict, vocab_size: int) -> Path:
    """Where the tokens of `text_path` under `key` (the tokenizer and reading options) go."""
    name = f"{_text_prefix(text_path)}{_digest(key)}.{token_dtype(vocab_size)}{SUFFIX}"
    return text_path.with_name(name)


def load_or_build(
    text_path: Path, key: dict, vocab_size: int, token_chunks: Iterable[np.ndarray]
) -> np.memmap:
    """The memory-mapped tokens of `text_path`; written from `token_chunks` (consumed only
    when no valid cache exists) on first use."""
    target = cache_path(text_path, key, vocab_size)
    dtype = token_dtype(vocab_size)
    if not target.exists():
        for old in text_path.parent.glob(f"{glob.escape(text_path.name)}.*{SUFFIX}"):
            if not old.name.startswith(_text_prefix(text_path)):
                old.unlink()  # tokens of an earlier version of the text
        tmp = target.with_name(f"{target.name}.tmp{os.getpid()}")
        start = time.perf_counter()
        try:
            with tmp.open("wb") as f:
                for ids in token_chunks:
                    f.write(ids.astype(dtype).tobytes())
            os.replace(tmp, target)
        except OSError as e:
            raise UserError(f"cannot write token cache {target}: {e.strerror or e}") from None
        finally:
            tmp.unlink(missing_ok=True)
        logging.info("Tokenized %s in %.1f s: %s", text_path, time.perf_counter() - start, target)
    if target.stat().st_size == 0:
        raise UserError(f"no tokens in {text_path}")
    return np.memmap(target, dtype=dtype, mode="r")
