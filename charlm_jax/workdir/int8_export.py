"""An int8 copy of a trained workdir: a new workdir whose checkpoint holds the int8 arrays
and their scales (`model.int8`), for a smaller download; it loads only with quantize="int8"
and is inference-only (it has no optimizer state to resume training from)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import orbax.checkpoint as ocp
from flax import nnx

from charlm_jax.errors import UserError
from charlm_jax.workdir import checkpoints, loader


def export_int8(workdir: str | Path, out: str | Path, checkpoint: str | int = "best") -> Path:
    """Writes the workdir `out` whose checkpoint is `workdir`'s `checkpoint`, quantized to
    int8 (config, tokenizer, step and validation loss carried over). Returns the
    checkpoint's directory."""
    workdir, out = Path(workdir), Path(out)
    if loader.saved_quantization(workdir) != "none":
        raise UserError(f"{workdir} is already quantized")
    checkpoints.check_new_workdir(out)
    run = loader.open_run(workdir, checkpoint, "int8")
    with checkpoints.open_manager(workdir) as source:
        metrics = source.metrics(run.step)
    out.mkdir(parents=True, exist_ok=True)
    for name in (checkpoints.CONFIG_FILE, checkpoints.TOKENIZER_FILE):
        shutil.copy(workdir / name, out / name)
    (out / checkpoints.QUANTIZATION_FILE).write_text(json.dumps({"mode": "int8"}) + "\n")
    with checkpoints.open_manager(out) as manager:
        state = ocp.args.StandardSave(nnx.state(run.model))
        manager.save(run.step, args=ocp.args.Composite(model=state), metrics=metrics)
    return out / checkpoints.CHECKPOINT_DIR / str(run.step)
