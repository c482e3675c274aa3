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
import sys
from collections.abc import Iterator
from pathlib import Path

import uvicorn
from absl import app, flags, logging

from charlm_jax import cli
from charlm_jax.server.app import create_app
from charlm_jax.server.service import ServeOptions, Service

flags.DEFINE_string("workdir", None, "A trained run's directory.", required=True)
flags.DEFINE_string("checkpoint", "best", 'Checkpoint: "best", "latest" or a step number.')
flags.DEFINE_string("host", "127.0.0.1", "Address to listen on.")
flags.DEFINE_integer("port", 8000, "Port to listen on (0: any free port).")
flags.DEFINE_integer("num_slots", 16, "Sequences decoded together (the engine's batch).")
flags.DEFINE_integer("max_queue", 256, "Sequences allowed to wait for a slot; more get 429.")
flags.DEFINE_float("request_timeout", 60.0, "Seconds a request may take, waiting included.")
flags.DEFINE_integer("max_tokens_limit", 2048, "The largest max_tokens a request may ask for.")
flags.DEFINE_bool("log_prompts", False, "Put each request's prompts in its log line.")
flags.DEFINE_string("quantize", "none", 'Dense layers: "none" (float32) or "int8" dots.')
flags.DEFINE_float("grace_period", 30.0, "Seconds running requests get to finish on SIGTERM.")
flags.DEFINE_integer("cache_entries", 1024, "Output cache: most completions kept.")
flags.DEFINE_integer("cache_mb", 64, "Output cache: most megabytes kept.")
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
    options = ServeOptions(
        max_queue=FLAGS.max_queue,
        request_timeout=FLAGS.request_timeout,
        max_tokens_limit=FLAGS.max_tokens_limit,
        log_prompts=FLAGS.log_prompts,
        cache_entries=FLAGS.cache_entries,
        cache_bytes=FLAGS.cache_mb << 20,
    )
    with cli.exit_on_error(), cli.stderr_held():
        service = Service.from_workdir(
            Path(FLAGS.workdir),
            cli.checkpoint_arg(FLAGS.checkpoint),
            FLAGS.num_slots,
            FLAGS.quantize,
            options,
        )
    logging.info("serving %s on http://%s:%d", service.info.id, FLAGS.host, FLAGS.port)
    config = uvicorn.Config(
        create_app(service),
        host=FLAGS.host,
        port=FLAGS.port,
        access_log=False,
        timeout_graceful_shutdown=5,
    )
    server = DrainingServer(config, service, FLAGS.grace_period)
    server.run()
    if not server.started:
        sys.exit(1)  # uvicorn said why (the port is taken, ...)


if __name__ == "__main__":
    app.run(main, flags_parser=cli.flags_parser())
