"""Decode speed of the KV-cache sampler against the naive loop that reruns the model on the
whole (cropped) context for every new token, as nanoGPT's sampler does; same model, same
machine, the model jitted in both. Weights are random: speed does not depend on them.

    python experiments/benchmark_sampling.py \
        --runs=nanogpt_baby:1,nanogpt_baby:16,small:1,small:16,nanogpt:1 --new_tokens=500
"""

import runpy
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx

from charlm_jax import models
from charlm_jax.sampling import Sampler, SamplingParams, choose_token, row_seeds
from charlm_jax.text_files import embedded_tiny_shakespeare
from charlm_jax.tokenizers import CharTokenizer

flags.DEFINE_list(
    "runs",
    ["nanogpt_baby:1", "nanogpt_baby:16", "small:1", "small:16", "nanogpt:1"],
    "PRESET:BATCH pairs: a Transformer preset and the rows sampled at once.",
)
flags.DEFINE_integer("new_tokens", 500, "Tokens generated per row.")
flags.DEFINE_integer("repeats", 2, "Timed runs per measurement (the median is reported).")
FLAGS = flags.FLAGS

NAIVE_BUCKET = 32


def naive_sampler(model: nnx.Module, context: int):
    """nanoGPT's loop: every new token reruns the model on the whole text so far, cropped to
    its last `context` tokens, from a Python loop. Lengths are rounded up to a multiple of
    NAIVE_BUCKET with padding at the end, which the last real position never attends to, so
    that context / NAIVE_BUCKET compiled shapes serve every step."""
    graphdef, state = nnx.split(model)
    params = SamplingParams(jnp.float32(1.0), jnp.int32(0), jnp.float32(1.0))

    @jax.jit
    def next_tokens(state, window, length, seeds, step):
        logits = nnx.merge(graphdef, state)(window)[:, length - 1]
        return jax.vmap(choose_token, (0, 0, None, None))(logits, seeds, step, params)

    def run(prompt: np.ndarray, num_steps: int) -> np.ndarray:
        tokens, seeds = prompt, row_seeds(jax.random.key(0), len(prompt))
        for i in range(num_steps):
            window = tokens[:, -context:]
            length = window.shape[1]
            padding = -length % NAIVE_BUCKET
            window = np.pad(window, ((0, 0), (0, padding)))
            new = next_tokens(state, window, length, seeds, i)
            tokens = np.concatenate([tokens, np.asarray(new)[:, None]], axis=1)
        return tokens

    return run


def median_seconds(fn) -> float:
    jax.block_until_ready(fn())  # compile
    times = []
    for _ in range(FLAGS.repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv):
    del argv
    tokenizer = CharTokenizer.from_text(embedded_tiny_shakespeare().read_text(encoding="utf-8"))
    print(f"{jax.devices()[0].device_kind}, {FLAGS.new_tokens} new tokens per row\n")
    print("| preset | context | batch | KV cache tok/s | naive tok/s | speed-up |")
    print("|---|---|---|---|---|---|")
    for run in FLAGS.runs:
        preset, batch = run.split(":")
        batch = int(batch)
        config = runpy.run_path("configs/transformer.py")["get_config"](preset)
        context = config.data.sequence_length
        model = models.create_model(config, tokenizer.vocab_size, nnx.Rngs(0))
        sampler, naive = Sampler(model, tokenizer, context), naive_sampler(model, context)
        prompts = [""] * batch  # start from a newline
        cached_s = median_seconds(lambda: sampler.generate(prompts, FLAGS.new_tokens))  # noqa: B023
        prompt = np.zeros((batch, 1), np.int32)
        naive_s = median_seconds(lambda: naive(prompt, FLAGS.new_tokens))  # noqa: B023
        tokens = batch * FLAGS.new_tokens
        print(
            f"| {preset} | {context} | {batch} | {tokens / cached_s:,.0f} | "
            f"{tokens / naive_s:,.0f} | {naive_s / cached_s:.1f}x |",
            flush=True,
        )


if __name__ == "__main__":
    app.run(main)
