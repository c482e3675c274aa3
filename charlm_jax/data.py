"""Text sources, train/validation split, and batch sampling (on device, inside jit)."""

from __future__ import annotations

import importlib.resources
import os
import tempfile
import urllib.request
from pathlib import Path

import jax
import ml_collections
import numpy as np

from charlm_jax.errors import UserError

TINY_SHAKESPEARE_URL = (
    "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
)


def embedded_tiny_shakespeare() -> Path:
    """Path of the tiny Shakespeare copy shipped inside the package (1.1 MB)."""
    return Path(str(importlib.resources.files("charlm_jax") / "resources" / "tinyshakespeare.txt"))


def download(url: str, path: str | Path, timeout_s: float = 60.0) -> Path:
    """Downloads `url` to `path` (written atomically) unless `path` already exists."""
    path = Path(path)
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            content = response.read()
    except OSError as e:
        raise UserError(f"cannot download {url}: {e}") from None
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".")
    with os.fdopen(fd, "wb") as f:
        f.write(content)
    os.replace(tmp, path)
    return path


def load_text(config: ml_collections.ConfigDict) -> str:
    """Reads the corpus named by `config` (the `data` section).

    An empty `path` means the embedded tiny Shakespeare. A missing `path` is downloaded from
    `download_url` only when `download` is set.
    """
    if not config.path:
        return embedded_tiny_shakespeare().read_text(encoding="utf-8")
    path = Path(config.path).expanduser()
    if not path.exists() and config.download:
        download(config.download_url, path)
    if not path.is_file():
        raise UserError(f"data file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"data file {path} is not valid UTF-8 text: {e}") from None
    except OSError as e:
        raise UserError(f"cannot read data file {path}: {e}") from None
    if not text:
        raise UserError(f"data file is empty: {path}")
    return text


def split_tokens(
    tokens: np.ndarray, val_fraction: float, sequence_length: int
) -> tuple[np.ndarray, np.ndarray]:
    """Splits by position: the first (1 - val_fraction) for training, the rest for validation.

    Both parts must hold at least one window of `sequence_length + 1` tokens.
    """
    n_train = int(len(tokens) * (1.0 - val_fraction))
    train, val = tokens[:n_train], tokens[n_train:]
    need = sequence_length + 1
    if len(train) < need or len(val) < need:
        raise UserError(
            f"data too short: {len(tokens)} tokens give {len(train)} for training and "
            f"{len(val)} for validation; each needs at least sequence_length + 1 = {need}"
        )
    return train, val


def sample_batch(
    tokens: jax.Array, key: jax.Array, batch_size: int, sequence_length: int
) -> tuple[jax.Array, jax.Array]:
    """Draws `batch_size` random windows of `tokens`: inputs and next-token targets.

    Jittable: with `tokens` already on the device, the host does no per-step work.
    """
    starts = jax.random.randint(key, (batch_size,), 0, tokens.shape[0] - sequence_length)
    windows = jax.vmap(lambda s: jax.lax.dynamic_slice(tokens, (s,), (sequence_length + 1,)))(
        starts
    )
    return windows[:, :-1], windows[:, 1:]
