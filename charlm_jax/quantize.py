"""Post-training int8 quantization of a model's dense layers (docs/quantization.md).

    python -m charlm_jax.quantize --workdir=DIR --out=DIR2   # exports an int8 checkpoint

`quantize_model(model, "int8")` returns a copy in which every `nnx.Linear` (the Transformer's
attention qkv/out and MLP up/down projections; the MLP model's hidden layers and head) and the
Transformer's tied output head run as int8 x int8 -> int32 dots: weights quantized once per
output channel, activations per row on the fly (symmetric, absmax). Embedding lookups, norms,
softmax, attention and the residual stream stay float32. The copy is an ordinary NNX module
with the same methods (`__call__`, `init_cache`, `forward_cached`), so the sampler, the decode
engine and the server run it like the float32 model.
"""

from __future__ import annotations

import functools
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp
from absl import app, flags
from flax import nnx

from charlm_jax import cli
from charlm_jax.data.tokenizers import Tokenizer
from charlm_jax.errors import UserError
from charlm_jax.model import models
from charlm_jax.workdir import checkpoints

MODES = ("none", "int8")
# XLA:CPU runs int8 dots in YNNPACK, except for a dimension of 1 (one decoding row), which
# falls back to XLA's own loops, 2-3x slower than float32 there; fewer rows than this are
# zero-padded up to it (docs/quantization.md has the measurements).
MIN_ROWS = 8


def check_mode(mode: str) -> str:
    """Returns `mode` if it is a known quantization mode; ValueError otherwise."""
    if mode not in MODES:
        raise ValueError(f"unknown quantization mode {mode!r}: expected 'none' or 'int8'")
    return mode


def quantize_array(x: jax.Array, axis: int) -> tuple[jax.Array, jax.Array]:
    """Symmetric int8 quantization with one scale per slice along `axis` (the reduced axis
    kept, size 1): x ~= q * scale, |q| <= 127."""
    absmax = jnp.max(jnp.abs(x), axis=axis, keepdims=True).astype(jnp.float32)
    scale = jnp.where(absmax > 0, absmax / 127.0, 1.0)
    q = jnp.clip(jnp.round(x / scale), -127, 127).astype(jnp.int8)
    return q, scale


def int8_matmul(x: jax.Array, kernel: jax.Array, scale: jax.Array) -> jax.Array:
    """x (..., in) float @ the int8 `kernel` (in, out) with per-column `scale` (1, out), as
    one 2-D int8 x int8 -> int32 dot over the rows of x, each quantized with its own scale."""
    rows = x.reshape(-1, x.shape[-1])
    n = rows.shape[0]
    if n < MIN_ROWS:
        rows = jnp.pad(rows, ((0, MIN_ROWS - n), (0, 0)))
    q, row_scale = quantize_array(rows, axis=1)
    acc = jax.lax.dot_general(q, kernel, (((1,), (0,)), ((), ())), preferred_element_type=jnp.int32)
    y = acc.astype(jnp.float32) * row_scale * scale
    return y[:n].reshape(*x.shape[:-1], kernel.shape[1])


class Int8Linear(nnx.Module):
    """An `nnx.Linear` with an int8 kernel and per-output-channel scales."""

    def __init__(self, linear: nnx.Linear):
        kernel, scale = quantize_array(linear.kernel[...], axis=0)
        self.kernel = nnx.Param(kernel)
        self.scale = nnx.Param(scale)
        self.bias = None if linear.bias is None else nnx.Param(linear.bias[...])
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def __call__(self, x: jax.Array) -> jax.Array:
        y = int8_matmul(x, self.kernel[...], self.scale[...])
        return y if self.bias is None else y + self.bias[...]


class Int8TiedEmbed(nnx.Module):
    """An `nnx.Embed` whose lookups stay float32 and whose `attend` (the tied output head)
    is an int8 dot against a copy of the table quantized per vocabulary entry."""

    def __init__(self, embed: nnx.Embed):
        table = embed.embedding[...]
        head, scale = quantize_array(table.T, axis=0)  # (features, vocab), one scale per entry
        self.embedding = nnx.Param(table)
        self.head = nnx.Param(head)
        self.scale = nnx.Param(scale)
        self.num_embeddings, self.features = embed.num_embeddings, embed.features

    def __call__(self, ids: jax.Array) -> jax.Array:
        return jnp.take(self.embedding[...], ids, axis=0)

    def attend(self, x: jax.Array) -> jax.Array:
        return int8_matmul(x, self.head[...], self.scale[...])


def _replace_modules(node, convert: Callable[[nnx.Module], nnx.Module | None]) -> None:
    """Replaces, in place, every module below `node` for which `convert` gives a new one."""
    for key, child in list(nnx.iter_children(node)):
        if not isinstance(child, nnx.Module | nnx.List):
            continue
        new = convert(child) if isinstance(child, nnx.Module) else None
        if new is None:
            _replace_modules(child, convert)
        elif isinstance(node, nnx.List):
            node[key] = new
        else:
            setattr(node, key, new)


def _to_float(module: nnx.Module) -> nnx.Module | None:
    """The float32 layer an int8 one came from, with the weights it holds (q * scale)."""
    if isinstance(module, Int8TiedEmbed):
        embed = nnx.Embed(module.num_embeddings, module.features, rngs=nnx.Rngs(0))
        embed.embedding[...] = module.embedding[...]
        return embed
    if not isinstance(module, Int8Linear):
        return None
    linear = nnx.Linear(
        module.in_features, module.out_features, use_bias=module.bias is not None,
        rngs=nnx.Rngs(0),
    )  # fmt: skip
    linear.kernel[...] = module.kernel[...].astype(jnp.float32) * module.scale[...]
    if module.bias is not None:
        linear.bias[...] = module.bias[...]
    return linear


def is_quantized(model: nnx.Module) -> bool:
    """Whether `model` holds int8 layers."""
    return any(isinstance(m, Int8Linear | Int8TiedEmbed) for _, m in nnx.iter_modules(model))


def quantize_model(model: nnx.Module, mode: str = "int8") -> nnx.Module:
    """A copy of `model` with its dense layers quantized (`mode` "int8"), or `model` itself
    for "none"."""
    if check_mode(mode) == "none":
        return model
    if is_quantized(model):
        raise ValueError("the model is already quantized")
    model = nnx.clone(model)
    _replace_modules(model, lambda m: Int8Linear(m) if isinstance(m, nnx.Linear) else None)
    if isinstance(model, models.Transformer) and model.cfg.tie_embeddings:
        model.embed = Int8TiedEmbed(model.embed)  # the output head is the embedding's attend
    return model


def dequantize_model(model: nnx.Module) -> nnx.Module:
    """A float32 copy of a quantized `model`: its int8 layers become float32 ones holding the
    quantized weights times their scales (the tied head: the float32 embedding table)."""
    model = nnx.clone(model)
    _replace_modules(model, _to_float)
    return model


def for_slots(model: nnx.Module, num_slots: int) -> nnx.Module:
    """The model an engine of `num_slots` slots decodes with: a quantized model's float32
    copy (`dequantize_model`) below MIN_ROWS slots, where int8 dots are slower than float32
    ones on the CPU (docs/quantization.md); `model` itself otherwise."""
    return dequantize_model(model) if num_slots < MIN_ROWS and is_quantized(model) else model


QUANTIZATION_FILE = "quantization.json"  # in a workdir whose checkpoints are quantized


def saved_mode(workdir: str | Path) -> str:
    """The quantization of the checkpoints in `workdir`: "none" unless it was exported."""
    path = Path(workdir) / QUANTIZATION_FILE
    return json.loads(path.read_text())["mode"] if path.exists() else "none"


def load_model(
    workdir: str | Path, checkpoint: str | int = "best", quantize: str = "none"
) -> tuple[nnx.Module, Tokenizer, ml_collections.ConfigDict]:
    """`checkpoints.load_model` with the dense layers quantized as `quantize` says ("none" or
    "int8"): a float32 checkpoint is quantized as it loads; an exported int8 one loads as it
    is, and only with quantize="int8"."""
    check_mode(quantize)
    saved = saved_mode(workdir)
    if saved == "none":
        model, tokenizer, config = checkpoints.load_model(workdir, checkpoint)
        return quantize_model(model, quantize), tokenizer, config
    if quantize != saved:
        raise UserError(
            f"{workdir} holds an {saved}-quantized checkpoint: load it with quantize={saved!r}"
        )
    return checkpoints.load_model(
        workdir, checkpoint, transform=functools.partial(quantize_model, mode=saved)
    )


def export(workdir: str | Path, out: str | Path, checkpoint: str | int = "best") -> Path:
    """Writes a workdir `out` whose checkpoint is `workdir`'s, quantized to int8 (config,
    tokenizer and validation loss carried over). Returns the checkpoint's directory."""
    workdir, out = Path(workdir), Path(out)
    if saved_mode(workdir) != "none":
        raise UserError(f"{workdir} is already quantized")
    if (out / checkpoints.CHECKPOINT_DIR).exists():
        raise UserError(f"{out} already holds checkpoints: choose a new --out")
    model, _, _ = load_model(workdir, checkpoint, "int8")
    with checkpoints.open_manager(workdir) as source:
        step = checkpoints.resolve_step(source, checkpoint)
        metrics = source.metrics(step)
    out.mkdir(parents=True, exist_ok=True)
    for name in (checkpoints.CONFIG_FILE, checkpoints.TOKENIZER_FILE):
        shutil.copy(workdir / name, out / name)
    (out / QUANTIZATION_FILE).write_text(json.dumps({"mode": "int8"}) + "\n")
    with checkpoints.open_manager(out) as manager:
        state = ocp.args.StandardSave(nnx.state(model))
        manager.save(step, args=ocp.args.Composite(model=state), metrics=metrics)
    return out / checkpoints.CHECKPOINT_DIR / str(step)


def main(argv: list[str]) -> None:
    cli.start(argv)
    FLAGS = flags.FLAGS
    with cli.exit_on_error():
        path = export(FLAGS.workdir, FLAGS.out, cli.checkpoint_arg(FLAGS.checkpoint))
    print(f"int8 checkpoint written to {path}")


if __name__ == "__main__":  # flags defined here: the module is imported by the sampler's CLIs
    flags.DEFINE_string("workdir", None, "A trained run's directory.", required=True)
    flags.DEFINE_string(
        "out", None, required=True, help="Directory for the quantized copy (a new workdir)."
    )
    flags.DEFINE_string("checkpoint", "best", 'Checkpoint: "best", "latest" or a step number.')
    app.run(main, flags_parser=cli.flags_parser())
