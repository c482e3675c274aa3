"""charlm_jax/training/optimizers.py: Muon on matrices stacked by shape is optax's Muon."""

import jax
import numpy as np
import optax
from conftest import tiny_config
from flax import nnx
from optax.contrib import muon

from charlm_jax.model import models
from charlm_jax.training import optimizers


def per_matrix_reference(config) -> optax.GradientTransformation:
    """`optimizers.muon_with_adamw` as optax's own per-matrix Muon would do it: no stacking,
    each 2-D matrix orthogonalised on its own with optax's default (inputs, outputs) axes.
    Both run at their peak rates: the train step scales every update by the schedule
    (`optimizers.scale_by_schedule`), outside the optimizers compared here."""

    def labels(params):
        return jax.tree_util.tree_map_with_path(
            lambda path, x: (
                "muon"
                if x.ndim == 2 and jax.tree_util.keystr(path).startswith("['blocks']")
                else "adamw"
            ),
            params,
        )

    return optax.partition(
        {
            "muon": muon(
                config.muon_learning_rate,
                beta=config.muon_momentum,
                weight_decay=config.weight_decay,
            ),
            "adamw": optimizers.adamw(config, config.learning_rate),
        },
        labels,
    )


def random_like(tree, seed: int):
    """Gradients of `tree`'s shapes, each leaf its own (same-shape matrices differ)."""
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(
        treedef, [jax.random.normal(k, x.shape) for k, x in zip(keys, leaves, strict=True)]
    )


def test_stacked_muon_equals_optax_per_matrix_muon_over_several_steps():
    config = tiny_config(**{"train.optimizer": "muon", "train.warmup_steps": 2,
                            "train.weight_decay": 0.1, "train.num_steps": 6})  # fmt: skip
    model = models.create_model(config, 65, nnx.Rngs(0))
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    # Several matrices share each shape (2 layers): the stacking has something to stack.
    shapes = [x.shape for x in jax.tree.leaves(params["blocks"]) if x.ndim == 2]
    assert len(set(shapes)) < len(shapes)
    results = []
    for tx in (optimizers.muon_with_adamw(config.train), per_matrix_reference(config.train)):
        p, state = params, tx.init(params)
        update = jax.jit(tx.update)
        for step in range(5):
            updates, state = update(random_like(params, step), state, p)
            p = optax.apply_updates(p, updates)
        results.append(p)
    stacked, reference = results
    moved = jax.tree.map(lambda a, b: float(np.abs(a - b).max()), reference, params)
    assert min(jax.tree.leaves(moved["blocks"])) > 1e-3  # every block matrix was updated
    for a, b in zip(jax.tree.leaves(stacked), jax.tree.leaves(reference), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=2e-6)
