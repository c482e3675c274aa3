"""Data parallelism, FSDP, two processes, gradient accumulation, mixed precision, remat.

Several devices need `XLA_FLAGS` before JAX starts, so those runs are subprocesses; their
losses are compared with runs of the same config on this process's single device.
"""

import json
import os
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ROOT, TINY_MODEL, TINY_TRAIN, tiny_config
from flax import nnx

from charlm_jax.data.text_files import embedded_tiny_shakespeare
from charlm_jax.model import models
from charlm_jax.training import parallel, step_bench, train
from charlm_jax.training.metrics import read_history

STEPS = {"train.num_steps": 4, "train.log_every": 1, "train.eval_every": 4}
TEXT = embedded_tiny_shakespeare().read_text(encoding="utf-8")[:20_000]


def run_steps(config, num_steps: int = 4) -> tuple[dict, list[np.ndarray]]:
    """Runs the train step on the visible devices: ({"losses", "flops" of the compiled
    per-device program, "specs" of the parameters}, the final parameters)."""
    setup = step_bench.compile_step(config, TEXT)
    losses = [float(setup.advance().compute()["loss"]) for _ in range(num_steps)]
    report = {
        "losses": losses,
        "flops": setup.compiled.cost_analysis()["flops"],
        "specs": [str(x.sharding.spec) for x in jax.tree.leaves(setup.model_state)],
    }
    return report, jax.tree.leaves(jax.device_get(setup.model_state))


FOUR_DEVICES = """
import json, sys
sys.path[:0] = [{root!r}, {tests!r}]
import jax
from conftest import tiny_config
from test_parallel import run_steps
print(json.dumps({{
    "devices": jax.device_count(),
    "plain": run_steps(tiny_config())[0],
    "fsdp": run_steps(tiny_config(**{{"train.fsdp": True}}))[0],
    "dropout": run_steps(tiny_config(**{{"model.dropout_rate": 0.2}}))[0],
}}))
"""


def subprocess_env(devices: int) -> dict:
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}"
    return {**os.environ, "XLA_FLAGS": flags.strip()}


def train_losses(workdir) -> list[float]:
    return [r["loss"] for r in read_history(workdir) if r["kind"] == "train"]


def test_four_devices_match_one_and_split_the_batch():
    script = FOUR_DEVICES.format(root=str(ROOT), tests=str(ROOT / "tests"))
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
        env=subprocess_env(4),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    four = json.loads(result.stdout.strip().splitlines()[-1])
    assert four["devices"] == 4
    one, _ = run_steps(tiny_config())
    for run in (four["plain"], four["fsdp"]):
        np.testing.assert_allclose(run["losses"], one["losses"], atol=1e-5)
    # Dropout masks do not depend on how the batch is split.
    one_dropout, _ = run_steps(tiny_config(**{"model.dropout_rate": 0.2}))
    np.testing.assert_allclose(four["dropout"]["losses"], one_dropout["losses"], atol=1e-5)
    # Each device computes about a quarter of the one-device step: the batch is split.
    assert four["plain"]["flops"] < 0.3 * one["flops"]
    assert not any("'data'" in spec for spec in four["plain"]["specs"])  # replicated
    assert any("'data'" in spec for spec in four["fsdp"]["specs"])  # FSDP splits parameters


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def main_command(workdir, text_file, *extra: str) -> list[str]:
    """The command line for tiny_config(**STEPS) on `text_file`."""
    overrides = {**TINY_MODEL["transformer"], **TINY_TRAIN, **STEPS, "data.path": text_file}
    return [
        sys.executable, "-m", "charlm_jax.main", "--config=configs/transformer.py:nanogpt_baby",
        f"--workdir={workdir}", *(f"--config.{k}={v}" for k, v in overrides.items()), *extra,
    ]  # fmt: skip


def test_two_processes_match_one(tmp_path, text_file):
    train.train_and_evaluate(
        tiny_config(**STEPS, **{"data.path": str(text_file)}), tmp_path / "single"
    )
    address = f"localhost:{free_port()}"
    procs = [
        subprocess.Popen(
            main_command(
                tmp_path / "multi",
                text_file,
                f"--coordinator_address={address}",
                "--num_processes=2",
                f"--process_id={i}",
                "--coordinator_timeout=120",
            ),
            cwd=ROOT,
            env=subprocess_env(2),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for i in range(2)
    ]
    errors = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errors[0][-2000:] + errors[1][-2000:]
    summary = json.loads((tmp_path / "multi" / "summary.json").read_text())
    assert (summary["num_processes"], summary["num_devices"]) == (2, 4)
    np.testing.assert_allclose(
        train_losses(tmp_path / "multi"), train_losses(tmp_path / "single"), atol=1e-5
    )
    assert summary["steps"] == 4 and (tmp_path / "multi" / "checkpoints" / "4").is_dir()


def test_unreachable_coordinator_is_one_line(tmp_path, text_file):
    result = subprocess.run(
        main_command(tmp_path, text_file, f"--coordinator_address=localhost:{free_port()}",
                     "--num_processes=2", "--process_id=1", "--coordinator_timeout=2"),
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith("error: cannot reach the coordinator")
    assert "Traceback" not in result.stderr


def test_batch_not_divisible_by_devices():
    parallel.check_batch_size(8, parallel.make_mesh())  # one device divides everything
    three_devices = type("FakeMesh", (), {"size": 3})()
    with pytest.raises(ValueError, match="not divisible by the 3 devices"):
        parallel.check_batch_size(8, three_devices)


def test_gradient_accumulation_equals_a_larger_batch():
    def first_update(**overrides) -> list[np.ndarray]:
        return run_steps(tiny_config(**{"train.warmup_steps": 0, **overrides}), num_steps=1)[1]

    accumulated = first_update(**{"train.batch_size": 8, "train.grad_accum_steps": 4})
    large = first_update(**{"train.batch_size": 32})
    small = first_update(**{"train.batch_size": 8})
    for a, b in zip(accumulated, large, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)
    assert any(not np.allclose(a, b, atol=1e-6) for a, b in zip(small, large, strict=True))


def test_bfloat16_compute_trains_close_to_float32():
    f32, _ = run_steps(tiny_config(), num_steps=20)
    bf16, _ = run_steps(tiny_config(**{"model.dtype": "bfloat16"}), num_steps=20)
    assert bf16["losses"][-1] < bf16["losses"][0] - 0.3
    np.testing.assert_allclose(bf16["losses"], f32["losses"], atol=0.05)
    assert bf16["losses"] != f32["losses"]  # bfloat16 really computed


def test_remat_gives_the_same_losses():
    config = tiny_config(**{"model.remat": True})
    graphdef, state = nnx.split(models.create_model(config, 65, nnx.Rngs(0)))

    def loss(state):
        return nnx.merge(graphdef, state)(jnp.zeros((2, 8), jnp.int32), train=True).sum()

    assert "remat" in str(jax.make_jaxpr(jax.grad(loss))(state))  # blocks are rematerialised
    np.testing.assert_allclose(
        run_steps(config)[0]["losses"], run_steps(tiny_config())[0]["losses"], atol=1e-5
    )


@pytest.mark.parametrize("cuda", ["cuda12", "cuda13"])
def test_gpu_wheel_without_gpu_warns(monkeypatch, cuda):
    def version(name):
        if name != f"jax-{cuda}-plugin":
            raise parallel.importlib.metadata.PackageNotFoundError(name)
        return "0.10.2"

    warnings = []
    monkeypatch.setattr(parallel.importlib.metadata, "version", version)
    monkeypatch.setattr(parallel.logging, "warning", lambda msg, *a: warnings.append(msg % a))
    parallel.warn_if_gpu_wheel_unused()
    assert warnings == [f"jax[{cuda}] is installed but no GPU is visible: running on the CPU"]


def test_dropout_is_reproducible_and_applied():
    config = tiny_config(**{"model.dropout_rate": 0.2})
    first, second = run_steps(config, num_steps=3)[0], run_steps(config, num_steps=3)[0]
    assert first["losses"] == second["losses"]
    assert first["losses"] != run_steps(tiny_config(), num_steps=3)[0]["losses"]


@pytest.mark.parametrize(
    "platform, count, waits", [("cpu", 2, True), ("cpu", 1, False), ("gpu", 2, False)]
)
def test_one_step_in_flight_waits_only_on_several_cpu_devices(monkeypatch, platform, count, waits):
    """XLA:CPU deadlocked with several multi-device steps queued: the training loops wait
    for each such step before queuing the next."""

    class Device:
        def __init__(self, i):
            self.id, self.platform = i, platform

    class Output:
        sharding = type("Sharding", (), {"device_set": {Device(i) for i in range(count)}})()

    waited = []
    monkeypatch.setattr(jax, "block_until_ready", waited.append)
    outputs = (Output(), {"loss": Output()})
    assert parallel.one_step_in_flight(outputs) is outputs
    assert waited == ([outputs] if waits else [])
