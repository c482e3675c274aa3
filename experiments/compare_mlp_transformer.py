"""MLP against Transformer on tiny Shakespeare, at the same parameter count and the same
training time.

    python experiments/compare_mlp_transformer.py --transformer=configs/transformer.py:small \
        --mlp=configs/mlp.py:small --seconds=120 --workdir=results/compare

The MLP's hidden width is chosen so that its parameter count is closest to the
Transformer's. With --seconds, a short calibration run measures each model's training
speed and sets its step count so that it trains for about that long (DIR/plan.json keeps
the plan, so running the command again resumes the same runs); --seconds=0 keeps each
config's num_steps. Both runs go through the sweep machinery (DIR/transformer, DIR/mlp,
DIR/results.md and the plots); then each model samples from the same prompt
(DIR/samples.md).
"""

import dataclasses
import json
import shutil
import sys
from pathlib import Path

import ml_collections
import provenance
from absl import app, flags, logging

from charlm_jax import cli
from charlm_jax.data import text_files
from charlm_jax.data.tokenizers import CharTokenizer
from charlm_jax.decoding.sampling import Sampler
from charlm_jax.errors import UserError
from charlm_jax.model import models
from charlm_jax.training import sweeps, train

flags.DEFINE_string("transformer", "configs/transformer.py:small", "The Transformer's config.")
flags.DEFINE_string("mlp", "configs/mlp.py:small", "The MLP's config (its hidden_dim is matched).")
flags.DEFINE_multi_string(
    "set", [], "KEY=VALUE: an override for both models, e.g. train.* (repeatable)."
)
flags.DEFINE_float("seconds", 120, "Training time per model (0: the configs' num_steps).")
flags.DEFINE_integer("calibration_steps", 100, "Steps of the speed measurement per model.")
flags.DEFINE_string("workdir", "results/compare", "Directory of the comparison.")
flags.DEFINE_integer("jobs", 1, "Runs trained at once (more than 1 skews their timings).")
flags.DEFINE_string("prompt", "ROMEO:", "Prompt of the samples.")
flags.DEFINE_integer("max_new_tokens", 300, "Characters per sample.")
flags.DEFINE_float("temperature", 0.8, "Sampling temperature.")
FLAGS = flags.FLAGS
PLAN_FILE = "plan.json"
SAMPLES_FILE = "samples.md"


def matched_hidden_dim(config: ml_collections.ConfigDict, vocab_size: int, target: int) -> int:
    """The hidden_dim whose parameter count is closest to `target` (counts grow with it)."""
    config = config.copy_and_resolve_references()

    def count(hidden_dim: int) -> int:
        config.model.hidden_dim = hidden_dim
        return models.count_params(models.abstract_model(config, vocab_size))

    low, high = 1, 1
    while count(high) < target:
        low, high = high, 2 * high
    while high - low > 1:  # count(low) < target <= count(high)
        middle = (low + high) // 2
        low, high = (middle, high) if count(middle) < target else (low, middle)
    return min((low, high), key=lambda h: abs(count(h) - target))


def steps_for(
    config: ml_collections.ConfigDict, seconds: float, calibration_steps: int, workdir: Path
) -> int:
    """Training steps that take about `seconds`, from a short run's speed (in `workdir`,
    emptied first: a leftover finished run would not be timed)."""
    shutil.rmtree(workdir, ignore_errors=True)
    config = config.copy_and_resolve_references()
    config.train.num_steps = config.train.eval_every = calibration_steps
    config.train.eval_batches = 1
    summary = train.train_and_evaluate(config, workdir)
    steps_per_second = summary["train_tokens_per_sec"] / summary["tokens_per_step"]
    return max(1, round(seconds * steps_per_second))


def plan(workdir: Path) -> list[sweeps.Run]:
    """The two runs: parameters matched, and with --seconds, training time too. Kept in
    DIR/plan.json, and reused from there."""
    path = workdir / PLAN_FILE
    request = {k: FLAGS[k].value for k in ("transformer", "mlp", "set", "seconds")}
    if path.exists():
        saved = json.loads(path.read_text())
        if saved["request"] != request:
            raise UserError(f"{path} holds a comparison made with other flags: {saved['request']}")
        return [sweeps.Run(**run) for run in saved["runs"]]
    transformer = sweeps.expand_grid(FLAGS.transformer, [], FLAGS.set)[0]
    transformer_config = sweeps.load_config(transformer)
    target = models.count_params(
        models.abstract_model(transformer_config, vocab_size(transformer_config))
    )
    mlp = sweeps.expand_grid(FLAGS.mlp, [], FLAGS.set)[0]
    mlp_config = sweeps.load_config(mlp)
    hidden_dim = matched_hidden_dim(mlp_config, vocab_size(mlp_config), target)
    logging.info("Transformer: %d parameters; MLP hidden_dim %d matches it", target, hidden_dim)
    runs = [
        sweeps.Run("transformer", transformer.config, transformer.overrides),
        sweeps.Run("mlp", mlp.config, {**mlp.overrides, "model.hidden_dim": str(hidden_dim)}),
    ]
    if FLAGS.seconds > 0:
        runs = [timed(run, workdir / "calibration" / run.name) for run in runs]
    workdir.mkdir(parents=True, exist_ok=True)
    saved = {"request": request, "runs": [dataclasses.asdict(run) for run in runs]}
    path.write_text(json.dumps(saved, indent=2) + "\n")
    return runs


def timed(run: sweeps.Run, calibration_dir: Path) -> sweeps.Run:
    """`run` with the step count (and evaluation interval) for --seconds of training."""
    steps = steps_for(
        sweeps.load_config(run), FLAGS.seconds, FLAGS.calibration_steps, calibration_dir
    )
    logging.info("%s: %d steps for %g s of training", run.name, steps, FLAGS.seconds)
    overrides = {"train.num_steps": str(steps), "train.eval_every": str(max(1, steps // 10))}
    return dataclasses.replace(run, overrides={**run.overrides, **overrides})


def vocab_size(config: ml_collections.ConfigDict) -> int:
    return CharTokenizer.from_text(
        text_files.read_text(config.data), allow_unknown=config.data.allow_unknown
    ).vocab_size


def samples(workdir: Path, rows: list[dict]) -> str:
    """Markdown: one sample per finished run, from the same prompt and seed."""
    parts = [f"Prompt {FLAGS.prompt!r}, temperature {FLAGS.temperature:g}, best checkpoints.\n"]
    for row in rows:
        if row["status"] == "done":
            sampler = Sampler.from_workdir(workdir / row["run"])
            (text,) = sampler.generate(
                [FLAGS.prompt], FLAGS.max_new_tokens, temperature=FLAGS.temperature
            )
            parts.append(f"## {row['run']} (best val loss {row['best_val_loss']:.4f})\n")
            parts.append(f"```\n{FLAGS.prompt}{text}\n```\n")
    return "\n".join(parts)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    cli.quiet_library_logs()
    logging.set_verbosity(logging.INFO)
    workdir = Path(FLAGS.workdir)
    started = provenance.begin()
    try:
        with cli.StopSignals(cli.interrupt):  # SIGTERM stops it as Ctrl-C does
            rows = sweeps.run_sweep(plan(workdir), workdir, FLAGS.jobs)
        text = samples(workdir, rows)
    except UserError as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        sys.exit("interrupted: run the same command to resume")
    (workdir / SAMPLES_FILE).write_text(text)
    # What made the comparison's results.csv, for experiments/report.py.
    provenance.write_json(workdir / provenance.FILE, {"table": sweeps.RESULTS_CSV}, started)
    print(sweeps.markdown_table(rows, list(rows[0])))
    print(f"\nPlots: {workdir / sweeps.CURVES_PNG}, {workdir / sweeps.LOSS_VS_PARAMS_PNG}\n")
    print(text)


if __name__ == "__main__":
    app.run(main, flags_parser=cli.flags_parser())
