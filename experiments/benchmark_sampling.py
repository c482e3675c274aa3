"""Decode speed of the engine (`Sampler.generate`: one engine slot per row) next to a PyTorch
KV-cache loop of the same shapes (experiments/pytorch_peer.py --decode_batch, run as a
subprocess when torch is installed; torch is not a dependency), and the engine under
arriving work against serving the same requests one at a time.

    python experiments/benchmark_sampling.py --out=results/decoding/benchmark_sampling.json
    python experiments/benchmark_sampling.py --runs= --arrivals=64

Weights are random (speed does not depend on them); temperature 1, a one-token prompt,
--new_tokens per row (500 for nanogpt_baby, 200 for nanogpt by default). The two sides
alternate, --repeats times each, and the medians are reported, with the engine's use of the
memory bandwidth: the bytes a token step must read (the weights, and every row's keys and
values over its window, averaged over the run) per step time, as a fraction of this
machine's copy bandwidth (numpy copying a 256 MiB array, the best of several, bytes read
and written per second). With --out, the runs are written as JSON with their provenance
(experiments/provenance.py) for experiments/report.py's `decoding` table.
"""

import collections
import math
import re
import runpy
import statistics
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import provenance
from absl import app, flags
from flax import nnx

from charlm_jax.data.text_files import embedded_tiny_shakespeare
from charlm_jax.data.tokenizers import CharTokenizer
from charlm_jax.decoding.engine import Engine, Request, rebuilt_length
from charlm_jax.decoding.sampling import Sampler
from charlm_jax.model import models

flags.DEFINE_list(
    "runs",
    ["nanogpt:1", "nanogpt:16", "nanogpt:64", "nanogpt_baby:64"],
    "PRESET:BATCH pairs: a Transformer preset and the rows sampled at once.",
)
flags.DEFINE_list("new_tokens", ["nanogpt_baby:500", "nanogpt:200"], "PRESET:N tokens per row.")
flags.DEFINE_integer("repeats", 3, "Timed runs per side and measurement (medians reported).")
flags.DEFINE_bool("torch", True, "Also time the PyTorch loop (needs torch installed).")
flags.DEFINE_string("out", None, "Write the runs as JSON with provenance to this file.")
flags.DEFINE_integer("arrivals", 0, "Requests of the arriving-work benchmark (0: skip it).")
flags.DEFINE_string("arrival_preset", "nanogpt_baby", "Model of the arriving-work benchmark.")
flags.DEFINE_float("arrival_rate", 50.0, "Mean arrivals per second (a Poisson stream).")
flags.DEFINE_integer("arrival_slots", 16, "Engine slots for the arriving work.")
FLAGS = flags.FLAGS

PEER = Path(__file__).resolve().parent / "pytorch_peer.py"
CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "transformer.py"


def preset_config(preset: str):
    return runpy.run_path(str(CONFIGS))["get_config"](preset)


def torch_tokens_per_s(preset: str, batch: int, new_tokens: int) -> tuple[float, str]:
    """One timed run of the PyTorch loop in a fresh process (its warm-up excluded): its
    tokens/s and torch's version."""
    command = [sys.executable, str(PEER), f"--preset={preset}", f"--decode_batch={batch}",
               f"--new_tokens={new_tokens}", "--repeats=1"]  # fmt: skip
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    rate = float(re.search(r"([\d,]+) tokens/s", out).group(1).replace(",", ""))
    return rate, re.match(r"pytorch (\S+)", out).group(1)


def copy_bandwidth(megabytes: int = 256, repeats: int = 5) -> float:
    """This machine's memory bandwidth in bytes/s: numpy copying a `megabytes` MiB array,
    the best of `repeats`, counting the bytes read and written."""
    source = np.ones(megabytes << 20, np.uint8)
    target = np.empty_like(source)
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        np.copyto(target, source)
        best = min(best, time.perf_counter() - start)
    return 2 * source.nbytes / best


def mean_window(context: int, new_tokens: int) -> float:
    """The mean number of cache columns a row attends per token step over a run of
    `new_tokens` from a one-token prompt, under the engine's context policy (a full window
    keeps its newest half)."""
    length, columns = 1, []
    for _ in range(new_tokens):
        if length == context:
            length = rebuilt_length(context)  # the newest half and the token
        else:
            columns.append(length + 1)  # the new token's column and those before it
            length += 1
    return statistics.mean(columns)


def step_bytes(model, config, batch: int, new_tokens: int) -> float:
    """The bytes a decode step must read: the weights once, and each row's keys and values
    over its window (float32), averaged over the run."""
    weights = sum(x.nbytes for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    m = config.model
    per_column = 2 * m.num_layers * m.embedding_dim * 4  # keys and values, every layer
    window = mean_window(config.data.context_length, new_tokens)
    return weights + batch * per_column * window


def measure(tokenizer: CharTokenizer, preset: str, batch: int, n: int) -> dict:
    """The engine's and the PyTorch loop's tokens/s, alternated, --repeats each."""
    config = preset_config(preset)
    model = models.create_model(config, tokenizer.vocab_size, nnx.Rngs(0))
    sampler = Sampler(model, tokenizer, config.data.context_length)
    prompts = [""] * batch  # a one-token prompt: a newline
    sampler.generate(prompts, n)  # compile
    ours, theirs, version = [], [], None
    for _ in range(FLAGS.repeats):  # alternated
        start = time.perf_counter()
        sampler.generate(prompts, n)
        ours.append(batch * n / (time.perf_counter() - start))
        if FLAGS.torch:
            rate, version = torch_tokens_per_s(preset, batch, n)
            theirs.append(rate)
    return {
        "preset": preset, "batch": batch, "new_tokens": n,
        "engine_tokens_per_s": ours, "torch_tokens_per_s": theirs, "torch": version,
        "engine_median": statistics.median(ours),
        "torch_median": statistics.median(theirs) if theirs else None,
        "step_bytes": step_bytes(model, config, batch, n),
    }  # fmt: skip


def bandwidth_fraction(run: dict) -> float:
    """The engine's bytes read per second (a step's bytes per step time) over the copy
    bandwidth."""
    steps_per_s = run["engine_median"] / run["batch"]
    return run["step_bytes"] * steps_per_s / run["copy_bandwidth"]


def batch_table(tokenizer: CharTokenizer) -> None:
    started = provenance.begin()
    new_tokens = {k: int(v) for k, v in (item.split(":") for item in FLAGS.new_tokens)}
    bandwidth = copy_bandwidth()
    print(f"copy bandwidth: {bandwidth / 1e9:.1f} GB/s (read + written)")
    print("| model | batch | new tokens | charlm-jax tok/s | PyTorch loop tok/s | ratio | "
          "engine bandwidth |\n|---|---|---|---|---|---|---|")  # fmt: skip
    runs = []
    for item in FLAGS.runs:
        preset, batch = item.split(":")
        run = measure(tokenizer, preset, int(batch), new_tokens[preset])
        runs.append(run | {"copy_bandwidth": bandwidth})
        theirs = run["torch_median"] or math.nan
        print(
            f"| {preset} | {batch} | {run['new_tokens']} | {run['engine_median']:,.0f} | "
            f"{theirs:,.0f} | {run['engine_median'] / theirs:.2f}x | "
            f"{bandwidth_fraction(runs[-1]):.1%} |",
            flush=True,
        )
    if FLAGS.out:
        version = runs[-1]["torch"] if runs else None
        provenance.write_json(
            FLAGS.out, {"runs": runs}, started, **({"torch": version} if version else {})
        )


def serve(engine: Engine, requests: list[Request], arrivals: np.ndarray) -> tuple[float, list]:
    """Runs `requests` arriving at `arrivals` (seconds), first come first served; returns
    the time the last one finished and each one's latency (arrival to last token)."""
    start, finished, owner = time.perf_counter(), {}, {}
    waiting, upcoming = collections.deque(), collections.deque(range(len(requests)))
    while len(finished) < len(requests):
        now = time.perf_counter() - start
        while upcoming and arrivals[upcoming[0]] <= now:
            waiting.append(upcoming.popleft())
        while waiting and engine.free_slots():
            index = waiting.popleft()
            owner[engine.insert(requests[index])] = index
        if not engine.active_slots():
            time.sleep(max(0.0, arrivals[upcoming[0]] - now))
            continue
        for out in engine.step():
            if out.finished:
                finished[owner.pop(out.slot)] = time.perf_counter() - start
    latencies = [finished[i] - arrivals[i] for i in range(len(requests))]
    return max(finished.values()), latencies


def arriving_work(tokenizer: CharTokenizer) -> None:
    config = preset_config(FLAGS.arrival_preset)
    context = config.data.context_length
    model = models.create_model(config, tokenizer.vocab_size, nnx.Rngs(0))
    rng = np.random.default_rng(0)
    n = FLAGS.arrivals
    lengths, outputs = rng.integers(1, 201, n), rng.integers(50, 501, n)
    requests = [
        Request(rng.integers(0, tokenizer.vocab_size, length), int(out), seed=i)
        for i, (length, out) in enumerate(zip(lengths, outputs, strict=True))
    ]
    arrivals = np.cumsum(rng.exponential(1 / FLAGS.arrival_rate, n))
    print(
        f"\n{FLAGS.arrival_preset} (context {context}): {n} requests, prompts 1-200 tokens "
        f"(the last {context} kept), 50-500 new tokens, Poisson arrivals at "
        f"{FLAGS.arrival_rate:g}/s\n"
    )
    print("| engine | tokens/s | latency median s | latency p90 s | makespan s |")
    print("|---|---|---|---|---|")
    for slots in (FLAGS.arrival_slots, 1):
        engine = Engine(model, context, num_slots=slots)
        engine.warm_up()
        makespan, latencies = serve(engine, requests, arrivals)
        name = f"{slots} slots" if slots > 1 else "one at a time"
        print(
            f"| {name} | {outputs.sum() / makespan:,.0f} | {np.median(latencies):.2f} | "
            f"{np.percentile(latencies, 90):.2f} | {makespan:.1f} |",
            flush=True,
        )


def main(argv):
    del argv
    tokenizer = CharTokenizer.from_text(embedded_tiny_shakespeare().read_text(encoding="utf-8"))
    if FLAGS.runs:
        batch_table(tokenizer)
    if FLAGS.arrivals:
        arriving_work(tokenizer)


if __name__ == "__main__":
    app.run(main)
