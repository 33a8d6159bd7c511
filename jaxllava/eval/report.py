"""Files and tables from minimal-pair `Results`.

  predictions JSONL   one line per item: id, UID, scores (one per candidate, good first),
                      chosen, correct.
  summary JSON        protocol, template, n, chance, macro average over UIDs, ties, items
                      identical after tokenization, non-finite items, and accuracy/n for
                      every value of every metadata key (UID, field, linguistics_term, ...).
  pipeline files      `best_temperature_report.txt` text and `predictions.json` in the
                      official layout (evaluation-pipeline-2025 `sentence_zero_shot/run.py::
                      create_evaluation_report`, `compute_results.py::rank_and_evaluate`), so
                      the official `collate_preds.py` can read our runs.
  tables              one setting, or two side by side (e.g. without / with image template),
                      with the ties and how many of them are identical after tokenization:
                      both count as correct, so they raise accuracy without the model deciding.
"""
from __future__ import annotations

import json
import math
import os
from typing import Any

from jaxllava.eval.scoring import Results


def prediction_records(results: Results) -> list[dict[str, Any]]:
    return [{"id": item.id, "UID": item.uid, "scores": [float(s) for s in scores], "chosen": int(chosen),
             "correct": bool(correct)}
            for item, scores, chosen, correct in zip(results.items, results.scores, results.chosen, results.correct)]


def summary(results: Results) -> dict[str, Any]:
    return {
        "protocol": results.protocol,
        "image_template": results.image_template,
        "n": len(results.items),
        "chance": results.chance,
        "average": results.average,  # mean over UIDs, the pipeline's reported number
        "ties": results.ties,
        "identical_after_tokenization": results.identical,
        "nonfinite": results.nonfinite,
        "by": {key: {value: {"accuracy": acc, "n": results.counts[key][value]} for value, acc in values.items()}
               for key, values in results.accuracy.items()},
    }


def write_predictions(results: Results, path: str) -> None:
    _ensure_parent(path)
    with open(path, "w", encoding="utf-8") as f:
        for record in prediction_records(results):
            f.write(json.dumps(record) + "\n")


def write_summary(results: Results, path: str) -> None:
    _ensure_parent(path)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(summary(results), f, indent=2)
        f.write("\n")


def pipeline_report(results: Results) -> str:
    """`best_temperature_report.txt` as run.py::create_evaluation_report writes it (T = 1)."""
    lines = ["TEMPERATURE: 1.00", ""]
    for key, values in results.accuracy.items():
        lines.append(f"### {key.upper()} ACCURACY")
        lines += [f"{value}: {acc:.2f}" for value, acc in values.items()]
        lines.append("")
    lines += ["### AVERAGE ACCURACY", f"{results.average:.2f}", ""]
    return "\n".join(lines) + "\n"


def pipeline_predictions(results: Results) -> dict[str, dict[str, list[dict[str, str]]]]:
    """`predictions.json`: {UID: {"predictions": [{"id": "<UID>_<k>", "pred": chosen completion}]}}."""
    out: dict[str, dict[str, list[dict[str, str]]]] = {}
    for item, chosen in zip(results.items, results.chosen):
        out.setdefault(item.uid, {"predictions": []})["predictions"].append(
            {"id": item.id, "pred": item.completions[chosen]})
    return out


def write_pipeline_files(results: Results, directory: str) -> None:
    write_pipeline_texts(directory, pipeline_report(results), pipeline_predictions(results))


def write_pipeline_texts(directory: str, report: str, predictions: dict) -> None:
    """The two files the pipeline writes per task and its collation reads."""
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "best_temperature_report.txt"), "w", encoding="utf-8") as f:
        f.write(report)
    with open(os.path.join(directory, "predictions.json"), "w", encoding="utf-8") as f:
        json.dump(predictions, f)


def format_table(results: Results, keys: tuple[str, ...] = ("UID", "field")) -> str:
    """Accuracy per value of each key, then the macro average over UIDs and chance."""
    rows = [("", "n", "accuracy")]
    for key in keys:
        for value, acc in results.accuracy.get(key, {}).items():
            rows.append((f"{key} {value}", str(results.counts[key][value]), f"{acc:.2f}"))
    n_uids = len(results.accuracy.get("UID", {}))
    rows.append((f"average over {n_uids} UIDs ({results.protocol})", str(len(results.items)),
                 f"{results.average:.2f}"))
    rows.append(("chance", "", f"{results.chance:.2f}"))
    return _render(rows) + "\n" + ties_line(results)


def ties_line(results: Results) -> str:
    return (f"ties: {results.ties} ({results.identical} of them identical after tokenization), "
            f"counted correct as the pipeline does")


def format_comparison(first: Results, second: Results, labels: tuple[str, str] = ("text", "image template"),
                      keys: tuple[str, ...] = ("UID", "field")) -> str:
    """Two settings side by side, per value of each key, with the difference second - first."""
    rows = [("", labels[0], labels[1], "delta")]
    for key in keys:
        values = list(first.accuracy.get(key, {}))
        values += [v for v in second.accuracy.get(key, {}) if v not in values]
        for value in values:
            a = first.accuracy.get(key, {}).get(value, math.nan)
            b = second.accuracy.get(key, {}).get(value, math.nan)
            rows.append((f"{key} {value}", f"{a:.2f}", f"{b:.2f}", f"{b - a:+.2f}"))
    rows.append(("average over UIDs", f"{first.average:.2f}", f"{second.average:.2f}",
                 f"{second.average - first.average:+.2f}"))
    rows.append(("ties (identical after tokenization)", f"{first.ties} ({first.identical})",
                 f"{second.ties} ({second.identical})", ""))
    return _render(rows) + "\nties count as correct, as the pipeline does"


def _render(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for row in rows:
        cells = [row[0].ljust(widths[0])] + [cell.rjust(w) for cell, w in zip(row[1:], widths[1:])]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def _ensure_parent(path: str) -> None:
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, exist_ok=True)
