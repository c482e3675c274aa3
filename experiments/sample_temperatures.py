"""Samples a batch of prompts at several temperatures through the Python API and prints
the samples side by side, one column per temperature.

    python experiments/sample_temperatures.py --workdir=runs/default \
        --prompts="ROMEO:,JULIET:" --temperatures=0,0.5,0.8,1.2 --max_new_tokens=160
"""

import textwrap

from absl import app, flags

from charlm_jax import cli
from charlm_jax.decoding.sampling import Sampler

flags.DEFINE_string("workdir", None, "A trained run's directory.", required=True)
flags.DEFINE_string("checkpoint", "best", 'Checkpoint: "best", "latest" or a step number.')
flags.DEFINE_list("prompts", ["ROMEO:", "JULIET:", "First Citizen:"], "Prompts.")
flags.DEFINE_list("temperatures", ["0", "0.5", "0.8", "1.2"], "Temperatures (0 is greedy).")
flags.DEFINE_integer("max_new_tokens", 160, "Characters per sample.")
flags.DEFINE_integer("width", 34, "Column width.")
flags.DEFINE_integer("seed", 0, "Random seed.")
FLAGS = flags.FLAGS


def side_by_side(columns: dict[str, str], width: int) -> str:
    wrapped = {
        title: [line for para in text.split("\n") for line in textwrap.wrap(para, width) or [""]]
        for title, text in columns.items()
    }
    height = max(len(lines) for lines in wrapped.values())
    rows = [" | ".join(title.ljust(width) for title in wrapped)]
    rows.append("-+-".join("-" * width for _ in wrapped))
    for i in range(height):
        cells = (lines[i] if i < len(lines) else "" for lines in wrapped.values())
        rows.append(" | ".join(cell.ljust(width) for cell in cells))
    return "\n".join(rows)


def main(argv):
    del argv
    cli.quiet_library_logs()
    sampler = Sampler.from_workdir(FLAGS.workdir, FLAGS.checkpoint)
    temperatures = [float(t) for t in FLAGS.temperatures]
    samples = {
        t: sampler.generate(FLAGS.prompts, FLAGS.max_new_tokens, temperature=t, seed=FLAGS.seed)
        for t in temperatures
    }
    for i, prompt in enumerate(FLAGS.prompts):
        print(f"\n=== {prompt!r}\n")
        columns = {f"temperature {t:g}": prompt + samples[t][i] for t in temperatures}
        print(side_by_side(columns, FLAGS.width))


if __name__ == "__main__":
    app.run(main)
