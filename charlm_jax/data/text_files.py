"""Text from local files: the tiny Shakespeare copy inside the package, a UTF-8 file (read
whole, or in chunks when it is too large to hold), and downloading one."""

from __future__ import annotations

import codecs
import importlib.resources
import os
import tempfile
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import ml_collections
import numpy as np
import tqdm

from charlm_jax.data import token_cache
from charlm_jax.data.tokenizers import Tokenizer
from charlm_jax.errors import UserError

CHUNK_BYTES = 1 << 20  # large files are read and tokenized in chunks of this many bytes
DECODE_ERRORS = ("strict", "replace")


def check_choice(config: ml_collections.ConfigDict, field: str, choices: tuple[str, ...]):
    """Raises UserError unless `config[field]` (of the `data` section) is one of `choices`."""
    if config[field] not in choices:
        raise UserError(f"data.{field} must be one of {choices}, got {config[field]!r}")


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


def data_file(config: ml_collections.ConfigDict) -> Path:
    """The existing file `config.path` names, downloaded first when asked."""
    check_choice(config, "decode_errors", DECODE_ERRORS)
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


def read_text(config: ml_collections.ConfigDict) -> str:
    """Reads the whole corpus file named by `config` (the `data` section).

    An empty `path` means the embedded tiny Shakespeare. A missing `path` is downloaded from
    `download_url` only when `download` is set.
    """
    if not config.path:
        return embedded_tiny_shakespeare().read_text(encoding="utf-8")
    path = data_file(config)
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
            total=limit,
            unit="B",
            unit_scale=True,
            desc=f"tokenizing {self.path.name}",
            disable=None if progress else True,
        )
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
