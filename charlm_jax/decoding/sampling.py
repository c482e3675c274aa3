"""Sampling text from a trained model: `Sampler`, text in and text out.

Every decoder here runs on the decode engine (charlm_jax/decoding/engine.py): each prompt is
one request in a slot, with the engine's context policy (when a text fills the model's
context, its oldest half is dropped and the cache rebuilt from the rest) and token choice;
beam search (charlm_jax/decoding/beam.py) runs its beams as rows of the engine's cache with
the same policy. Row i of a call with `seed` s is the request with seed s + i * 2**32, so the
same seed gives the same texts and a row's text does not depend on the others in its call.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
from flax import nnx

from charlm_jax.data.tokenizers import Tokenizer
from charlm_jax.decoding import beam
from charlm_jax.decoding.engine import STEPS_PER_CALL, Engine, Request, check_sampling_args
from charlm_jax.errors import UserError
from charlm_jax.model import scoring
from charlm_jax.workdir.loader import open_run

STREAM_CHUNK = 16  # tokens per chunk when the generate CLI streams
MAX_SLOTS = 64  # the most rows a Sampler decodes at once; more prompts wait for a slot


class Sampler:
    """Generates text from a trained model.

        sampler = Sampler.from_workdir("runs/default", checkpoint="best")
        sampler.generate(["ROMEO:", "JULIET:"], max_new_tokens=200, temperature=0.8)

    `sampler.model` is the NNX module (`model(tokens)` gives logits) and `sampler.tokenizer`
    its tokenizer.
    """

    def __init__(self, model: nnx.Module, tokenizer: Tokenizer, context_length: int):
        self.model = model
        self.tokenizer = tokenizer
        self.context_length = context_length
        graphdef, self._state = nnx.split(model)
        self._start_id = int(tokenizer.encode("\n")[0]) if "\n" in tokenizer.chars else 0
        self._engines: dict[tuple[int, int], Engine] = {}

    @classmethod
    def from_workdir(
        cls, workdir: str | Path, checkpoint: str | int = "best", quantize: str = "none"
    ) -> Sampler:
        """Loads a trained workdir (`open_run`); `checkpoint` is "best", "latest" or a step
        number; `quantize` "int8" runs the dense layers as int8 dots (model/int8.py)."""
        run = open_run(workdir, checkpoint, quantize)
        return cls(run.model, run.tokenizer, run.context_length)

    def engine(self, rows: int, steps_per_call: int | None = None) -> Engine:
        """The engine this Sampler decodes `rows` prompts with: min(MAX_SLOTS, the next power
        of two) slots (one engine, compiled once, per size). A quantized model's engines of
        fewer than `int8.MIN_ROWS` slots decode with its float32 copy, faster there (the
        engine's rule when not warmed up)."""
        slots = min(MAX_SLOTS, 1 << max(rows - 1, 0).bit_length())
        key = (slots, steps_per_call or STEPS_PER_CALL)
        if key not in self._engines:
            self._engines[key] = Engine(self.model, self.context_length, *key)
        return self._engines[key]

    def _prompt_ids(self, prompt: str) -> np.ndarray:
        return self.tokenizer.encode(prompt) if prompt else np.array([self._start_id])

    def stream(
        self,
        prompts: Sequence[str],
        max_new_tokens: int = 200,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int = 0,
        chunk: int | None = None,
    ) -> Iterator[list[str]]:
        """Yields the new text of each row (the continuations only) as the engine produces
        it; with `chunk`, in pieces of exactly `chunk` tokens per row (the last shorter)."""
        check_sampling_args(temperature, top_k, top_p, max_new_tokens)
        if not prompts or not max_new_tokens:
            return
        requests = [
            Request(
                self._prompt_ids(p), max_new_tokens, temperature, top_k, top_p, seed + i * 2**32
            )
            for i, p in enumerate(prompts)
        ]
        ids: list[list[int]] = [[] for _ in prompts]  # produced, not yet yielded
        left = max_new_tokens  # tokens per row not yet yielded, with `chunk`
        for outputs in self.engine(len(prompts), chunk).generate(requests):
            for i, out in outputs:
                ids[i] += out.tokens.tolist()
            if chunk is None:
                yield [self.tokenizer.decode(row) for row in ids]
                ids = [[] for _ in prompts]
            # A chunk goes out once every row has it (rows pause at different steps to
            # rebuild their caches).
            while chunk and left and min(map(len, ids)) >= min(chunk, left):
                n = min(chunk, left)
                yield [self.tokenizer.decode(row[:n]) for row in ids]
                ids, left = [row[n:] for row in ids], left - n

    def generate(
        self,
        prompts: Sequence[str],
        max_new_tokens: int = 200,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int = 0,
        stop: str | None = None,
        beam_size: int = 1,
    ) -> list[str]:
        """Returns each prompt's continuation (without the prompt), cut before `stop`.

        Sampling defaults: temperature 1, no top-k (0), no top-p (1). With `beam_size` > 1,
        beam search returns the most probable continuation of `max_new_tokens` tokens;
        it takes no sampling options.
        """
        if beam_size > 1:
            if (temperature, top_k, top_p) != (None, None, None):
                raise UserError("beam_size > 1 is deterministic: drop temperature, top_k, top_p")
            texts = [self.beam_search(p, beam_size, max_new_tokens) for p in prompts]
        else:
            if beam_size < 1:
                raise UserError(f"beam_size must be >= 1, got {beam_size}")
            texts = ["" for _ in prompts]
            options = (
                1.0 if temperature is None else temperature,
                0 if top_k is None else top_k,
                1.0 if top_p is None else top_p,
            )
            for pieces in self.stream(prompts, max_new_tokens, *options, seed=seed):
                texts = [t + p for t, p in zip(texts, pieces, strict=True)]
        if stop:
            texts = [t.split(stop, 1)[0] for t in texts]
        return texts

    def beam_search(self, prompt: str, beam_size: int, max_new_tokens: int) -> str:
        """The continuation of `max_new_tokens` tokens with the highest total
        log-probability found by a beam of `beam_size`."""
        ids = self._prompt_ids(prompt)
        tokens, _ = beam.search(self.engine(beam_size), ids, beam_size, max_new_tokens)
        return self.tokenizer.decode(tokens)

    def log_probs(self, text: str, stride: int | None = None) -> np.ndarray:
        """Log-probabilities (nats) of each token of `text` after the first, given the
        ones before it, in sliding windows of the model's context (`scoring.score_tokens`:
        `stride` default half the context; the context: back-to-back windows)."""
        ids = self.tokenizer.encode(text)
        return scoring.score_tokens(self.model, ids, self.context_length, stride).log_probs

    def perplexity(self, text: str, stride: int | None = None) -> float:
        """exp of the mean negative log-probability per token of `text` (after the first)."""
        logp = self.log_probs(text, stride)
        if not len(logp):
            raise ValueError("perplexity needs a text of at least 2 tokens")
        return math.exp(-float(logp.mean()))
