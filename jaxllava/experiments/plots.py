"""`launch.py plot RUNDIR... --out DIR`: report figures (PNG) from runs' metrics.jsonl.

One figure per quantity, every run a line in it: the training loss (and held-out loss) against
words seen; each evaluation metric against words seen (the milestones); the learning rate; the
per-step modality mix (share of image samples) and padding. TensorBoard stays the live view;
these are for reports and sweeps (jaxllava/experiments/sweep.py writes them for its runs).
"""
from __future__ import annotations

import json
import os
import re
from typing import Sequence

from jaxllava.errors import ConfigError


def read_metrics(workdir: str) -> list[dict]:
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise ConfigError(f"{workdir}: no metrics.jsonl here, so it is not a jaxllava run directory")
    rows = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:  # a run killed mid-write leaves a partial last line
                if line.endswith("\n"):
                    raise ConfigError(f"{path} line {number}: not JSON ({e})") from None
    return rows


def run_labels(workdirs: Sequence[str]) -> list[str]:
    """The shortest path tails that tell the runs apart (seed_0 under two arms: arm/seed_0)."""
    parts = [os.path.normpath(os.path.abspath(w)).split(os.sep) for w in workdirs]
    for depth in range(1, max(len(p) for p in parts) + 1):
        labels = ["/".join(p[-depth:]) for p in parts]
        if len(set(labels)) == len(labels):
            return labels
    raise ConfigError(f"the same run directory is given twice: {list(workdirs)}")


def _series(rows: list[dict], key: str) -> tuple[list[float], list[float]]:
    """(words seen, value) of every row with `key`; evaluation rows take the words of their step."""
    words = {0: 0}
    for row in rows:
        if "words_seen" in row:
            words[row["step"]] = row["words_seen"]
    points = [(words[r["step"]], r[key]) for r in rows if key in r and r["step"] in words]
    return [p[0] for p in points], [p[1] for p in points]


def plot_runs(workdirs: Sequence[str], out: str) -> list[str]:
    """Writes the figures; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    runs = {label: read_metrics(w) for label, w in zip(run_labels(workdirs), workdirs)}
    os.makedirs(out, exist_ok=True)
    written = []

    def figure(name, title, xlabel, ylabel, draw):
        fig, ax = plt.subplots(figsize=(7, 4.2))
        for label, rows in runs.items():
            draw(ax, label, rows)
        ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        path = os.path.join(out, f"{name}.png")
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    def loss(ax, label, rows):
        line, = ax.plot(*_series(rows, "loss"), label=f"{label} train")
        ax.plot(*_series(rows, "val_loss"), "o--", color=line.get_color(), label=f"{label} held out")

    figure("loss", "loss", "words seen", "cross-entropy (nats/token)", loss)
    metrics = sorted({k for rows in runs.values() for r in rows for k in r if k.startswith("eval/")})
    for key in metrics:
        figure(re.sub(r"[^A-Za-z0-9_.-]+", "_", key), key, "words seen", "accuracy (%)",
               lambda ax, label, rows, key=key: ax.plot(*_series(rows, key), "o-", label=label))
    def steps(rows, key):
        return [r["step"] for r in rows if key in r], [r[key] for r in rows if key in r]

    figure("learning_rate", "learning rate", "step", "lr", lambda ax, label, rows: ax.plot(*steps(rows, "lr"),
                                                                                           label=label))

    def mix(ax, label, rows):
        fed = [r for r in rows if "image_samples" in r]
        share = [r["image_samples"] / max(1, r["image_samples"] + r["text_samples"]) for r in fed]
        line, = ax.plot([r["step"] for r in fed], share, label=f"{label} image share of samples")
        ax.plot([r["step"] for r in fed], [r["padding_fraction"] for r in fed], ":", color=line.get_color(),
                label=f"{label} padding share of tokens")

    figure("modality_and_padding", "what each step fed", "step", "fraction", mix)
    return written
