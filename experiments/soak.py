"""Soak: normal streaming clients alongside hostile ones, for a while. Hostile clients cycle
through oversized bodies, absurd values, work that can never fit, bodies that are not JSON,
deep JSON, streams never read, disconnects mid-stream and half-sent headers. Reports the
normal requests served (429 is allowed: it means "busy, retry"), the hostile ones' answers
by kind, the server's RSS after warm-up and at the end, and the server's log lines that
are not a known refusal; writes soak.json. Exits 1 if a normal request failed, RSS grew by
more than 100 MB, or the log holds anything else.

    python experiments/soak.py --workdir=runs/baby --num_slots=32 --max_seconds=600 \\
        --normal_clients=32 --hostile_clients=8 --min_tokens=1 --max_tokens=64
    python experiments/soak.py --url=http://127.0.0.1:8000 ...   # a running server

It shares load_test.py's flags (the server's, the prompts', the lengths', --warmup, --out);
--max_seconds is the soak's length.
"""

import asyncio
import collections
import json
import logging
import random
import socket
import sys
import time
from pathlib import Path

import httpx
from absl import app, flags
from load_test import FLAGS, Server, one_request, random_requests, run_level, server_rss_mb

flags.DEFINE_integer("normal_clients", 16, "Clients sending normal streaming requests.")
flags.DEFINE_integer("hostile_clients", 4, "Clients cycling through the attacks.")
flags.DEFINE_float("rss_budget_mb", 100, "Allowed RSS growth from after warm-up to the end.")

# Log lines the attacks are expected to cause (each a refusal, not a failure).
KNOWN_REFUSALS = (
    "read nothing for",  # a stream never read, dropped (charlm_jax/server/app.py)
    "ASGI callable returned without completing response",  # uvicorn, on that drop
    "Exceeded concurrency limit",  # uvicorn's 503 past --max_connections
)
# Timeouts for a server of our own, short so that the slow attacks cycle.
OWN_SERVER_FLAGS = (
    "--send_timeout=2", "--header_timeout=2", "--body_timeout=2", "--max_tokens_limit=2048"
)  # fmt: skip
NEVER_READ_TOKENS = 2048  # x 16 choices with log-probs: more than the socket buffers hold
STALL_SECONDS = 10


async def post(http: httpx.AsyncClient, url: str, content: bytes, content_type: str) -> str:
    try:
        response = await http.post(
            f"{url}/v1/completions", content=content, headers={"Content-Type": content_type}
        )
        return str(response.status_code)
    except httpx.HTTPError as e:  # the server closed while the body was still being sent
        return type(e).__name__


async def raw(url: str, data: bytes, read: bool) -> str:
    """Sends `data` on a connection of its own with a small receive buffer; returns the
    answer's status line ("closed" if none came), or, with `read` False, reads nothing for
    STALL_SECONDS (the server must drop the stream, not the client)."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, (host, int(port)))
    reader, writer = await asyncio.open_connection(sock=sock, limit=1024)
    try:
        writer.write(data)
        if not read:
            await asyncio.sleep(STALL_SECONDS)
            return f"stalled {STALL_SECONDS}s"
        return (await asyncio.wait_for(reader.readline(), 60)).decode().strip() or "closed"
    except (ConnectionError, asyncio.TimeoutError):
        return "closed"
    finally:
        writer.close()


def request_bytes(body: dict) -> bytes:
    data = json.dumps(body).encode()
    head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    return head + b"Content-Length: %d\r\n\r\n" % len(data) + data


async def disconnect(http: httpx.AsyncClient, url: str) -> str:
    body = {"prompt": "R", "max_tokens": FLAGS.max_tokens, "stream": True}
    async with http.stream("POST", f"{url}/v1/completions", json=body) as response:
        async for _ in response.aiter_lines():
            break  # gone after the first event
        return f"{response.status_code} closed early"


def attacks(http: httpx.AsyncClient, url: str) -> dict:
    """Each attack: a coroutine factory giving its outcome (a status, or what happened)."""
    absurd = b'{"prompt": "R", "top_k": 2147483648, "temperature": 1e999}'
    never_fits = json.dumps({"prompt": ["R"] * 64, "n": 16}).encode()
    deep = b'{"prompt": ' + b"[" * 50_000 + b"]" * 50_000 + b"}"
    never_read = request_bytes(
        {"prompt": "R", "n": 16, "logprobs": 5, "max_tokens": NEVER_READ_TOKENS, "stream": True}
    )
    as_json = "application/json"
    return {
        "oversized body": lambda: post(http, url, b" " * (4 << 20), as_json),
        "absurd values": lambda: post(http, url, absurd, as_json),
        "never fits": lambda: post(http, url, never_fits, as_json),
        "not JSON": lambda: post(http, url, b'{"prompt": "R"}', "text/plain"),
        "deep JSON": lambda: post(http, url, deep, as_json),
        "never read": lambda: raw(url, never_read, read=False),
        "disconnect": lambda: disconnect(http, url),
        "half-sent headers": lambda: raw(url, b"POST /v1/completions HTTP/1.1\r\n", read=True),
    }


async def soak(url: str, rng: random.Random, seconds: float) -> dict:
    deadline = time.perf_counter() + seconds
    normal, hostile = [], collections.defaultdict(collections.Counter)
    timeout = httpx.Timeout(seconds + 120)
    async with httpx.AsyncClient(timeout=timeout) as http:
        kinds = attacks(http, url)

        async def normal_client():
            while time.perf_counter() < deadline:
                normal.append(await one_request(http, url, random_requests(1, rng)[0]))
                if normal[-1]["error"] == "http 429":
                    await asyncio.sleep(0.05)

        async def hostile_client(offset: int):
            names = list(kinds)
            i = offset
            while time.perf_counter() < deadline:
                name = names[i % len(names)]
                hostile[name][await kinds[name]()] += 1
                i += 1

        await asyncio.gather(
            *(normal_client() for _ in range(FLAGS.normal_clients)),
            *(hostile_client(i) for i in range(FLAGS.hostile_clients)),
        )
    outcomes = collections.Counter(r["error"] or "ok" for r in normal)
    return {"normal": dict(outcomes), "hostile": {k: dict(v) for k, v in hostile.items()}}


def main(argv: list[str]) -> None:
    if len(argv) > 1 or (FLAGS.url is None) == (FLAGS.workdir is None):
        raise app.UsageError("give either --url or --workdir")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per request otherwise
    rng = random.Random(FLAGS.seed)
    server = Server(FLAGS.workdir, *OWN_SERVER_FLAGS) if FLAGS.workdir else None
    url = server.url if server else FLAGS.url.rstrip("/")
    concurrency = FLAGS.normal_clients
    asyncio.run(run_level(url, concurrency, random_requests(FLAGS.warmup, rng), 300))
    report = {"rss_mb_after_warmup": server_rss_mb(url)}
    report.update(asyncio.run(soak(url, rng, FLAGS.max_seconds)))
    report["rss_mb_end"] = server_rss_mb(url)
    growth = report["rss_mb_end"] - report["rss_mb_after_warmup"]
    unexplained = []
    if server:
        report["server_exit_code"] = server.stop()
        unexplained = [
            line for line in server.log_errors if not any(k in line for k in KNOWN_REFUSALS)
        ]
        report["log_refusal_lines"] = len(server.log_errors) - len(unexplained)
        report["log_other_lines"] = unexplained
    failed = {k: v for k, v in report["normal"].items() if k not in ("ok", "http 429")}
    print(f"normal requests: {report['normal']}")
    for name, outcomes in report["hostile"].items():
        print(f"hostile, {name}: {outcomes}")
    print(
        f"server RSS: {report['rss_mb_after_warmup']:.0f} MB after warm-up, "
        f"{report['rss_mb_end']:.0f} MB at the end ({growth:+.0f} MB)"
    )
    if server:
        print(f"server log: {report['log_refusal_lines']} refusal lines, {len(unexplained)} other")
        print(*unexplained, sep="", end="")
    out = Path(FLAGS.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "soak.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out / 'soak.json'}")
    if failed or growth > FLAGS.rss_budget_mb or unexplained:
        sys.exit(f"soak failed: normal failures {failed}, RSS {growth:+.0f} MB, log {unexplained}")


if __name__ == "__main__":
    app.run(main)
