"""Character-level language models as Flax NNX modules.

Both map int32 tokens of shape (batch, time) to logits of shape (batch, time, vocab), and the
logits at position t depend only on tokens 0..t.

- `MLP`: Bengio et al. (2003) / makemore. Each position sees the embeddings of the last
  `context_size` characters (itself included), concatenated, through tanh hidden layers.
- `Transformer`: a decoder-only GPT (nanoGPT's layout): token (+ learned position)
  embeddings, pre-norm blocks of causal self-attention and an MLP, a final norm, and an
  output head tied to the token embedding. Positions may instead be rotary (RoPE).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from charlm_jax.errors import UserError

INIT_STD = 0.02  # GPT-2 / nanoGPT initialisation


def _normal(std: float = INIT_STD) -> nnx.Initializer:
    return nnx.initializers.normal(stddev=std)


class MLP(nnx.Module):
    """Bengio-style MLP language model over a fixed window of previous characters."""

    def __init__(
        self,
        vocab_size: int,
        *,
        context_size: int,
        embedding_dim: int,
        hidden_dim: int,
        num_layers: int,
        dropout_rate: float,
        rngs: nnx.Rngs,
    ):
        self.context_size = context_size
        self.pad_id = vocab_size  # an extra embedding row for positions before the text
        self.embed = nnx.Embed(vocab_size + 1, embedding_dim, rngs=rngs)
        widths = [context_size * embedding_dim] + [hidden_dim] * num_layers
        self.hidden = nnx.List(
            [nnx.Linear(i, o, rngs=rngs) for i, o in zip(widths[:-1], widths[1:], strict=True)]
        )
        self.dropout = nnx.Dropout(dropout_rate)
        self.head = nnx.Linear(widths[-1], vocab_size, rngs=rngs)

    def __call__(
        self, tokens: jax.Array, *, train: bool = False, rngs: nnx.Rngs | None = None
    ) -> jax.Array:
        batch, time = tokens.shape
        c = self.context_size
        padded = jnp.pad(tokens, ((0, 0), (c - 1, 0)), constant_values=self.pad_id)
        # windows[:, t, k] is the token at position t - (c - 1) + k.
        windows = jnp.stack([padded[:, k : k + time] for k in range(c)], axis=-1)
        x = self.embed(windows).reshape(batch * time, -1)
        for layer in self.hidden:
            x = self.dropout(jnp.tanh(layer(x)), deterministic=not train, rngs=rngs)
        return self.head(x).reshape(batch, time, -1)


def rope(x: jax.Array, positions: jax.Array, base: float = 10000.0) -> jax.Array:
    """Rotary position embedding of x (batch, time, heads, head_dim) at `positions` (time,)."""
    half = x.shape[-1] // 2
    freqs = base ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angles = positions.astype(jnp.float32)[:, None] * freqs  # (time, half)
    cos, sin = jnp.cos(angles)[:, None, :], jnp.sin(angles)[:, None, :]
    x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
    return jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1).astype(x.dtype)


def make_norm(kind: str, dim: int, use_bias: bool, rngs: nnx.Rngs) -> nnx.Module:
    if kind == "layernorm":
        return nnx.LayerNorm(dim, epsilon=1e-5, use_bias=use_bias, rngs=rngs)
    if kind == "rmsnorm":
        return nnx.RMSNorm(dim, epsilon=1e-5, rngs=rngs)
    raise UserError(f"unknown model.norm {kind!r}: expected 'layernorm' or 'rmsnorm'")


def dense(layer: nnx.Linear, x: jax.Array) -> jax.Array:
    """Applies `layer` to x (..., features) as one 2-D matmul.

    Flattening first makes the weight gradient a plain (features, n) x (n, out) matmul; over
    3-D activations XLA:CPU contracts two dimensions at once, about 2x slower.
    """
    return layer(x.reshape(-1, x.shape[-1])).reshape(*x.shape[:-1], -1)


class CausalSelfAttention(nnx.Module):
    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        use_rope: bool,
        use_bias: bool,
        dropout_rate: float,
        out_std: float,
        rngs: nnx.Rngs,
    ):
        if dim % num_heads:
            raise UserError(f"model.embedding_dim={dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.use_rope = use_rope
        self.qkv = nnx.Linear(dim, 3 * dim, use_bias=use_bias, kernel_init=_normal(), rngs=rngs)
        self.out = nnx.Linear(dim, dim, use_bias=use_bias, kernel_init=_normal(out_std), rngs=rngs)
        self.dropout = nnx.Dropout(dropout_rate)

    def __call__(
        self, x: jax.Array, positions: jax.Array, *, train: bool, rngs: nnx.Rngs | None
    ) -> jax.Array:
        batch, time, dim = x.shape
        head_dim = dim // self.num_heads
        qkv = dense(self.qkv, x).reshape(batch, time, 3, self.num_heads, head_dim)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # (batch, time, heads, head_dim)
        if self.use_rope:
            q, k = rope(q, positions), rope(k, positions)
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) / math.sqrt(head_dim)
        causal = jnp.tril(jnp.ones((time, time), dtype=bool))
        scores = jnp.where(causal, scores, jnp.finfo(jnp.float32).min)
        weights = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        weights = self.dropout(weights, deterministic=not train, rngs=rngs)
        y = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(batch, time, dim)
        return self.dropout(dense(self.out, y), deterministic=not train, rngs=rngs)


class FeedForward(nnx.Module):
    def __init__(
        self,
        dim: int,
        hidden_dim: int,
        *,
        use_bias: bool,
        dropout_rate: float,
        out_std: float,
        rngs: nnx.Rngs,
    ):
        self.up = nnx.Linear(dim, hidden_dim, use_bias=use_bias, kernel_init=_normal(), rngs=rngs)
        self.down = nnx.Linear(
            hidden_dim, dim, use_bias=use_bias, kernel_init=_normal(out_std), rngs=rngs
        )
        self.dropout = nnx.Dropout(dropout_rate)

    def __call__(self, x: jax.Array, *, train: bool, rngs: nnx.Rngs | None) -> jax.Array:
        y = dense(self.down, jax.nn.gelu(dense(self.up, x), approximate=True))
        return self.dropout(y, deterministic=not train, rngs=rngs)


class Block(nnx.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(
        self,
        dim: int,
        hidden_dim: int,
        num_heads: int,
        *,
        norm: str,
        use_rope: bool,
        use_bias: bool,
        dropout_rate: float,
        out_std: float,
        rngs: nnx.Rngs,
    ):
        self.attn_norm = make_norm(norm, dim, use_bias, rngs)
        self.attn = CausalSelfAttention(
            dim,
            num_heads,
            use_rope=use_rope,
            use_bias=use_bias,
            dropout_rate=dropout_rate,
            out_std=out_std,
            rngs=rngs,
        )
        self.mlp_norm = make_norm(norm, dim, use_bias, rngs)
        self.mlp = FeedForward(
            dim,
            hidden_dim,
            use_bias=use_bias,
            dropout_rate=dropout_rate,
            out_std=out_std,
            rngs=rngs,
        )

    def __call__(
        self, x: jax.Array, positions: jax.Array, *, train: bool, rngs: nnx.Rngs | None
    ) -> jax.Array:
        x = x + self.attn(self.attn_norm(x), positions, train=train, rngs=rngs)
        return x + self.mlp(self.mlp_norm(x), train=train, rngs=rngs)


class Transformer(nnx.Module):
    """Decoder-only GPT over characters."""

    def __init__(
        self,
        vocab_size: int,
        *,
        max_length: int,
        embedding_dim: int,
        hidden_dim: int,
        num_layers: int,
        num_heads: int,
        dropout_rate: float,
        position: str,
        norm: str,
        use_bias: bool,
        rngs: nnx.Rngs,
    ):
        if position not in ("learned", "rope"):
            raise UserError(f"unknown model.position {position!r}: expected 'learned' or 'rope'")
        self.max_length = max_length
        self.embed = nnx.Embed(vocab_size, embedding_dim, embedding_init=_normal(), rngs=rngs)
        self.pos_embed = (
            nnx.Embed(max_length, embedding_dim, embedding_init=_normal(), rngs=rngs)
            if position == "learned"
            else None
        )
        self.dropout = nnx.Dropout(dropout_rate)
        out_std = INIT_STD / math.sqrt(2 * num_layers)  # scaled residual projections (GPT-2)
        self.blocks = nnx.List(
            [
                Block(
                    embedding_dim,
                    hidden_dim,
                    num_heads,
                    norm=norm,
                    use_rope=position == "rope",
                    use_bias=use_bias,
                    dropout_rate=dropout_rate,
                    out_std=out_std,
                    rngs=rngs,
                )
                for _ in range(num_layers)
            ]
        )
        self.final_norm = make_norm(norm, embedding_dim, use_bias, rngs)

    def __call__(
        self, tokens: jax.Array, *, train: bool = False, rngs: nnx.Rngs | None = None
    ) -> jax.Array:
        time = tokens.shape[1]
        if time > self.max_length:
            raise ValueError(
                f"sequence of length {time} exceeds the model's context {self.max_length}"
            )
        positions = jnp.arange(time)
        x = self.embed(tokens)
        if self.pos_embed is not None:
            x = x + self.pos_embed(positions)
        x = self.dropout(x, deterministic=not train, rngs=rngs)
        for block in self.blocks:
            x = block(x, positions, train=train, rngs=rngs)
        x = self.final_norm(x).reshape(-1, x.shape[-1])  # 2-D for a fast matmul, as in dense()
        return self.embed.attend(x).reshape(*tokens.shape, -1)


def create_model(config: ml_collections.ConfigDict, vocab_size: int, rngs: nnx.Rngs) -> nnx.Module:
    """Builds the model named by `config.model.name` (the context length is
    `config.data.sequence_length`)."""
    m = config.model
    if m.name == "transformer":
        return Transformer(
            vocab_size,
            max_length=config.data.sequence_length,
            embedding_dim=m.embedding_dim,
            hidden_dim=m.hidden_dim,
            num_layers=m.num_layers,
            num_heads=m.num_heads,
            dropout_rate=m.dropout_rate,
            position=m.position,
            norm=m.norm,
            use_bias=m.use_bias,
            rngs=rngs,
        )
    if m.name == "mlp":
        return MLP(
            vocab_size,
            context_size=m.context_size,
            embedding_dim=m.embedding_dim,
            hidden_dim=m.hidden_dim,
            num_layers=m.num_layers,
            dropout_rate=m.dropout_rate,
            rngs=rngs,
        )
    raise UserError(f"unknown model.name {m.name!r}: expected 'transformer' or 'mlp'")
