"""Structured pruning: scores the MLP neurons of a model and cuts the least important ones,
giving a smaller dense model of the same kind (docs/quantization.md).

Criterion: hidden neuron j of a layer pair (a Transformer block's MLP up/down, or an MLP
model's hidden layer and the layer after it) scores

    E|a_j| * ||W_next[j, :]||_2

the mean size of what it sends on, with its activations a_j measured on the given batches.
Each layer keeps its `keep` best neurons, in their original order (config.model.hidden_dim is
one width for all layers).
"""

from __future__ import annotations

import copy

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from charlm_jax.errors import UserError
from charlm_jax.model import models

LayerRef = tuple[nnx.Module, str | int]  # (parent, attribute name or list index)


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


def child_layer(parent: nnx.Module, key: str | int) -> nnx.Module:
    """The layer a `LayerRef` names."""
    return parent[key] if isinstance(parent, nnx.List) else getattr(parent, key)


def _set_child(parent: nnx.Module, key: str | int, value: nnx.Module) -> None:
    if isinstance(parent, nnx.List):
        parent[key] = value
    else:
        setattr(parent, key, value)


def layer_pairs(model: nnx.Module) -> list[tuple[LayerRef, LayerRef]]:
    """(the layer that produces a hidden width, the layer that reads it) for every prunable
    width of `model`."""
    if isinstance(model, models.Transformer):
        return [((b.mlp, "up"), (b.mlp, "down")) for b in model.blocks]
    if isinstance(model, models.MLP):
        readers = [(model.hidden, i) for i in range(1, len(model.hidden))] + [(model, "head")]
        return [((model.hidden, i), r) for i, r in enumerate(readers)]
    raise UserError(f"cannot prune a {type(model).__name__}")


def neuron_scores(model: nnx.Module, batches: list[np.ndarray]) -> list[np.ndarray]:
    """Each prunable width's scores E|a_j| * ||W_next[j, :]|| over the tokens of `batches`
    (each (batch, time) token ids)."""
    model = nnx.clone(model)
    readers = [reader for _, reader in layer_pairs(model)]
    for parent, key in readers:
        _set_child(parent, key, _InputMagnitude(child_layer(parent, key)))
    for batch in batches:
        model(jnp.asarray(batch))
    scores = []
    for parent, key in readers:
        probe = child_layer(parent, key)
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
    model: nnx.Module,
    config: ml_collections.ConfigDict,
    vocab_size: int,
    scores: list[np.ndarray],
    keep: int,
) -> tuple[nnx.Module, ml_collections.ConfigDict]:
    """The model with each width cut to its `keep` best-scoring neurons, and its config."""
    pruned = nnx.clone(model)
    for (producer, reader), score in zip(layer_pairs(pruned), scores, strict=True):
        kept = np.sort(np.argsort(-score, kind="stable")[:keep])
        _cut(child_layer(*producer), kept, axis=1)
        _cut(child_layer(*reader), kept, axis=0)
    config = copy.deepcopy(config)
    config.model.hidden_dim = keep
    small = nnx.eval_shape(lambda: models.create_model(config, vocab_size, nnx.Rngs(0)))
    return nnx.merge(nnx.graphdef(small), nnx.state(pruned)), config
