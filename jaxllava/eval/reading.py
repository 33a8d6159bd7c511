"""Reading: word surprisal against eye-tracking and self-paced reading times (BabyLM 2025).

Source: `babylm/evaluation-pipeline-2025`, `evaluation_pipeline/reading/run.py` and
`evaluation_functions.py::get_p2` (data and method from de Varda et al. 2023), and the
same regressions in `collate_preds.py::_calculate_reading_results`.

Input: `reading_data.csv`, one row per word: `item` (the text before the word), `word`,
`prev_item` / `prev_word` (the previous row's pair, for spillover; empty on a
sentence's first word), the controls `Subtlex_log10`, `length`, `context_length`,
`prev_length`, and the measures RTfirstfix, RTfirstpass, RTgopast, RTrightbound,
self_paced_reading_time (ELAN, LAN, N400, P600, EPNP, PNP also used when present).
Read as pandas reads it there: the NA strings ("", "NA", "nan", "None", ...) are
missing values, and a missing `item` becomes the text "None" (run.py: fillna("None")).

Surprisal (`get_p2`, causal backend): the context is tokenised with the tokenizer's
special tokens, the word alone without them; p(word) = product over the word's tokens of
p(token | context and the word's earlier tokens); surprisal = -ln p. The pipeline
re-tokenises the context after appending each decoded token; here the word's own tokens
are teacher-forced in one pass, which is the same chain whenever decoding and
re-encoding a token round-trips (true of byte-level BPE and word-level vocabularies).
Log-probabilities are summed, so no product underflows to 0 (where -log would fail).

Scores (run.py): per measure, an OLS baseline and the baseline + `pred` (surprisal)
are fitted on the rows where their columns are all present (each its own dropna), and
the measure's score is 100 * (R²_model - R²_base) / (1 - R²_base).
  eye tracking (no spillover): baseline = Subtlex_log10, length, context_length and
    their three pairwise products; score = mean over the four RT measures.
  self-paced (1-word spillover): baseline = Subtlex_log10, length, context_length,
    prev_length, prev_pred and all ten pairwise products; score = that of
    self_paced_reading_time.
R² is statsmodels' `rsquared` with an intercept: 1 - SSR / centred TSS; least squares by
numpy (`lstsq`, minimum-norm on rank-deficient designs, the same fitted values as
statsmodels' pinv).
"""
from __future__ import annotations

import csv
import dataclasses
import itertools
import json
import math
import os
from typing import Any, Optional, Sequence

import numpy as np

from jaxllava.errors import DataError
from jaxllava.eval.scoring import DEFAULT_BUCKETS, EncodedSet, as_logits_fn, check_vocab, pad_id, score_encoded

EYE_TRACKING = ("RTfirstfix", "RTfirstpass", "RTgopast", "RTrightbound")
SELF_PACED = "self_paced_reading_time"
EEG = ("ELAN", "LAN", "N400", "P600", "EPNP", "PNP")
CONTROLS = ("Subtlex_log10", "length", "context_length", "prev_length")
REQUIRED = ("item", "word", "prev_item", "prev_word") + CONTROLS + EYE_TRACKING + (SELF_PACED,)
# pandas.read_csv's default missing-value strings (what run.py's read_csv treats as NaN).
NA_STRINGS = frozenset({"", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN",
                        "<NA>", "N/A", "NA", "NULL", "NaN", "None", "n/a", "nan", "null"})


def _terms(*names: str) -> tuple[str, ...]:
    """Main effects then every pairwise product, in the formula order of run.py."""
    return names + tuple(f"{a}:{b}" for a, b in itertools.combinations(names, 2))


ET_BASELINE = _terms("Subtlex_log10", "length", "context_length")
SPR_BASELINE = _terms("Subtlex_log10", "length", "context_length", "prev_length", "prev_pred")


@dataclasses.dataclass(frozen=True)
class ReadingData:
    path: str
    items: list[str]  # context before each word
    words: list[str]
    prev_items: list[Optional[str]]  # None: the row has no previous word
    prev_words: list[Optional[str]]
    columns: dict[str, np.ndarray]  # numeric columns, float64, NaN where missing

    def __len__(self) -> int:
        return len(self.words)


def read_reading_csv(path: str | os.PathLike) -> ReadingData:
    path = str(path)
    if not os.path.isfile(path):
        raise DataError("no such file", file=path)
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = [c for c in REQUIRED if c not in (reader.fieldnames or [])]
        if missing:
            raise DataError(f"missing columns {missing}", file=path, record="line 1")
        numeric = [c for c in reader.fieldnames if c in CONTROLS + EYE_TRACKING + (SELF_PACED,) + EEG]
        items, words, prev_items, prev_words = [], [], [], []
        values: dict[str, list[float]] = {c: [] for c in numeric}
        for line_number, row in enumerate(reader, start=2):
            where = dict(file=path, record=f"line {line_number}")
            if None in row or any(v is None for v in row.values()):
                raise DataError(f"expected {len(reader.fieldnames)} fields", **where)
            items.append("None" if row["item"] in NA_STRINGS else row["item"])
            if row["word"] in NA_STRINGS:
                raise DataError("missing word", field="word", **where)
            words.append(row["word"])
            has_prev = row["prev_item"] not in NA_STRINGS  # run.py: isinstance(row["prev_item"], str)
            if has_prev and row["prev_word"] in NA_STRINGS:
                raise DataError("prev_item is given but prev_word is missing", field="prev_word", **where)
            prev_items.append(row["prev_item"] if has_prev else None)
            prev_words.append(row["prev_word"] if has_prev else None)
            for column in numeric:
                values[column].append(_number(row[column], column, where))
    if not words:
        raise DataError("no rows", file=path)
    return ReadingData(path, items, words, prev_items, prev_words,
                       {c: np.asarray(v, np.float64) for c, v in values.items()})


def _number(text: str, column: str, where: dict[str, str]) -> float:
    if text in NA_STRINGS:
        return math.nan
    try:
        return float(text)
    except ValueError:
        raise DataError(f"expected a number, got {text!r}", field=column, **where) from None


# ---------------------------------------------------------------------------- surprisal


def encode_words(tokenizer: Any, pairs: Sequence[tuple[str, str]]) -> EncodedSet:
    """One row per (context, word): context tokens (special tokens included) then the word's
    tokens (none added), every word token a target."""
    contexts = tokenizer([c for c, _ in pairs], add_special_tokens=True)["input_ids"]
    words = tokenizer([w for _, w in pairs], add_special_tokens=False)["input_ids"]
    token_ids, target_mask = [], []
    for (context, word), ctx, ids in zip(pairs, contexts, words):
        if not ctx or not ids:
            raise DataError(f"context {context!r} or word {word!r} has no tokens", field="item" if not ctx else "word")
        token_ids.append(np.asarray(list(ctx) + list(ids), np.int32))
        target_mask.append(np.asarray([False] * len(ctx) + [True] * len(ids), bool))
    return EncodedSet(tuple(token_ids), tuple(target_mask), np.arange(len(pairs) + 1), pad_id(tokenizer),
                      "2025", None)


def word_surprisals(model: Any, tokenizer: Any, pairs: Sequence[tuple[str, str]], *, batch_size: int = 64,
                    buckets: Sequence[int] = DEFAULT_BUCKETS) -> np.ndarray:
    """-ln p(word | context) per pair (float64), subword tokens chained."""
    unique = list(dict.fromkeys(pairs))  # consecutive rows share pairs (a row's prev is the last row)
    encoded = encode_words(tokenizer, unique)
    check_vocab(model, max(int(ids.max()) for ids in encoded.token_ids))
    log_probs = score_encoded(as_logits_fn(model), encoded, batch_size=batch_size, buckets=buckets)
    index = {pair: k for k, pair in enumerate(unique)}
    return np.array([-log_probs[index[pair]] for pair in pairs], np.float64)


# ---------------------------------------------------------------------------- regressions


def design(columns: dict[str, np.ndarray], terms: Sequence[str]) -> np.ndarray:
    """Intercept, then one column per term ("a" or the product "a:b")."""
    cols = [np.ones_like(next(iter(columns.values())))]
    for term in terms:
        cols.append(np.prod([columns[name] for name in term.split(":")], axis=0))
    return np.stack(cols, axis=1)


def ols(y: np.ndarray, x: np.ndarray) -> tuple[float, np.ndarray]:
    """(R² with intercept, coefficients) of least squares y ~ x (x includes the intercept column)."""
    coef = np.linalg.lstsq(x, y, rcond=None)[0]
    residual = y - x @ coef
    return 1.0 - float(residual @ residual) / float(np.sum((y - y.mean()) ** 2)), coef


def delta_r2(columns: dict[str, np.ndarray], measure: str, baseline: Sequence[str]) -> dict[str, float]:
    """Baseline and baseline + pred, each on its own complete rows (the pipeline's two dropna)."""
    names = lambda terms: sorted({n for t in terms for n in t.split(":")} | {measure})  # noqa: E731
    out = {}
    for label, terms in (("baseline", tuple(baseline)), ("model", tuple(baseline) + ("pred",))):
        keep = np.all([~np.isnan(columns[n]) for n in names(terms)], axis=0)
        rows = {n: columns[n][keep] for n in names(terms)}
        out[f"R2_{label}"], coef = ols(rows[measure], design(rows, terms))
        out[f"n_{label}"] = int(keep.sum())
    out["coefficient"] = float(coef[-1])
    out["delta_R2"] = out["R2_model"] - out["R2_baseline"]
    out["score"] = 100.0 * out["delta_R2"] / (1.0 - out["R2_baseline"])
    return out


@dataclasses.dataclass(frozen=True)
class ReadingResults:
    data: ReadingData
    pred: np.ndarray  # surprisal of each row's word (nats)
    prev_pred: np.ndarray  # surprisal of the previous word given its context; NaN on first words
    no_spillover: dict[str, dict[str, float]]  # measure -> delta_r2(...) with ET_BASELINE
    spillover: dict[str, dict[str, float]]  # measure -> delta_r2(...) with SPR_BASELINE
    eye_tracking_score: float  # mean over EYE_TRACKING of no_spillover scores
    self_paced_score: float  # spillover score of self_paced_reading_time
    correlations: dict[str, float]  # Pearson r of pred with each measure (pairwise complete)


def reading_scores(data: ReadingData, pred: np.ndarray, prev_pred: np.ndarray) -> ReadingResults:
    columns = {**data.columns, "pred": pred, "prev_pred": prev_pred}
    measures = [m for m in EYE_TRACKING + (SELF_PACED,) + EEG if m in columns]
    no_spillover = {m: delta_r2(columns, m, ET_BASELINE) for m in measures}
    spillover = {m: delta_r2(columns, m, SPR_BASELINE) for m in measures}
    et = float(np.mean([no_spillover[m]["score"] for m in EYE_TRACKING]))
    correlations = {m: _pearson(pred, columns[m]) for m in measures}
    return ReadingResults(data, pred, prev_pred, no_spillover, spillover, et, spillover[SELF_PACED]["score"],
                          correlations)


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    keep = ~np.isnan(a) & ~np.isnan(b)
    return float(np.corrcoef(a[keep], b[keep])[0, 1]) if keep.sum() > 1 else math.nan


def evaluate_reading(model: Any, tokenizer: Any, path: str | os.PathLike, *, batch_size: int = 64,
                     buckets: Sequence[int] = DEFAULT_BUCKETS) -> ReadingResults:
    """Read the CSV, compute every word's (and previous word's) surprisal, fit the regressions."""
    data = read_reading_csv(path)
    firsts = [(item, word) for item, word in zip(data.items, data.words)]
    prevs = [(item, word) for item, word in zip(data.prev_items, data.prev_words) if item is not None]
    surprisals = word_surprisals(model, tokenizer, firsts + prevs, batch_size=batch_size, buckets=buckets)
    pred = surprisals[:len(firsts)]
    prev_pred = np.full(len(data), np.nan)
    prev_pred[[k for k, item in enumerate(data.prev_items) if item is not None]] = surprisals[len(firsts):]
    return reading_scores(data, pred, prev_pred)


# ---------------------------------------------------------------------------- outputs


def format_reading(r: ReadingResults) -> str:
    lines = [f"== reading ({len(r.data)} words)", "measure                  dR2% no spill  dR2% spill  r(pred)"]
    for m in r.no_spillover:
        lines.append(f"{m:<24} {r.no_spillover[m]['score']:>13.2f} {r.spillover[m]['score']:>11.2f} "
                     f"{r.correlations[m]:>8.4f}")
    lines += [f"EYE TRACKING SCORE: {r.eye_tracking_score:.2f}", f"SELF-PACED READING SCORE: {r.self_paced_score:.2f}"]
    return "\n".join(lines)


def summary(r: ReadingResults) -> dict[str, Any]:
    return {"path": r.data.path, "n": len(r.data), "eye_tracking_score": r.eye_tracking_score,
            "self_paced_score": r.self_paced_score, "no_spillover": r.no_spillover, "spillover": r.spillover,
            "correlations": r.correlations, "mean_surprisal": float(np.nanmean(r.pred))}


def write_pipeline_files(r: ReadingResults, directory: str) -> None:
    """What run.py writes into `.../zero_shot/<backend>/reading/`; collate_preds.py reads predictions.json
    ({"reading": {"predictions": [{"id": row, "pred", "prev_pred"}]}}, NaN written as JSON NaN, as json.dump does)."""
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "predictions.json"), "w", encoding="utf-8") as f:
        json.dump({"reading": {"predictions": [{"id": k, "pred": float(p), "prev_pred": float(q)}
                                               for k, (p, q) in enumerate(zip(r.pred, r.prev_pred))]}}, f)
    with open(os.path.join(directory, "prediction.jsonl"), "w", encoding="utf-8") as f:
        for k in range(len(r.data)):
            f.write(json.dumps({"Index": k, "Sentence": r.data.items[k], "Word": r.data.words[k],
                                "Logprob": float(r.pred[k]), "Prev_Logprob": float(r.prev_pred[k])}) + "\n")
    for name, fits in (("predictive_power.jsonl", r.no_spillover), ("predictive_power_spillover.jsonl", r.spillover)):
        with open(os.path.join(directory, name), "w", encoding="utf-8") as f:
            for measure, fit in fits.items():
                f.write(json.dumps({"Predicted variable": measure, "Coefficient": fit["coefficient"],
                                    "R2": fit["R2_model"], "Change in R2 from baseline": fit["delta_R2"]}) + "\n")
    with open(os.path.join(directory, "correlations.txt"), "w", encoding="utf-8") as f:
        f.writelines(f"{m}\t{v:.4f}\n" for m, v in r.correlations.items())
    with open(os.path.join(directory, "report.txt"), "w", encoding="utf-8") as f:
        f.write(f"EYE TRACKING SCORE: {r.eye_tracking_score:.2f}\nSELF-PACED READING SCORE: {r.self_paced_score:.2f}\n")


def write_reading(r: ReadingResults, directory: str) -> None:
    """summary.json and, under pipeline/, the official files."""
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "summary.json"), "w", encoding="utf-8") as f:
        json.dump(summary(r), f, indent=2)
        f.write("\n")
    write_pipeline_files(r, os.path.join(directory, "pipeline"))
