"""Workdir files and orbax checkpoints (loader.open_run loads a trained model back).

DIR/config.json        the run's config (everything needed to rebuild the model)
DIR/tokenizer.json     the tokenizer
DIR/hf_tokenizer.json  the same tokenizer as a Hugging Face `tokenizers` file
DIR/checkpoints/STEP/  orbax checkpoints: the latest and the best by validation loss
DIR/summary.json       written at the end of training
DIR/quantization.json  only in an int8 export: {"mode": "int8"}, its checkpoints' format
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp
from absl import logging
from flax import nnx
from orbax.checkpoint import checkpoint_managers

from charlm_jax import config_defaults
from charlm_jax.data import hf_tokenizer
from charlm_jax.errors import UserError
from charlm_jax.workdir import files

CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.json"
CHECKPOINT_DIR = "checkpoints"
SUMMARY_FILE = "summary.json"
QUANTIZATION_FILE = "quantization.json"
METRIC = "val_loss"


def _val_loss(metrics: dict) -> float:
    return metrics[METRIC]


def open_manager(workdir: str | Path, keep_latest: int = 1) -> ocp.CheckpointManager:
    """A manager under DIR/checkpoints that keeps the latest `keep_latest` checkpoints and the
    best one by validation loss (checkpoints saved without a loss count only as latest)."""
    options = ocp.CheckpointManagerOptions(
        best_fn=_val_loss,
        best_mode="min",
        preservation_policy=checkpoint_managers.AnyPreservationPolicy(
            [
                checkpoint_managers.LatestN(n=keep_latest),
                checkpoint_managers.BestN(
                    get_metric_fn=_val_loss,
                    reverse=True,
                    n=1,
                    keep_checkpoints_without_metrics=False,
                ),
            ]
        ),  # fmt: skip
        enable_async_checkpointing=True,  # `save` hands orbax copies: see there
    )
    return ocp.CheckpointManager(
        Path(workdir).absolute() / CHECKPOINT_DIR, options=options, item_names=("model", "opt")
    )


def save(
    manager: ocp.CheckpointManager,
    step: int,
    model_state: nnx.State,
    opt_state: nnx.State,
    val_loss: float | None = None,
) -> None:
    """Saves a checkpoint in the background; without `val_loss` it can only be kept as one of
    the latest. Orbax gets a copy of the states (`_copy_for_saving`): the train step reuses
    (donates) their buffers while the save is still writing."""
    model_state, opt_state = _copy_for_saving((model_state, opt_state))
    try:
        manager.save(
            step,
            args=ocp.args.Composite(
                model=ocp.args.StandardSave(model_state), opt=ocp.args.StandardSave(opt_state)
            ),
            metrics=None if val_loss is None else {METRIC: float(val_loss)},
        )
    except OSError as e:
        raise UserError(
            f"cannot write checkpoint {step} in {manager.directory}: {e.strerror or e}; "
            f"earlier checkpoints are intact: {manager.all_steps()}"
        ) from None


_copy_on_device = jax.jit(lambda tree: jax.tree.map(jnp.copy, tree))


def _copy_for_saving(tree):
    """`tree` fetched to the host in one transfer, so orbax's background thread writes from
    host memory and the caller never waits on a device-to-host copy of orbax's own. (On a
    CPU the fetched arrays are views of the device buffers: a step that donates them then
    leaves them be and allocates new ones.) Arrays spread over several processes, which no
    one process can fetch, are copied on the devices instead, in one call."""
    if all(x.is_fully_addressable for x in jax.tree.leaves(tree)):
        return jax.device_get(tree)
    return _copy_on_device(tree)


def resolve_step(manager: ocp.CheckpointManager, checkpoint: str | int) -> int:
    """Maps "best", "latest" or a step number to a saved step."""
    if checkpoint == "best":
        step = manager.best_step()
    elif checkpoint == "latest":
        step = manager.latest_step()
    elif isinstance(checkpoint, int) or checkpoint.isdigit():
        step = int(checkpoint)
        if step not in manager.all_steps():
            raise UserError(f"no checkpoint at step {step}; saved steps: {manager.all_steps()}")
    else:
        raise UserError(
            f"unknown checkpoint {checkpoint!r}: expected 'best', 'latest' or a step number"
        )
    if step is None:
        raise UserError(f"no checkpoint found in {manager.directory}")
    return step


class CorruptCheckpoint(UserError):
    """A checkpoint whose files are damaged or missing (not one that could not be read for
    a reason outside it: permissions, I/O errors, memory)."""


# What shows a checkpoint's files damaged or missing: these exceptions, or TensorStore's
# errors (ValueErrors) with these status codes.
CORRUPTION_ERRORS = (FileNotFoundError, NotADirectoryError, EOFError, UnicodeDecodeError)
CORRUPTION_CODES = ("DATA_LOSS", "OUT_OF_RANGE", "NOT_FOUND", "INVALID_ARGUMENT")


def restore(
    manager: ocp.CheckpointManager,
    step: int,
    model_state: nnx.State,
    opt_state: nnx.State | None = None,
) -> tuple[nnx.State, nnx.State | None]:
    """Restores the checkpoint at `step` into states shaped like the given ones. An error
    raises UserError naming the file that could not be read, CorruptCheckpoint if its files
    are damaged or missing; reads still in flight may print tracebacks as they finish (the
    CLIs hold stderr: `cli.stderr_held`)."""

    def target(state):
        return ocp.args.StandardRestore(jax.tree.map(ocp.utils.to_shape_dtype_struct, state))

    items = {"model": target(model_state)}
    if opt_state is not None:
        items["opt"] = target(opt_state)
    error = None
    try:
        restored = manager.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:  # orbax raises many types for missing or damaged files
        kind = CorruptCheckpoint if _shows_corruption(e) else UserError
        error = kind(f"cannot restore checkpoint {step} in {manager.directory}: {_root_cause(e)}")
    if error is not None:  # raised outside `except`: its traceback would keep the reads alive
        raise error
    return restored["model"], restored.get("opt") if opt_state is not None else None


def _chain(error: BaseException) -> list[BaseException]:
    """`error` and the exceptions behind it, outermost first."""
    chain = [error]
    while (inner := chain[-1].__cause__ or chain[-1].__context__) is not None:
        chain.append(inner)
    return chain


def _shows_corruption(error: BaseException) -> bool:
    return any(
        isinstance(e, CORRUPTION_ERRORS) or str(e).startswith(CORRUPTION_CODES)
        for e in _chain(error)
    )


def _root_cause(error: BaseException) -> str:
    """The first line of the innermost exception behind `error`, without the storage spec
    that TensorStore appends (orbax's own messages print that spec whole)."""
    error = _chain(error)[-1]
    lines = str(error).strip().splitlines() or [type(error).__name__]
    return lines[0].split(" [tensorstore_spec", 1)[0]


def restore_latest_good(
    manager: ocp.CheckpointManager, model_state: nnx.State, opt_state: nnx.State
) -> tuple[int, nnx.State, nnx.State]:
    """Restores the newest checkpoint that reads back. Newer ones whose files are damaged
    are moved to DIR/checkpoints_unreadable/ (kept, never deleted) with a warning; any other
    restore error (permissions, I/O, memory) is raised, with every checkpoint left alone."""
    for step in sorted(manager.all_steps(), reverse=True):
        try:
            restored_model, restored_opt = restore(manager, step, model_state, opt_state)
        except CorruptCheckpoint as e:
            aside = Path(manager.directory).parent / "checkpoints_unreadable" / str(step)
            aside.parent.mkdir(exist_ok=True)
            (Path(manager.directory) / str(step)).rename(aside)
            logging.warning("%s; moved it to %s and trying the previous one", e, aside)
            manager.reload()
            continue
        return step, restored_model, restored_opt
    raise UserError(f"no readable checkpoint in {manager.directory}")


def check_new_workdir(workdir: Path) -> None:
    """UserError if `workdir`, about to receive a derived run, already holds checkpoints."""
    if (workdir / CHECKPOINT_DIR).exists():
        raise UserError(f"output directory {workdir} already holds checkpoints: choose a new one")


def save_run_files(workdir: Path, config: ml_collections.ConfigDict, tokenizer) -> None:
    """DIR/config.json, DIR/tokenizer.json and DIR/hf_tokenizer.json, each replaced whole."""
    files.write_text(workdir / CONFIG_FILE, config.to_json_best_effort(indent=2) + "\n")
    with files.replacing(workdir / TOKENIZER_FILE) as tmp:
        tokenizer.save(tmp)
    with files.replacing(workdir / hf_tokenizer.HF_TOKENIZER_FILE) as tmp:
        hf_tokenizer.save(tokenizer, tmp)


def read_run_config(workdir: str | Path) -> ml_collections.ConfigDict:
    """The config saved in DIR/config.json, in today's terms (`config_defaults.upgrade`)."""
    path = Path(workdir) / CONFIG_FILE
    try:
        return config_defaults.upgrade(json.loads(path.read_text()))
    except (OSError, ValueError, AttributeError, TypeError) as e:  # not JSON; not an object
        raise UserError(f"cannot read the run's config {path}: {e}") from None
