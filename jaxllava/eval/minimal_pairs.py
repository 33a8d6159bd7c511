"""Minimal-pair evaluation items, read exactly as the BabyLM 2025 pipeline reads them.

Source of every rule: `babylm/evaluation-pipeline-2025`,
`evaluation_pipeline/sentence_zero_shot/read_files.py` (`read_files`, `decode_blimp`,
`decode_ewok`) and `dataset.py` (`__getitem__`: which keys are aggregation metadata);
see docs/evaluation.md#reading-task-files.

  task "blimp", line has `field`   BLiMP: candidates [sentence_good, sentence_bad], each
                                   scored whole; metadata UID, field
                                   (`syntax_semantics` -> `syntax/semantics`), linguistics_term.
  task "blimp", no `field`         BLiMP supplement: same candidates; UID = file stem,
                                   field = linguistics_term = "supplement".
  task "ewok"                      candidates Context1 + " " + Target1/2; scored part
                                   " " + Target1/2 (the whole sentence with
                                   `full_sentence_scores`); UID = Domain; metadata also
                                   context_type, context_contrast, target_contrast.
                                   Context2 is required (the pipeline reads it) but unused
                                   by causal scoring. Never commit EWoK text (its terms of
                                   use, docs/evaluation.md#ewok-terms-of-use).

The correct candidate is always first (the pipeline's label 0). A directory is read
like the pipeline: every `*.jsonl` in `pathlib.Path.iterdir()` order (file-system
order, unsorted), lines in file order; each line is `json.loads(line.strip())`, so
text fields are never stripped (supplement sentences keep their `\\n`). Only the order
of items and prediction ids depends on the directory order, never an accuracy.
Where the pipeline would crash (bad JSON, a missing key) a `DataError` names the
file, line and field; non-string text fields are rejected the same way.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import os
import pathlib
from typing import Any, Iterator, Literal

from jaxllava.errors import DataError

Task = Literal["blimp", "ewok"]
TASKS = ("blimp", "ewok")


@dataclasses.dataclass(frozen=True)
class MinimalPairItem:
    """One multiple-choice item; `sentences[0]` is the correct candidate."""

    id: str  # "<UID>_<k>": k-th item of its UID in reading order (the pipeline's predictions.json id)
    uid: str
    sentences: tuple[str, ...]  # full candidate texts, fed to the tokenizer as they are
    completions: tuple[str, ...]  # scored suffix of each sentence
    metadata: dict[str, str]  # aggregation keys and values, as the pipeline's `metadata` (includes "UID")
    source: str  # "<file>:<line>" (1-based line)

    def __post_init__(self):
        if len(self.sentences) < 2 or len(self.sentences) != len(self.completions):
            raise DataError("an item needs >= 2 candidates and one completion per candidate",
                            record=self.source, record_id=self.id, field="sentences")
        for k, (sentence, completion) in enumerate(zip(self.sentences, self.completions)):
            if not sentence.endswith(completion):
                # The pipeline locates the scored part as the last len(completion) characters.
                raise DataError(f"completion {completion!r} is not a suffix of candidate {k} {sentence!r}",
                                record=self.source, record_id=self.id, field="completions")


def read_minimal_pairs(path: str | pathlib.Path, task: Task, *,
                       full_sentence_scores: bool = False) -> list[MinimalPairItem]:
    """Items of one `*.jsonl` file, or of every `*.jsonl` file in a directory (pipeline order)."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    items: list[MinimalPairItem] = []
    per_uid: collections.Counter = collections.Counter()
    for file, line_number, record in iter_jsonl(path):
        where = dict(file=str(file), record=f"line {line_number}")
        if task == "blimp":
            fields = _decode_blimp(record, file, where)
        else:
            fields = _decode_ewok(record, full_sentence_scores, where)
        uid = fields["metadata"]["UID"]
        items.append(MinimalPairItem(id=f"{uid}_{per_uid[uid]}", uid=uid, source=f"{file}:{line_number}", **fields))
        per_uid[uid] += 1
    return items


def iter_jsonl(path: str | os.PathLike) -> Iterator[tuple[pathlib.Path, int, dict[str, Any]]]:
    """(file, 1-based line, record) of a `*.jsonl` file or of every one in a directory, in the
    pipeline's order (read_files.py: `iterdir`, suffix filter, `json.loads(line.strip())`): the one
    reader of every zero-shot task file, so a bad line is named the same way everywhere."""
    path = pathlib.Path(path)
    if path.is_dir():
        files = [p for p in path.iterdir() if p.suffix == ".jsonl"]
        if not files:
            raise DataError("no *.jsonl files in directory", file=str(path))
    elif path.is_file():
        files = [path]
    else:
        raise DataError("no such file or directory", file=str(path))
    for file in files:
        with file.open("r", encoding="utf-8") as f:
            for line_number, line in enumerate(f, start=1):
                try:
                    record = json.loads(line.strip())
                except json.JSONDecodeError as e:
                    raise DataError(f"invalid JSON ({e.msg} at column {e.colno})", file=str(file),
                                    record=f"line {line_number}") from None
                if not isinstance(record, dict):
                    raise DataError(f"expected a JSON object, got {type(record).__name__}", file=str(file),
                                    record=f"line {line_number}")
                yield file, line_number, record


def _text(record: dict[str, Any], key: str, where: dict[str, str]) -> str:
    if key not in record:
        raise DataError("missing field", field=key, **where)
    value = record[key]
    if not isinstance(value, str):
        raise DataError(f"expected a string, got {type(value).__name__}", field=key, **where)
    if key.startswith(("sentence_", "Context", "Target")) and value == "":
        raise DataError("empty text", field=key, **where)
    return value


def _label(record: dict[str, Any], key: str, where: dict[str, str]) -> str:
    """A value used only to group accuracies: any JSON scalar, as the pipeline's Counter keys."""
    if key not in record:
        raise DataError("missing field", field=key, **where)
    value = record[key]
    if isinstance(value, (list, dict)):
        raise DataError(f"expected a scalar, got {type(value).__name__}", field=key, **where)
    return value if isinstance(value, str) else str(value)


def _decode_blimp(record: dict[str, Any], file: pathlib.Path, where: dict[str, str]) -> dict[str, Any]:
    good = _text(record, "sentence_good", where)
    bad = _text(record, "sentence_bad", where)
    if "field" in record:  # read_files.py::decode_blimp: `field` marks original BLiMP
        field = _text(record, "field", where)
        metadata = {
            "field": "syntax/semantics" if field == "syntax_semantics" else field,
            "UID": _text(record, "UID", where),
            "linguistics_term": _text(record, "linguistics_term", where),
        }
    else:  # supplement: no field/UID in the data
        metadata = {"field": "supplement", "UID": file.stem, "linguistics_term": "supplement"}
    return {"sentences": (good, bad), "completions": (good, bad), "metadata": metadata}


def _decode_ewok(record: dict[str, Any], full_sentence_scores: bool, where: dict[str, str]) -> dict[str, Any]:
    context = _text(record, "Context1", where)
    _text(record, "Context2", where)  # read by the pipeline (enc-dec prefix), unused here
    targets = (_text(record, "Target1", where), _text(record, "Target2", where))
    sentences = tuple(" ".join([context, target]) for target in targets)
    completions = sentences if full_sentence_scores else tuple(" " + target for target in targets)
    metadata = {
        "UID": _text(record, "Domain", where),
        "context_type": _label(record, "ContextType", where),
        "context_contrast": _label(record, "ContextDiff", where),
        "target_contrast": _label(record, "TargetDiff", where),
    }
    return {"sentences": sentences, "completions": completions, "metadata": metadata}
