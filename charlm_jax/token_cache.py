"""Token files for corpora too large to hold: a text file is tokenized once, in chunks, into
DIR/NAME.KEY.DTYPE.tokens beside it (raw little-endian integers, nanoGPT's train.bin idea),
and read back as a memory map. KEY hashes the file's size and modification time and the
tokenizer, so a changed text or tokenizer writes a new file (and removes the stale one)."""

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


def cache_path(text_path: Path, key: dict, vocab_size: int) -> Path:
    """Where the tokens of `text_path` under `key` (the tokenizer and reading options) go."""
    stat = text_path.stat()
    spec = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, **key}
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]
    return text_path.with_name(f"{text_path.name}.{digest}.{token_dtype(vocab_size)}{SUFFIX}")


def load_or_build(
    text_path: Path, key: dict, vocab_size: int, token_chunks: Iterable[np.ndarray]
) -> np.memmap:
    """The memory-mapped tokens of `text_path`; written from `token_chunks` (consumed only
    when no valid cache exists) on first use."""
    target = cache_path(text_path, key, vocab_size)
    dtype = token_dtype(vocab_size)
    if not target.exists():
        for stale in text_path.parent.glob(f"{glob.escape(text_path.name)}.*{SUFFIX}"):
            stale.unlink()
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
