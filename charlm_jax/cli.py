"""What the command-line entry points share: flag parsing that fails in one line, quiet
library logs, errors as one line and an exit status, JAX's persistent compilation cache,
stderr held while a checkpoint loads, and signals that stop a run cleanly."""

from __future__ import annotations

import contextlib
import gc
import logging as pylogging
import os
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator

from absl import app, flags, logging

from charlm_jax.errors import flag_error_message

PACKAGE_DIR = "charlm_jax/"
COMPILATION_CACHE = "~/.cache/charlm_jax/xla"
CACHE_MIN_COMPILE_S = 0.5  # programs that compiled faster than this are not worth a file
STRAY_OUTPUT_WAIT_S = 0.5  # for the reads a failed restore left in flight to finish


def _keep_record(record: pylogging.LogRecord) -> bool:
    return record.levelno >= pylogging.WARNING or PACKAGE_DIR in record.pathname


def quiet_library_logs() -> None:
    """Shows this package's INFO lines and everyone's warnings; orbax and jax log every file
    they touch at INFO."""
    logging.get_absl_handler().addFilter(_keep_record)


def start(argv: list[str]) -> None:
    """The start of every entry point's `main`: no positional arguments, quiet library logs."""
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    quiet_library_logs()


@contextlib.contextmanager
def exit_on_error(error_type: type[Exception] = ValueError) -> Iterator[None]:
    """Turns an `error_type` (UserError is a ValueError) raised in the block into
    `error: MESSAGE` on stderr and exit status 1."""
    try:
        yield
    except error_type as e:
        sys.exit(f"error: {e}")


def define_compilation_cache_flag(
    default: str = COMPILATION_CACHE, allow_override: bool = False
) -> None:
    """`--compilation_cache`, for the entry points that compile (train, generate, serve; the
    speedrun, whose default is off so that its records compile from scratch).
    `allow_override`: a later definition of the flag in the same process replaces this one
    instead of failing (for a script that tests load beside a CLI module)."""
    flags.DEFINE_string(
        "compilation_cache",
        default,
        "Folder of JAX's persistent compilation cache: a rerun loads the programs it compiled "
        "before (seconds each on a CPU). Empty: off. $JAX_COMPILATION_CACHE_DIR wins.",
        allow_override=allow_override,
    )


def use_compilation_cache(directory: str) -> None:
    """Turns on JAX's persistent compilation cache in `directory` ("": leave it off),
    unless $JAX_COMPILATION_CACHE_DIR already chose a folder. Call before compiling."""
    if not directory or os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return
    import jax  # noqa: PLC0415 (cli is imported before flags are parsed; jax is slow)

    jax.config.update("jax_compilation_cache_dir", os.path.expanduser(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", CACHE_MIN_COMPILE_S)


def checkpoint_arg(value: str) -> str | int:
    """A `--checkpoint` flag's value: a step number, or a name such as "best" or "latest"."""
    return int(value) if value.isdigit() else value


@contextlib.contextmanager
def stderr_held() -> Iterator[None]:
    """Holds the process's stderr, file descriptor 2 (where TensorStore's threads write too),
    in a temporary file for the block: replayed if the block succeeds, dropped if it raises.

    For loading a checkpoint: after a failed restore, the reads still in flight finish on
    orbax's closed event loop and each prints a traceback, and asyncio logs each failure
    nobody retrieved. Those are collected and waited for before stderr is released, so the
    CLI's one-line error is all the user sees."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        failed = True
        try:
            yield
            failed = False
        finally:
            if failed:
                gc.collect()
                time.sleep(STRAY_OUTPUT_WAIT_S)
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            if not failed:
                held.seek(0)
                sys.stderr.write(held.read().decode(errors="replace"))


def flags_parser(check: Callable[[], object] | None = None) -> Callable[[list[str]], list[str]]:
    """A `flags_parser` for `absl.app.run`: a bad flag (or a failing `check()` after
    parsing) exits with one line naming the problem."""

    def parse(argv: list[str]) -> list[str]:
        try:
            remaining = flags.FLAGS(argv)
            if check is not None:
                check()
        except Exception as e:  # absl and ml_collections raise many types
            sys.exit(f"error: {flag_error_message(e)}")
        return remaining

    return parse


def interrupt(signal_name: str) -> None:
    """Stops the main thread at once, as Ctrl-C does (a `StopSignals` action)."""
    raise KeyboardInterrupt(signal_name)


class StopSignals:
    """The one way the commands handle SIGINT and SIGTERM (library calls install no handler;
    they take a stop callback or an exception instead). While active in the main thread
    (elsewhere it does nothing), the first of them calls `on_stop(name)` and any later one
    `on_again(name)`; both run in the main thread, between two Python bytecodes.

    The defaults suit a training run: the first signal is recorded, so that `requested()`
    says why ("interrupted by SIGTERM") and the run checkpoints and stops; a second one
    stops at once (KeyboardInterrupt)."""

    def __init__(
        self,
        on_stop: Callable[[str], None] | None = None,
        on_again: Callable[[str], None] = interrupt,
    ):
        self._on_stop = on_stop or self._record
        self._on_again = on_again
        self._received: str | None = None
        self._seen = False
        self._previous: dict = {}

    def requested(self) -> str | None:
        return self._received and f"interrupted by {self._received}"

    def _record(self, signal_name: str) -> None:
        self._received = signal_name
        logging.warning("%s received: saving a checkpoint, then stopping", signal_name)

    def _handle(self, signum: int, frame) -> None:
        name, again, self._seen = signal.Signals(signum).name, self._seen, True
        (self._on_again if again else self._on_stop)(name)

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
