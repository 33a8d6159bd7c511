"""`launch.py sweep`: every arm × seed trained in its own work directory, then compared with intervals.

    python launch.py sweep --config A.yaml --config B.yaml [--set ...] --seeds 3 --out DIR [--only ARM:SEED]

An arm is a config file, named by its file stem. Seed k (0 .. seeds-1) sets `train.seed` and
`data.seed` (initialisation, data order and held-out split), so arm A seed k and arm B seed k see
the same data. Runs live in `DIR/<arm>/seed_<k>`; a run that was interrupted resumes from its last
checkpoint and a finished one is not trained again (jaxllava/train/loop.py), so rerunning the same
command after a crash or a preemption continues the sweep. On one host the runs go one after
another; across hosts, give each job one run with `--only ARM:SEED` and run the command once more
without `--only` to write the table (README "Experiments").

The comparison reads the final evaluation of every run (`<workdir>/eval/step_<N>/<task>/<setting>/
predictions.jsonl`): per arm and task, the mean over seeds with a 95% Student-t interval; per task,
each later arm against the first with a paired bootstrap over items (jaxllava/experiments/stats.py).
Writes `DIR/sweep.json`, `DIR/table.txt` and the runs' figures under `DIR/figures/`
(jaxllava/experiments/plots.py), and prints the table.
"""
from __future__ import annotations

import dataclasses
import glob
import json
import os
import time
from typing import Callable, Optional, Sequence

import numpy as np

from jaxllava.errors import ConfigError
from jaxllava.experiments.plots import plot_runs
from jaxllava.experiments.stats import (
    Interval,
    macro_accuracy,
    paired_bootstrap,
    seed_interval,
)


@dataclasses.dataclass(frozen=True)
class Run:
    arm: str
    seed: int
    config: str
    workdir: str


def plan_runs(configs: Sequence[str], seeds: int, out: str, only: Optional[str] = None) -> list[Run]:
    names = [os.path.splitext(os.path.basename(c))[0] for c in configs]
    if len(set(names)) != len(names):
        raise ConfigError(f"sweep arms are named by their config file stems, and these repeat: {names}")
    if seeds < 1:
        raise ConfigError(f"--seeds must be >= 1, got {seeds}")
    runs = [Run(name, k, config, os.path.join(out, name, f"seed_{k}"))
            for name, config in zip(names, configs) for k in range(seeds)]
    if only is None:
        return runs
    chosen = [r for r in runs if f"{r.arm}:{r.seed}" == only]
    if not chosen:
        raise ConfigError(f"--only {only!r} names no run; the runs are {[f'{r.arm}:{r.seed}' for r in runs]}")
    return chosen


def train_runs(runs: Sequence[Run], overrides: Sequence[str], train: Callable[..., dict]) -> Optional[int]:
    """Trains (or resumes, or skips as finished) each run in turn; returns a signal number if one stopped it."""
    from jaxllava.config import load_config

    for k, run in enumerate(runs, start=1):
        print(f"== sweep run {k}/{len(runs)}: arm {run.arm}, seed {run.seed} in {run.workdir}", flush=True)
        config = load_config(run.config, [*overrides, f"train.seed={run.seed}", f"data.seed={run.seed}",
                                          f"train.workdir={run.workdir}"])
        summary = train(config)
        if summary["signal"] is not None:
            return summary["signal"]
    return None


def final_predictions(workdir: str) -> dict[str, list[dict]]:
    """{"task/setting": predictions} from a run's last end-of-training evaluation."""
    steps = sorted(glob.glob(os.path.join(workdir, "eval", "step_*")), key=lambda p: int(p.rsplit("_", 1)[1]))
    if not steps:
        raise ConfigError(f"{workdir}: the run wrote no evaluation (eval.tasks empty or eval.at_end false?)")
    found = {}
    for path in sorted(glob.glob(os.path.join(steps[-1], "*", "*", "predictions.jsonl"))):
        task, setting = path.split(os.sep)[-3:-1]
        with open(path, encoding="utf-8") as f:
            found[f"{task}/{setting}"] = [json.loads(line) for line in f]
    return found


def compare(runs: Sequence[Run], *, bootstrap_samples: int = 2000) -> dict:
    """Scores per arm with seed intervals, and each arm against the first with a paired bootstrap."""
    arms = list(dict.fromkeys(r.arm for r in runs))
    correct: dict[str, dict[str, list[np.ndarray]]] = {}
    groups: dict[str, np.ndarray] = {}
    for run in runs:
        for key, rows in final_predictions(run.workdir).items():
            rows = sorted(rows, key=lambda r: r["id"])
            order = np.array([r["UID"] for r in rows])
            if groups.setdefault(key, order).tolist() != order.tolist():
                raise ConfigError(f"{run.workdir}: {key} scored other items than the sweep's other runs")
            correct.setdefault(key, {}).setdefault(run.arm, []).append(np.array([float(r["correct"]) for r in rows]))
    table: dict = {"arms": arms, "scores": {}, "differences": {}}
    for key, by_arm in correct.items():
        table["scores"][key] = {}
        for arm in arms:
            per_seed = [macro_accuracy(c, groups[key]) for c in by_arm.get(arm, [])]
            table["scores"][key][arm] = {"per_seed": per_seed, **dataclasses.asdict(seed_interval(per_seed))}
        table["differences"][key] = {}
        for arm in arms[1:]:
            interval, p = paired_bootstrap(np.stack(by_arm[arms[0]]), np.stack(by_arm[arm]), groups[key],
                                           samples=bootstrap_samples)
            table["differences"][key][f"{arm} - {arms[0]}"] = {**dataclasses.asdict(interval), "p": p}
    return table


def format_table(table: dict) -> str:
    arms = table["arms"]
    header = ["task/setting", *arms, *(f"{a} - {arms[0]}" for a in arms[1:])]
    rows = [header]
    for key, scores in table["scores"].items():
        cells = [key] + [Interval(**{k: scores[a][k] for k in ("mean", "low", "high", "n")}).format() for a in arms]
        for d in table["differences"][key].values():
            cells.append(f"{Interval(d['mean'], d['low'], d['high'], d['n']).format()} p={d['p']:.3f}")
        rows.append(cells)
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    note = ("accuracy (%), macro over UIDs: mean over seeds [95% t-interval]; differences: paired bootstrap "
            "over items [95% percentile interval], two-sided p")
    return "\n".join([lines[0], "-" * len(lines[0]), *lines[1:], note])


def run_sweep(configs: Sequence[str], overrides: Sequence[str], seeds: int, out: str, *, only: Optional[str] = None,
              train: Optional[Callable[..., dict]] = None) -> int:
    if train is None:
        from jaxllava.train.loop import train
    runs = plan_runs(configs, seeds, out, only)
    started = time.monotonic()
    signal = train_runs(runs, overrides, train)
    if signal is not None:
        return 128 + signal
    if only is not None:
        print(f"run {only} done; without --only, the same command writes the table once every run is done")
        return 0
    table = compare(runs)
    table.update(configs=list(configs), overrides=list(overrides), seeds=seeds,
                 runs=[dataclasses.asdict(r) for r in runs], seconds=round(time.monotonic() - started, 1))
    text = format_table(table)
    figures = plot_runs([r.workdir for r in runs], os.path.join(out, "figures"))
    table["figures"] = [os.path.relpath(f, out) for f in figures]
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "sweep.json"), "w", encoding="utf-8") as f:
        json.dump(table, f, indent=2)
    with open(os.path.join(out, "table.txt"), "w", encoding="utf-8") as f:
        f.write(text + "\n")
    print(text)
    return 0
