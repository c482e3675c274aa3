"""End-to-end runs of `python -m charlm_jax.main`, in a subprocess as a user would run it."""

import copy
import json
import os
import runpy
import signal
import subprocess
import sys
import warnings
from pathlib import Path
from unittest import mock

import jax
import pytest
from absl import flags
from conftest import ROOT, TINY_MODEL, TINY_TRAIN

from charlm_jax import cli

CONFIG_FILE = str(ROOT / "configs" / "transformer.py")
CONFIG = f"{CONFIG_FILE}:nanogpt_baby"  # the plain model (the default preset: the speedrun's)
CONFIG_FLAG = f"--config={CONFIG}"
TINY_FLAGS = [f"--config.{k}={v}" for k, v in {**TINY_MODEL["transformer"], **TINY_TRAIN}.items()]


def run_main(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "charlm_jax.main", CONFIG_FLAG, *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )


def test_trains_end_to_end_with_overrides(tmp_path, text_file):
    workdir = tmp_path / "run"
    result = run_main(
        f"--workdir={workdir}",
        *TINY_FLAGS,
        f"--config.data.path={text_file}",
        "--config.model.num_layers=1",
        "--config.model.position=rope",
        "--config.train.num_steps=20",
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["steps"] == 20 and summary["final_val_loss"] > 0
    saved = json.loads((workdir / "config.json").read_text())
    assert saved["model"]["num_layers"] == 1 and saved["model"]["position"] == "rope"
    # RoPE (no position table), 1 block of width 32 with MLP 64: token embedding, qkv, out,
    # up, down, and 3 LayerNorm scales (no biases).
    vocab = len(set(text_file.read_text()))
    assert summary["num_params"] == vocab * 32 + 32 * 96 + 32 * 32 + 2 * 32 * 64 + 3 * 32
    assert "step 20/20" in result.stderr and "tok/s" in result.stderr
    assert "orbax" not in result.stderr  # library INFO chatter stays off the console


def main_in_process(capfd, module: str, *args: str) -> subprocess.CompletedProcess:
    """`python -m module args` (or `python module args` for a script path ending in .py) run
    in this process as `__main__`, by runpy, in the repository root: the exit status, stdout
    and stderr a subprocess would give, without the seconds of a process start (tests of
    signals, kills and several processes keep real ones). absl's flags are global: those
    other commands defined in this process are set aside for the run, and restored."""
    values = flags.FLAGS
    saved = copy.deepcopy(vars(values))
    for name in list(values):
        if not values.find_module_defining_flag(name, "").startswith("absl"):
            delattr(values, name)
    values.unparse_flags()
    capfd.readouterr()
    cwd = os.getcwd()
    code, message = 0, ""
    try:
        os.chdir(ROOT)  # where the subprocesses ran: relative paths mean the same
        # JAX's backends run here already: XLA_FLAGS names their device count, so that a
        # command leaves it as it is (parallel.one_cpu_device_per_core).
        devices = f"--xla_force_host_platform_device_count={jax.device_count()}"
        xla_flags = {"XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} {devices}".strip()}
        with (
            mock.patch.object(sys, "argv", [module, *args]),
            mock.patch.dict(os.environ, xla_flags),
            warnings.catch_warnings(),
        ):
            # Run again as `__main__` after a test imported it: what a fresh process does.
            warnings.filterwarnings("ignore", ".* found in sys.modules", RuntimeWarning)
            if module.endswith(".py"):  # a script imports its siblings
                with mock.patch.object(sys, "path", [str(Path(module).parent), *sys.path]):
                    runpy.run_path(module, run_name="__main__")
            else:
                runpy.run_module(module, run_name="__main__")
    except SystemExit as e:  # sys.exit("error: ...") prints its text and exits with 1
        code, message = (1, f"{e.code}\n") if isinstance(e.code, str) else (e.code or 0, "")
    finally:
        os.chdir(cwd)
        vars(values).clear()
        vars(values).update(saved)
    out, err = capfd.readouterr()
    return subprocess.CompletedProcess([module, *args], code, out, err + message)


def assert_one_line_error(result: subprocess.CompletedProcess, pattern: str) -> None:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr
    assert pattern in result.stderr.strip().splitlines()[-1], result.stderr


@pytest.mark.parametrize(
    ("make_args", "message"),
    [
        (lambda d: [f"--config.data.path={d / 'missing.txt'}"], "error: data file not found"),
        (lambda d: [f"--config.data.path={d / 'empty.txt'}"], "error: data file is empty"),
        (lambda d: [f"--config.data.path={d / 'short.txt'}"], "error: data too short"),
        (lambda d: [f"--workdir={d / 'empty.txt' / 'run'}"], "error: workdir"),
        (lambda d: ["--config.model.num_layer=2"], "num_layer"),
        (lambda d: ["--config.train.batch_size=many"], "batch_size"),
    ],
    ids=[
        "missing-data",
        "empty-data",
        "short-data",
        "unwritable-workdir",
        "unknown-key",
        "bad-value",
    ],
)
def test_bad_input_gives_one_line_error(tmp_path, capfd, make_args, message):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "short.txt").write_text("To be, or not to be.")
    args = [f"--workdir={tmp_path / 'run'}", *TINY_FLAGS, *make_args(tmp_path)]
    assert_one_line_error(main_in_process(capfd, "charlm_jax.main", CONFIG_FLAG, *args), message)


def test_unknown_preset_is_a_clear_error(tmp_path, capfd):
    args = [f"--config={CONFIG_FILE}:huge", f"--workdir={tmp_path}"]
    result = main_in_process(capfd, "charlm_jax.main", *args)
    assert_one_line_error(result, "unknown preset 'huge'")


def test_bad_config_field_is_a_one_line_error_before_the_data_is_read(tmp_path, capfd):
    missing = f"--config.data.path={tmp_path / 'missing.txt'}"  # the error if read first
    result = main_in_process(
        capfd, "charlm_jax.main", CONFIG_FLAG, f"--workdir={tmp_path / 'run'}", *TINY_FLAGS,
        "--config.train.schedule=linear", missing,
    )  # fmt: skip
    assert_one_line_error(result, "error: unknown train.schedule 'linear'")


def test_stop_signals_record_the_first_and_interrupt_on_the_second():
    previous = signal.getsignal(signal.SIGTERM)
    with cli.StopSignals() as signals:
        assert signals.requested() is None
        signal.raise_signal(signal.SIGTERM)
        assert signals.requested() == "interrupted by SIGTERM"
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
    assert signal.getsignal(signal.SIGTERM) is previous


def test_stop_signals_call_the_given_actions():
    calls = []
    actions = {
        "on_stop": lambda name: calls.append(("stop", name)),
        "on_again": lambda name: calls.append(("again", name)),
    }
    with cli.StopSignals(**actions):
        for sig in (signal.SIGTERM, signal.SIGTERM, signal.SIGINT):
            signal.raise_signal(sig)
    assert calls == [("stop", "SIGTERM"), ("again", "SIGTERM"), ("again", "SIGINT")]
