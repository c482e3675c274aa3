"""int8 dense layers: a model's `nnx.Linear` layers and tied output head as int8 dots.

`quantize_model(model, "int8")` returns a copy in which every `nnx.Linear` (the Transformer's
attention qkv/out and MLP up/down projections; the MLP model's hidden layers and head) and the
Transformer's tied output head run as int8 x int8 -> int32 dots: weights quantized once per
output channel, activations per row on the fly (symmetric, absmax). Embedding lookups, norms,
softmax, attention and the residual stream stay float32. The copy is an ordinary NNX module
with the same methods (`__call__`, `init_cache`, `forward_cached`), so the sampler, the decode
engine and the server run it like the float32 model (docs/quantization.md).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from charlm_jax.errors import UserError
from charlm_jax.model import models

MODES = ("none", "int8")
# XLA:CPU runs int8 dots in YNNPACK, except for a dimension of 1 (one decoding row), which
# falls back to XLA's own loops, 2-3x slower than float32 there; fewer rows than this are
# zero-padded up to it (docs/quantization.md has the measurements).
MIN_ROWS = 8


def check_mode(mode: str) -> str:
    """Returns `mode` if it is a known quantization mode; UserError otherwise."""
    if mode not in MODES:
        raise UserError(f"unknown quantization mode {mode!r}: expected 'none' or 'int8'")
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
        raise UserError("the model is already quantized")
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
