"""Opening a trained workdir: `open_run` gives its model (from one checkpoint, quantized or
not), tokenizer, config and the step it loaded; the Sampler, the server, prune, quantize and
the experiments all open runs through it.

    run = open_run("runs/default", checkpoint="best", quantize="int8")
    run.model(run.tokenizer.encode("ROMEO:")[None])
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path

import jax
import ml_collections
from flax import nnx

from charlm_jax.data.tokenizers import Tokenizer, load_tokenizer
from charlm_jax.errors import UserError
from charlm_jax.model import int8, models
from charlm_jax.workdir import checkpoints


@dataclasses.dataclass(frozen=True)
class Run:
    """A trained model as loaded from a workdir."""

    model: nnx.Module
    tokenizer: Tokenizer
    config: ml_collections.ConfigDict
    step: int  # the checkpoint's step
    quantize: str  # "none" or "int8": how the dense layers run

    @property
    def context_length(self) -> int:
        """The model's context length in tokens."""
        return self.config.data.context_length


def saved_quantization(workdir: str | Path) -> str:
    """How the checkpoints in `workdir` are quantized: "none" unless it is an int8 export."""
    path = Path(workdir) / checkpoints.QUANTIZATION_FILE
    return json.loads(path.read_text())["mode"] if path.exists() else "none"


def open_run(workdir: str | Path, checkpoint: str | int = "best", quantize: str = "none") -> Run:
    """Loads the model of `workdir`'s checkpoint "best" (lowest validation loss), "latest" or
    a step number, onto one device, with its dense layers as `quantize` says ("none" or
    "int8"): a float32 checkpoint is quantized as it loads; an int8 export loads only as
    "int8"."""
    int8.check_mode(quantize)
    workdir = Path(workdir)
    if not (workdir / checkpoints.CHECKPOINT_DIR).is_dir():
        raise UserError(f"no checkpoints in {workdir}")
    saved = saved_quantization(workdir)
    if saved not in ("none", quantize):
        raise UserError(
            f"{workdir} holds an {saved}-quantized checkpoint: load it with quantize={saved!r}"
        )
    config = checkpoints.read_run_config(workdir)
    try:
        tokenizer = load_tokenizer(workdir / checkpoints.TOKENIZER_FILE)
        abstract = models.abstract_model(config, tokenizer.vocab_size)
    except UserError:
        raise
    except (AttributeError, KeyError, TypeError, ValueError) as e:  # a field missing or wrong
        raise UserError(
            f"the {checkpoints.CONFIG_FILE} or {checkpoints.TOKENIZER_FILE} in {workdir} is not "
            f"one a run writes: {type(e).__name__}: {e}"
        ) from None
    if saved != "none":
        abstract = nnx.eval_shape(functools.partial(int8.quantize_model, mode=saved), abstract)
    graphdef, abstract_state = nnx.split(abstract)
    # Onto one device, however many devices the checkpoint was written from.
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    abstract_state = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), abstract_state
    )
    with checkpoints.open_manager(workdir) as manager:
        step = checkpoints.resolve_step(manager, checkpoint)
        state, _ = checkpoints.restore(manager, step, abstract_state)
    model = nnx.merge(graphdef, state)
    if saved == "none":
        model = int8.quantize_model(model, quantize)
    return Run(model, tokenizer, config, step, quantize)


def load_model(
    workdir: str | Path, checkpoint: str | int = "best"
) -> tuple[nnx.Module, Tokenizer, ml_collections.ConfigDict]:
    """(model, tokenizer, config) of `workdir`'s float32 checkpoint `checkpoint` ("best",
    "latest" or a step): `open_run` for those who need only these three."""
    run = open_run(workdir, checkpoint)
    return run.model, run.tokenizer, run.config
