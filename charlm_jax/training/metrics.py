"""Training metrics: averaged with clu, logged to DIR/metrics.jsonl (the run's history, read by
the plots) and to TensorBoard event files in DIR/tensorboard (no TensorFlow: `events`)."""

import json
import math
from pathlib import Path

import flax
from clu import metrics as clu_metrics

from charlm_jax.training.events import EventFile
from charlm_jax.workdir import files

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


@flax.struct.dataclass  # clu reads the annotations: no `from __future__ import annotations`
class TrainMetrics(clu_metrics.Collection):
    loss: clu_metrics.Average.from_output("loss")
    grad_norm: clu_metrics.Average.from_output("grad_norm")
    lr: clu_metrics.LastValue.from_output("lr")  # the AdamW learning rate of the last step


def bits_per_character(loss: float, chars_per_token: float) -> float:
    """A loss in nats per token as bits per character of text: comparable across tokenizers
    (for the character tokenizer, loss / ln 2)."""
    return loss / math.log(2) / chars_per_token


def read_history(workdir: str | Path) -> list[dict]:
    """The records of DIR/metrics.jsonl: dicts with "step", "kind" ("train" or "eval"). A
    last line without its newline (a run killed while appending it) is left out."""
    path = Path(workdir) / METRICS_FILE
    if not path.exists():
        return []
    lines = path.read_text().split("\n")[:-1]  # what follows the last newline is partial
    return [json.loads(line) for line in lines if line.strip()]


class MetricsLog:
    """Appends records to DIR/metrics.jsonl and TensorBoard. Opened at `start_step`, it drops
    what a killed run wrote after its last checkpoint, so a resumed history stays one line.
    `read_only` (processes other than the first in a multi-process run) keeps the history in
    memory and writes nothing."""

    def __init__(self, workdir: Path, start_step: int, read_only: bool = False):
        self.path = workdir / METRICS_FILE
        self.history = [r for r in read_history(workdir) if r["step"] <= start_step]
        self._tensorboard = None
        if not read_only:
            files.write_text(self.path, "".join(json.dumps(r) + "\n" for r in self.history))
            self._tensorboard = EventFile(workdir / TENSORBOARD_DIR, purge_step=start_step + 1)

    def write(self, step: int, kind: str, **values: float) -> None:
        record = {"step": step, "kind": kind, **values}
        self.history.append(record)
        if self._tensorboard is None:
            return
        with self.path.open("a") as f:  # one write of a whole line (see `read_history`)
            f.write(json.dumps(record) + "\n")
        for name, value in values.items():
            self._tensorboard.add_scalar(f"{kind}/{name}", value, step)
        self._tensorboard.flush()

    def evals(self) -> list[dict]:
        return [r for r in self.history if r["kind"] == "eval"]

    def close(self) -> None:
        if self._tensorboard is not None:
            self._tensorboard.close()
