"""Learning-rate schedules, and Muon for the blocks' weight matrices (with AdamW for the
rest): the optimizer options `train.create_optimizer` builds from the `train` section."""

from __future__ import annotations

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


def schedule(config: ml_collections.ConfigDict, peak: float, end: float) -> optax.Schedule:
    """`train.schedule`: linear warmup to `peak` over `train.warmup_steps`, then down to
    `end` at `train.num_steps`, by a cosine ("cosine"), or held and then decayed linearly
    over the last `train.decay_fraction` of the steps ("wsd", warmup-stable-decay).
    `config` is the `train` section, checked by `check_config`."""
    steps = max(config.num_steps, config.warmup_steps + 1)
    if config.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(
            init_value=0.0,
            peak_value=peak,
            warmup_steps=config.warmup_steps,
            decay_steps=steps,
            end_value=end,
        )
    decay = max(1, round(config.decay_fraction * steps))
    stable = max(0, steps - config.warmup_steps - decay)
    return optax.join_schedules(
        [
            optax.linear_schedule(0.0, peak, config.warmup_steps),
            optax.constant_schedule(peak),
            optax.linear_schedule(peak, end, decay),
        ],
        boundaries=[config.warmup_steps, config.warmup_steps + stable],
    )


def adamw(config: ml_collections.ConfigDict, learning_rate: optax.Schedule):
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
    on the blocks' weight matrices at peak `train.muon_learning_rate`, AdamW on the
    embeddings, norms and head at peak `train.learning_rate`. Weight decay
    (`train.weight_decay`, times the learning rate) on matrices and embeddings only."""

    def labels(params):
        return jax.tree_util.tree_map_with_path(
            lambda path, x: "muon" if _is_block_matrix(path, x) else "adamw", params
        )

    ratio = config.min_learning_rate / config.learning_rate  # Muon's schedule has the same shape
    return optax.partition(
        {
            "muon": stacked_by_shape(
                muon(
                    schedule(config, config.muon_learning_rate, config.muon_learning_rate * ratio),
                    beta=config.muon_momentum,
                    weight_decay=config.weight_decay,
                    # Stacked matrices: axis 0 counts them; each is (inputs, outputs).
                    muon_weight_dimension_numbers=lambda tree: jax.tree.map(
                        lambda _: MuonDimensionNumbers(reduction_axis=1, output_axis=2), tree
                    ),
                )
            ),
            "adamw": adamw(
                config, schedule(config, config.learning_rate, config.min_learning_rate)
            ),
        },
        labels,
    )
