"""Writing a workdir's small files whole: a reader, or a run killed mid-write, sees the old
file or the new one, never half of one."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def replacing(path: Path) -> Iterator[Path]:
    """Yields a temporary path beside `path` to write; on success it replaces `path` (one
    rename), on an error it is removed and `path` is left as it was."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: Path, text: str) -> None:
    """`path.write_text(text)`, replacing the file whole."""
    with replacing(path) as tmp:
        tmp.write_text(text)
