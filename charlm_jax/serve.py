"""Serves a trained workdir over HTTP: OpenAI's completions API, metrics, a playground.

python -m charlm_jax.serve --workdir=runs/default --port=8000
curl localhost:8000/v1/completions -H 'Content-Type: application/json' \
    -d '{"prompt": "ROMEO:", "max_tokens": 100, "temperature": 0.8}'

SIGTERM or Ctrl-C drains: /ready answers 503 and new requests are refused, running ones get
up to --grace_period seconds to finish, then the process exits 0 (a second Ctrl-C stops at
once).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import uvicorn
from absl import app, flags, logging

from charlm_jax import cli
from charlm_jax.server.app import server_config
from charlm_jax.server.service import ServeOptions, Service

flags.DEFINE_string("workdir", None, "A trained run's directory.", required=True)
flags.DEFINE_string("checkpoint", "best", 'Checkpoint: "best", "latest" or a step number.')
flags.DEFINE_string("host", "127.0.0.1", "Address to listen on.")
flags.DEFINE_integer("port", 8000, "Port to listen on (0: any free port).")
flags.DEFINE_integer(
    "num_slots", 16, "Sequences decoded together (the engine's batch).", lower_bound=1
)
flags.DEFINE_integer(
    "max_queue", 256, "Sequences allowed to wait for a slot; more get 429.", lower_bound=1
)
flags.DEFINE_integer(
    "max_request_tokens",
    1 << 16,
    "Most tokens one request may need, prompts x n x (prompt + max_tokens); more get 400.",
    lower_bound=1,
)
flags.DEFINE_integer(
    "max_queued_tokens",
    1 << 18,
    "Most tokens the admitted requests may need together; more get 429.",
    lower_bound=1,
)
flags.DEFINE_float(
    "request_timeout", 60.0, "Seconds a request may take, waiting included.", lower_bound=0.001
)
flags.DEFINE_float(
    "step_timeout",
    30.0,
    "Seconds an engine step may take; longer fails the engine (503).",
    lower_bound=0.001,
)
flags.DEFINE_integer(
    "max_tokens_limit", 2048, "The largest max_tokens a request may ask for.", lower_bound=1
)
flags.DEFINE_integer(
    "max_body_kb", 1024, "Most kilobytes in a request body; more get 413.", lower_bound=1
)
flags.DEFINE_float(
    "body_timeout",
    10.0,
    "Seconds a request body may take to arrive; more get 408.",
    lower_bound=0.001,
)
flags.DEFINE_float(
    "header_timeout",
    10.0,
    "Seconds a new connection has to send its request headers.",
    lower_bound=0.001,
)
flags.DEFINE_float(
    "send_timeout",
    30.0,
    "Seconds a stream waits for a client that does not read.",
    lower_bound=0.001,
)
flags.DEFINE_integer("max_connections", 256, "Open connections; more get 503.", lower_bound=1)
flags.DEFINE_string(
    "api_key",
    None,
    "Require `Authorization: Bearer KEY` (not for /health); default $CHARLM_API_KEY.",
)
flags.DEFINE_list("allowed_hosts", [], "Host header names the server answers (empty: any).")
flags.DEFINE_bool("log_prompts", False, "Put each request's prompts in its log line.")
flags.DEFINE_string("quantize", "none", 'Dense layers: "none" (float32) or "int8" dots.')
flags.DEFINE_float(
    "grace_period", 30.0, "Seconds running requests get to finish on SIGTERM.", lower_bound=0
)
flags.DEFINE_integer("cache_entries", 1024, "Output cache: most completions kept.", lower_bound=0)
flags.DEFINE_integer("cache_mb", 64, "Output cache: most megabytes kept.", lower_bound=0)
cli.define_compilation_cache_flag()
FLAGS = flags.FLAGS


class DrainingServer(uvicorn.Server):
    """Uvicorn whose SIGTERM / Ctrl-C first drains the service, then exits (uvicorn's own
    handlers would stop listening at once, and re-raise the signal after shutdown)."""

    def __init__(self, config: uvicorn.Config, service: Service, grace_period: float):
        super().__init__(config)
        self.service, self.grace_period = service, grace_period
        self._drain: asyncio.Task | None = None

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        """uvicorn's hook around serving: the CLI's `StopSignals`, whose first signal starts
        draining and whose later Ctrl-C exits at once."""
        loop = asyncio.get_running_loop()

        def drain(signal_name: str) -> None:  # in a signal handler: hand it to the loop
            loop.call_soon_threadsafe(self._start_drain, signal_name)

        with cli.StopSignals(on_stop=drain, on_again=self._exit_at_once):
            yield

    def _start_drain(self, signal_name: str) -> None:
        logging.info(
            "draining (%s): up to %.0fs for running requests", signal_name, self.grace_period
        )
        self._drain = asyncio.ensure_future(self._drain_then_exit())

    def _exit_at_once(self, signal_name: str) -> None:
        if signal_name == "SIGINT":
            self.should_exit = self.force_exit = True

    async def _drain_then_exit(self) -> None:
        await self.service.drain(self.grace_period)
        self.should_exit = True


def main(argv: list[str]) -> None:
    cli.start(argv)
    cli.use_compilation_cache(FLAGS.compilation_cache)
    with cli.exit_on_error(), cli.stderr_held():
        options = ServeOptions(
            max_queue=FLAGS.max_queue,
            max_request_tokens=FLAGS.max_request_tokens,
            max_queued_tokens=FLAGS.max_queued_tokens,
            request_timeout=FLAGS.request_timeout,
            step_timeout=FLAGS.step_timeout,
            max_tokens_limit=FLAGS.max_tokens_limit,
            max_body_bytes=FLAGS.max_body_kb << 10,
            body_timeout=FLAGS.body_timeout,
            send_timeout=FLAGS.send_timeout,
            api_key=FLAGS.api_key or os.environ.get("CHARLM_API_KEY") or None,
            allowed_hosts=tuple(FLAGS.allowed_hosts),
            log_prompts=FLAGS.log_prompts,
            cache_entries=FLAGS.cache_entries,
            cache_bytes=FLAGS.cache_mb << 20,
        )
        service = Service.from_workdir(
            Path(FLAGS.workdir),
            cli.checkpoint_arg(FLAGS.checkpoint),
            FLAGS.num_slots,
            FLAGS.quantize,
            options,
        )
    logging.info("serving %s on http://%s:%d", service.info.id, FLAGS.host, FLAGS.port)
    if options.api_key is None and FLAGS.host not in ("127.0.0.1", "localhost", "::1"):
        logging.warning("listening on %s without an API key (--api_key)", FLAGS.host)
    config = server_config(
        service,
        FLAGS.host,
        FLAGS.port,
        FLAGS.max_connections,
        FLAGS.header_timeout,
        access_log=False,
        timeout_graceful_shutdown=5,
    )
    server = DrainingServer(config, service, FLAGS.grace_period)
    server.run()
    if not server.started:
        sys.exit(1)  # uvicorn said why (the port is taken, ...)


if __name__ == "__main__":
    app.run(main, flags_parser=cli.flags_parser())
