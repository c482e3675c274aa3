"""A pruned copy of a trained workdir, optionally fine-tuned: the workdir tool behind
`python -m charlm_jax.prune` (the scoring and cutting of neurons is `model.pruning`).

It lives with training because fine-tuning is a training run in the new workdir: config.json
with the smaller `model.hidden_dim`, the tokenizer, and a checkpoint with a fresh optimizer
state, so the copy trains, samples and serves like any run.
"""

from __future__ import annotations

from pathlib import Path

import ml_collections
import numpy as np
from flax import nnx

from charlm_jax.data import pipeline
from charlm_jax.errors import UserError
from charlm_jax.model import models, pruning, scoring
from charlm_jax.training import train
from charlm_jax.workdir import checkpoints, loader

STATS_BATCHES = 8  # training batches the activation statistics are measured on


def spread_windows(tokens: np.ndarray, length: int, count: int) -> np.ndarray:
    """`count` windows of `length` tokens spread evenly over `tokens` (fewer if the text
    holds fewer), shape (count, length)."""
    total = len(tokens) // length
    starts = np.linspace(0, total - 1, min(count, total)).astype(int) * length
    return np.stack([tokens[s : s + length] for s in starts]).astype(np.int32)


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


def finetune_config(
    config: ml_collections.ConfigDict, steps: int, learning_rate: float | None
) -> ml_collections.ConfigDict:
    """`config` set to train `steps` steps at peak `learning_rate` (None: the run's), with
    warm-up and evaluations scaled to the short run."""
    config = config.copy_and_resolve_references()
    tc = config.train
    tc.num_steps, tc.num_epochs = steps, 0.0
    tc.warmup_steps = min(tc.warmup_steps, steps // 10)
    tc.eval_every = min(tc.eval_every, steps)
    tc.learning_rate = tc.learning_rate if learning_rate is None else learning_rate
    tc.min_learning_rate = min(tc.min_learning_rate, tc.learning_rate)
    return config


def _check_args(mlp_keep: float, finetune_steps: int, workdir: Path, out: Path) -> None:
    if not 0 < mlp_keep <= 1:
        raise UserError(f"mlp_keep must be in (0, 1], got {mlp_keep}")
    if finetune_steps < 0:
        raise UserError(f"finetune_steps must be >= 0, got {finetune_steps}")
    if loader.saved_quantization(workdir) != "none":
        raise UserError(f"{workdir} holds a quantized checkpoint: prune its float32 original")
    checkpoints.check_new_workdir(out)


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
    Returns {"hidden_dim", "num_params", "val_loss" (nats per token) and "val_bpc" (the whole
    validation text, `scoring.score_tokens`, before any fine-tuning), and "finetune": the
    training summary if fine-tuned}."""
    workdir, out = Path(workdir), Path(out)
    _check_args(mlp_keep, finetune_steps, workdir, out)
    run = loader.open_run(workdir, checkpoint)
    dataset = pipeline.load_dataset(run.config.data, run.tokenizer)
    stats = spread_windows(
        dataset.train, run.context_length, STATS_BATCHES * run.config.train.batch_size
    )
    scores = pruning.neuron_scores(run.model, np.array_split(stats, STATS_BATCHES))
    keep = max(1, round(mlp_keep * run.config.model.hidden_dim))
    small, config = pruning.prune_model(
        run.model, run.config, run.tokenizer.vocab_size, scores, keep
    )
    val = scoring.score_tokens(
        small, dataset.val, run.context_length, chars_per_token=dataset.chars_per_token
    )
    result = {
        "hidden_dim": keep,
        "num_params": models.count_params(small),
        "val_loss": val.nats_per_token,
        "val_bpc": val.bits_per_char,
    }
    if finetune_steps:
        config = finetune_config(config, finetune_steps, learning_rate)
    write_workdir(out, small, config, run.tokenizer, None if finetune_steps else val.nats_per_token)
    if finetune_steps:
        result["finetune"] = train.train_and_evaluate(config, out)
    return result
