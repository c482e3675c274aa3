"""Load test of the server: N concurrent streaming clients over loopback, random prompts
(slices of tiny Shakespeare) and lengths, each level bounded in requests and in time.
Prints requests/s, generated tokens/s, time to first token and latency percentiles, and
errors by kind; writes results.json and a plot against concurrency. Every response is
checked: status 200, JSON chunks, `finish_reason` "length" after exactly max_tokens
tokens, the usage chunk, then [DONE].

    # a server of its own on a workdir (it is sent SIGTERM at the end and must exit 0)
    python experiments/load_test.py --workdir=runs/baby --num_slots=32 \
        --concurrency=1,8,32 --requests=64 --min_tokens=200 --max_tokens=200 \
        --engine_batch=32 --out=runs/load_test
    # the soak: 10,000 requests from 64 clients against a running server
    python experiments/load_test.py --url=http://127.0.0.1:8000 --concurrency=64 \
        --requests=10000 --max_seconds=1800 --min_tokens=1 --max_tokens=64

--engine_batch=B also measures the engine alone (no HTTP) on B such requests at once,
before the server starts, for the HTTP layer's cost.
"""

import asyncio
import collections
import json
import random
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import provenance
from absl import app, flags

from charlm_jax.data.text_files import embedded_tiny_shakespeare
from charlm_jax.decoding.engine import Engine, Request
from charlm_jax.workdir.loader import open_run

flags.DEFINE_string("url", None, "A running server (http://HOST:PORT); or --workdir.")
flags.DEFINE_string("workdir", None, "Start a server of its own on this trained workdir.")
flags.DEFINE_integer("num_slots", 32, "With --workdir: the server's --num_slots.")
flags.DEFINE_integer("max_queue", 256, "With --workdir: the server's --max_queue.")
flags.DEFINE_string("quantize", "none", 'With --workdir: the server\'s --quantize ("int8").')
flags.DEFINE_list("concurrency", ["1", "8", "32"], "Concurrent clients, one level each.")
flags.DEFINE_integer("requests", 64, "Requests per level (at most).")
flags.DEFINE_float("max_seconds", 120, "Seconds per level (at most).")
flags.DEFINE_integer("min_tokens", 200, "Each request's max_tokens is drawn from")
flags.DEFINE_integer("max_tokens", 200, "[min_tokens, max_tokens].")
flags.DEFINE_integer("min_prompt", 1, "Prompt lengths (characters) are drawn from")
flags.DEFINE_integer("max_prompt", 40, "[min_prompt, max_prompt].")
flags.DEFINE_integer("warmup", 8, "Requests before the first level (not counted).")
flags.DEFINE_integer("engine_batch", 0, "Also time the engine alone at this batch (0: no).")
flags.DEFINE_integer("seed", 0, "Seed of the prompts and lengths.")
flags.DEFINE_string("out", "runs/load_test", "Folder for results.json and load_test.png.")
FLAGS = flags.FLAGS


def random_requests(count: int, rng: random.Random) -> list[dict]:
    """Streaming completion bodies with random prompts and lengths (uncacheable: no seed)."""
    text = embedded_tiny_shakespeare().read_text(encoding="utf-8")
    bodies = []
    for _ in range(count):
        length = rng.randint(FLAGS.min_prompt, FLAGS.max_prompt)
        start = rng.randrange(len(text) - length)
        bodies.append(
            {
                "prompt": text[start : start + length],
                "temperature": 1.0,
                "max_tokens": rng.randint(FLAGS.min_tokens, FLAGS.max_tokens),
                "stream": True,
                "stream_options": {"include_usage": True},
            }
        )
    return bodies


async def one_request(http: httpx.AsyncClient, url: str, body: dict) -> dict:
    """Streams one completion; returns its timings, tokens and error kind (None: ok)."""
    start = time.perf_counter()
    result = {"ttft": None, "latency": None, "tokens": 0, "error": None}
    try:
        async with http.stream("POST", f"{url}/v1/completions", json=body) as response:
            if response.status_code != 200:
                await response.aread()
                result["error"] = f"http {response.status_code}"
                return result
            result["error"] = await _read_stream(response, body, result, start)
    except httpx.HTTPError as e:
        result["error"] = type(e).__name__
    result["latency"] = time.perf_counter() - start
    return result


async def _read_stream(response, body: dict, result: dict, start: float) -> str | None:
    finish, usage = None, None
    async for line in response.aiter_lines():
        if not line:
            continue
        if not line.startswith("data: "):
            return "malformed"
        if line == "data: [DONE]":
            break
        chunk = json.loads(line[6:])
        if "error" in chunk:
            return f"stream error {chunk['error']['type']}"
        for choice in chunk["choices"]:
            if choice["text"] and result["ttft"] is None:
                result["ttft"] = time.perf_counter() - start
            finish = choice["finish_reason"] or finish
        usage = chunk["usage"] or usage
    else:
        return "no [DONE]"
    if usage is None or finish != "length" or usage["completion_tokens"] != body["max_tokens"]:
        return "incomplete"
    result["tokens"] = usage["completion_tokens"]
    return None


async def run_level(url: str, concurrency: int, bodies: list[dict], max_seconds: float) -> dict:
    """`concurrency` clients send `bodies` one after another until none or time is left."""
    todo = collections.deque(bodies)
    results = []
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    timeout = httpx.Timeout(max_seconds + 60)
    deadline = time.perf_counter() + max_seconds
    async with httpx.AsyncClient(limits=limits, timeout=timeout) as http:

        async def client():
            while todo and time.perf_counter() < deadline:
                results.append(await one_request(http, url, todo.popleft()))
                if results[-1]["error"] == "http 429":
                    await asyncio.sleep(0.05)  # as Retry-After asks, briefly

        start = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        wall = time.perf_counter() - start
    return summarize(concurrency, results, wall)


def percentiles(values: list[float]) -> dict:
    if not values:
        return {}
    p50, p95, p99 = np.percentile(values, [50, 95, 99])
    return {"p50": float(p50), "p95": float(p95), "p99": float(p99)}


def summarize(concurrency: int, results: list[dict], wall: float) -> dict:
    ok = [r for r in results if r["error"] is None]
    tokens = sum(r["tokens"] for r in ok)
    return {
        "concurrency": concurrency,
        "requests": len(results),
        "ok": len(ok),
        "seconds": wall,
        "requests_per_s": len(ok) / wall,
        "tokens_per_s": tokens / wall,
        "ttft_s": percentiles([r["ttft"] for r in ok if r["ttft"] is not None]),
        "latency_s": percentiles([r["latency"] for r in ok]),
        "errors": dict(collections.Counter(r["error"] for r in results if r["error"])),
    }


def print_level(s: dict) -> None:
    def ms(p):
        return "/".join(f"{p.get(k, float('nan')) * 1000:.0f}" for k in ("p50", "p95", "p99"))

    print(
        f"concurrency {s['concurrency']:3d}: {s['ok']}/{s['requests']} ok in "
        f"{s['seconds']:.1f}s, {s['requests_per_s']:.2f} req/s, {s['tokens_per_s']:.0f} "
        f"tokens/s, TTFT p50/p95/p99 {ms(s['ttft_s'])} ms, latency {ms(s['latency_s'])} "
        f"ms, errors {s['errors'] or 'none'}",
        flush=True,
    )


def server_rss_mb(url: str) -> float | None:
    text = httpx.get(f"{url}/metrics").text
    found = re.search(r"^process_resident_memory_bytes (\S+)$", text, re.MULTILINE)
    return float(found.group(1)) / 2**20 if found else None


def engine_tokens_per_second(workdir: str, bodies: list[dict], repeats: int = 3) -> float:
    """The engine alone: all `bodies` inserted at once (batch = their number), the median
    tokens/s over `repeats` runs after one warm-up run."""
    run = open_run(workdir, "best", FLAGS.quantize)
    engine = Engine(run.model, run.context_length, num_slots=len(bodies))
    engine.warm_up()  # int8 or float32 dots, whichever is faster here (as the server runs)
    requests = [
        Request(run.tokenizer.encode(b["prompt"]), b["max_tokens"], seed=i)
        for i, b in enumerate(bodies)
    ]
    speeds = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        tokens = sum(len(out.tokens) for outs in engine.generate(requests) for _, out in outs)
        speeds.append(tokens / (time.perf_counter() - start))
    return statistics.median(speeds[1:])


class Server:
    """`python -m charlm_jax.serve` on a free port, for the test's duration; its log lines
    that say "error" or "warning" are printed and kept in `log_errors`."""

    def __init__(self, workdir: str, *flags: str):
        command = [
            sys.executable,
            "-m",
            "charlm_jax.serve",
            f"--workdir={workdir}",
            "--port=0",
            f"--num_slots={FLAGS.num_slots}",
            f"--max_queue={FLAGS.max_queue}",
            f"--quantize={FLAGS.quantize}",
            f"--max_tokens_limit={max(FLAGS.max_tokens, 16)}",
            *flags,
        ]
        self.process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
        self.url = None
        self.log_errors: list[str] = []
        started = threading.Event()

        def read():
            for line in self.process.stderr:
                if found := re.search(r"running on (http://\S+)", line):
                    self.url = found.group(1)
                    started.set()
                elif "error" in line.lower() or line.startswith(("W", "E")):
                    self.log_errors.append(line)
                    print("server:", line, end="", file=sys.stderr)
            started.set()

        threading.Thread(target=read, daemon=True).start()
        started.wait(600)
        while self.url and httpx.get(f"{self.url}/ready").status_code != 200:
            time.sleep(0.2)
        if not self.url:
            sys.exit("error: the server did not start")

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(120)


def plot(levels: list[dict], path: Path) -> None:
    from charlm_jax.training import curves  # noqa: PLC0415 (matplotlib only where a plot is drawn)

    x = [s["concurrency"] for s in levels]
    fig, (left, right) = curves.plt.subplots(1, 2, figsize=(10, 4))
    left.plot(x, [s["tokens_per_s"] for s in levels], "o-")
    left.set(
        xscale="log", xlabel="concurrent clients", ylabel="generated tokens/s", title="throughput"
    )
    for key, style in (("ttft_s", "o-"), ("latency_s", "s--")):
        for p in ("p50", "p99"):
            right.plot(x, [s[key].get(p) for s in levels], style, label=f"{key[:-2]} {p}")
    right.set(
        xscale="log",
        yscale="log",
        xlabel="concurrent clients",
        ylabel="seconds",
        title="time to first token and latency",
    )
    right.legend()
    curves.save_figure(fig, path)


def main(argv: list[str]) -> None:
    if len(argv) > 1 or (FLAGS.url is None) == (FLAGS.workdir is None):
        raise app.UsageError("give either --url or --workdir")
    started = provenance.begin()
    rng = random.Random(FLAGS.seed)
    levels = [int(c) for c in FLAGS.concurrency]
    report = {
        "flags": {
            f: FLAGS[f].value
            for f in (
                "concurrency",
                "requests",
                "max_seconds",
                "min_tokens",
                "max_tokens",
                "num_slots",
                "quantize",
                "workdir",
                "url",
            )
        }
    }
    if FLAGS.engine_batch:
        if not FLAGS.workdir:
            raise app.UsageError("--engine_batch needs --workdir")
        speed = engine_tokens_per_second(FLAGS.workdir, random_requests(FLAGS.engine_batch, rng))
        report["engine_tokens_per_s"] = speed
        print(f"engine alone, batch {FLAGS.engine_batch}: {speed:.0f} tokens/s", flush=True)
    server = Server(FLAGS.workdir) if FLAGS.workdir else None
    url = server.url if server else FLAGS.url.rstrip("/")
    warmup = asyncio.run(run_level(url, max(levels), random_requests(FLAGS.warmup, rng), 300))
    report["rss_mb_after_warmup"] = server_rss_mb(url)
    report["warmup_errors"] = warmup["errors"]
    report["levels"] = []
    for concurrency in levels:
        bodies = random_requests(FLAGS.requests, rng)
        summary = asyncio.run(run_level(url, concurrency, bodies, FLAGS.max_seconds))
        print_level(summary)
        report["levels"].append(summary)
    report["rss_mb_end"] = server_rss_mb(url)
    print(
        f"server RSS: {report['rss_mb_after_warmup']:.0f} MB after warm-up, "
        f"{report['rss_mb_end']:.0f} MB at the end"
    )
    if server:
        report["server_exit_code"] = server.stop()
        print(f"server exit code after SIGTERM: {report['server_exit_code']}")
    out = Path(FLAGS.out)
    provenance.write_json(out / "results.json", report, started)
    plot(report["levels"], out / "load_test.png")
    print(f"wrote {out / 'results.json'} and {out / 'load_test.png'}")


if __name__ == "__main__":
    app.run(main)
