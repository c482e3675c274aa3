"""Text sources, the train/validation split, and batches: drawn on the device inside jit, or
on the host (from a memory-mapped token file) and prefetched to the device by a thread."""

from __future__ import annotations

import codecs
import importlib.resources
import os
import queue
import tempfile
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import jax
import ml_collections
import numpy as np
import tqdm

from charlm_jax import token_cache
from charlm_jax.errors import UserError
from charlm_jax.tokenizers import Tokenizer

TINY_SHAKESPEARE_URL = (
    "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
)
CHUNK_BYTES = 1 << 20  # large files are read and tokenized in chunks of this many bytes
CHUNK_TOKENS = 1 << 22  # token arrays are scanned on the host in chunks of this many
PREFETCH_BATCHES = 4  # host batches prepared ahead of the training step
DECODE_ERRORS = ("strict", "replace")
BATCHES = ("auto", "device", "host")


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


def _data_file(config: ml_collections.ConfigDict) -> Path:
    """The existing file `config.path` names, downloaded first when asked."""
    if config.decode_errors not in DECODE_ERRORS:
        raise UserError(
            f"data.decode_errors must be one of {DECODE_ERRORS}, got {config.decode_errors!r}"
        )
    path = Path(config.path).expanduser()
    if not path.exists() and config.download:
        download(config.download_url, path)
    if not path.is_file():
        raise UserError(f"data file not found: {path}")
    return path


def _utf8_error(path: Path, error: UnicodeDecodeError, offset: int) -> UserError:
    """`error` met in bytes that start at byte `offset` of the file."""
    return UserError(
        f"data file {path} is not valid UTF-8 text: byte 0x{error.object[error.start]:02x} at "
        f"offset {offset + error.start}; fix the file or set data.decode_errors=replace"
    )


def decode_text(data: bytes, errors: str, source: str) -> str:
    """UTF-8 `data` as text; a bad byte is an error naming `source` and its offset."""
    try:
        return data.decode("utf-8", errors)
    except UnicodeDecodeError as e:
        raise _utf8_error(Path(source), e, 0) from None


def load_text(config: ml_collections.ConfigDict) -> str:
    """Reads the whole corpus file named by `config` (the `data` section).

    An empty `path` means the embedded tiny Shakespeare. A missing `path` is downloaded from
    `download_url` only when `download` is set.
    """
    if not config.path:
        return embedded_tiny_shakespeare().read_text(encoding="utf-8")
    path = _data_file(config)
    try:
        text = decode_text(path.read_bytes(), config.decode_errors, str(path))
    except OSError as e:
        raise UserError(f"cannot read data file {path}: {e}") from None
    if not text:
        raise UserError(f"data file is empty: {path}")
    return text


class TextCorpus:
    """A corpus held in memory as one string."""

    def __init__(self, text: str):
        self.text = text

    def chunks(self, fraction: float = 1.0) -> Iterator[str]:
        """The first `fraction` of the text (one chunk)."""
        yield self.text[: int(len(self.text) * fraction)]

    def tokens(self, tokenizer: Tokenizer) -> np.ndarray:
        return tokenizer.encode(self.text)


class FileCorpus:
    """A corpus file too large to hold: read in chunks cut after newlines, tokenized once
    into a memory-mapped token cache beside it (see `token_cache`)."""

    def __init__(self, path: Path, errors: str = "strict"):
        self.path = path
        self.errors = errors

    def chunks(self, fraction: float = 1.0, progress: bool = False) -> Iterator[str]:
        """The text of the first `fraction` of the file's bytes, in chunks."""
        size = self.path.stat().st_size
        limit = int(size * fraction)
        decoder = codecs.getincrementaldecoder("utf-8")(self.errors)
        carry, offset = "", 0
        bar = tqdm.tqdm(
            total=limit, unit="B", unit_scale=True, desc=f"tokenizing {self.path.name}",
            disable=None if progress else True,
        )  # fmt: skip
        with bar, self.path.open("rb") as f:
            while offset < limit:
                data = f.read(min(CHUNK_BYTES, limit - offset))
                if not data:
                    break
                pending = len(decoder.getstate()[0])
                try:
                    text = carry + decoder.decode(data, final=offset + len(data) == size)
                except UnicodeDecodeError as e:
                    raise _utf8_error(self.path, e, offset - pending) from None
                offset += len(data)
                bar.update(len(data))
                # Cut after the last newline (a token boundary for both tokenizers); a text
                # without newlines is cut anywhere once it is a chunk long.
                cut = text.rfind("\n") + 1 or (len(text) if len(text) >= CHUNK_BYTES else 0)
                if cut:
                    yield text[:cut]
                carry = text[cut:]
        if carry:
            yield carry

    def tokens(self, tokenizer: Tokenizer) -> np.memmap:
        key = {"tokenizer": tokenizer.to_dict(), "errors": self.errors}
        encoded = (tokenizer.encode(text) for text in self.chunks(progress=True))
        return token_cache.load_or_build(self.path, key, tokenizer.vocab_size, encoded)


def open_corpus(config: ml_collections.ConfigDict) -> TextCorpus | FileCorpus:
    """The corpus `config` (the `data` section) names: a TFDS dataset, the embedded tiny
    Shakespeare, a text file, or a file over `memmap_above_mb` read through a token cache."""
    if config.source == "tfds":
        from charlm_jax import tfds_text  # imports tensorflow_datasets (seconds): only if used

        return TextCorpus(tfds_text.load_text(config))
    if config.source != "file":
        raise UserError(f"data.source must be 'file' or 'tfds', got {config.source!r}")
    if config.path:
        path = _data_file(config)
        if path.stat().st_size > config.memmap_above_mb * 2**20:
            return FileCorpus(path, config.decode_errors)
    return TextCorpus(load_text(config))


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
    if config.batches not in BATCHES:
        raise UserError(f"data.batches must be one of {BATCHES}, got {config.batches!r}")
    if config.batches == "auto":
        return not isinstance(tokens, np.memmap)
    return config.batches == "device"


def step_keys(key: jax.Array, step: jax.Array | int) -> tuple[jax.Array, jax.Array]:
    """The batch key and the dropout key of training step `step` (counted from 0)."""
    batch_key, dropout_key = jax.random.split(jax.random.fold_in(key, step))
    return batch_key, dropout_key


def batch_starts(
    key: jax.Array, num_tokens: int, batch_size: int, sequence_length: int
) -> jax.Array:
    """The first positions of `batch_size` random windows of `sequence_length + 1` tokens."""
    return jax.random.randint(key, (batch_size,), 0, num_tokens - sequence_length)


def sample_batch(
    tokens: jax.Array, key: jax.Array, batch_size: int, sequence_length: int
) -> tuple[jax.Array, jax.Array]:
    """Draws `batch_size` random windows of `tokens`: inputs and next-token targets.

    Jittable: with `tokens` already on the device, the host does no per-step work.
    """
    starts = batch_starts(key, tokens.shape[0], batch_size, sequence_length)
    windows = jax.vmap(lambda s: jax.lax.dynamic_slice(tokens, (s,), (sequence_length + 1,)))(
        starts
    )
    return windows[:, :-1], windows[:, 1:]


_batch_starts = jax.jit(batch_starts, static_argnums=(1, 2, 3))


def host_batch(
    tokens: np.ndarray, key: jax.Array, batch_size: int, sequence_length: int
) -> tuple[np.ndarray, np.ndarray]:
    """`sample_batch` on the host: the same windows for the same key, gathered from a
    (memory-mapped) array with numpy, as int32."""
    starts = np.asarray(_batch_starts(key, len(tokens), batch_size, sequence_length))
    windows = np.stack([tokens[s : s + sequence_length + 1] for s in starts]).astype(np.int32)
    return windows[:, :-1], windows[:, 1:]


def host_batches(
    tokens: np.ndarray, key: jax.Array, batch_size: int, sequence_length: int, num_batches: int
) -> tuple[np.ndarray, np.ndarray]:
    """Inputs and targets (num_batches, batch_size, sequence_length) of the batches drawn from
    `fold_in(key, i)` for i < `num_batches` (evaluation's fixed batches)."""
    batches = [
        host_batch(tokens, jax.random.fold_in(key, i), batch_size, sequence_length)
        for i in range(num_batches)
    ]
    return np.stack([b[0] for b in batches]), np.stack([b[1] for b in batches])


class HostBatches:
    """The device batches of training steps `start_step`, `start_step + 1`, ...: each drawn
    on the host from `step_keys(key, step)` (the windows `sample_batch` would draw) by a
    background thread that keeps `PREFETCH_BATCHES` ready, placed with `sharding`.
    `close()` stops the thread."""

    def __init__(
        self,
        tokens: np.ndarray,
        key: jax.Array,
        batch_size: int,
        sequence_length: int,
        start_step: int,
        sharding: jax.sharding.Sharding | None = None,
    ):
        self._queue: queue.Queue = queue.Queue(PREFETCH_BATCHES)
        self._stop = threading.Event()
        args = (tokens, key, batch_size, sequence_length, start_step, sharding)
        self._thread = threading.Thread(target=self._fill, args=args, daemon=True)
        self._thread.start()

    def _fill(self, tokens, key, batch_size, sequence_length, step, sharding):
        try:
            while not self._stop.is_set():
                batch = host_batch(tokens, step_keys(key, step)[0], batch_size, sequence_length)
                self._put(jax.device_put(batch, sharding))
                step += 1
        except Exception as e:  # raised in the consumer by __next__
            self._put(e)

    def _put(self, item) -> None:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def __iter__(self) -> HostBatches:
        return self

    def __next__(self) -> tuple[jax.Array, jax.Array]:
        item = self._queue.get()
        if isinstance(item, Exception):
            raise item
        return item

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
