"""Record sources of every format (`data.sources[].format`), and precomputed vision features.

    llava     LLaVA records (records.py), images from files or, with `features:`, from feature rows
    text      plain-text files (BabyLM's `*.train`; a path or a glob): a text-only sample per
              non-empty line, per paragraph (blank lines end one), or per chunk of consecutive
              lines that fit in `chunk_tokens` tokens
    captions  a JSON list of caption strings, or JSONL objects {"caption", "image"?, "id"?}: each
              caption is an image record, its picture an image file (`image` under `image_folder`)
              or row i of `features:`

Every format ends as `Record`s with the same validation, skip policy and word rule; a text line
is an assistant turn, so it is a training target under every objective.

Features (`FeatureStore`): `.npy` files of shape (rows, E) or (rows, P, E), float32, float16 or
bfloat16 (numpy writes bfloat16 as 2-byte void), concatenated in order, memory-mapped: a worker
reads only the rows of its microbatches, never the 7 GB of BabyLM's DINOv2 states.
"""
from __future__ import annotations

import functools
import glob
import hashlib
import os
from typing import Any, Callable, Iterator, Optional

import ml_dtypes
import numpy as np

from jaxllava.data.config import SourceConfig
from jaxllava.data.records import EntryError, Record, SkipReport, Turn, read_records_with_raw
from jaxllava.errors import DataError

_FEATURE_DTYPES = (np.dtype(np.float32), np.dtype(np.float16), np.dtype(ml_dtypes.bfloat16))
_CHECK_ROWS = 65_536  # rows checked for NaN/inf at a time: bounded memory on any array


class FeatureStore:
    """The rows of one or more `.npy` files, concatenated in order and memory-mapped. Picklable:
    a Grain worker reopens the files instead of receiving their bytes."""

    def __init__(self, paths: tuple[str, ...]):
        self.paths = tuple(paths)
        arrays = self._open()
        shapes = {tuple(a.shape[1:]) for a in arrays}
        if len(shapes) != 1:
            raise DataError(f"the feature files disagree on the shape of a row: "
                            f"{', '.join(f'{p} {a.shape}' for p, a in zip(self.paths, arrays))}",
                            file=self.paths[0], field="features", reason="features_shape")
        shape = shapes.pop()
        self.shape = (1,) + shape if len(shape) == 1 else shape  # (P, E)
        self.offsets = np.cumsum([0] + [a.shape[0] for a in arrays])
        self._arrays: Optional[list[np.ndarray]] = arrays

    @property
    def rows(self) -> int:
        return int(self.offsets[-1])

    def describe(self) -> str:
        return " + ".join(self.paths)

    def _open(self) -> list[np.ndarray]:
        arrays = []
        for path in self.paths:
            try:
                array = np.load(path, mmap_mode="r", allow_pickle=False)
            except FileNotFoundError:
                raise DataError("features file not found", file=path, field="features", reason="features_file") \
                    from None
            except (OSError, ValueError) as error:
                raise DataError(f"not a readable .npy array ({error})", file=path, field="features",
                                reason="features_file") from None
            if array.dtype == np.dtype("V2"):
                array = array.view(ml_dtypes.bfloat16)
            if array.dtype not in _FEATURE_DTYPES or array.ndim not in (2, 3):
                raise DataError(f"expected a float32, float16 or bfloat16 array of shape (rows, E) or (rows, P, E), "
                                f"got {array.dtype} {array.shape}", file=path, field="features",
                                reason="features_shape")
            arrays.append(array)
        return arrays

    def __getstate__(self):
        return {**self.__dict__, "_arrays": None}

    def _locate(self, row: int) -> tuple[int, int]:
        k = int(np.searchsorted(self.offsets, row, side="right")) - 1
        return k, row - int(self.offsets[k])

    def where(self, row: int) -> str:
        k, local = self._locate(row)
        return f"{self.paths[k]} row {local}"

    def row(self, row: int) -> np.ndarray:
        """(P, E) float32 features of one row; a NaN or inf is a DataError naming file and row."""
        if self._arrays is None:
            self._arrays = self._open()
        k, local = self._locate(row)
        values = np.asarray(self._arrays[k][local], dtype=np.float32).reshape(self.shape)
        if not np.isfinite(values).all():
            raise DataError(f"row {local} holds NaN or inf", file=self.paths[k], record=f"row {local}",
                            field="features", reason="bad_features")
        return values

    def bad_rows(self) -> Iterator[int]:
        """The rows holding a NaN or inf, read a bounded block at a time."""
        if self._arrays is None:
            self._arrays = self._open()
        for k, array in enumerate(self._arrays):
            for lo in range(0, array.shape[0], _CHECK_ROWS):
                block = np.asarray(array[lo:lo + _CHECK_ROWS], dtype=np.float32)
                finite = np.isfinite(block.reshape(block.shape[0], -1)).all(axis=1)
                for local in np.flatnonzero(~finite):
                    yield int(self.offsets[k]) + lo + int(local)


def features_identity(paths: list[str], probe: int = 1 << 20) -> str:
    """sha256 standing for feature files' contents without reading gigabytes at every start: each
    file's size and its first and last MiB (a different extraction changes both, in practice)."""
    digest = hashlib.sha256()
    for path in paths:
        size = os.path.getsize(path)
        digest.update(f"{os.path.basename(path)}\0{size}\0".encode())
        with open(path, "rb") as f:
            digest.update(f.read(probe))
            f.seek(max(0, size - probe))
            digest.update(f.read(probe))
    return digest.hexdigest()


def caption_record(raw: Any, *, with_features: bool) -> dict:
    """A captions-format entry as the LLaVA record it stands for, validated like any record. With
    features every caption is an image record (its `image` entry only counts its row)."""
    if isinstance(raw, str):
        raw = {"caption": raw}
    if not isinstance(raw, dict):
        raise EntryError(f"a captions entry must be a string or an object with a 'caption', got "
                         f"{type(raw).__name__}", None, "not_object")
    caption = raw.get("caption")
    if not isinstance(caption, str):
        raise EntryError(f"'caption' must be a string, got {type(caption).__name__}", "caption", "turn_text")
    image = "features" if with_features else raw.get("image")
    if image is None:
        raise EntryError("a caption needs its picture: an 'image' file under image_folder, or the source's "
                         "features:", "image", "image_field")
    return {"conversations": [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": caption}],
            "image": image, **({"id": raw["id"]} if "id" in raw else {})}


def text_files(pattern: str) -> list[str]:
    """The files a text source names: the path itself, or the sorted matches of a glob."""
    if glob.has_magic(pattern):
        files = sorted(path for path in glob.glob(pattern, recursive=True) if os.path.isfile(path))
        if not files:
            raise DataError("the glob matches no file", file=pattern, field="path", reason="file")
        return files
    if not os.path.isfile(pattern):
        raise DataError("no such text file", file=pattern, field="path", reason="file")
    return [pattern]


def _text_units(path: str, unit: str) -> Iterator[tuple[int, int, str]]:
    """(first line, last line, text) per sample of one text file: every non-empty line, or every
    paragraph (non-empty lines up to a blank one)."""
    paragraph: list[str] = []
    first = number = 0
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, 1):
            try:
                line = raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as error:
                raise DataError(f"not UTF-8 text at byte {error.start} of the line", file=path,
                                record=f"line {number}", reason="encoding") from None
            if unit == "line":
                if line.strip():
                    yield number, number, line
            elif line.strip():
                first = first or number
                paragraph.append(line)
            elif paragraph:
                yield first, number - 1, "\n".join(paragraph)
                paragraph, first = [], 0
    if paragraph:
        yield first, number, "\n".join(paragraph)


def _chunks(units: list[tuple[int, int, str]], tokenizer, budget: int) -> list[tuple[int, int, str]]:
    """Consecutive lines joined while their tokens fit in `budget` (a longer line stands alone)."""
    if not units:
        return []
    counts = [len(ids) + 1 for ids in tokenizer([text for *_, text in units], add_special_tokens=False)["input_ids"]]
    spans, start, used = [], 0, 0
    for k, count in enumerate(counts):
        if k > start and used + count > budget:
            spans.append((start, k))
            start, used = k, 0
        used += count
    spans.append((start, len(units)))
    return [(units[a][0], units[b - 1][1], "\n".join(text for *_, text in units[a:b])) for a, b in spans]


def _read_text(source: SourceConfig, on_bad_record: str, skips: SkipReport, tokenizer) -> list[Record]:
    records = []
    for path in text_files(source.path):
        stem = os.path.splitext(os.path.basename(path))[0]
        try:
            units = list(_text_units(path, "paragraph" if source.text_unit == "paragraph" else "line"))
            if not units:
                raise DataError("no text in the file", file=path, reason="empty_file")
        except DataError as error:
            if on_bad_record == "error":
                raise
            skips.add(error)
            continue
        if source.text_unit == "chunk":
            units = _chunks(units, tokenizer, source.chunk_tokens)
        for first, last, text in units:
            where = f"line {first}" if first == last else f"lines {first}-{last}"
            records.append(Record(path, where, f"{stem}:{first}", (Turn("assistant", text),), None))
    return records


def read_source(source: SourceConfig, *, features: Optional[FeatureStore], on_bad_record: str,
                skips: SkipReport, tokenizer, use_images: bool = True) -> list[Record]:
    """The validated records of one source; `features`: its FeatureStore (`features:`) or None."""
    if source.format == "text":
        return _read_text(source, on_bad_record, skips, tokenizer)
    entry: Optional[Callable[[Any], Any]] = None
    if source.format == "captions":
        entry = functools.partial(caption_record, with_features=features is not None)
    pairs = read_records_with_raw(source.path, image_folder=source.image_folder, on_bad_record=on_bad_record,
                                  skips=skips, allow_outside=source.allow_outside,
                                  check_image_files=use_images, entry=entry, features=features,
                                  video_folder=source.video_folder)
    return [record for record, _ in pairs]
