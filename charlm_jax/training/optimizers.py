"""Learning-rate schedules, and Muon for the blocks' weight matrices (with AdamW for the
rest): the optimizer options `train.create_optimizer` builds from the `train` section.

The optimizers run at their peak rates and `scale_by_schedule` multiplies their updates by
the schedule's factor, which the train step computes from its step and the run's length."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax
from optax.contrib import MuonDimensionNumbers, muon

from charlm_jax.errors import UserError

SCHEDULES = ("cosine", "wsd")
OPTIMIZERS = ("adamw", "muon")


def check_config(config: ml_collections.ConfigDict) -> None:
    """Raises UserError naming the first field of `config` (the `train` section) that no
    optimizer or schedule can be built from."""
    for name, choices in (("optimizer", OPTIMIZERS), ("schedule", SCHEDULES)):
        if config[name] not in choices:
            raise UserError(f"unknown train.{name} {config[name]!r}: expected one of {choices}")
    if config.schedule == "wsd" and not 0.0 < config.decay_fraction <= 1.0:
        raise UserError(f"train.decay_fraction must be in (0, 1], got {config.decay_fraction}")
    if config.warmup_steps < 0:
        raise UserError(f"train.warmup_steps must be >= 0, got {config.warmup_steps}")


def schedule(config: ml_collections.ConfigDict, peak: float, end: float) -> Callable:
    """`train.schedule` as lr(step, num_steps=train.num_steps): linear warmup to `peak` over
    `train.warmup_steps`, then down to `end` at `num_steps`, by a cosine ("cosine"), or held
    and then decayed linearly over the last `train.decay_fraction` of the steps ("wsd",
    warmup-stable-decay). Pure jnp: both arguments may be traced, so the train step computes
    it, and a time budget can fix the run's length without recompiling the step. `config` is
    the `train` section, checked by `check_config`."""
    warmup = config.warmup_steps

    def lr(step: jax.Array | int, num_steps: jax.Array | int = config.num_steps) -> jax.Array:
        step = jnp.asarray(step, jnp.float32)
        steps = jnp.maximum(jnp.asarray(num_steps, jnp.float32), warmup + 1)
        if config.schedule == "cosine":
            progress = jnp.clip((step - warmup) / (steps - warmup), 0.0, 1.0)
            decayed = end + (peak - end) * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
        else:
            decay = jnp.maximum(1.0, jnp.round(config.decay_fraction * steps))
            decay_start = jnp.maximum(warmup, steps - decay)
            progress = jnp.clip((step - decay_start) / decay, 0.0, 1.0)
            decayed = peak + (end - peak) * progress
        return jnp.where(step < warmup, peak * step / max(warmup, 1), decayed)

    return lr


def scale_by_schedule() -> optax.GradientTransformationExtraArgs:
    """Multiplies the updates by the `lr_factor` passed to `update`: the schedule's value
    at this step over its peak, which the train step computes."""

    def update(updates, state, params=None, *, lr_factor: jax.Array, **extra_args):
        del params, extra_args
        return jax.tree.map(lambda u: u * lr_factor.astype(u.dtype), updates), state

    return optax.GradientTransformationExtraArgs(lambda params: optax.EmptyState(), update)


def adamw(config: ml_collections.ConfigDict, learning_rate: float):
    """AdamW with `train`'s betas, its weight decay on matrices and embeddings only."""
    return optax.adamw(
        learning_rate,
        b1=config.beta1,
        b2=config.beta2,
        weight_decay=config.weight_decay,
        mask=lambda params: jax.tree.map(lambda p: p.ndim >= 2, params),
    )


def _is_block_matrix(path, x) -> bool:
    """A weight matrix inside the Transformer's blocks (not an embedding or the head)."""
    return x.ndim == 2 and jax.tree_util.keystr(path).startswith("['blocks']")


def stacked_by_shape(inner: optax.GradientTransformation) -> optax.GradientTransformation:
    """`inner` applied to the leaves stacked into one array per shape (a leading axis of the
    leaves of that shape), its updates unstacked: Muon's Newton-Schulz iterations then run as
    a few batched matmuls instead of a chain of small ones per matrix."""

    def groups(tree) -> dict[str, list[int]]:
        by_shape = {}
        for i, leaf in enumerate(jax.tree.leaves(tree)):
            by_shape.setdefault("x".join(map(str, leaf.shape)), []).append(i)
        return by_shape

    def stack(tree):
        if tree is None:
            return None
        leaves = jax.tree.leaves(tree)
        return {k: jnp.stack([leaves[i] for i in ids]) for k, ids in groups(tree).items()}

    def update(updates, state, params=None):
        stacked, state = inner.update(stack(updates), state, stack(params))
        leaves, treedef = jax.tree.flatten(updates)
        for key, ids in groups(updates).items():
            for i, leaf in zip(ids, stacked[key], strict=True):
                leaves[i] = leaf
        return jax.tree.unflatten(treedef, leaves), state

    return optax.GradientTransformation(lambda params: inner.init(stack(params)), update)


def muon_with_adamw(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """Muon (momentum orthogonalised by Newton-Schulz; Jordan et al. 2024, modded-nanogpt)
    on the blocks' weight matrices at `train.muon_learning_rate`, AdamW on the embeddings,
    norms and head at `train.learning_rate`: the peak rates (`scale_by_schedule` after it
    gives both the schedule's shape). Weight decay (`train.weight_decay`, times the learning
    rate) on matrices and embeddings only."""

    def labels(params):
        return jax.tree_util.tree_map_with_path(
            lambda path, x: "muon" if _is_block_matrix(path, x) else "adamw", params
        )

    return optax.partition(
        {
            "muon": stacked_by_shape(
                muon(
                    config.muon_learning_rate,
                    beta=config.muon_momentum,
                    weight_decay=config.weight_decay,
                    # Stacked matrices: axis 0 counts them; each is (inputs, outputs).
                    muon_weight_dimension_numbers=lambda tree: jax.tree.map(
                        lambda _: MuonDimensionNumbers(reduction_axis=1, output_axis=2), tree
                    ),
                )
            ),
            "adamw": adamw(config, config.learning_rate),
        },
        labels,
    )
