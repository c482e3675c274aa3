"""Speedrun: train until the validation loss reaches a target, and time it end to end.

    python experiments/speedrun.py [--config=configs/transformer.py:speedrun] [--seeds=0,1,2] \
        [--target=1.8857] [--check_every=25] [--max_seconds=300] [--out=FILE.json]
    python experiments/speedrun.py --reference=nanogpt        # the GPU counterpart (val 1.47)

The loss is judged as nanoGPT judges it: its estimate, the mean loss of a fixed set of random
validation batches (the reference's count and size: 20 of 12 windows for `nanogpt_baby`,
200 of 64 for `nanogpt`), checked every --check_every steps. The clock starts with the
process and stops when the estimate first reaches the target, so start-up, data loading and
compilation count; each seed runs in a fresh process. The model that reached the target is
then scored on the whole validation text in back-to-back windows of the context (the
scorer `charlm_jax.model.scoring` with stride = context, as the PyTorch peer scores), outside
the clock. A target not reached within the step budget (--max_steps, else the config's
train.num_steps) or --max_seconds ends the run with one line saying how far it got, and a
non-zero exit.

The default targets are nanoGPT's validation loss after its 2000 (`nanogpt_baby`: its own
train.py on a CPU, results/full_runs) or 5000 (`nanogpt`: its README) steps.

With --nanogpt_dir=DIR (a checkout of karpathy/nanoGPT) and --peer_python (a Python with
torch), each seed is followed by a run of nanoGPT's own train.py (experiments/nanogpt_peer.py:
its README's CPU baby-GPT command for `nanogpt_baby`, config/train_shakespeare_char.py on a
GPU for `nanogpt`), alternated on the same machine. Both sides are timed two ways: the whole
process, launch to exit, measured by this script for both (a seed's process here ends by
saving its model, which this script then scores on the whole validation text), and the time
to the target from launch (here when the estimate reaches it, there when its evaluation line
reports it).
"""

import concurrent.futures
import dataclasses
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

START = time.perf_counter()  # before absl, JAX and charlm_jax: their imports count too

from absl import app, flags  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's charlm_jax

import nanogpt_peer  # noqa: E402
import provenance  # noqa: E402

from charlm_jax import cli  # noqa: E402
from charlm_jax.errors import UserError  # noqa: E402

# JAX and the training modules are imported where they are used: a bad flag fails at once.


@dataclasses.dataclass(frozen=True)
class Reference:
    """A nanoGPT recipe: its preset, the speedrun config that chases it, its quality after
    its full run, and how nanoGPT estimates the validation loss."""

    config: str
    target: float  # nanoGPT's 20-batch (baby) / 200-batch estimate after its full run
    estimate_batches: int
    estimate_batch_size: int
    nanogpt_recipe: str  # experiments/nanogpt_peer.py's recipe of the same run


REFERENCES = {
    # nanoGPT's own train.py (commit 3adf61e), its README's CPU baby-GPT command: val loss at
    # step 2000, the same in every run (it seeds torch with 1337): results/full_runs/nanogpt*.
    "nanogpt_baby": Reference("configs/transformer.py:speedrun", 1.8857, 20, 12, "cpu_baby"),
    # nanoGPT's README for config/train_shakespeare_char.py (5000 steps on a GPU).
    "nanogpt": Reference("configs/transformer.py:speedrun_gpu", 1.47, 200, 64, "gpu"),
}

flags.DEFINE_enum("reference", "nanogpt_baby", list(REFERENCES), "The recipe to beat.")
flags.DEFINE_string("config", "", "Config file and preset (default: the reference's speedrun).")
flags.DEFINE_multi_string("set", [], "KEY=VALUE: a config override (repeatable).")
flags.DEFINE_list("seeds", ["0", "1", "2"], "Training seeds, each in a fresh process.")
flags.DEFINE_float("target", None, "Validation loss to reach (default: the reference's).")
flags.DEFINE_integer("check_every", 10, "Steps between checks of the validation estimate.")
flags.DEFINE_float(
    "gate", 0.1, "Check only once the training loss is within this of the target (inf: always)."
)
flags.DEFINE_integer("max_steps", 0, "Step budget (0: the config's train.num_steps).")
flags.DEFINE_float("max_seconds", 300.0, "Wall-time budget per seed (0: none).")
flags.DEFINE_string("out", "", "Write the runs and their means to this JSON file.")
flags.DEFINE_string("label", "", "What this run tries, for the record table (in --out).")
flags.DEFINE_string("nanogpt_dir", "", "A nanoGPT checkout: also time its train.py per seed.")
flags.DEFINE_string("peer_python", sys.executable, "A Python with torch, for nanoGPT.")
flags.DEFINE_multi_string("peer_set", [], "KEY=VALUE: a nanoGPT train.py override.")
flags.DEFINE_string(
    "model_out", "", "Save the trained weights here (.npz) instead of scoring the whole "
    "validation text (the parent process of a run of several seeds scores it)."
)  # fmt: skip
# Off by default: records compile from scratch. The tests load this script into processes
# that also import the generate CLI, which defines the same flag.
cli.define_compilation_cache_flag(default="", allow_override=True)
FLAGS = flags.FLAGS


def train_to_target(config, reference: Reference, target: float, check_every: int,
                    max_steps: int, max_seconds: float, gate: float):  # fmt: skip
    """Trains `config` until nanoGPT's validation estimate is <= `target` or a budget runs
    out, checking every `check_every` steps once the mean training loss of the last ones is
    within `gate` of the target: (the run's record, times from the process start; the
    trained model)."""
    import jax
    import numpy as np
    from flax import nnx

    from charlm_jax.data import batching, pipeline
    from charlm_jax.training import parallel, train

    seq_len = config.data.context_length
    dataset = pipeline.load_dataset(config.data)
    mesh = parallel.make_mesh()
    for size in (config.train.batch_size, reference.estimate_batch_size):
        parallel.check_batch_size(size, mesh)
    step_fn, model_def, model_state, opt_state, _ = train.build_training(
        config, dataset.tokenizer.vocab_size, mesh
    )
    train_tokens = parallel.put_replicated(np.asarray(dataset.train, np.int32), mesh)
    data_key, eval_key = jax.random.split(jax.random.key(config.train.seed))  # as train.py
    estimate = train.make_eval_step(model_def, mesh)
    val_batches = jax.tree.map(
        lambda x: parallel.put_replicated(x, mesh),
        batching.eval_batches_numpy(
            dataset.val, eval_key, reference.estimate_batch_size, seq_len,
            reference.estimate_batches,
        ),
    )  # fmt: skip
    num_steps = jax.numpy.int32(config.train.num_steps)  # the schedule's length
    # The step and the estimate compile side by side: XLA compiles without holding the GIL.
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        compiled = pool.submit(
            lambda: step_fn.lower(model_state, opt_state, train_tokens, data_key, num_steps)
            .compile()
        )  # fmt: skip
        estimate = estimate.lower(model_state, val_batches).compile()
        step_fn = compiled.result()
    started = time.perf_counter() - START
    best, loss, step, losses = math.inf, math.inf, 0, []
    while step < max_steps:
        model_state, opt_state, metrics = parallel.one_step_in_flight(
            step_fn(model_state, opt_state, train_tokens, data_key, num_steps)
        )
        step += 1
        losses.append(metrics.loss)
        if step % check_every and step < max_steps:
            continue
        recent = jax.device_get(losses[-check_every:])
        train_loss = float(np.mean([m.total / m.count for m in recent]))
        out_of_time = max_seconds and time.perf_counter() - START > max_seconds
        # The estimate costs a few steps: skipped while the training loss (the validation
        # loss is above it here) is still well above the target.
        if train_loss <= target + gate or step == max_steps or out_of_time:
            loss = float(estimate(model_state, val_batches))
            best = min(best, loss)
        if loss <= target or out_of_time or not math.isfinite(train_loss) or math.isnan(loss):
            break
    elapsed = time.perf_counter() - START
    record = {
        "seed": config.train.seed,
        "reached": loss <= target,
        "steps": step,
        "tokens": step * config.train.batch_size * config.train.grad_accum_steps * seq_len,
        "estimate": loss,
        "best_estimate": best,
        "wall_to_target_s": elapsed,
        "startup_s": started,  # imports, data, model, compilation of the train step
        "step_ms": 1000 * (elapsed - started) / max(step, 1),  # the estimates included
        "platform": jax.devices()[0].platform,
        "num_devices": jax.device_count(),
    }
    return record, nnx.merge(model_def, model_state)


def whole_val_loss(model, config) -> float:
    """`model`'s loss on the whole validation text, in back-to-back windows of its context."""
    from charlm_jax.data import pipeline
    from charlm_jax.model import scoring

    val, context = pipeline.load_dataset(config.data).val, config.data.context_length
    return scoring.score_tokens(model, val, context, stride=context).nats_per_token


def save_weights(model, path: str) -> None:
    """`model`'s weights as an .npz of its state's leaves, in order (`load_weights`)."""
    import jax
    import numpy as np
    from flax import nnx

    np.savez(path, *(np.asarray(x) for x in jax.tree.leaves(nnx.state(model))))


def load_weights(config, path: Path):
    """The model of `config` with the weights `save_weights` wrote to `path`."""
    import jax
    import numpy as np
    from flax import nnx

    from charlm_jax.data import pipeline
    from charlm_jax.model import models

    vocab_size = pipeline.load_dataset(config.data).tokenizer.vocab_size
    graphdef, state = nnx.split(models.abstract_model(config, vocab_size))
    with np.load(path) as saved:
        leaves = [saved[f"arr_{i}"] for i in range(len(saved.files))]
    return nnx.merge(graphdef, jax.tree.unflatten(jax.tree.structure(state), leaves))


def time_peer(target: float) -> dict:
    """A run of nanoGPT's own train.py with the reference's recipe (experiments/
    nanogpt_peer.py): its whole process and when its evaluations first reached `target`."""
    recipe = REFERENCES[FLAGS.reference].nanogpt_recipe
    try:
        return nanogpt_peer.run(
            Path(FLAGS.nanogpt_dir), FLAGS.peer_python, recipe, FLAGS.peer_set, target
        )
    except RuntimeError as e:
        raise UserError(str(e)) from e


def run_seeds(argv: list[str], seeds: list[str], target: float) -> tuple[list[dict], list[dict]]:
    """Each seed's record from a fresh process per seed (this command with --seeds=SEED), up
    to the first that did not reach the target, with `process_s` its launch to exit; with
    --nanogpt_dir, each followed by a run of nanoGPT's train.py (alternated processes). A
    seed's process saves its model, and this one scores it on the whole validation text:
    an evaluation of the result, not part of the run it times."""
    passed = ("--seeds=", "--out=", "--nanogpt_dir=", "--peer_python=", "--peer_set=",
              "--model_out=")  # fmt: skip
    flags_ = [a for a in argv[1:] if not a.startswith(passed)]
    records, peers = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in seeds:
            out, weights = Path(tmp) / f"seed{seed}.json", Path(tmp) / f"seed{seed}.npz"
            command = [sys.executable, str(Path(__file__).resolve()), *flags_,
                       f"--seeds={seed}", f"--out={out}", f"--model_out={weights}"]  # fmt: skip
            start = time.perf_counter()
            done = subprocess.run(command, stdout=sys.stdout, stderr=subprocess.PIPE, text=True)
            process_s = time.perf_counter() - start
            if not out.exists():  # it failed before training
                last = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
                raise UserError(f"seed {seed}: {last.removeprefix('error: ')}")
            config = run_config(seed)
            loss = whole_val_loss(load_weights(config, weights), config)
            print(f"seed {seed}: whole val text {loss:.4f}", flush=True)
            records += [
                {**r, "process_s": process_s, "whole_val_loss": loss}
                for r in json.loads(out.read_text())["runs"]
            ]
            if not records[-1]["reached"]:
                break
            if FLAGS.nanogpt_dir:
                peers.append(peer := time_peer(target))
                print(nanogpt_peer.summary_line(peer), flush=True)
    return records, peers


def run_config(seed: str):
    """The config a seed trains: --config (or the reference's) with --set, at `seed`."""
    from charlm_jax.training import sweeps, train

    config_arg = FLAGS.config or REFERENCES[FLAGS.reference].config
    config = sweeps.load_config(sweeps.expand_grid(config_arg, [], FLAGS.set)[0])
    config.train.seed = int(seed)
    train.validate(config)
    return config


def run_here(seed: str, target: float) -> dict:
    """One seed's record, trained in this process; the model scored on the whole validation
    text, or with --model_out saved for the parent process to score."""
    from charlm_jax.training import parallel

    config = run_config(seed)
    max_steps = FLAGS.max_steps or config.train.num_steps
    # A process-wide setting, so the CLI makes it (before JAX's backends start), not
    # train_to_target, which tests call in a process whose backends already run.
    parallel.one_cpu_device_per_core(config.train.batch_size)
    cli.use_compilation_cache(FLAGS.compilation_cache)
    record, model = train_to_target(
        config, REFERENCES[FLAGS.reference], target, FLAGS.check_every, max_steps,
        FLAGS.max_seconds, FLAGS.gate,
    )  # fmt: skip
    if FLAGS.model_out:
        save_weights(model, FLAGS.model_out)
    else:
        record["whole_val_loss"] = whole_val_loss(model, config)
    return record


def summary_line(record: dict, target: float) -> str:
    """One line: how far a run got and how long it took."""
    head = (
        f"reached {target:g}" if record["reached"]
        else f"target {target:g} not reached: best {record['best_estimate']:.4f}"
    )  # fmt: skip
    return (
        f"seed {record['seed']}: {head} at step {record['steps']} in "
        f"{record['wall_to_target_s']:.1f} s (start-up {record['startup_s']:.1f} s, "
        f"{record['step_ms']:.1f} ms/step); estimate {record['estimate']:.4f}"
        + (f", whole val text {record['whole_val_loss']:.4f}" if "whole_val_loss" in record else "")
    )


def write_result(path: str, started: dict, target: float, records: list[dict],
                 peers: list[dict]) -> None:  # fmt: skip
    """The runs, their means and how they were made, as JSON (results/speedrun/)."""
    keys = ("steps", "wall_to_target_s", "startup_s", "step_ms", "estimate", "whole_val_loss",
            "process_s")  # fmt: skip
    keys = [key for key in keys if key in records[0]]  # a seed's own process has the first 5
    result = {
        "label": FLAGS.label, "reference": FLAGS.reference, "target": target, "runs": records,
        "mean": {key: statistics.mean(r[key] for r in records) for key in keys},
    }  # fmt: skip
    versions = {}
    if peers:
        recipe = REFERENCES[FLAGS.reference].nanogpt_recipe
        header = nanogpt_peer.peer_header(
            Path(FLAGS.nanogpt_dir), FLAGS.peer_python, recipe, FLAGS.peer_set
        )
        reached = [p["time_to_target_s"] for p in peers if p["time_to_target_s"] is not None]
        result["peer"] = {
            **header, "runs": peers,
            "mean_process_s": statistics.mean(p["process_s"] for p in peers),
            "mean_time_to_target_s": statistics.mean(reached) if reached else None,
        }  # fmt: skip
        versions["torch"] = header["torch"]
    provenance.write_json(path, result, started, **versions)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        sys.exit(f"error: unexpected arguments {argv[1:]}")
    target = REFERENCES[FLAGS.reference].target if FLAGS.target is None else FLAGS.target
    if not (math.isfinite(target) and target > 0):
        sys.exit(f"error: --target must be a positive number, got {target}")
    if FLAGS.check_every < 1 or FLAGS.max_steps < 0 or FLAGS.max_seconds < 0 or FLAGS.gate < 0:
        sys.exit("error: --check_every must be positive; --max_steps, --max_seconds, --gate >= 0")
    started = provenance.begin()
    cli.quiet_library_logs()
    here = len(FLAGS.seeds) == 1 and not FLAGS.nanogpt_dir
    try:
        if here:
            records, peers = [run_here(FLAGS.seeds[0], target)], []
        else:
            records, peers = run_seeds(sys.argv, FLAGS.seeds, target)
        if FLAGS.out:
            write_result(FLAGS.out, started, target, records, peers)
    except UserError as e:
        sys.exit(f"error: {e}")
    if not records[-1]["reached"]:
        sys.exit(f"error: {summary_line(records[-1], target)}")
    if here:
        print(summary_line(records[0], target))
        return
    print(
        f"mean of {len(records)} seeds: "
        f"{statistics.mean(r['wall_to_target_s'] for r in records):.1f} s to {target:g}, "
        f"{statistics.mean(r['steps'] for r in records):.0f} steps, whole val text "
        f"{statistics.mean(r['whole_val_loss'] for r in records):.4f}"
    )
    if peers:
        print(f"nanoGPT's train.py: {statistics.mean(p['process_s'] for p in peers):.1f} s")


if __name__ == "__main__":
    app.run(main, flags_parser=cli.flags_parser())
