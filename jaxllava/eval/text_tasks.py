"""The other BabyLM 2025 zero-shot text tasks: entity tracking, COMPS and the two WUG tests.

Each is a multiple-choice task scored like BLiMP (scoring.py: summed log-probabilities of
each candidate's completion, the 2025 offset rule, first maximum wins, label 0), so the
items are `MinimalPairItem`s and go through `encode_candidates` / `score_encoded` /
`decide`. What differs per task is how a line becomes candidates, the headline number
and the prediction files. Sources, `babylm/evaluation-pipeline-2025`:
`evaluation_pipeline/sentence_zero_shot/read_files.py` (decode_entity_tracking,
decode_comps, decode_wug), `compute_results.py` (rank_and_evaluate,
rank_and_evaluate_wug) and `run.py` (process_results, process_results_wug,
create_evaluation_report).

  entity_tracking  line: input_prefix, options (the first is correct), numops.
                   candidates input_prefix + option (no separator: prefixes end with a
                   space), completion = option; UID "<file stem>_<numops>_ops".
                   Headline: per split (regular, ambiref, move_contents: the file stems)
                   the mean over its UIDs, then the mean over the splits present.
  comps            line: prefix_acceptable, prefix_unacceptable, property_phrase.
                   candidates prefix + " " + property_phrase, completion the phrase;
                   UID from the file stem (comps_base -> base, comps_wugs -> wugs,
                   comps_wugs_dist-before -> wugs_dist_before, comps_wugs_dist-in-between
                   -> wugs_dist_in_between). Headline: mean over UIDs. Predictions hold
                   the chosen full sentence, not the phrase.
  wug_adj/past     line: sentences (candidate prompts joined by a tab; each scored
                   whole), ratio (human proportion choosing the first). Model ratio =
                   softmax over the candidates' scores, first entry; headline =
                   Spearman's rho between model and human ratios over all items (a
                   correlation, not a percentage; the leaderboard shows it x100).
                   Predictions add "prob" (the model ratio).

Files are read like the pipeline reads them: every `*.jsonl` of a directory in
`Path.iterdir()` order, lines in order, `json.loads(line.strip())`, fields never
stripped. Where the pipeline would crash or silently misfile a line (bad JSON, missing
key, a non-string text, an unknown COMPS file name) a DataError names file, line and field.

Outputs (`write_text_task`): our predictions.jsonl and summary.json, and the pipeline's
`best_temperature_report.txt` and `predictions.json` (`write_pipeline_files`); where
they go in the official results tree is pipeline_layout.py's job.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import math
import os
import pathlib
from typing import Any, Literal, Optional, Sequence

import numpy as np
from scipy import stats

from jaxllava.errors import ConfigError, DataError
from jaxllava.eval import report
from jaxllava.eval.minimal_pairs import MinimalPairItem, iter_jsonl
from jaxllava.eval.scoring import (DEFAULT_BUCKETS, EncodedSet, Results, as_logits_fn, check_vocab, compile_count,
                                   decide, encode_candidates, score_encoded)

TextKind = Literal["entity_tracking", "comps", "wug_adj", "wug_past"]
TEXT_KINDS = ("entity_tracking", "comps", "wug_adj", "wug_past")
ENTITY_TRACKING_SPLITS = ("regular", "ambiref", "move_contents")  # run.py::process_results
COMPS_SUBSETS = {  # read_files.py::decode_comps; file names as calculate_results_from_pred.py names them
    "comps_base": "base",
    "comps_wugs": "wugs",
    "comps_wugs_dist-before": "wugs_dist_before",
    "comps_wugs_dist-in-between": "wugs_dist_in_between",
}
# Entity-tracking prompts run to a few hundred tokens; the minimal-pair buckets stop at 512.
BUCKETS = DEFAULT_BUCKETS + (1024,)


# ---------------------------------------------------------------------------- reading


@dataclasses.dataclass(frozen=True)
class TextTask:
    kind: str
    path: str
    items: list[MinimalPairItem]
    ratios: Optional[np.ndarray] = None  # wug: float64 (items,), human proportion for candidate 0


def read_text_task(kind: str, path: str | os.PathLike) -> TextTask:
    """The items of one task (a file or a directory of `*.jsonl`), the first candidate correct."""
    if kind not in TEXT_KINDS:
        raise ConfigError(f"text task kind must be one of {TEXT_KINDS}, got {kind!r}")
    items, ratios = [], []
    per_uid: collections.Counter = collections.Counter()
    for file, line_number, record in iter_jsonl(path):
        where = dict(file=str(file), record=f"line {line_number}")
        if kind == "entity_tracking":
            fields = _decode_entity_tracking(record, file, where)
        elif kind == "comps":
            fields = _decode_comps(record, file, where)
        else:
            fields = _decode_wug(record, kind, where)
            ratios.append(fields.pop("ratio"))
        uid = fields["metadata"]["UID"]
        items.append(MinimalPairItem(id=f"{uid}_{per_uid[uid]}", uid=uid, source=f"{file}:{line_number}", **fields))
        per_uid[uid] += 1
    if not items:
        raise DataError(f"no {kind} items", file=str(path))
    return TextTask(kind, str(path), items, np.asarray(ratios, np.float64) if kind.startswith("wug") else None)


def _text(record: dict[str, Any], key: str, where: dict[str, str], *, allow_empty: bool = False) -> str:
    if key not in record:
        raise DataError("missing field", field=key, **where)
    value = record[key]
    if not isinstance(value, str):
        raise DataError(f"expected a string, got {type(value).__name__}", field=key, **where)
    if not allow_empty and value == "":
        raise DataError("empty text", field=key, **where)
    return value


def _decode_entity_tracking(record, file: pathlib.Path, where) -> dict[str, Any]:
    prefix = _text(record, "input_prefix", where)
    options = record.get("options")
    if not isinstance(options, list) or len(options) < 2:
        raise DataError("expected a list of >= 2 options", field="options", **where)
    for k in range(len(options)):
        _text({"options": options[k]}, "options", where)
    numops = record.get("numops")
    if isinstance(numops, bool) or not isinstance(numops, int) or numops < 0:
        raise DataError(f"expected a non-negative integer, got {numops!r}", field="numops", **where)
    uid = f"{file.stem}_{numops}_ops"
    return {"sentences": tuple(prefix + option for option in options), "completions": tuple(options),
            "metadata": {"UID": uid}}


def _decode_comps(record, file: pathlib.Path, where) -> dict[str, Any]:
    if file.stem not in COMPS_SUBSETS:
        # The pipeline files any other name under wugs_dist_in_between; refuse to guess.
        raise DataError(f"unknown COMPS file name {file.stem!r}; expected one of {sorted(COMPS_SUBSETS)}",
                        **where)
    phrase = _text(record, "property_phrase", where)
    prefixes = (_text(record, "prefix_acceptable", where), _text(record, "prefix_unacceptable", where))
    return {"sentences": tuple(" ".join([p, phrase]) for p in prefixes), "completions": (phrase, phrase),
            "metadata": {"UID": COMPS_SUBSETS[file.stem]}}


def _decode_wug(record, kind: str, where) -> dict[str, Any]:
    candidates = tuple(_text(record, "sentences", where).split("\t"))
    if len(candidates) < 2 or "" in candidates:
        raise DataError("expected >= 2 non-empty tab-separated candidates", field="sentences", **where)
    ratio = record.get("ratio")
    try:  # read_files.py::decode_wug: float(raw["ratio"]), so "0.25" is accepted too
        ratio = float(ratio) if not isinstance(ratio, bool) else math.nan
    except (TypeError, ValueError):
        ratio = math.nan
    if not math.isfinite(ratio):
        raise DataError(f"expected a finite number, got {record.get('ratio')!r}", field="ratio", **where)
    return {"sentences": candidates, "completions": candidates, "metadata": {"UID": kind}, "ratio": ratio}


# ---------------------------------------------------------------------------- scoring


@dataclasses.dataclass(frozen=True)
class PreparedTextTask:
    task: TextTask
    encoded: EncodedSet


@dataclasses.dataclass(frozen=True)
class TextTaskResults:
    task: TextTask
    results: Results  # per-item scores and choices, accuracy per UID
    average: float  # the pipeline's headline: accuracy in % (entity tracking: mean of split means), wug: rho
    split_accuracy: dict[str, float]  # entity tracking: split -> mean of its UID accuracies
    probs: Optional[np.ndarray] = None  # wug: softmax over the candidates' scores, first entry

    @property
    def metric(self) -> str:
        return "SPEARMAN'S RHO" if self.task.kind.startswith("wug") else "ACCURACY"


def prepare_text_task(kind: str, path: str | os.PathLike, tokenizer: Any, *,
                      buckets: Sequence[int] = BUCKETS) -> PreparedTextTask:
    """Read and tokenise once (scored many times, e.g. at every milestone)."""
    task = read_text_task(kind, path)
    encoded = encode_candidates(tokenizer, task.items)
    longest = max(len(ids) - 1 for ids in encoded.token_ids)
    if longest > max(buckets):
        row = max(range(encoded.num_rows), key=lambda r: len(encoded.token_ids[r]))
        item = task.items[int(np.searchsorted(encoded.row_start, row, side="right")) - 1]
        raise DataError(f"a candidate needs {longest} input positions, more than the largest bucket "
                        f"{max(buckets)}", record=item.source, record_id=item.id, field="sentences")
    return PreparedTextTask(task, encoded)


def score_text_task(prepared: PreparedTextTask, model: Any, *, batch_size: int = 64,
                    buckets: Sequence[int] = BUCKETS) -> TextTaskResults:
    """Score a prepared task with an NNX module (`model(input_ids, segment_ids=, positions=)`) or a
    scoring `logits_fn`; the module is only read."""
    check_vocab(model, max(int(ids.max()) for ids in prepared.encoded.token_ids))
    before = compile_count()
    flat = score_encoded(as_logits_fn(model), prepared.encoded, batch_size=batch_size, buckets=buckets)
    results = decide(prepared.task.items, prepared.encoded, flat, compiles=compile_count() - before)
    return summarise(prepared.task, results)


def evaluate_text_task(kind: str, model: Any, tokenizer: Any, path: str | os.PathLike, *,
                       batch_size: int = 64, buckets: Sequence[int] = BUCKETS) -> TextTaskResults:
    """Read, tokenise and score one task: the entry point for a suite runner."""
    prepared = prepare_text_task(kind, path, tokenizer, buckets=buckets)
    return score_text_task(prepared, model, batch_size=batch_size, buckets=buckets)


def summarise(task: TextTask, results: Results) -> TextTaskResults:
    """The task's headline number from per-item decisions (run.py::process_results / _wug)."""
    if task.kind == "entity_tracking":
        splits = entity_tracking_splits(results.accuracy["UID"])
        return TextTaskResults(task, results, float(np.mean(list(splits.values()))), splits)
    if task.kind.startswith("wug"):
        probs = np.array([_first_softmax(s) for s in results.scores])
        return TextTaskResults(task, results, wug_spearman(probs, task.ratios), {}, probs)
    return TextTaskResults(task, results, results.average, {})


def entity_tracking_splits(uid_accuracy: dict[str, float]) -> dict[str, float]:
    """Split -> mean accuracy of the UIDs whose name starts with it, for the splits present."""
    splits = {}
    for split in ENTITY_TRACKING_SPLITS:
        values = [acc for uid, acc in uid_accuracy.items() if uid.startswith(split)]
        if values:
            splits[split] = sum(values) / len(values)
    if not splits:  # the pipeline divides by zero here
        raise DataError(f"entity tracking files must be named by split {ENTITY_TRACKING_SPLITS}; "
                        f"got UIDs {sorted(uid_accuracy)[:5]}")
    return splits


def _first_softmax(scores: np.ndarray) -> float:
    shifted = np.exp(scores - np.max(scores))
    return float(shifted[0] / shifted.sum())


def wug_spearman(model_ratios: np.ndarray, human_ratios: np.ndarray) -> float:
    """Spearman's rho over all items (compute_results.py::rank_and_evaluate_wug; ties get mean ranks)."""
    return float(stats.spearmanr(model_ratios, human_ratios)[0])


# ---------------------------------------------------------------------------- outputs


def prediction_records(r: TextTaskResults) -> list[dict[str, Any]]:
    """One per item: id, UID, scores, chosen, correct (and prob, ratio for wug)."""
    records = report.prediction_records(r.results)
    if r.probs is not None:
        for record, prob, ratio in zip(records, r.probs, r.task.ratios):
            record.update(prob=float(prob), ratio=float(ratio))
    return records


def summary(r: TextTaskResults) -> dict[str, Any]:
    out = {"kind": r.task.kind, "path": r.task.path, "metric": r.metric.lower(), "average": r.average,
           **{k: v for k, v in report.summary(r.results).items() if k not in ("average", "image_template")}}
    if r.split_accuracy:
        out["splits"] = r.split_accuracy
    if r.probs is not None:
        del out["by"], out["chance"], out["ties"]  # accuracy against label 0 means nothing for wug
    return out


def pipeline_report(r: TextTaskResults) -> str:
    """`best_temperature_report.txt` as run.py::create_evaluation_report writes it (T = 1)."""
    if r.probs is not None:
        sections = {"UID": {"avg": r.average}}  # run.py::process_results_wug
    else:  # process_results adds each split's mean to the UID section for entity tracking
        sections = {key: dict(values) for key, values in r.results.accuracy.items()}
        sections["UID"].update(r.split_accuracy)
    lines = ["TEMPERATURE: 1.00", ""]
    for key, values in sections.items():
        lines.append(f"### {key.upper()} {r.metric}")
        lines += [f"{value}: {acc:.2f}" for value, acc in values.items()]
        lines.append("")
    lines += [f"### AVERAGE {r.metric}", f"{r.average:.2f}", ""]
    return "\n".join(lines) + "\n"


def pipeline_predictions(r: TextTaskResults) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """`predictions.json`: {UID: {"predictions": [{"id", "pred"[, "prob"]}]}} in file order
    (compute_results.py: COMPS pred is the chosen sentence, others the chosen completion)."""
    out: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for k, (item, chosen) in enumerate(zip(r.results.items, r.results.chosen)):
        texts = item.sentences if r.task.kind == "comps" else item.completions
        record = {"id": item.id, "pred": texts[chosen]}
        if r.probs is not None:
            record["prob"] = float(r.probs[k])
        out.setdefault(item.uid, {"predictions": []})["predictions"].append(record)
    return out


def write_pipeline_files(r: TextTaskResults, directory: str) -> None:
    report.write_pipeline_texts(directory, pipeline_report(r), pipeline_predictions(r))


def write_text_task(r: TextTaskResults, directory: str) -> None:
    """predictions.jsonl, summary.json and, under pipeline/, the official files."""
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "predictions.jsonl"), "w", encoding="utf-8") as f:
        for record in prediction_records(r):
            f.write(json.dumps(record) + "\n")
    with open(os.path.join(directory, "summary.json"), "w", encoding="utf-8") as f:
        json.dump(summary(r), f, indent=2)
        f.write("\n")
    write_pipeline_files(r, os.path.join(directory, "pipeline"))


def format_text_task(r: TextTaskResults, name: str = "") -> str:
    """A printed table: per UID (and split) n and accuracy, then the headline (or rho for wug)."""
    title = f"== {name or r.task.kind} ({r.task.kind}, {len(r.task.items)} items)"
    if r.probs is not None:
        return (f"{title}\nSpearman's rho (model p(first) vs human ratio): {r.average:.4f}\n"
                f"mean model p(first) {np.mean(r.probs):.4f}, mean human ratio {np.mean(r.task.ratios):.4f}")
    rows = [("", "n", "accuracy")]
    counts = r.results.counts["UID"]
    rows += [(f"UID {uid}", str(counts[uid]), f"{acc:.2f}") for uid, acc in r.results.accuracy["UID"].items()]
    rows += [(f"split {split}", "", f"{acc:.2f}") for split, acc in r.split_accuracy.items()]
    how = "mean of split means" if r.split_accuracy else "mean over UIDs"
    rows += [(f"average ({how})", str(len(r.task.items)), f"{r.average:.2f}"),
             ("chance", "", f"{r.results.chance:.2f}")]
    width = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = ["  ".join([row[0].ljust(width[0]), row[1].rjust(width[1]), row[2].rjust(width[2])]).rstrip()
             for row in rows]
    return title + "\n" + "\n".join(lines) + "\n" + report.ties_line(r.results)
