"""Trains every combination of swept config values and compares the runs.

    python experiments/sweep.py --config=configs/transformer.py:small \
        --sweep=model.num_layers=2,4,6 --sweep=model.position=learned,rope \
        --set=train.num_steps=500 --workdir=runs/sweep [--jobs=2]

One run per combination in DIR/NAME (NAME from its swept values, e.g.
num_layers=2__position=rope; `--sweep=preset=small,medium` sweeps the config's preset).
Running the command again skips finished runs and resumes interrupted ones. Writes
DIR/results.csv, DIR/results.md (best val loss first), DIR/val_curves.png,
DIR/loss_vs_params.png and DIR/loss_vs_time.png. Each run's console output is in
DIR/NAME/train.log; a failed run's error is in the table and the others go on.
"""

import sys
from pathlib import Path

import provenance
from absl import app, flags, logging

from charlm_jax import cli
from charlm_jax.errors import UserError
from charlm_jax.training import sweeps

flags.DEFINE_string("config", None, "Config file and preset: configs/transformer.py:small.")
flags.DEFINE_multi_string("sweep", [], "KEY=V1,V2,...: values to sweep (repeat for a grid).")
flags.DEFINE_multi_string("set", [], "KEY=VALUE: a fixed override for every run (repeatable).")
flags.DEFINE_string("workdir", None, "Directory of the sweep: one subdirectory per run.")
flags.DEFINE_integer("jobs", 1, "Runs trained at once, each in its own process.")
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    cli.quiet_library_logs()
    logging.set_verbosity(logging.INFO)
    started = provenance.begin()
    try:
        runs = sweeps.expand_grid(FLAGS.config, FLAGS.sweep, FLAGS.set)
        with cli.StopSignals(cli.interrupt):  # SIGTERM stops it as Ctrl-C does
            rows = sweeps.run_sweep(runs, FLAGS.workdir, FLAGS.jobs)
    except UserError as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        sys.exit("interrupted: run the same command to resume")
    # What made the sweep's results.csv, for experiments/report.py.
    provenance.write_json(Path(FLAGS.workdir) / provenance.FILE, {"table": sweeps.RESULTS_CSV},
                          started)  # fmt: skip
    print(sweeps.markdown_table(rows, list(rows[0])))
    failed = sum(row["status"] != "done" for row in rows)
    if failed:
        sys.exit(f"{failed} of {len(rows)} runs failed: see the error column")


if __name__ == "__main__":
    app.run(main, flags_parser=cli.flags_parser())
