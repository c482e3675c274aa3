"""Loss curves from DIR/metrics.jsonl, with matplotlib (no display needed)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from charlm_jax.training.metrics import read_history  # noqa: E402


def save_figure(fig: plt.Figure, path: str | Path, dpi: int = 100) -> None:
    """Writes `fig` to `path` and closes it."""
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)  # pyplot keeps every open figure alive otherwise


def _series(history: list[dict], kind: str, key: str) -> tuple[list[int], list[float]]:
    points = [(r["step"], r[key]) for r in history if r["kind"] == kind and key in r]
    return [p[0] for p in points], [p[1] for p in points]


def plot_loss_curve(history: list[dict], path: str | Path, title: str = "") -> None:
    """Train and validation loss against step (and tokens, on top), the best point marked."""
    fig, ax = plt.subplots(figsize=(8, 5))
    steps, loss = _series(history, "train", "loss")
    ax.plot(steps, loss, color="tab:blue", alpha=0.35, label="train (running)")
    for key, color in (("train_loss", "tab:blue"), ("val_loss", "tab:orange")):
        s, v = _series(history, "eval", key)
        ax.plot(s, v, "o-", color=color, markersize=3, label=key.replace("_", " "))
    s, v = _series(history, "eval", "val_loss")
    if v:
        best = min(range(len(v)), key=v.__getitem__)
        ax.plot(s[best], v[best], "*", color="red", markersize=14, label=f"best {v[best]:.4f}")
    tokens_per_step = next((r["tokens"] / r["step"] for r in history if r["step"]), None)
    if tokens_per_step:
        top = ax.secondary_xaxis(
            "top", functions=(lambda x: x * tokens_per_step, lambda t: t / tokens_per_step)
        )
        top.set_xlabel("tokens")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats per character)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    save_figure(fig, path)


def plot_runs(workdirs: list[str | Path], path: str | Path, include_train: bool = True) -> None:
    """Overlays the validation (and train) curves of several runs."""
    fig, ax = plt.subplots(figsize=(8, 5))
    for i, workdir in enumerate(workdirs):
        history = read_history(workdir)
        color = f"C{i}"
        ax.plot(
            *_series(history, "eval", "val_loss"),
            "o-",
            color=color,
            markersize=3,
            label=f"{Path(workdir).name} val",
        )
        if include_train:
            ax.plot(
                *_series(history, "eval", "train_loss"),
                "--",
                color=color,
                alpha=0.6,
                label=f"{Path(workdir).name} train",
            )
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats per character)")
    ax.grid(alpha=0.3)
    ax.legend()
    save_figure(fig, path)


def plot_tradeoff(
    points: list[tuple[str, float, float]], xlabel: str, path: str | Path, log_x: bool = True
) -> None:
    """Best validation loss against a cost (parameters, wall time): one labelled point per
    run, given as (label, cost, loss)."""
    fig, ax = plt.subplots(figsize=(8, 5))
    for i, (label, x, y) in enumerate(points):
        ax.plot(x, y, "o", color=f"C{i}", markersize=8, label=label)
    if log_x:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("best val loss (nats per character)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize="small")
    save_figure(fig, path)
