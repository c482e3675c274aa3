"""Character-level language models as Flax NNX modules.

Both map int32 tokens of shape (batch, time) to logits of shape (batch, time, vocab), and the
logits at position t depend only on tokens 0..t.

- `MLP`: Bengio et al. (2003) / makemore. Each position sees the embeddings of the last
  `window` characters (itself included), concatenated, through tanh hidden layers.
- `Transformer`: a decoder-only GPT (nanoGPT's layout): token (+ learned position)
  embeddings, pre-norm blocks of causal self-attention and an MLP, a final norm, and an
  output head tied to the token embedding. Positions may instead be rotary (RoPE).

Each is configured by one frozen dataclass (`MLPConfig`, `TransformerConfig`, in
`model/config.py`) that `create_model` builds from `config.model`; both implement
`CachedDecoder`, the interface the decode engine runs.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, NamedTuple, Protocol, runtime_checkable

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from charlm_jax.errors import UserError
from charlm_jax.model.config import (
    CONFIG_CLASSES,
    DTYPE_FIELDS,
    INIT_STD,
    MLPConfig,
    TransformerConfig,
    section_fields,
)
from charlm_jax.model.random_bits import hashed_uniform_bits

QUERY_BLOCK = 128  # full-sequence attention runs in blocks of this many queries
KV_BLOCK = 64  # columns per block of a KV cache (decoding reads only the blocks seen)


@runtime_checkable
class CachedDecoder(Protocol):
    """What the decode engine needs of a model: a full forward pass, and one over a cache.

    A cache holds `context_length` columns per row. `forward_cached` writes `tokens`
    (batch, time) at columns column..column+time-1 and returns their logits (batch, time,
    vocab) with the new cache; they sit at `positions` (batch, time) and attend where `mask`
    (batch, time, visible) is True, over the first `visible` columns (all of them, or a
    multiple of KV_BLOCK: the columns after are neither seen nor read). Within the context,
    its logits equal those of `__call__` on the whole text.
    """

    def __call__(
        self, tokens: jax.Array, *, train: bool = False, rngs: nnx.Rngs | None = None
    ) -> jax.Array: ...

    def init_cache(self, batch: int, context_length: int) -> Any: ...

    def forward_cached(
        self, tokens: jax.Array, positions: jax.Array, mask: jax.Array, cache: Any, column
    ) -> tuple[jax.Array, Any]: ...


def _normal(std: float = INIT_STD) -> nnx.Initializer:
    return nnx.initializers.normal(stddev=std)


class Dropout(nnx.Module):
    """nnx.Dropout's interface and scaling, with masks from `hashed_uniform_bits`."""

    def __init__(self, rate: float):
        self.rate = rate

    def __call__(
        self, x: jax.Array, *, deterministic: bool, rngs: nnx.Rngs | None = None
    ) -> jax.Array:
        if deterministic or self.rate == 0:
            return x
        if rngs is None:
            raise ValueError("training with dropout needs rngs with a 'dropout' stream")
        if self.rate >= 1:
            return jnp.zeros_like(x)
        threshold = jnp.uint32(min(round(self.rate * 2**32), 2**32 - 1))
        keep = hashed_uniform_bits(rngs.dropout(), x.shape) >= threshold
        return jnp.where(keep, x / (1 - self.rate), 0).astype(x.dtype)


class MLP(nnx.Module):
    """Bengio-style MLP language model over a fixed window of previous characters."""

    def __init__(self, cfg: MLPConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.window = cfg.window
        self.pad_id = cfg.vocab_size  # an extra embedding row for positions before the text
        dtypes = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        self.embed = nnx.Embed(cfg.vocab_size + 1, cfg.embedding_dim, rngs=rngs, **dtypes)
        widths = [cfg.window * cfg.embedding_dim] + [cfg.hidden_dim] * cfg.num_layers
        self.hidden = nnx.List(
            [
                nnx.Linear(i, o, rngs=rngs, **dtypes)
                for i, o in zip(widths[:-1], widths[1:], strict=True)
            ]
        )
        self.dropout = Dropout(cfg.dropout_rate)
        self.head = nnx.Linear(widths[-1], cfg.vocab_size, rngs=rngs, **dtypes)

    def __call__(
        self, tokens: jax.Array, *, train: bool = False, rngs: nnx.Rngs | None = None
    ) -> jax.Array:
        padded = jnp.pad(tokens, ((0, 0), (self.window - 1, 0)), constant_values=self.pad_id)
        return self._logits(padded, 0, tokens.shape[1], train=train, rngs=rngs)

    def _logits(
        self, padded: jax.Array, start, time: int, *, train: bool, rngs: nnx.Rngs | None
    ) -> jax.Array:
        """Logits for the `time` positions whose windows end at padded[:, start + c - 1 + t]."""
        batch, c = padded.shape[0], self.window
        # windows[:, t, k] is the token k - (c - 1) places before position t.
        windows = jnp.stack(
            [jax.lax.dynamic_slice_in_dim(padded, start + k, time, axis=1) for k in range(c)],
            axis=-1,
        )
        x = self.embed(windows).reshape(batch * time, -1)
        for layer in self.hidden:
            x = self.dropout(jnp.tanh(layer(x)), deterministic=not train, rngs=rngs)
        return self.head(x).reshape(batch, time, -1)

    def init_cache(self, batch: int, context_length: int) -> jax.Array:
        """The MLP's decoding cache is the token buffer itself."""
        return jnp.full((batch, context_length), self.pad_id, jnp.int32)

    def forward_cached(
        self, tokens: jax.Array, positions: jax.Array, mask: jax.Array, cache: jax.Array, column
    ) -> tuple[jax.Array, jax.Array]:
        """Writes `tokens` at buffer columns column.. and returns their logits (see
        Transformer)."""
        del positions  # the MLP only sees the window
        cache = write_columns(cache, tokens, column, axis=1)
        seen = jnp.pad(mask[:, -1, :], ((0, 0), (0, cache.shape[1] - mask.shape[-1])))
        visible = jnp.where(seen, cache, self.pad_id)  # columns the row may not see
        padded = jnp.pad(visible, ((0, 0), (self.window - 1, 0)), constant_values=self.pad_id)
        if jnp.ndim(column) == 0:
            return self._logits(padded, column, tokens.shape[1], train=False, rngs=None), cache
        logits = jax.vmap(
            lambda row, start: self._logits(
                row[None], start, tokens.shape[1], train=False, rngs=None
            )[0]
        )(padded, column)
        return logits, cache


def rope(x: jax.Array, positions: jax.Array, base: float = 10000.0) -> jax.Array:
    """Rotary position embedding of x (batch, time, heads, head_dim) at positions (batch, time)."""
    half = x.shape[-1] // 2
    freqs = base ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angles = positions.astype(jnp.float32)[..., None] * freqs  # (batch, time, half)
    cos, sin = jnp.cos(angles)[..., None, :], jnp.sin(angles)[..., None, :]
    x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
    return jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1).astype(x.dtype)


def rms_normalize(x: jax.Array, epsilon: float = 1e-6) -> jax.Array:
    """x scaled to unit root-mean-square over its last axis (computed in float32)."""
    x32 = x.astype(jnp.float32)
    return (x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, -1, keepdims=True) + epsilon)).astype(x.dtype)


def make_norm(cfg: TransformerConfig, rngs: nnx.Rngs) -> nnx.Module:
    """`cfg.norm` over the residual stream, computed in float32 whatever the compute dtype."""
    dtypes = dict(dtype=jnp.float32, param_dtype=cfg.param_dtype)
    if cfg.norm == "rmsnorm":
        return nnx.RMSNorm(cfg.embedding_dim, epsilon=1e-5, rngs=rngs, **dtypes)
    return nnx.LayerNorm(
        cfg.embedding_dim, epsilon=1e-5, use_bias=cfg.use_bias, rngs=rngs, **dtypes
    )


def _linear(cfg: TransformerConfig, rngs: nnx.Rngs, features: int, out: int, std: float):
    return nnx.Linear(
        features,
        out,
        use_bias=cfg.use_bias,
        kernel_init=_normal(std),
        dtype=cfg.dtype,
        param_dtype=cfg.param_dtype,
        rngs=rngs,
    )


def dense(layer: nnx.Linear, x: jax.Array) -> jax.Array:
    """Applies `layer` to x (..., features) as one 2-D matmul.

    Flattening first makes the weight gradient a plain (features, n) x (n, out) matmul; over
    3-D activations XLA:CPU contracts two dimensions at once, which is much slower
    (docs/performance.md).
    """
    return layer(x.reshape(-1, x.shape[-1])).reshape(*x.shape[:-1], -1)


def write_columns(cache: jax.Array, new: jax.Array, column, axis: int) -> jax.Array:
    """Writes `new` into `cache` along `axis` from `column`: one index for every row, or one
    per row (an array of shape (batch,))."""
    if jnp.ndim(column) == 0:
        return jax.lax.dynamic_update_slice_in_dim(cache, new, column, axis=axis)
    write = functools.partial(jax.lax.dynamic_update_slice_in_dim, axis=axis - 1)
    return jax.vmap(write)(cache, new, column)


class KVCache(NamedTuple):
    """One attention layer's keys and values, each a tuple of blocks (batch, heads, columns,
    head_dim) of KV_BLOCK columns (the last may be narrower): decoding reads only the blocks
    that some query may see (a cache of separate buffers, as a slice of one buffer would be
    copied before the matmul)."""

    k: tuple[jax.Array, ...]
    v: tuple[jax.Array, ...]

    @classmethod
    def zeros(cls, batch: int, heads: int, context_length: int, head_dim: int) -> KVCache:
        widths = [
            min(KV_BLOCK, context_length - start) for start in range(0, context_length, KV_BLOCK)
        ]
        blocks = lambda: tuple(jnp.zeros((batch, heads, w, head_dim)) for w in widths)  # noqa: E731
        return cls(blocks(), blocks())

    def write(self, k: jax.Array, v: jax.Array, column) -> KVCache:
        """The cache with k, v (batch, heads, time, head_dim) written at columns column.. (one
        index, or one per row)."""
        batch, _, time, _ = k.shape
        columns = jnp.broadcast_to(jnp.reshape(column, (-1, 1)), (batch, 1)) + jnp.arange(time)
        rows = jnp.arange(batch)[:, None]

        def put(blocks, new):
            new, out, start = new.transpose(0, 2, 1, 3), [], 0  # (batch, time, heads, dim)
            for block in blocks:
                width = block.shape[2]
                index = columns - start
                index = jnp.where((index >= 0) & (index < width), index, width)  # else dropped
                out.append(block.at[rows, :, index].set(new.astype(block.dtype), mode="drop"))
                start += width
            return tuple(out)

        return KVCache(put(self.k, k), put(self.v, v))


class TransformerCache(NamedTuple):
    """The Transformer's decoding cache: each layer's keys and values, and with a bigram
    embedding the tokens written so far (batch, columns), whose last one each new token pairs
    with."""

    layers: list[KVCache]
    tokens: jax.Array | None = None

    def previous_token(self, column, none_id: int) -> jax.Array:
        """(batch,) the token before cache column `column` (one index, or one per row):
        `none_id` at column 0."""
        column = jnp.broadcast_to(column, self.tokens.shape[:1])
        before = jnp.take_along_axis(self.tokens, jnp.maximum(column - 1, 0)[:, None], axis=1)
        return jnp.where(column > 0, before[:, 0], none_id)


def bigram_ids(tokens: jax.Array, first_previous: jax.Array, vocab_size: int) -> jax.Array:
    """The bigram table's row of each (previous, current) pair of `tokens` (batch, time):
    previous * vocab_size + current, with `first_previous` (batch,) before the first token
    (vocab_size: none)."""
    previous = jnp.concatenate([first_previous[:, None], tokens[:, :-1]], axis=1)
    return previous * vocab_size + tokens


class CausalSelfAttention(nnx.Module):
    def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
        dim = cfg.embedding_dim
        self.num_heads = cfg.num_heads
        self.use_rope = cfg.position == "rope"
        self.qk_norm = cfg.qk_norm
        self.fused = cfg.attention == "dot_product"
        self.qkv = _linear(cfg, rngs, dim, 3 * dim, INIT_STD)
        self.out = _linear(cfg, rngs, dim, dim, cfg.out_std)
        self.dropout = Dropout(cfg.dropout_rate)

    def __call__(
        self,
        x: jax.Array,
        positions: jax.Array,
        mask: jax.Array,
        *,
        cache: KVCache | None = None,
        column=0,
        train: bool = False,
        rngs: nnx.Rngs | None = None,
    ) -> tuple[jax.Array, KVCache | None]:
        """x: (batch, time, dim); positions: (batch, time); mask: (batch, time, keys), True
        where a query may attend a key. With a cache, the new keys and values are written
        at columns column..column+time-1 and the queries attend over the cache's first
        `keys` columns."""
        batch, time, dim = x.shape
        head_dim = dim // self.num_heads
        qkv = dense(self.qkv, x).reshape(batch, time, 3, self.num_heads, head_dim)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # (batch, time, heads, head_dim)
        if self.use_rope:
            q, k = rope(q, positions), rope(k, positions)
        if self.qk_norm:
            q, k = rms_normalize(q), rms_normalize(k)
        if cache is None and self.fused:
            # cuDNN's flash attention on NVIDIA GPUs (bfloat16), XLA's elsewhere; the mask of
            # a full pass is causal. No dropout on the attention weights here.
            y = jax.nn.dot_product_attention(q, k, v, is_causal=True).reshape(batch, time, dim)
            return self.dropout(dense(self.out, y), deterministic=not train, rngs=rngs), None
        # Heads first, (batch, heads, time, head_dim): the layout XLA's batched matmuls read
        # without a transpose, which matters most for the cache, read at every decoding step.
        q, k, v = (a.transpose(0, 2, 1, 3) for a in (q, k, v))
        attend = functools.partial(self._attend, train=train, rngs=rngs)
        if cache is not None:
            cache = cache.write(k, v, column)
            y = self._attend_cached(q, mask, cache)
        elif time > QUERY_BLOCK:
            # Causal: the queries in [start, end) see keys before end only. Skipping the rest
            # saves a quarter of the attention work at time 256 (docs/performance.md).
            blocks = []
            for start in range(0, time, QUERY_BLOCK):
                end = min(start + QUERY_BLOCK, time)
                blocks.append(
                    attend(
                        q[:, :, start:end],
                        [k[:, :, :end]],
                        [v[:, :, :end]],
                        [mask[:, start:end, :end]],
                    )
                )
            y = jnp.concatenate(blocks, axis=2)
        else:
            y = attend(q, [k], [v], [mask])
        y = y.transpose(0, 2, 1, 3).reshape(batch, time, dim)
        return self.dropout(dense(self.out, y), deterministic=not train, rngs=rngs), cache

    def _attend_cached(self, q: jax.Array, mask: jax.Array, cache: KVCache) -> jax.Array:
        """Attention of q (batch, heads, time, head_dim) over the cache, its new keys and
        values already written, where `mask` (batch, time, visible) allows: the blocks that
        hold the first `visible` columns are read, the rest are not. Writing first keeps the
        cache updates in place.

        A row's numbers do not depend on `visible` (nor on its neighbours, who set it): the
        maximum over the blocks is exact whatever their number, a masked score's exponential
        is exactly 0, and the row sums and value products are reduced per block and added in
        block order, so the blocks after a row's window add exactly 0."""
        head_dim = q.shape[-1]
        low = jnp.finfo(jnp.float32).min
        scores, offset = [], 0
        for keys in cache.k:
            if offset >= mask.shape[-1]:
                break
            m = mask[:, None, :, offset : offset + keys.shape[2]]
            s = jnp.einsum("bhqd,bhkd->bhqk", q, keys).astype(jnp.float32)
            scores.append(jnp.where(m, s / math.sqrt(head_dim), low))
            offset += keys.shape[2]
        top = functools.reduce(jnp.maximum, [jnp.max(s, axis=-1, keepdims=True) for s in scores])
        weights = [jnp.exp(s - top) for s in scores]
        total = functools.reduce(jnp.add, [jnp.sum(e, axis=-1, keepdims=True) for e in weights])
        out = functools.reduce(
            jnp.add,
            [
                jnp.einsum("bhqk,bhkd->bhqd", e.astype(v.dtype), v).astype(jnp.float32)
                for e, v in zip(weights, cache.v, strict=False)
            ],
        )
        return (out / total).astype(q.dtype)

    def _attend(self, q, keys, values, masks, *, train: bool, rngs: nnx.Rngs | None) -> jax.Array:
        """Softmax attention of q (batch, heads, queries, head_dim) over groups of keys and
        values (batch, heads, keys, head_dim), each where its mask (batch, queries, keys)
        allows, with one softmax over all groups."""
        scores = jnp.concatenate(
            [
                jnp.where(
                    m[:, None],
                    jnp.einsum("bhqd,bhkd->bhqk", q, k).astype(jnp.float32),
                    jnp.finfo(jnp.float32).min,
                )
                for k, m in zip(keys, masks, strict=True)
            ],
            axis=-1,
        )
        weights = jax.nn.softmax(scores / math.sqrt(q.shape[-1]), axis=-1)
        weights = self.dropout(weights.astype(q.dtype), deterministic=not train, rngs=rngs)
        y, start = 0, 0
        for v in values:
            y += jnp.einsum("bhqk,bhkd->bhqd", weights[..., start : start + v.shape[2]], v)
            start += v.shape[2]
        return y


class FeedForward(nnx.Module):
    def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
        self.up = _linear(cfg, rngs, cfg.embedding_dim, cfg.hidden_dim, INIT_STD)
        self.down = _linear(cfg, rngs, cfg.hidden_dim, cfg.embedding_dim, cfg.out_std)
        self.dropout = Dropout(cfg.dropout_rate)
        self.squared_relu = cfg.activation == "relu2"

    def __call__(self, x: jax.Array, *, train: bool, rngs: nnx.Rngs | None) -> jax.Array:
        h = dense(self.up, x)
        h = jnp.square(jax.nn.relu(h)) if self.squared_relu else jax.nn.gelu(h, approximate=True)
        y = dense(self.down, h)
        return self.dropout(y, deterministic=not train, rngs=rngs)


class Block(nnx.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
        self.attn_norm = make_norm(cfg, rngs)
        self.attn = CausalSelfAttention(cfg, rngs=rngs)
        self.mlp_norm = make_norm(cfg, rngs)
        self.mlp = FeedForward(cfg, rngs=rngs)

    def __call__(
        self,
        x: jax.Array,
        positions: jax.Array,
        mask: jax.Array,
        *,
        cache: KVCache | None = None,
        column=0,
        train: bool = False,
        rngs: nnx.Rngs | None = None,
    ) -> tuple[jax.Array, KVCache | None]:
        y, cache = self.attn(
            self.attn_norm(x), positions, mask, cache=cache, column=column, train=train, rngs=rngs
        )
        x = x + y
        return x + self.mlp(self.mlp_norm(x), train=train, rngs=rngs), cache


class Transformer(nnx.Module):
    """Decoder-only GPT over characters."""

    def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        # Embeddings, the residual stream and the tied output head stay in param_dtype; the
        # blocks' matmuls run in `dtype`.
        embed = functools.partial(
            nnx.Embed, embedding_init=_normal(), param_dtype=cfg.param_dtype, rngs=rngs
        )
        self.embed = embed(cfg.vocab_size, cfg.embedding_dim)
        # Zero at first, so the model starts as it would without it.
        self.bigram = (
            embed((cfg.vocab_size + 1) * cfg.vocab_size, cfg.embedding_dim,
                  embedding_init=nnx.initializers.zeros)
            if cfg.bigram_embedding else None
        )  # fmt: skip
        learned = cfg.position == "learned"
        self.pos_embed = embed(cfg.context_length, cfg.embedding_dim) if learned else None
        self.dropout = Dropout(cfg.dropout_rate)
        self.blocks = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.num_layers)])
        self.final_norm = make_norm(cfg, rngs)
        # An own output matrix (`tie_embeddings` False) computes in param_dtype too.
        head_init = _normal(0.0 if cfg.zero_init else INIT_STD)
        self.head = (
            None
            if cfg.tie_embeddings
            else nnx.Linear(
                cfg.embedding_dim,
                cfg.vocab_size,
                use_bias=False,
                kernel_init=head_init,
                param_dtype=cfg.param_dtype,
                rngs=rngs,
            )
        )

    def __call__(
        self, tokens: jax.Array, *, train: bool = False, rngs: nnx.Rngs | None = None
    ) -> jax.Array:
        time = tokens.shape[1]
        if time > self.cfg.context_length:
            raise ValueError(
                f"sequence of length {time} exceeds the model's context {self.cfg.context_length}"
            )
        positions = jnp.arange(time)[None]
        mask = jnp.tril(jnp.ones((1, time, time), dtype=bool))
        logits, _ = self._forward(tokens, positions, mask, None, 0, train=train, rngs=rngs)
        return logits

    def init_cache(self, batch: int, context_length: int) -> TransformerCache:
        """An empty cache of `context_length` columns (at most the model's context length)."""
        heads, head_dim = self.cfg.num_heads, self.cfg.head_dim
        layers = [KVCache.zeros(batch, heads, context_length, head_dim) for _ in self.blocks]
        tokens = jnp.zeros((batch, context_length), jnp.int32) if self.bigram is not None else None
        return TransformerCache(layers, tokens)

    def forward_cached(
        self,
        tokens: jax.Array,
        positions: jax.Array,
        mask: jax.Array,
        cache: TransformerCache,
        column,
    ) -> tuple[jax.Array, TransformerCache]:
        """Runs `tokens` (batch, time), placed at cache columns column..column+time-1
        (`column`: one index, or one per row), at the given `positions` (batch, time),
        attending where `mask` (batch, time, visible) is True (`CachedDecoder`)."""
        return self._forward(tokens, positions, mask, cache, column, train=False, rngs=None)

    def _forward(self, tokens, positions, mask, cache, column, *, train, rngs):
        x = self.embed(tokens)
        if self.bigram is not None:
            none_id = self.cfg.vocab_size
            first = (
                jnp.full(tokens.shape[:1], none_id)
                if cache is None
                else cache.previous_token(column, none_id)
            )
            x = x + self.bigram(bigram_ids(tokens, first, self.cfg.vocab_size))
        if self.pos_embed is not None:
            x = x + self.pos_embed(positions)
        x = self.dropout(x, deterministic=not train, rngs=rngs)
        layers = [None] * len(self.blocks) if cache is None else cache.layers

        def run_block(block, x, layer_cache, rngs):
            return block(
                x, positions, mask, cache=layer_cache, column=column, train=train, rngs=rngs
            )

        if self.cfg.remat and train:  # recompute each block's activations in the backward pass
            run_block = nnx.remat(run_block)
        new_layers = []
        for block, layer_cache in zip(self.blocks, layers, strict=True):
            x, layer_cache = run_block(block, x, layer_cache, rngs)
            new_layers.append(layer_cache)
        x = self.final_norm(x).reshape(-1, x.shape[-1])  # 2-D for a fast matmul, as in dense()
        logits = self.embed.attend(x) if self.head is None else self.head(x)
        if self.cfg.logit_softcap:
            logits = self.cfg.logit_softcap * jnp.tanh(logits / self.cfg.logit_softcap)
        if cache is not None:
            written = cache.tokens
            if written is not None:
                written = write_columns(written, tokens.astype(written.dtype), column, axis=1)
            cache = TransformerCache(new_layers, written)
        return logits.reshape(*tokens.shape, -1), cache


def model_config(
    config: ml_collections.ConfigDict, vocab_size: int
) -> TransformerConfig | MLPConfig:
    """The dataclass of the model `config.model` describes: its fields, with the dataclass's
    defaults for the ones it lacks (a run saved before a field existed), the vocabulary and
    `config.data.context_length`. Raises UserError naming the first bad field."""
    fields = dict(config.model)
    name = fields.pop("name", None)
    if name not in CONFIG_CLASSES:
        raise UserError(f"unknown model.name {name!r}: expected one of {tuple(CONFIG_CLASSES)}")
    cls = CONFIG_CLASSES[name]
    known = [f.name for f in section_fields(cls)]
    unknown = [key for key in fields if key not in known]
    if unknown:
        raise UserError(f"model.{unknown[0]} is not a field of the {name} model: {known}")
    for key in [k for k in DTYPE_FIELDS if k in fields]:
        try:
            fields[key] = jnp.dtype(fields[key])
        except TypeError as e:
            raise UserError(f"bad model.{key}: {e}") from None
    data = {"vocab_size": vocab_size, "context_length": config.data.context_length}
    fields.update({f.name: data[f.name] for f in dataclasses.fields(cls) if f.name in data})
    return cls(**fields)


def check_config(config: ml_collections.ConfigDict) -> None:
    """Raises UserError naming the first `config.model` field no model can be built from
    (nothing is read: the checks do not depend on the vocabulary)."""
    model_config(config, vocab_size=1)


def create_model(config: ml_collections.ConfigDict, vocab_size: int, rngs: nnx.Rngs) -> nnx.Module:
    """Builds the model named by `config.model.name` (see `model_config`)."""
    cfg = model_config(config, vocab_size)
    return (
        Transformer(cfg, rngs=rngs) if isinstance(cfg, TransformerConfig) else MLP(cfg, rngs=rngs)
    )


def abstract_model(config: ml_collections.ConfigDict, vocab_size: int) -> nnx.Module:
    """The configured model with shapes and dtypes but no weights (nothing is computed)."""
    return nnx.eval_shape(lambda: create_model(config, vocab_size, nnx.Rngs(0)))


def count_params(model: nnx.Module | nnx.State) -> int:
    """The number of parameters of a model or of its state (abstract ones count too)."""
    state = nnx.state(model, nnx.Param) if isinstance(model, nnx.Module) else model
    return sum(math.prod(x.shape) for x in jax.tree.leaves(state))
