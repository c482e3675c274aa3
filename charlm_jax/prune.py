"""Structured pruning: removes the least important MLP neurons, giving a smaller dense model.

    python -m charlm_jax.prune --workdir=DIR --out=DIR2 --mlp_keep=0.5 [--finetune_steps=N]

DIR2 is a workdir like any other (config.json with the smaller `model.hidden_dim`, the
tokenizer, an orbax checkpoint with a fresh optimizer state), so it trains, samples and serves
as usual; with --finetune_steps it is trained that many steps by the normal training loop.

Criterion (docs/quantization.md): hidden neuron j of a layer pair (a Transformer block's MLP
up/down, or an MLP model's hidden layer and the layer after it) scores

    E|a_j| * ||W_next[j, :]||_2

the mean size of what it sends on, with its activations a_j measured on training batches.
Each layer keeps its `round(mlp_keep * hidden_dim)` best neurons, in their original order
(config.model.hidden_dim is one width for all layers).
"""

from __future__ import annotations

import math
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags
from flax import nnx

from charlm_jax import cli, config_defaults
from charlm_jax.data import pipeline
from charlm_jax.errors import UserError
from charlm_jax.model import models
from charlm_jax.training import train
from charlm_jax.workdir import checkpoints

STATS_BATCHES = 8  # training batches the activation statistics are measured on


class _InputMagnitude(nnx.Module):
    """Wraps a Linear and accumulates the summed |input| of each input feature (eagerly)."""

    def __init__(self, layer: nnx.Linear):
        self.layer = layer
        self.total = nnx.Variable(jnp.zeros(layer.in_features))
        self.rows = nnx.Variable(jnp.zeros(()))

    def __call__(self, x: jax.Array) -> jax.Array:
        rows = x.reshape(-1, x.shape[-1])
        self.total[...] += jnp.abs(rows).sum(0)
        self.rows[...] += rows.shape[0]
        return self.layer(x)


def _child(parent, key):
    return parent[key] if isinstance(parent, nnx.List) else getattr(parent, key)


def _set_child(parent, key, value) -> None:
    if isinstance(parent, nnx.List):
        parent[key] = value
    else:
        setattr(parent, key, value)


def layer_pairs(model: nnx.Module) -> list[tuple[tuple, tuple]]:
    """((parent, key) of the layer that produces a hidden width, (parent, key) of the layer
    that reads it) for every prunable width of `model`."""
    if isinstance(model, models.Transformer):
        return [((b.mlp, "up"), (b.mlp, "down")) for b in model.blocks]
    if isinstance(model, models.MLP):
        readers = [(model.hidden, i) for i in range(1, len(model.hidden))] + [(model, "head")]
        return [((model.hidden, i), r) for i, r in enumerate(readers)]
    raise UserError(f"cannot prune a {type(model).__name__}")


def neuron_scores(model: nnx.Module, batches: list[np.ndarray]) -> list[np.ndarray]:
    """Each prunable width's scores E|a_j| * ||W_next[j, :]|| over the tokens of `batches`."""
    model = nnx.clone(model)
    readers = [reader for _, reader in layer_pairs(model)]
    for parent, key in readers:
        _set_child(parent, key, _InputMagnitude(_child(parent, key)))
    for batch in batches:
        model(jnp.asarray(batch))
    scores = []
    for parent, key in readers:
        probe = _child(parent, key)
        magnitude = probe.total[...] / probe.rows[...]
        scores.append(np.asarray(magnitude * jnp.linalg.norm(probe.layer.kernel[...], axis=1)))
    return scores


def _cut(linear: nnx.Linear, kept: np.ndarray, axis: int) -> None:
    """Keeps only the `kept` indices of the Linear's kernel along `axis` (1: its outputs,
    and then its bias; 0: its inputs)."""
    linear.kernel = nnx.Param(jnp.take(linear.kernel[...], kept, axis=axis))
    if axis == 1 and linear.bias is not None:
        linear.bias = nnx.Param(linear.bias[...][kept])


def prune_model(
    model: nnx.Module, config: ml_collections.ConfigDict, vocab_size: int, scores, keep: int
) -> tuple[nnx.Module, ml_collections.ConfigDict]:
    """The model with each width cut to its `keep` best-scoring neurons, and its config."""
    pruned = nnx.clone(model)
    for (producer, reader), score in zip(layer_pairs(pruned), scores, strict=True):
        kept = np.sort(np.argsort(-score, kind="stable")[:keep])
        _cut(_child(*producer), kept, axis=1)
        _cut(_child(*reader), kept, axis=0)
    # Today's defaults under the run's values: a run written before a field existed lacks it.
    saved, config = config, config_defaults.base_config(config.model.to_dict())
    config.update(saved.to_dict())
    config.model.hidden_dim = keep
    small = nnx.eval_shape(lambda: models.create_model(config, vocab_size, nnx.Rngs(0)))
    return nnx.merge(nnx.graphdef(small), nnx.state(pruned)), config


def windows(tokens: np.ndarray, length: int, count: int | None = None) -> np.ndarray:
    """`count` (default: all) consecutive windows of length + 1 tokens, spread evenly over
    `tokens` when fewer than all, shape (count, length + 1)."""
    total = (len(tokens) - 1) // length
    starts = np.arange(total) * length
    if count is not None and count < total:
        starts = starts[np.linspace(0, total - 1, count).astype(int)]
    return np.stack([tokens[s : s + length + 1] for s in starts]).astype(np.int32)


def score_text(
    model: nnx.Module, tokens: np.ndarray, length: int, batch: int = 32
) -> tuple[np.ndarray, np.ndarray]:
    """Next-token log-probabilities (nats) and greedy predictions over `tokens` in
    consecutive windows of `length` (the rest, under one window, is left out)."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state, inputs, targets):
        logp = jax.nn.log_softmax(nnx.merge(graphdef, state)(inputs).astype(jnp.float32))
        chosen = jnp.take_along_axis(logp, targets[..., None], -1)[..., 0]
        return chosen, jnp.argmax(logp, -1)

    rows = windows(tokens, length)
    logps, predictions = [], []
    for start in range(0, len(rows), batch):
        part = rows[start : start + batch]
        padded = np.pad(part, ((0, batch - len(part)), (0, 0)))  # one compilation
        logp, predicted = run(state, padded[:, :-1], padded[:, 1:])
        logps.append(np.asarray(logp)[: len(part)])
        predictions.append(np.asarray(predicted)[: len(part)])
    return np.concatenate(logps).ravel(), np.concatenate(predictions).ravel()


def write_workdir(
    out: Path, model: nnx.Module, config: ml_collections.ConfigDict, tokenizer, val_loss
) -> None:
    """A workdir for `model`: config, tokenizer, and a step-0 checkpoint with a fresh
    optimizer state (training resumes from it); `val_loss` None: not a "best" candidate."""
    out.mkdir(parents=True, exist_ok=True)
    checkpoints.save_run_files(out, config, tokenizer)
    tx, _ = train.create_optimizer(config.train)
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    with checkpoints.open_manager(out) as manager:
        checkpoints.save(manager, 0, nnx.state(model), nnx.state(optimizer), val_loss)


def check_fraction(mlp_keep: float) -> None:
    """ValueError unless 0 < mlp_keep <= 1."""
    if not 0 < mlp_keep <= 1:
        raise UserError(f"mlp_keep must be in (0, 1], got {mlp_keep}")


def prune_workdir(
    workdir: str | Path,
    out: str | Path,
    mlp_keep: float,
    finetune_steps: int = 0,
    learning_rate: float | None = None,
    checkpoint: str | int = "best",
) -> dict:
    """Prunes `workdir`'s model to `mlp_keep` of its MLP neurons into the new workdir `out`,
    then fine-tunes it `finetune_steps` steps (peak `learning_rate`, default the run's).
    Returns {"hidden_dim", "num_params", "val_loss" and "val_bpc" (the whole validation
    text, before any fine-tuning), and "finetune": the training summary if fine-tuned}."""
    from charlm_jax import quantize  # noqa: PLC0415 (quantize imports nothing of this module)

    check_fraction(mlp_keep)
    if finetune_steps < 0:
        raise UserError(f"finetune_steps must be >= 0, got {finetune_steps}")
    workdir, out = Path(workdir), Path(out)
    if quantize.saved_mode(workdir) != "none":
        raise UserError(f"{workdir} holds a quantized checkpoint: prune its float32 original")
    if (out / checkpoints.CHECKPOINT_DIR).exists():
        raise UserError(f"{out} already holds checkpoints: choose a new --out")
    model, tokenizer, config = checkpoints.load_model(workdir, checkpoint)
    dataset = pipeline.load_dataset(config.data, tokenizer)
    train_tokens, val_tokens = dataset.train, dataset.val
    length = config.data.context_length
    stats = windows(train_tokens, length, STATS_BATCHES * config.train.batch_size)[:, :-1]
    scores = neuron_scores(model, np.split(stats, STATS_BATCHES))
    keep = max(1, round(mlp_keep * config.model.hidden_dim))
    small, config = prune_model(model, config, tokenizer.vocab_size, scores, keep)
    val_loss = -float(np.mean(score_text(small, val_tokens, length)[0]))
    result = {
        "hidden_dim": keep,
        "num_params": models.count_params(small),
        "val_loss": val_loss,
        "val_bpc": val_loss / math.log(2) / dataset.chars_per_token,
    }
    if finetune_steps:
        tc = config.train
        tc.num_steps, tc.num_epochs = finetune_steps, 0.0
        tc.warmup_steps = min(tc.warmup_steps, finetune_steps // 10)
        tc.eval_every = min(tc.eval_every, finetune_steps)
        tc.learning_rate = tc.learning_rate if learning_rate is None else learning_rate
        tc.min_learning_rate = min(tc.min_learning_rate, tc.learning_rate)
    write_workdir(out, small, config, tokenizer, None if finetune_steps else val_loss)
    if finetune_steps:
        result["finetune"] = train.train_and_evaluate(config, out)
    return result


def main(argv: list[str]) -> None:
    cli.start(argv)
    FLAGS = flags.FLAGS
    with cli.exit_on_error():
        result = prune_workdir(
            FLAGS.workdir, FLAGS.out, FLAGS.mlp_keep, FLAGS.finetune_steps,
            FLAGS.finetune_learning_rate,
        )  # fmt: skip
    line = f"pruned to hidden_dim {result['hidden_dim']}, {result['num_params']:,} parameters"
    print(f"{line}; validation {result['val_bpc']:.4f} bits per character before fine-tuning")
    if "finetune" in result:
        print(f"fine-tuned: best validation loss {result['finetune']['best_val_loss']:.4f}")


if __name__ == "__main__":
    flags.DEFINE_string("workdir", None, "A trained run's directory.", required=True)
    flags.DEFINE_string(
        "out", None, required=True, help="Directory for the pruned model (a new workdir)."
    )
    flags.DEFINE_float("mlp_keep", 0.5, "Fraction of each MLP's hidden neurons kept, in (0, 1].")
    flags.DEFINE_integer("finetune_steps", 0, "Training steps after pruning (0: none).")
    flags.DEFINE_float("finetune_learning_rate", None, "Peak learning rate (default: the run's).")
    app.run(main, flags_parser=cli.flags_parser())
