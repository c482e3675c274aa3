"""Decode speed of the engine (`Sampler.generate`: one engine slot per row) next to a PyTorch
KV-cache loop of the same shapes (experiments/pytorch_peer.py --decode_batch, run as a
subprocess when torch is installed; torch is not a dependency), and the engine under
arriving work against serving the same requests one at a time.

    python experiments/benchmark_sampling.py \
        --runs=nanogpt_baby:1,nanogpt_baby:16,nanogpt_baby:64,nanogpt:1,nanogpt:16,nanogpt:64
    python experiments/benchmark_sampling.py --runs= --arrivals=64

Weights are random (speed does not depend on them); temperature 1, a one-token prompt,
--new_tokens per row (500 for nanogpt_baby, 200 for nanogpt by default). The two sides
alternate, --repeats times each, and the medians are reported.
"""

import collections
import re
import runpy
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from absl import app, flags
from flax import nnx

from charlm_jax.data.text_files import embedded_tiny_shakespeare
from charlm_jax.data.tokenizers import CharTokenizer
from charlm_jax.decoding.engine import Engine, Request
from charlm_jax.decoding.sampling import Sampler
from charlm_jax.model import models

flags.DEFINE_list(
    "runs",
    ["nanogpt_baby:1", "nanogpt_baby:16", "nanogpt_baby:64", "nanogpt:1", "nanogpt:16",
     "nanogpt:64"],
    "PRESET:BATCH pairs: a Transformer preset and the rows sampled at once.",
)  # fmt: skip
flags.DEFINE_list("new_tokens", ["nanogpt_baby:500", "nanogpt:200"], "PRESET:N tokens per row.")
flags.DEFINE_integer("repeats", 3, "Timed runs per side and measurement (medians reported).")
flags.DEFINE_bool("torch", True, "Also time the PyTorch loop (needs torch installed).")
flags.DEFINE_integer("arrivals", 0, "Requests of the arriving-work benchmark (0: skip it).")
flags.DEFINE_string("arrival_preset", "nanogpt_baby", "Model of the arriving-work benchmark.")
flags.DEFINE_float("arrival_rate", 50.0, "Mean arrivals per second (a Poisson stream).")
flags.DEFINE_integer("arrival_slots", 16, "Engine slots for the arriving work.")
FLAGS = flags.FLAGS

PEER = Path(__file__).resolve().parent / "pytorch_peer.py"
CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "transformer.py"


def preset_config(preset: str):
    return runpy.run_path(str(CONFIGS))["get_config"](preset)


def torch_tokens_per_s(preset: str, batch: int, new_tokens: int) -> float:
    """One timed run of the PyTorch loop in a fresh process (its warm-up excluded)."""
    command = [sys.executable, str(PEER), f"--preset={preset}", f"--decode_batch={batch}",
               f"--new_tokens={new_tokens}", "--repeats=1"]  # fmt: skip
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    return float(re.search(r"([\d,]+) tokens/s", out).group(1).replace(",", ""))


def batch_table(tokenizer: CharTokenizer) -> None:
    new_tokens = {k: int(v) for k, v in (item.split(":") for item in FLAGS.new_tokens)}
    print("| model | batch | new tokens | charlm-jax tok/s | PyTorch loop tok/s | ratio |")
    print("|---|---|---|---|---|---|")
    for run in FLAGS.runs:
        preset, batch = run.split(":")
        batch, n = int(batch), new_tokens[preset]
        config = preset_config(preset)
        model = models.create_model(config, tokenizer.vocab_size, nnx.Rngs(0))
        sampler = Sampler(model, tokenizer, config.data.context_length)
        prompts = [""] * batch  # a one-token prompt: a newline
        sampler.generate(prompts, n)  # compile
        ours, theirs = [], []
        for _ in range(FLAGS.repeats):  # alternated
            start = time.perf_counter()
            sampler.generate(prompts, n)
            ours.append(batch * n / (time.perf_counter() - start))
            if FLAGS.torch:
                theirs.append(torch_tokens_per_s(preset, batch, n))
        jax_rate = statistics.median(ours)
        torch_rate = statistics.median(theirs) if theirs else float("nan")
        print(
            f"| {preset} | {batch} | {n} | {jax_rate:,.0f} | {torch_rate:,.0f} | "
            f"{jax_rate / torch_rate:.2f}x |",
            flush=True,
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
