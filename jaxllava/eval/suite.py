"""`launch.py eval --suite babylm2025 --data-root DIR`: every BabyLM 2025 task found, in process.

The task sets and their directory names are `pipeline_layout.py`'s (the official
`evaluation_data/full_eval` and `fast_eval` names). A data root in another layout, such as the
bundled `data/sample`, names its files in `babylm_tasks.json` ({task name: path relative to the
root}). Each task found is scored with its own reader (minimal pairs and the image tasks through
`evaluator.MinimalPairEvaluator`, the others through `text_tasks.py`, `reading.py` and `aoa.py`),
printed as a table, written under `<out>/<task>/`, and written in the pipeline's results tree under
`<out>/results/` (what its collation step reads, so a team can submit from it). Tasks whose files
are missing are listed as skipped, with the path looked for; image tasks are also reported without
vision, side by side. AoA reads the milestone checkpoints of the run (`<workdir>/milestones/`).
"""
from __future__ import annotations

import json
import os
from typing import Any, Mapping, Optional

from jaxllava.errors import ConfigError
from jaxllava.eval import aoa, devbench, pipeline_layout, reading, text_tasks
from jaxllava.eval.evaluator import MinimalPairEvaluator

MANIFEST = "babylm_tasks.json"
IMAGE_KINDS = ("vqa", "winoground")


def find_suite_tasks(data_root: str, suite: str) -> tuple[list, list]:
    """(found (spec, path), skipped (spec, why)): the official layout, or the root's manifest."""
    manifest_path = os.path.join(data_root, MANIFEST)
    if not os.path.isfile(manifest_path):
        return pipeline_layout.find_tasks(data_root, suite)
    if suite not in pipeline_layout.TASK_SETS:
        raise ConfigError(f"--suite must be one of {sorted(pipeline_layout.TASK_SETS)}, got {suite!r}")
    with open(manifest_path, encoding="utf-8") as f:
        manifest = json.load(f)
    specs = {spec.name: spec for spec in pipeline_layout.TASK_SETS[suite]}
    unknown = sorted(set(manifest) - set(specs))
    if unknown:
        raise ConfigError(f"{manifest_path}: {unknown} are not tasks of {suite} ({sorted(specs)})")
    found, skipped = [], []
    for name, spec in specs.items():
        path = os.path.join(data_root, manifest[name]) if name in manifest else None
        if path is not None and os.path.exists(path):
            found.append((spec, path))
        else:
            skipped.append((spec, f"not in {manifest_path}" if path is None else f"no {path}"))
    return found, skipped


def run_suite(model, tokenizer, *, suite: str, data_root: str, out: str, workdir: Optional[str], revision: str,
              image_sources: Mapping[str, str], image_processing, batch_size: int, primary: bool = True,
              skip_kinds: Mapping[str, str] = {}) -> dict[str, Any]:
    """Scores every task found; returns {"scores": {task/row: number}, "skipped": {task: why}}.

    primary: this process prints and writes (every process of a multi-host run scores).
    skip_kinds: task kind -> why it is left out here (training leaves AoA to the finished run)."""
    found, skipped = find_suite_tasks(data_root, suite)
    skipped += [(spec, skip_kinds[spec.kind]) for spec, _ in found if spec.kind in skip_kinds]
    found = [(spec, path) for spec, path in found if spec.kind not in skip_kinds]
    for spec, why in skipped if primary else ():
        print(f"skipped {spec.name}: {why}")
    if not found:
        raise ConfigError(f"no task of {suite} under {data_root}: "
                          f"{'; '.join(why for _, why in skipped)}")
    model_name = os.path.basename(os.path.abspath(workdir)) if workdir else "model"
    results_root = os.path.join(out, "results")
    scores: dict[str, float] = {}
    for spec, path in found:
        result, headline = _score(spec, path, model, tokenizer, workdir=workdir, out=out if primary else None,
                                  image_sources=image_sources, image_processing=image_processing,
                                  batch_size=batch_size)
        if result is None:
            skipped.append((spec, headline))
            if primary:
                print(f"skipped {spec.name}: {headline}")
            continue
        scores.update(headline)
        if primary:
            pipeline_layout.write_pipeline_layout(results_root, model_name, spec, result, revision=revision)
    if primary:
        print("\n" + format_scores(scores))
    return {"scores": scores, "skipped": {spec.name: why for spec, why in skipped},
            "results_tree": os.path.join(results_root, model_name)}


def _score(spec, path: str, model, tokenizer, *, workdir, out, image_sources, image_processing, batch_size):
    """(result for the pipeline layout, {name: headline number}) of one task, or (None, why skipped);
    prints and writes under `out` unless it is None."""
    directory = None if out is None else os.path.join(out, spec.name)
    show = print if out is not None else (lambda *_: None)
    if spec.kind in ("blimp", "ewok", *IMAGE_KINDS):
        sources = {spec.name: image_sources[spec.name]} if spec.name in image_sources else {}
        evaluator = MinimalPairEvaluator({spec.name: path}, tokenizer, batch_size=batch_size,
                                         image_sources=sources, image_processing=image_processing)
        results = evaluator.evaluate(model)
        show(evaluator.format(results))
        if directory:
            evaluator.write(results, directory)
        rows = results[spec.name]
        main = rows["image" if spec.kind in IMAGE_KINDS else "text"]
        return main, {f"{spec.name}/{row}": r.average for row, r in rows.items()}
    if spec.kind in text_tasks.TEXT_KINDS:
        result = text_tasks.evaluate_text_task(spec.kind, model, tokenizer, path, batch_size=batch_size)
        show(text_tasks.format_text_task(result, spec.name))
        if directory:
            text_tasks.write_text_task(result, directory)
        return result, {spec.name: result.average}
    if spec.kind == "reading":
        result = reading.evaluate_reading(model, tokenizer, path, batch_size=batch_size)
        show(reading.format_reading(result))
        if directory:
            reading.write_reading(result, directory)
        return result, {f"{spec.name}/eye_tracking": result.eye_tracking_score,
                        f"{spec.name}/self_paced": result.self_paced_score}
    if spec.kind == "aoa":
        if workdir is None or not aoa.milestone_checkpoints(workdir):
            return None, "AoA needs a run directory with milestone checkpoints (checkpoint.milestones)"
        cdi = os.path.join(os.path.dirname(os.path.dirname(path)), pipeline_layout.CDI_HUMAN)
        result = aoa.evaluate_aoa(workdir, path, cdi_path=cdi if os.path.isfile(cdi) else None, batch_size=batch_size)
        show(aoa.format_aoa(result))
        fitness = result.get("fitness", {}).get("curve_fitness")
        return result, {} if fitness is None else {f"{spec.name}/curve_fitness": fitness}
    if spec.kind == "devbench":
        if image_processing is None:
            return None, "DevBench needs a model with a pixel vision tower"
        result = devbench.evaluate_devbench(model, tokenizer, path, image_processing, batch_size)
        show(devbench.format_devbench(result))
        if directory:
            devbench.write_devbench(result, directory)
        return result, result.headline()
    raise ConfigError(f"task {spec.name}: unknown kind {spec.kind!r}")


def format_scores(scores: Mapping[str, float]) -> str:
    width = max(len(k) for k in scores)
    lines = [f"{'task':<{width}}  score"]
    lines += [f"{name:<{width}}  {value:8.2f}" for name, value in scores.items()]
    return "\n".join(lines)
