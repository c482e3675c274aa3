"""Where a decode step's time goes: the engine's step with every slot's window short (one
64-column cache block read per layer) and long (four blocks), next to the step's dense
matmuls alone and to plain attention over three cache blocks per layer (one query per row:
q·K, softmax, weights·V), each jitted at the same batch. Random weights.

    python experiments/profile_decode.py [--preset=nanogpt] [--slots=64] [--hlo_only]

It first counts, in the compiled decode call's HLO text, the `conditional`s (branches) and
` copy(` instructions (buffers copied), at the shortest and the longest windows.

The difference between the two engine rows is the attention over three more cache blocks;
what the short row spends beyond the matmuls is the rest of the step (one block of
attention, norms, sampling, the cache writes).
"""

import runpy
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx

from charlm_jax import cli
from charlm_jax.decoding.engine import STEPS_PER_CALL, Engine, Request
from charlm_jax.model import models
from charlm_jax.model.models import KV_BLOCK

flags.DEFINE_string("preset", "nanogpt", "A configs/transformer.py preset.")
flags.DEFINE_integer("slots", 64, "Engine slots (the decode batch).")
flags.DEFINE_bool("hlo_only", False, "Only count the decode call's branches and copies.")
flags.DEFINE_integer("repeats", 30, "Timed calls of the matmuls (minimum and median shown).")
FLAGS = flags.FLAGS
HLO_PATTERNS = {"conditional": " conditional(", "copy": " copy("}
CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "transformer.py"


def _timed_ms(fn, *args) -> list[float]:
    """Milliseconds of each of --repeats calls of the jitted `fn(*args)`, after one (its
    compilation)."""
    fn(*args).block_until_ready()
    times = []
    for _ in range(FLAGS.repeats):
        start = time.perf_counter()
        fn(*args).block_until_ready()
        times.append(1e3 * (time.perf_counter() - start))
    return times


def dense_ms(config, rows: int) -> tuple[float, float]:
    """(min, median) ms of one step's dense matmuls: each block's qkv, out, up and down
    projections of `rows` rows, and the output head."""
    m = config.model
    d, h = m.embedding_dim, m.hidden_dim
    shapes = [(d, 3 * d), (d, d), (d, h), (h, d)] * m.num_layers + [(d, 65)]
    weights = [0.02 * jax.random.normal(jax.random.key(i), s) for i, s in enumerate(shapes)]

    @jax.jit
    def matmuls(x, w):
        for i in range(m.num_layers):
            qkv, out, up, down = w[4 * i : 4 * i + 4]
            x = x + (x @ qkv)[:, :d] + x @ out + jax.nn.relu(x @ up) @ down
        return x @ w[-1]

    times = _timed_ms(matmuls, jax.random.normal(jax.random.key(0), (rows, d)), weights)
    return min(times), statistics.median(times)


def attention_ms(config, rows: int, blocks: int = 3) -> float:
    """Min ms of plain attention of one query per row and head over `blocks` cache blocks of
    keys and values in every layer: what the engine's further blocks read, by itself."""
    m = config.model
    heads, head_dim = m.num_heads, m.embedding_dim // m.num_heads
    shape = (rows, heads, KV_BLOCK, head_dim)
    kv = [jax.random.normal(jax.random.key(i), shape) for i in range(2 * m.num_layers * blocks)]
    q = jax.random.normal(jax.random.key(0), (rows, heads, 1, head_dim))

    @jax.jit
    def attend(q, kv):
        out = 0.0
        for k, v in zip(kv[::2], kv[1::2], strict=True):
            weights = jax.nn.softmax(jnp.einsum("bhqd,bhkd->bhqk", q, k), axis=-1)
            out = out + jnp.einsum("bhqk,bhkd->bhqd", weights, v)
        return out

    return min(_timed_ms(attend, q, kv))


def engine_ms(model, context: int, slots: int, prompt_length: int) -> float:
    """ms per token step of the engine's decode call, every slot holding `prompt_length`
    tokens (the best of two calls of `steps_per_call` tokens)."""
    engine = Engine(model, context, num_slots=slots)
    engine.warm_up()
    rng = np.random.default_rng(0)
    for i in range(slots):
        prompt = rng.integers(0, engine.vocab_size, prompt_length).astype(np.int32)
        engine.insert(Request(prompt, 3 * engine.steps_per_call, seed=i))
    engine.step()  # the prefills, and the first call
    times = []
    for _ in range(2):
        start = time.perf_counter()
        engine.step()
        times.append(1e3 * (time.perf_counter() - start) / engine.steps_per_call)
    return min(times)


def hlo_counts(engine: Engine, columns: int) -> dict[str, int]:
    """How many `conditional`s and ` copy(`s the engine's compiled decode call holds when
    its windows reach `columns` cache columns."""
    text = engine.compiled_step(columns).as_text()
    return {name: text.count(pattern) for name, pattern in HLO_PATTERNS.items()}


def main(argv: list[str]) -> None:
    cli.start(argv)
    config = runpy.run_path(str(CONFIGS))["get_config"](FLAGS.preset)
    config.model.dropout_rate = 0.0
    context = config.data.context_length
    model = models.create_model(config, 65, nnx.Rngs(0))
    engine = Engine(model, context, num_slots=FLAGS.slots)
    for columns in sorted({KV_BLOCK, context}):
        print(f"decode call HLO, windows within {columns} columns: {hlo_counts(engine, columns)}")
    if FLAGS.hlo_only:
        return
    low, median = dense_ms(config, FLAGS.slots)
    print(f"dense matmuls alone, {FLAGS.slots} rows: {low:.1f} ms (median {median:.1f})")
    ms = attention_ms(config, FLAGS.slots)
    print(f"plain attention over 3 cache blocks per layer, {FLAGS.slots} rows: {ms:.1f} ms")
    # The long windows end in the last block and do not fill up within the 3 calls.
    long_prompt = max(1, context - KV_BLOCK)
    for length in sorted({1, long_prompt}):
        blocks = -(-(length + 3 * STEPS_PER_CALL) // KV_BLOCK)
        ms = engine_ms(model, context, FLAGS.slots, length)
        print(f"engine, {FLAGS.slots} slots, prompts of {length} (up to {blocks} cache blocks "
              f"read): {ms:.1f} ms per token step")  # fmt: skip


if __name__ == "__main__":
    app.run(main)
