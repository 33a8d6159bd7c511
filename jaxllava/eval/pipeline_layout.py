"""The BabyLM 2025 task sets, where their data lives, and where their results go.

Task sets (`TASK_SETS`), directory names as the official scripts use them
(`babylm/evaluation-pipeline-2025`: `eval_zero_shot.sh`, `eval_zero_shot_fast.sh`,
`eval_aoa.sh`, `eval_multimodal.sh`), relative to `evaluation_data/full_eval` or
`evaluation_data/fast_eval`:

  babylm2025       blimp_filtered, supplement_filtered, ewok_filtered, entity_tracking,
                   wug_adj_nominalization, wug_past_tense, comps, reading/reading_data.csv,
                   aoa/cdi_childes.json (+ aoa/cdi_human.csv for the fit), and for the
                   multimodal track vqa_filtered, winoground_filtered and devbench/ (TROG,
                   Visual Vocabulary, THINGS; eval/devbench.py).
  babylm2025_fast  blimp_fast (200 pairs per paradigm), supplement_fast (50 per file),
                   ewok_fast (100 per domain), entity_tracking_fast (the `regular` split),
                   wug_adj_nominalization, wug_past_tense, reading/reading_data.csv.
                   The pipeline scores these at every checkpoint (`--revision_name
                   chck_<N>M`); a team downloads `evaluation_data/fast_eval` from OSF
                   (osf.io/ryjfm) and points jaxllava at it:
                     python launch.py eval --checkpoint runs/x/milestones/chck_10M \\
                         --suite babylm2025_fast --data-root evaluation_data
                   (`--data-root` may also name `fast_eval` itself.)

Results tree (`pipeline_dir`), what `collate_preds.py` reads:
  <results>/<model>/<revision>/zero_shot/<backend>/<task>/<data dir>/predictions.json
      (+ best_temperature_report.txt)   e.g. blimp/blimp_fast, entity_tracking/entity_tracking
  <results>/<model>/<revision>/zero_shot/<backend>/reading/predictions.json
  <results>/<model>/main/zero_shot/<backend>/AoA_word/surprisal.json   (AoA always under main)
with <revision> "main" for the final model and "chck_<N>M" for a milestone, <backend>
"causal". `size_problems` repeats collate_preds.py's item-count checks, so a run on
incomplete data is flagged before a submission is built from it.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping, Optional

from jaxllava.errors import ConfigError

BACKEND = "causal"
MAIN = "main"


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    name: str  # our name, for tables and output directories
    kind: str  # blimp | ewok | entity_tracking | comps | wug_adj | wug_past | reading | aoa | vqa | winoground
    relpath: str  # under full_eval/ or fast_eval/
    pipeline_task: str  # the pipeline's --task (directory under zero_shot/<backend>/)
    data_dir: str  # the directory under the task ("" for reading and AoA)


FULL = (
    TaskSpec("blimp", "blimp", "blimp_filtered", "blimp", "blimp_filtered"),
    TaskSpec("supplement", "blimp", "supplement_filtered", "blimp", "supplement_filtered"),
    TaskSpec("ewok", "ewok", "ewok_filtered", "ewok", "ewok_filtered"),
    TaskSpec("entity_tracking", "entity_tracking", "entity_tracking", "entity_tracking", "entity_tracking"),
    TaskSpec("wug_adj", "wug_adj", "wug_adj_nominalization", "wug_adj", "wug_adj_nominalization"),
    TaskSpec("wug_past", "wug_past", "wug_past_tense", "wug_past", "wug_past_tense"),
    TaskSpec("comps", "comps", "comps", "comps", "comps"),
    TaskSpec("reading", "reading", "reading/reading_data.csv", "reading", ""),
    TaskSpec("aoa", "aoa", "aoa/cdi_childes.json", "AoA_word", ""),
    TaskSpec("vqa", "vqa", "vqa_filtered", "vqa", "vqa_filtered"),
    TaskSpec("winoground", "winoground", "winoground_filtered", "winoground", "winoground_filtered"),
    TaskSpec("devbench", "devbench", "devbench", "devbench", ""),
)
FAST = (
    TaskSpec("blimp_fast", "blimp", "blimp_fast", "blimp", "blimp_fast"),
    TaskSpec("supplement_fast", "blimp", "supplement_fast", "blimp", "supplement_fast"),
    TaskSpec("ewok_fast", "ewok", "ewok_fast", "ewok", "ewok_fast"),
    TaskSpec("entity_tracking_fast", "entity_tracking", "entity_tracking_fast", "entity_tracking",
             "entity_tracking_fast"),
    TaskSpec("wug_adj", "wug_adj", "wug_adj_nominalization", "wug_adj", "wug_adj_nominalization"),
    TaskSpec("wug_past", "wug_past", "wug_past_tense", "wug_past", "wug_past_tense"),
    TaskSpec("reading", "reading", "reading/reading_data.csv", "reading", ""),
)
TASK_SETS = {"babylm2025": FULL, "babylm2025_fast": FAST}
SUBDIR = {"babylm2025": "full_eval", "babylm2025_fast": "fast_eval"}
CDI_HUMAN = "aoa/cdi_human.csv"  # calculate_results_from_pred.py: the children's data for the AoA fit

# Item counts collate_preds.py requires (per UID where a dict, else per UID for the fast
# BLiMP/supplement/EWoK files, else in total).
FAST_PER_UID = {"blimp_fast": 200, "supplement_fast": 50, "ewok_fast": 100}
ENTITY_TRACKING_FAST = {"regular_0_ops": 606, "regular_1_ops": 607, "regular_2_ops": 606, "regular_3_ops": 606,
                        "regular_4_ops": 568, "regular_5_ops": 159}
TOTALS = {"wug_adj": 200, "wug_past": 50, "reading": 1726, "blimp": 59_875,
          "supplement": 5_218, "ewok": 7_618, "entity_tracking": 9_483, "comps": 49_340 + 3 * 13_896}


def data_dir(data_root: str, task_set: str) -> str:
    """The directory holding the set's files: `<root>/full_eval` (or fast_eval) when present, else root."""
    if task_set not in TASK_SETS:
        raise ConfigError(f"--suite must be one of {sorted(TASK_SETS)}, got {task_set!r}")
    nested = os.path.join(data_root, SUBDIR[task_set])
    return nested if os.path.isdir(nested) else data_root


def find_tasks(data_root: str, task_set: str) -> tuple[list[tuple[TaskSpec, str]], list[tuple[TaskSpec, str]]]:
    """(found: (spec, path)), (skipped: (spec, why)) for the set under `data_root`."""
    base = data_dir(data_root, task_set)
    found, skipped = [], []
    for spec in TASK_SETS[task_set]:
        path = os.path.join(base, spec.relpath)
        if os.path.exists(path):
            found.append((spec, path))
        else:
            skipped.append((spec, f"no {path}"))
    return found, skipped


def pipeline_dir(results_root: str, model_name: str, spec: TaskSpec, *, revision: str = MAIN,
                 backend: str = BACKEND) -> str:
    """Where the pipeline (and so collate_preds.py) keeps this task's files."""
    if spec.kind == "devbench":  # devbench/eval.py: zero_shot/devbench, no backend level
        return os.path.join(results_root, model_name, revision, "zero_shot", "devbench")
    zero_shot = os.path.join(results_root, model_name, MAIN if spec.kind == "aoa" else revision, "zero_shot",
                             backend, spec.pipeline_task)
    return os.path.join(zero_shot, spec.data_dir) if spec.data_dir else zero_shot


def write_pipeline_layout(results_root: str, model_name: str, spec: TaskSpec, result: Any, *,
                          revision: str = MAIN, backend: str = BACKEND) -> str:
    """Write one task's result where the pipeline would; returns the directory.

    result: scoring.Results (blimp/ewok), text_tasks.TextTaskResults, reading.ReadingResults, or
    the dict aoa.evaluate_aoa returns."""
    from jaxllava.eval import aoa, devbench, reading, report, scoring, text_tasks

    directory = pipeline_dir(results_root, model_name, spec, revision=revision, backend=backend)
    if isinstance(result, scoring.Results):
        report.write_pipeline_files(result, directory)
    elif isinstance(result, text_tasks.TextTaskResults):
        text_tasks.write_pipeline_files(result, directory)
    elif isinstance(result, reading.ReadingResults):
        reading.write_pipeline_files(result, directory)
    elif isinstance(result, devbench.DevbenchResults):
        devbench.write_pipeline_files(result, directory, model_name)
    elif spec.kind == "aoa" and isinstance(result, Mapping):
        aoa.write_surprisal_json(dict(result), directory)
    else:
        raise TypeError(f"no pipeline files for a {type(result).__name__} result of task {spec.name!r}")
    return directory


def size_problems(spec: TaskSpec, counts: Mapping[str, int], *, fast: Optional[bool] = None) -> list[str]:
    """collate_preds.py's count checks for one task: [] when a submission would accept it."""
    fast = spec in FAST if fast is None else fast
    problems = []
    if fast and spec.name in FAST_PER_UID:
        want = FAST_PER_UID[spec.name]
        problems += [f"{uid}: {n} items, the pipeline expects {want}" for uid, n in counts.items() if n != want]
    elif fast and spec.kind == "entity_tracking":
        for uid, want in ENTITY_TRACKING_FAST.items():
            if counts.get(uid, 0) != want:
                problems.append(f"{uid}: {counts.get(uid, 0)} items, the pipeline expects {want}")
    elif spec.kind in TOTALS or spec.name in TOTALS:
        want = TOTALS.get(spec.name, TOTALS.get(spec.kind))
        if sum(counts.values()) != want:
            problems.append(f"{sum(counts.values())} items in all, the pipeline expects {want}")
    return problems
