"""Counter-based pseudo-random bits: a hash of each element's index under a 64-bit seed.

Elementwise integer work that XLA fuses into the consumer and splits across devices like any
other elementwise op, where threefry (`jax.random`) is a chain of separate ops; the dropout
masks and the sampling noise use it (docs/performance.md measures the difference). Good
enough for those, not for cryptography; the same seed gives the same bits on any device
layout.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def _mix(x: jax.Array) -> jax.Array:
    """MurmurHash3's 32-bit finalizer: a bijection that scrambles every bit of x."""
    x ^= x >> 16
    x *= jnp.uint32(0x85EBCA6B)
    x ^= x >> 13
    x *= jnp.uint32(0xC2B2AE35)
    return x ^ (x >> 16)


def hashed_bits(seed: jax.Array, shape: tuple[int, ...], offset: jax.Array | int = 0) -> jax.Array:
    """Pseudo-random uint32 bits of `shape`: each element's flat index, plus `offset`, hashed
    with a 64-bit `seed` (two uint32)."""
    index = jnp.full(shape, offset, jnp.uint32)
    for axis in range(len(shape)):
        stride = jnp.uint32(math.prod(shape[axis + 1 :]) % 2**32)
        index += jax.lax.broadcasted_iota(jnp.uint32, shape, axis) * stride
    return _mix(_mix(index ^ seed[0]) ^ seed[1])


def hash_seed(key: jax.Array) -> jax.Array:
    """The 64-bit seed of `hashed_bits` (two uint32), drawn from a JAX PRNG key."""
    return jax.random.bits(key, (2,), jnp.uint32)


def hashed_uniform_bits(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """`hashed_bits` of `shape` with a seed drawn from `key`."""
    return hashed_bits(hash_seed(key), shape)
