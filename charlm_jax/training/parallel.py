"""Devices: multi-process start-up, the device mesh, and how arrays are laid out on it.

One program runs on one CPU, one GPU, many GPUs or many hosts: batches are split along the
mesh's `data` axis; parameters and optimizer state are replicated, or with FSDP split too.
Sharding is declared (`NamedSharding`) and XLA inserts the collectives.
"""

from __future__ import annotations

import importlib.metadata
import os
import socket
import time

import jax
import numpy as np
from absl import logging
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from charlm_jax.errors import UserError

DATA_AXIS = "data"
COLLECTIVE_TIMEOUT_FLAG = "xla_cpu_collective_call_terminate_timeout_seconds"


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    timeout_s: int = 300,
) -> None:
    """Joins a multi-process run when a coordinator address is given, as arguments or as the
    environment variables JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID.
    Without one, this is a single-process run and nothing happens."""
    env = os.environ
    coordinator_address = coordinator_address or env.get("JAX_COORDINATOR_ADDRESS")
    if not coordinator_address:
        return
    try:
        num_processes = (
            num_processes if num_processes is not None else int(env["JAX_NUM_PROCESSES"])
        )
        process_id = process_id if process_id is not None else int(env["JAX_PROCESS_ID"])
    except (KeyError, ValueError) as e:
        raise UserError(
            f"a coordinator address ({coordinator_address}) needs the number of processes and "
            f"this process's id (flags or JAX_NUM_PROCESSES / JAX_PROCESS_ID): {e}"
        ) from None
    if not 0 <= process_id < num_processes:
        raise UserError(f"process id {process_id} is not in 0..{num_processes - 1}")
    if process_id != 0:
        # XLA aborts the whole process when the coordinator never answers: check first.
        _wait_for_coordinator(coordinator_address, timeout_s)
    try:
        jax.distributed.initialize(
            coordinator_address,
            num_processes=num_processes,
            process_id=process_id,
            initialization_timeout=timeout_s,
        )
    except Exception as e:  # XLA raises its own runtime errors for a failed connection
        first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(
            f"process {process_id} of {num_processes} could not join the coordinator at "
            f"{coordinator_address} within {timeout_s} s: {first_line}"
        ) from None


def _wait_for_coordinator(address: str, timeout_s: float) -> None:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise UserError(f"coordinator address {address!r} is not HOST:PORT")
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            socket.create_connection((host, int(port)), timeout=1.0).close()
            return
        except OSError as e:
            if time.monotonic() > deadline:
                raise UserError(
                    f"cannot reach the coordinator at {address} within {timeout_s} s ({e}); "
                    "is process 0 running there?"
                ) from None
            time.sleep(0.25)


def one_cpu_device_per_core(batch_size: int) -> int:
    """Splits a CPU into one JAX device per core (as many as divide `batch_size`), unless
    XLA_FLAGS already sets a device count; returns the count. Call before JAX starts its
    backends. It only matters where the CPU is the accelerator.

    XLA:CPU's threads inside single ops leave cores idle on these models' small matmuls;
    with a device per core, the data-parallel halves of a step run side by side (measured in
    docs/performance.md, One JAX device per CPU core).
    """
    flags = os.environ.get("XLA_FLAGS", "")
    if COLLECTIVE_TIMEOUT_FLAG not in flags:
        # The devices meet in each step's all-reduce, and XLA aborts the process when one
        # waits 40 s for the others: on a busy machine, a thread descheduled that long.
        os.environ["XLA_FLAGS"] = f"{flags} --{COLLECTIVE_TIMEOUT_FLAG}=3600".strip()
    if "xla_force_host_platform_device_count" in flags:
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    count = max(n for n in range(1, (cores or 1) + 1) if batch_size % n == 0)
    jax.config.update("jax_num_cpu_devices", count)
    return count


def one_step_in_flight(outputs):
    """Waits for a step's `outputs` when they live on several CPU devices; returns them.

    With several steps queued, XLA:CPU (jaxlib 0.10.2) deadlocked in a step's all-reduce on
    a loaded 2-core machine: device 0 waited in the rendezvous while device 1's execution of
    that step never started (docs/performance.md). Waiting costs one dispatch latency per
    step there; a single device or a GPU keeps its queue of steps.
    """
    devices = jax.tree.leaves(outputs)[0].sharding.device_set
    if len(devices) > 1 and next(iter(devices)).platform == "cpu":
        jax.block_until_ready(outputs)
    return outputs


def installed_cuda_extra() -> str | None:
    """The extra, "cuda12" or "cuda13", whose JAX CUDA plugin is installed, else None (without
    starting JAX's backends)."""
    for cuda in ("cuda12", "cuda13"):
        try:
            importlib.metadata.version(f"jax-{cuda}-plugin")
        except importlib.metadata.PackageNotFoundError:
            continue
        return cuda
    return None


def warn_if_gpu_wheel_unused() -> None:
    """A `cuda12`/`cuda13` extra installed but no GPU visible: say so (JAX falls back to the
    CPU)."""
    cuda = installed_cuda_extra()
    if cuda and jax.default_backend() == "cpu":
        logging.warning("jax[%s] is installed but no GPU is visible: running on the CPU", cuda)


def is_main_process() -> bool:
    """Only process 0 writes logs, plots and the summary."""
    return jax.process_index() == 0


def make_mesh() -> Mesh:
    """A 1-D mesh over every device of every process. Its axis is `Auto`: shardings declared
    at the jit boundary and on the batch propagate through the model."""
    return jax.make_mesh((jax.device_count(),), (DATA_AXIS,), axis_types=(AxisType.Auto,))


def check_batch_size(batch_size: int, mesh: Mesh) -> None:
    if batch_size % mesh.size:
        raise UserError(
            f"train.batch_size={batch_size} is not divisible by the {mesh.size} devices of the "
            "data axis; each device takes an equal share of every batch"
        )


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, leading_dims: int = 0) -> NamedSharding:
    """Splits the batch dimension, which follows `leading_dims` unsplit ones."""
    return NamedSharding(mesh, P(*[None] * leading_dims, DATA_AXIS))


def state_shardings(abstract_state, mesh: Mesh, fsdp: bool):
    """Shardings for a state pytree: replicated; with `fsdp`, each array split along its
    largest dimension divisible by the mesh size (smaller arrays stay replicated)."""

    def sharding(x) -> NamedSharding:
        if fsdp:
            for dim in np.argsort(x.shape)[::-1]:
                if x.shape[dim] >= mesh.size and x.shape[dim] % mesh.size == 0:
                    spec = [None] * len(x.shape)
                    spec[dim] = DATA_AXIS
                    return NamedSharding(mesh, P(*spec))
        return replicated(mesh)

    return jax.tree.map(sharding, abstract_state)


def put_replicated(array: np.ndarray, mesh: Mesh) -> jax.Array:
    """A host array as a global array held whole by every device (works across processes:
    each process supplies its own devices' copies)."""
    return jax.make_array_from_callback(array.shape, replicated(mesh), lambda index: array[index])
