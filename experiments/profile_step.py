"""Where the train step's time goes: XLA ops timed by `jax.profiler`, grouped by what they
compute (the JAX operation in each op's metadata, e.g. `transpose(jvp())/dot_general` is a
matmul of the backward pass), as milliseconds per step.

    python experiments/profile_step.py --config=configs/transformer.py:nanogpt_baby

Writes the trace (open in Perfetto or TensorBoard) and the optimized HLO under --out.
"""

import collections
import gzip
import json
import re
from pathlib import Path

import jax
from absl import app, flags
from ml_collections import config_flags

from charlm_jax import cli
from charlm_jax.training import step_bench

config_flags.DEFINE_config_file("config", None, "Config file[:preset].", lock_config=True)
flags.DEFINE_integer("steps", 10, "Profiled train steps.")
flags.DEFINE_integer("top", 30, "Rows of the table.")
flags.DEFINE_string("out", "/tmp/charlm_profile", "Folder for the trace and the HLO.")
flags.mark_flag_as_required("config")
FLAGS = flags.FLAGS


def op_metadata(hlo: str) -> dict[str, str]:
    """HLO instruction name -> the JAX operation it came from."""
    ops = {}
    for line in hlo.splitlines():
        match = re.match(r"\s*(?:ROOT )?%([\w.-]+) = .*?op_name=\"([^\"]*)\"", line)
        if match:
            ops[match.group(1)] = re.sub(r"^jit\(\w+\)/", "", match.group(2))
    return ops


def main(argv: list[str]) -> None:
    del argv
    cli.quiet_library_logs()
    out = Path(FLAGS.out)
    out.mkdir(parents=True, exist_ok=True)
    setup = step_bench.compile_step(FLAGS.config)
    hlo = setup.compiled.as_text()
    (out / "train_step.hlo").write_text(hlo)
    for _ in range(3):
        metrics = setup.advance()
    jax.block_until_ready(metrics)
    with jax.profiler.trace(str(out), create_perfetto_trace=True):
        for _ in range(FLAGS.steps):
            metrics = setup.advance()
        jax.block_until_ready(metrics)

    trace_file = max(out.glob("**/*.trace.json.gz"), key=lambda p: p.stat().st_mtime)
    with gzip.open(trace_file) as f:
        events = json.load(f)["traceEvents"]
    ops = op_metadata(hlo)
    total, count = collections.Counter(), collections.Counter()
    for event in events:
        if event.get("ph") == "X" and event["name"] in ops:
            kind = event["name"].rsplit(".", 1)[0]  # ynn_fusion, dot, multiply_add_fusion, ...
            group = (ops[event["name"]], kind)
            total[group] += event["dur"] / 1e3 / FLAGS.steps
            count[group] += 1 / FLAGS.steps
    all_ms = sum(total.values())
    print(f"{all_ms:.1f} ms/step in XLA ops (summed over threads); trace: {trace_file}")
    print(f"{'ms/step':>8} {'share':>6} {'ops':>4}  {'XLA op kind':<26} JAX operation")
    for (op, kind), ms in total.most_common(FLAGS.top):
        print(f"{ms:8.2f} {100 * ms / all_ms:5.1f}% {count[op, kind]:4.0f}  {kind:<26} {op}")


if __name__ == "__main__":
    app.run(main, flags_parser=cli.flags_parser(lambda: FLAGS.config.to_dict()))
