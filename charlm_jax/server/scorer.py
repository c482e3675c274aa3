"""Prompt log-probabilities (echo with logprobs), off the event loop and beside the engine:
one worker thread runs the project's text scorer (`model.scoring.score_texts`: sliding
windows of the context) over the weights the engine decodes with, each request's prompts
batched together. Requests queue for the thread; the scheduler's admission bounds their
work (`Scheduler.submit`'s `reserve`)."""

from __future__ import annotations

import concurrent.futures
import functools
import time

import numpy as np
from absl import logging
from flax import nnx

from charlm_jax.decoding import engine
from charlm_jax.model import scoring
from charlm_jax.server.protocol import ApiError
from charlm_jax.server.scheduler import timeout_error


class Scorer:
    """Scores prompts with the model that `engine_` decodes with (an int8 engine's: int8)
    over windows of its context, on its own thread."""

    def __init__(self, engine_: engine.Engine):
        self.engine = engine_
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="scorer")
        self._stopping = False

    def submit(
        self, prompts: list[np.ndarray], top_k: int, deadline: float
    ) -> concurrent.futures.Future[list[scoring.TextScore]]:
        """Scores each of `prompts` whole, with its `top_k` likeliest alternatives per token.
        The future fails with ApiError: 504 if it has not started by `deadline`
        (time.monotonic()), 503 once stopping, 500 if the model failed or gave NaN."""
        if self._stopping:
            raise ApiError(503, "the server is shutting down")
        return self._pool.submit(self._score, prompts, top_k, deadline)

    @functools.cached_property
    def model(self) -> nnx.Module:
        """The engine's model, its arrays shared (not copied); built on first use."""
        return nnx.merge(self.engine.graphdef, self.engine.weights)

    def stop(self) -> None:
        """Fails the scorings not started (503); the one running finishes on its own."""
        self._stopping = True
        self._pool.shutdown(wait=False)

    def _score(
        self, prompts: list[np.ndarray], top_k: int, deadline: float
    ) -> list[scoring.TextScore]:
        if self._stopping:
            raise ApiError(503, "the server is shutting down")
        if time.monotonic() > deadline:
            raise timeout_error()
        try:
            scores = scoring.score_texts(
                self.model, prompts, self.engine.context_length, top_k=top_k
            )
        except Exception as e:  # a bug, not the client's: this request fails alone
            logging.exception("prompt scoring failed")
            raise ApiError(500, f"scoring error: {e!r}") from None
        if any(np.isnan(score.log_probs).any() for score in scores):
            raise ApiError(500, "the model's output for this request is not a number")
        return scores
