"""Age of acquisition: word surprisal over the milestone checkpoints against children's AoA.

Sources, `babylm/evaluation-pipeline-2025` (after Chang & Bergen 2022):
  `evaluation_pipeline/AoA_word/eval_util.py::load_eval`   the word file
  `AoA_word/evaluation_functions.py::StepSurprisalExtractor`  surprisal per step
  `evaluation_pipeline/utils.py::AoAEvaluator`              sigmoid fits, correlation
  `collate_preds.py::_check_size_aoa`, `AoA_word/run.py`     what is written, where

Word file (`evaluation_data/full_eval/aoa/cdi_childes.json`): {word: [{"context": text},
...]}; words of one character are dropped, and words with fewer than `min_context`
contexts (run.py's default 0, so none).
Surprisal of a word in a context (causal backend, `use_bos_only` False as run.py calls
it): text = context.strip() + " " + word.strip(), tokenised with special tokens and
offsets; the word's tokens are those whose offset end lies past len(text) - len(word),
position 0 never counts; surprisal = -(sum of their log-probabilities), in nats.
One record per (checkpoint, word, context): {"step": "chck_10M", "word_count",
"target_word", "context_id", "context", "surprisal"}, written as
`{"metadata": {...}, "results": [...]}` to `.../zero_shot/causal/AoA_word/surprisal.json`.

Checkpoints: jaxllava's milestone entries (`<workdir>/milestones/chck_<N>M.json`, see
checkpoint.py), each evaluated with the model and tokenizer stored in it.

Scoring (utils.py::AoAEvaluator, reproduced with the same scipy calls):
  child AoA   per CDI word (`cdi_human.csv`: `word` and proportion columns "16".."30"
              months): sigmoid a / (1 + exp(-b (x - c))) + d fitted to the proportions
              with bounds a in [0, 2], b in [0, 1], c within the ages, d in [-0.5, 0.5];
              the age where it reaches 0.5.
  model AoA   per word, over all its (checkpoint, context) points in record order:
              x = log10(words seen + 1), y = -surprisal, unbounded sigmoid fit; the
              threshold is halfway between "chance" log2(300000) and the word's minimum
              surprisal (the pipeline mixes log2 and nats; kept as is); AoA = the x
              where the fit crosses it (log10 words), dropped outside the checkpoints.
  fitness     Pearson r between model and child AoAs of the words with both (0.0 when
              fewer than 3).
"""
from __future__ import annotations

import csv
import dataclasses
import glob
import json
import os
import re
from typing import Any, Iterable, Optional, Sequence

import numpy as np
from scipy import optimize, stats

from jaxllava.errors import DataError
from jaxllava.eval.scoring import DEFAULT_BUCKETS, EncodedSet, as_logits_fn, check_vocab, pad_id, score_encoded

CHANCE_VOCAB = 300_000  # utils.py::compute_model_aoa, approximate_vocab
CDI_AGES = tuple(range(16, 31))  # utils.py::prepare_cdi_data: months 16..30


# ---------------------------------------------------------------------------- words and surprisal


def read_aoa_words(path: str | os.PathLike, min_context: int = 0) -> tuple[list[str], list[list[str]]]:
    """(words, contexts per word) as load_eval keeps them, in file order."""
    path = str(path)
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise DataError("no such file", file=path) from None
    except json.JSONDecodeError as e:
        raise DataError(f"invalid JSON ({e.msg})", file=path, record=f"line {e.lineno}") from None
    if not isinstance(data, dict):
        raise DataError("expected an object {word: [{\"context\": ...}, ...]}", file=path)
    words, contexts = [], []
    for word, entries in data.items():
        if not isinstance(entries, list):
            raise DataError("expected a list of contexts", file=path, record_id=word)
        texts = []
        for k, entry in enumerate(entries):
            if not isinstance(entry, dict) or not isinstance(entry.get("context"), str):
                raise DataError("expected {\"context\": text}", file=path, record=f"context {k}", record_id=word,
                                field="context")
            texts.append(entry["context"])
        if len(word) > 1 and len(texts) >= min_context:
            words.append(word)
            contexts.append(texts)
    if not words:
        raise DataError("no words to evaluate", file=path)
    return words, contexts


def encode_aoa(tokenizer: Any, words: Sequence[str], contexts: Sequence[Sequence[str]]) -> EncodedSet:
    """One row per (word, context), words in order, each word's contexts in order."""
    texts, starts = [], []
    for word, word_contexts in zip(words, contexts):
        for context in word_contexts:
            target = word.strip()
            text = context.strip() + " " + target  # compute_surprisal
            texts.append(text)
            starts.append(len(text) - len(target))
    out = tokenizer(texts, add_special_tokens=True, return_offsets_mapping=True)
    token_ids, target_mask = [], []
    for ids, offsets, start in zip(out["input_ids"], out["offset_mapping"], starts):
        token_ids.append(np.asarray(ids, np.int32))
        target_mask.append(np.asarray([t >= 1 and end > start for t, (_, end) in enumerate(offsets)], bool))
    return EncodedSet(tuple(token_ids), tuple(target_mask), np.arange(len(texts) + 1), pad_id(tokenizer), "2025",
                      None)


def surprisals(model: Any, encoded: EncodedSet, *, batch_size: int = 64,
               buckets: Sequence[int] = DEFAULT_BUCKETS + (1024,)) -> np.ndarray:
    check_vocab(model, max(int(ids.max()) for ids in encoded.token_ids))
    return -score_encoded(as_logits_fn(model), encoded, batch_size=batch_size, buckets=buckets)


@dataclasses.dataclass(frozen=True)
class Milestone:
    name: str  # "chck_10M"
    words: int  # words seen at the milestone
    path: str  # milestone entry, for checkpoint.resolve_checkpoint / load_checkpoint_params


def milestone_checkpoints(workdir: str) -> list[Milestone]:
    """The run's milestone entries, fewest words first (checkpoint.py: milestones/<name>.json)."""
    out = []
    for record_path in glob.glob(os.path.join(workdir, "milestones", "*.json")):
        with open(record_path, encoding="utf-8") as f:
            record = json.load(f)
        if "milestone" not in record or "name" not in record:
            raise DataError("not a milestone record (needs 'milestone' and 'name')", file=record_path)
        out.append(Milestone(record["name"], int(record["milestone"]), record_path[: -len(".json")]))
    if not out:
        raise DataError("no milestone checkpoints (milestones/*.json); AoA needs the checkpoints at word "
                        "milestones that training writes", file=os.path.join(workdir, "milestones"))
    return sorted(out, key=lambda m: m.words)


def surprisal_records(milestone: Milestone, words: Sequence[str], contexts: Sequence[Sequence[str]],
                      values: np.ndarray) -> list[dict[str, Any]]:
    """The pipeline's result entries of one checkpoint (analyze_steps), in encode_aoa's row order."""
    records, row = [], 0
    for word, word_contexts in zip(words, contexts):
        for context_id, context in enumerate(word_contexts):
            records.append({"step": milestone.name, "word_count": milestone.words, "target_word": word,
                            "context_id": context_id, "context": context, "surprisal": float(values[row])})
            row += 1
    return records


def load_milestone(milestone: Milestone, dtype: str = "float32"):
    """(model, tokenizer) stored in a milestone checkpoint."""
    from jaxllava.checkpoint import load_checkpoint_params, model_from_params
    from jaxllava.data.tokenizer import load_tokenizer

    config, params, _ = load_checkpoint_params(milestone.path)
    model = model_from_params(dataclasses.replace(config.model, dtype=dtype), params)
    return model, load_tokenizer(config.data.tokenizer)


def evaluate_aoa(workdir: str, words_path: str, *, cdi_path: Optional[str] = None, batch_size: int = 64,
                 min_context: int = 0, dtype: str = "float32", model_name: str = "") -> dict[str, Any]:
    """surprisal.json's content over every milestone of `workdir`, plus "fitness" (curve_fitness)
    when `cdi_path` is given. One model in memory at a time."""
    words, contexts = read_aoa_words(words_path, min_context)
    milestones = milestone_checkpoints(workdir)
    results = []
    for milestone, (model, tokenizer) in zip(milestones, (load_milestone(m, dtype) for m in milestones)):
        values = surprisals(model, encode_aoa(tokenizer, words, contexts), batch_size=batch_size)
        results += surprisal_records(milestone, words, contexts, values)
    out = {"metadata": {"model_name": model_name or os.path.basename(os.path.abspath(workdir)),
                        "use_bos_only": False, "total_steps": len(milestones), "completed_steps": len(milestones)},
           "results": results}
    if cdi_path is not None:
        out["fitness"] = curve_fitness(results, read_cdi(cdi_path))
    return out


# ---------------------------------------------------------------------------- sigmoid fits


def sigmoid(x: np.ndarray, a: float, b: float, c: float, d: float) -> np.ndarray:
    return a / (1 + np.exp(-b * (x - c))) + d


def _crossing(popt: np.ndarray, y: float) -> Optional[float]:
    """x where the fitted sigmoid equals y, or None when it never does (or is not increasing)."""
    a, b, c, d = popt
    if b <= 0 or a <= 0 or y <= d or y >= a + d:
        return None
    return float(c - np.log(a / (y - d) - 1) / b)


def child_aoa(ages: np.ndarray, proportions: np.ndarray, threshold: float = 0.5) -> Optional[float]:
    """Age (months) at which the fitted share of children producing the word reaches `threshold`."""
    keep = ~np.isnan(proportions)
    ages, proportions = np.asarray(ages, float)[keep], proportions[keep]
    if len(proportions) < 3:
        return None
    try:
        popt, _ = optimize.curve_fit(sigmoid, ages, proportions, p0=[1.0, 0.1, np.mean(ages), 0.0],
                                     bounds=([0, 0, ages[0], -0.5], [2.0, 1.0, ages[-1], 0.5]), maxfev=1000)
    except (RuntimeError, ValueError):
        return None
    aoa = _crossing(popt, threshold)
    return aoa if aoa is not None and ages[0] <= aoa <= ages[-1] else None


def model_aoa(surprisal: Sequence[float], words_seen: Sequence[float], fraction: float = 0.5) -> Optional[float]:
    """log10(words seen + 1) at which the word's fitted surprisal curve is `fraction` of the way from
    chance to its minimum (utils.py::compute_model_aoa)."""
    steps, values = np.asarray(words_seen, float), np.asarray(surprisal, float)
    if len(values) < 3:
        return None
    keep = ~np.isnan(values)
    if not keep.any():
        return None
    steps, values = steps[keep], values[keep]
    chance = np.log2(CHANCE_VOCAB)
    threshold = chance - fraction * (chance - values.min())
    x, y = np.log10(steps + 1), -values
    try:
        popt, _ = optimize.curve_fit(sigmoid, x, y, p0=[y.max() - y.min(), 1.0, x.mean(), y.min()], maxfev=1000)
    except (RuntimeError, ValueError):
        return None
    log_aoa = _crossing(popt, -threshold)
    if log_aoa is None or not steps[0] <= 10 ** log_aoa - 1 <= steps[-1]:
        return None
    return log_aoa


@dataclasses.dataclass(frozen=True)
class CDI:
    words: list[str]
    ages: np.ndarray  # months with a column in the file
    proportions: np.ndarray  # (words, ages), NaN where empty


def read_cdi(path: str) -> CDI:
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        columns = [str(a) for a in CDI_AGES if str(a) in (reader.fieldnames or [])]
        if "word" not in (reader.fieldnames or []) or not columns:
            raise DataError("expected a 'word' column and age columns '16'..'30'", file=path, record="line 1")
        words, rows = [], []
        for line_number, row in enumerate(reader, start=2):
            words.append(row["word"])
            try:
                rows.append([float(row[c]) if row[c] not in ("", "NA", "nan", "NaN") else np.nan for c in columns])
            except (TypeError, ValueError):
                raise DataError("expected numbers in the age columns", file=path, record=f"line {line_number}") from None
    return CDI(words, np.array([int(c) for c in columns]), np.array(rows, float).reshape(len(words), len(columns)))


def words_of_step(name: Any) -> Optional[float]:
    """'chck_10M' -> 1e7, '500k' -> 5e5 (utils.py::extract_step_number)."""
    if isinstance(name, (int, float)):
        return float(name)
    match = re.search(r"(\d+(?:\.\d+)?)\s*([KMB]?)", str(name), re.IGNORECASE)
    if not match:
        return None
    return float(match.group(1)) * {"K": 1e3, "M": 1e6, "B": 1e9}.get(match.group(2).upper(), 1)


def curve_fitness(records: Iterable[dict[str, Any]], cdi: CDI) -> dict[str, Any]:
    """Pearson r between model and child AoAs (utils.py::compute_curve_fitness)."""
    per_word: dict[str, tuple[list[float], list[float]]] = {}
    for record in records:
        steps, values = per_word.setdefault(record["target_word"], ([], []))
        words = words_of_step(record["step"])
        if words is not None:
            steps.append(words)
            values.append(float(record["surprisal"]))
    row_of = {}
    for k, word in enumerate(cdi.words):
        row_of.setdefault(word, k)  # the first matching row, as np.where(...)[0][0]
    valid, model_aoas, child_aoas = [], [], []
    for word, (steps, values) in per_word.items():
        if word not in row_of:
            continue
        child = child_aoa(cdi.ages, cdi.proportions[row_of[word]])
        model = None if child is None else model_aoa(values, steps)
        if model is not None:
            valid.append(word)
            model_aoas.append(model)
            child_aoas.append(child)
    if len(valid) < 3:
        return {"curve_fitness": 0.0, "n_words": len(valid)}
    r, p = stats.pearsonr(model_aoas, child_aoas)
    return {"curve_fitness": float(r), "p_value": float(p), "n_words": len(valid), "valid_words": valid,
            "model_aoas": model_aoas, "child_aoas": child_aoas}


# ---------------------------------------------------------------------------- outputs


def format_aoa(out: dict[str, Any]) -> str:
    steps = list(dict.fromkeys(r["step"] for r in out["results"]))
    lines = [f"== AoA ({len({r['target_word'] for r in out['results']})} words, {len(steps)} checkpoints)"]
    for step in steps:
        values = np.array([r["surprisal"] for r in out["results"] if r["step"] == step])
        lines.append(f"{step:<12} mean surprisal {np.nanmean(values):8.3f}")
    if "fitness" in out:
        lines.append(f"model-child AoA Pearson r: {out['fitness']['curve_fitness']:.4f} "
                     f"({out['fitness']['n_words']} words with both AoAs)")
    return "\n".join(lines)


def write_surprisal_json(out: dict[str, Any], directory: str) -> str:
    """`surprisal.json` (metadata and results, as run.py saves it; indent 2) in `directory`."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, "surprisal.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump({"metadata": out["metadata"], "results": out["results"]}, f, indent=2)
    if "fitness" in out:
        with open(os.path.join(directory, "fitness.json"), "w", encoding="utf-8") as f:
            json.dump(out["fitness"], f, indent=2)
    return path
