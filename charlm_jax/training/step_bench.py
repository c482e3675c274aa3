"""A config's train step compiled ahead of time on tiny Shakespeare, with the state it runs
on: what the benchmark and the profiler time and the parallelism tests compare. (Training
builds its own step in `training/train.py`, from its own data and workdir.)"""

from __future__ import annotations

import dataclasses
import time

import jax
import ml_collections
from flax import nnx

from charlm_jax.data.text_files import embedded_tiny_shakespeare
from charlm_jax.data.tokenizers import CharTokenizer
from charlm_jax.training import parallel, train


@dataclasses.dataclass
class CompiledStep:
    """The compiled step and its arguments; `advance` runs it and keeps the new state."""

    compiled: jax.stages.Compiled
    model_def: nnx.GraphDef
    model_state: nnx.State
    opt_state: nnx.State
    tokens: jax.Array  # the whole text, on every device: the step draws its batch from it
    key: jax.Array
    num_steps: jax.Array  # the run length the learning-rate schedule spans
    tokenizer: CharTokenizer
    compile_s: float

    def advance(self):
        """One train step (the batch drawn from the same key each time); its metrics."""
        self.model_state, self.opt_state, metrics = self.compiled(
            self.model_state, self.opt_state, self.tokens, self.key, self.num_steps
        )
        return metrics


def compile_step(config: ml_collections.ConfigDict, text: str | None = None) -> CompiledStep:
    """`config`'s train step on the visible devices, compiled for a character tokenizer of
    `text` (default: the embedded tiny Shakespeare) with the text's tokens on the devices."""
    if text is None:
        text = embedded_tiny_shakespeare().read_text(encoding="utf-8")
    tokenizer = CharTokenizer.from_text(text)
    mesh = parallel.make_mesh()
    parallel.check_batch_size(config.train.batch_size, mesh)
    step, model_def, model_state, opt_state, _ = train.build_training(
        config, tokenizer.vocab_size, mesh
    )
    tokens = parallel.put_replicated(tokenizer.encode(text), mesh)
    key, num_steps = jax.random.key(0), jax.numpy.int32(config.train.num_steps)
    start = time.perf_counter()
    compiled = step.lower(model_state, opt_state, tokens, key, num_steps).compile()
    compile_s = time.perf_counter() - start
    return CompiledStep(
        compiled, model_def, model_state, opt_state, tokens, key, num_steps, tokenizer, compile_s
    )
