"""Plots training runs.

python -m charlm_jax.plot DIR              # DIR/loss_curve.png
python -m charlm_jax.plot DIR1 DIR2 ... [--out=runs.png]   # overlaid validation curves
"""

import sys
from pathlib import Path

from absl import app, flags

from charlm_jax import cli
from charlm_jax.training import curves
from charlm_jax.training.metrics import METRICS_FILE, read_history

flags.DEFINE_string("out", None, "Output PNG (default: DIR/loss_curve.png, or runs.png).")
FLAGS = flags.FLAGS


def main(argv: list[str]) -> None:
    workdirs = [Path(a) for a in argv[1:]]
    if not workdirs:
        sys.exit("error: name at least one workdir: python -m charlm_jax.plot DIR [DIR...]")
    for workdir in workdirs:
        if not (workdir / METRICS_FILE).exists():
            sys.exit(f"error: no {METRICS_FILE} in {workdir}: not a training workdir")
    if len(workdirs) == 1:
        out = FLAGS.out or workdirs[0] / "loss_curve.png"
        curves.plot_loss_curve(read_history(workdirs[0]), out, title=str(workdirs[0]))
    else:
        out = FLAGS.out or "runs.png"
        curves.plot_runs(workdirs, out)
    print(out)


if __name__ == "__main__":
    app.run(main, flags_parser=cli.flags_parser())
