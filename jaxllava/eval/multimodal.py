"""Image-conditioned zero-shot tasks (VQA, Winoground, and video choice): their items and where
their images (videos) come from.

Read as the BabyLM 2025 pipeline reads them (`babylm/evaluation-pipeline-2025`,
`evaluation_pipeline/sentence_zero_shot/read_files.py`: `read_files`, `decode_vqa`,
`decode_winoground`; `eval_multimodal.sh` for the data directories):

  vqa          fields question, target_ans, distractors (a list; 7 in the official data),
               idx_in_hf_dataset, image_id. Candidates `question + " " + answer`, target
               first; scored part `" " + answer`; UID "vqa". Chance 1/8.
  winoground   fields caption_0, caption_1, image_idx, collapsed_tag, tag, secondary_tag
               (image_key optional). Candidates = scored parts = the two captions, with
               the row's image (the "unpaired text score"); UID "winoground"; metadata
               Type, Linguistic Feature, Linguistic Sub-Feature as the pipeline names them.

  video        jaxllava's own (not BabyLM's): fields video (a file or frame folder, relative
               to the task file's folder), candidates (≥ 2 captions), label (the right
               one's index). Candidates = scored parts = the captions, right one first;
               UID "video". Scored with the model's video spans (data/sample/videos_eval.jsonl).

The correct candidate is first (label 0). The kind comes from the first record (`task_kind`);
every line is then checked against it, and a malformed line is a DataError naming file
and line. A directory is read like the pipeline: every `*.jsonl` in `iterdir` order.

Where images come from (never the hub):
  ImageFolder(dir)        a file `<key>.<png|jpg|jpeg|webp|bmp|gif>`; the key is `image_id`
                          (VQA) or `<image_idx>_<image_key>` (Winoground with image_key;
                          `<image_idx>` without it).
  FeatureRows(npy)        precomputed features for `model.vision.kind: features`: row i is
                          item i of the task in reading order, (items, E) or (items, P, E),
                          e.g. `launch.py cache-features` over a source listing the task's
                          images in that order. Rows are keyed by item, not by image id.
  SavedImageDataset(dir)  a Hugging Face `datasets` split saved with `save_to_disk`, read
                          with pyarrow (no `datasets` needed): VQA row `idx_in_hf_dataset`,
                          column "image"; Winoground row `image_idx`, column `image_key`.
Each source names the unique image an item needs (`key`), so an image shared by many
items (or by the candidates of one) is loaded and encoded once.
"""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import tempfile
from typing import Hashable, Literal, Sequence

import numpy as np

from jaxllava.data.images import ImageProcessing, load_image
from jaxllava.data.sources import FeatureStore
from jaxllava.data.video import read_video_frames
from jaxllava.errors import ConfigError, DataError
from jaxllava.eval.minimal_pairs import MinimalPairItem, iter_jsonl

ImageTaskKind = Literal["vqa", "winoground", "video"]
IMAGE_TASKS = ("vqa", "winoground", "video")
VQA_KEYS = ("question", "target_ans", "distractors")
WINOGROUND_KEYS = ("caption_0", "caption_1", "image_idx")
VIDEO_KEYS = ("video", "candidates", "label")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")


@dataclasses.dataclass(frozen=True)
class ImageRef:
    """Where an item's image is, under each kind of source."""

    folder_key: str  # file stem in an ImageFolder
    dataset_row: int  # row of a saved datasets split
    dataset_column: str  # its image column
    item_index: int  # the item's position in the task (FeatureRows)


@dataclasses.dataclass(frozen=True)
class ImageTask:
    kind: ImageTaskKind
    path: str
    items: list[MinimalPairItem]
    images: list[ImageRef]  # one per item


def task_kind(path: str | os.PathLike) -> ImageTaskKind | None:
    """"vqa" or "winoground" when the first record of the task's first `*.jsonl` has that kind's
    fields; None otherwise (a text task, or nothing readable: its reader reports why)."""
    path = pathlib.Path(path)
    first = next((p for p in path.iterdir() if p.suffix == ".jsonl"), None) if path.is_dir() else path
    if first is None or not first.is_file():
        return None
    with first.open("r", encoding="utf-8") as f:
        line = f.readline()
    try:
        record = json.loads(line.strip())
    except json.JSONDecodeError:
        return None
    if not isinstance(record, dict):
        return None
    if all(k in record for k in VQA_KEYS):
        return "vqa"
    if all(k in record for k in WINOGROUND_KEYS):
        return "winoground"
    if all(k in record for k in VIDEO_KEYS):
        return "video"
    return None


def read_image_task(path: str | os.PathLike, kind: ImageTaskKind | None = None) -> ImageTask:
    """Every item of a VQA or Winoground file, or of every `*.jsonl` in a directory (pipeline order)."""
    kind = kind or task_kind(path)
    if kind not in IMAGE_TASKS:
        raise DataError(f"not a VQA, Winoground or video task: the first record has none of {VQA_KEYS}, "
                        f"{WINOGROUND_KEYS}, {VIDEO_KEYS}", file=str(path))
    decode = {"vqa": _decode_vqa, "winoground": _decode_winoground, "video": _decode_video}[kind]
    items, images = [], []
    for file, line_number, record in iter_jsonl(path):
        fields, ref = decode(record, dict(file=str(file), record=f"line {line_number}"), len(items))
        uid = fields["metadata"]["UID"]
        items.append(MinimalPairItem(id=f"{uid}_{len(items)}", uid=uid, source=f"{file}:{line_number}", **fields))
        images.append(ref)
    if not items:
        raise DataError("no items in the task", file=str(path))
    return ImageTask(kind, str(path), items, images)


def _text(record: dict, key: str, where: dict) -> str:
    if key not in record:
        raise DataError("missing field", field=key, **where)
    value = record[key]
    if not isinstance(value, str):
        raise DataError(f"expected a string, got {type(value).__name__}", field=key, **where)
    return value


def _nonempty(record: dict, key: str, where: dict) -> str:
    value = _text(record, key, where)
    if not value.strip():
        raise DataError("empty text", field=key, **where)
    return value


def _index(record: dict, key: str, where: dict) -> int:
    if key not in record:
        raise DataError("missing field", field=key, **where)
    value = record[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise DataError(f"expected a non-negative integer, got {value!r}", field=key, **where)
    return value


def _decode_vqa(record: dict, where: dict, item_index: int) -> tuple[dict, ImageRef]:
    # read_files.py::decode_vqa
    question = _nonempty(record, "question", where)
    answers = [_nonempty(record, "target_ans", where)]
    distractors = record.get("distractors")
    if not isinstance(distractors, list) or not distractors:
        raise DataError(f"expected a non-empty list of answers, got {distractors!r}", field="distractors", **where)
    for k, answer in enumerate(distractors):
        if not isinstance(answer, str) or not answer.strip():
            raise DataError(f"distractor {k} must be a non-empty string, got {answer!r}", field="distractors",
                            **where)
    answers += distractors
    image_id = record.get("image_id")
    if not isinstance(image_id, (int, str)) or isinstance(image_id, bool) or str(image_id) == "":
        raise DataError(f"expected an integer or string id, got {image_id!r}", field="image_id", **where)
    fields = {"sentences": tuple(f"{question} {a}" for a in answers),
              "completions": tuple(f" {a}" for a in answers), "metadata": {"UID": "vqa"}}
    ref = ImageRef(str(image_id), _index(record, "idx_in_hf_dataset", where), "image", item_index)
    return fields, ref


def _decode_winoground(record: dict, where: dict, item_index: int) -> tuple[dict, ImageRef]:
    # read_files.py::decode_winoground: caption_0 matches the row's image (label 0).
    captions = (_nonempty(record, "caption_0", where), _nonempty(record, "caption_1", where))
    tag, secondary = _text(record, "tag", where), _text(record, "secondary_tag", where)
    metadata = {"UID": "winoground", "Type": _text(record, "collapsed_tag", where), "Linguistic Feature": tag,
                "Linguistic Sub-Feature": " ".join([tag, secondary])}
    image_idx = _index(record, "image_idx", where)
    image_key = _text(record, "image_key", where) if "image_key" in record else None
    folder_key = f"{image_idx}_{image_key}" if image_key else str(image_idx)
    ref = ImageRef(folder_key, image_idx, image_key or "image", item_index)
    return {"sentences": captions, "completions": captions, "metadata": metadata}, ref


def _decode_video(record: dict, where: dict, item_index: int) -> tuple[dict, ImageRef]:
    video = _nonempty(record, "video", where)
    candidates = record.get("candidates")
    if not isinstance(candidates, list) or len(candidates) < 2:
        raise DataError(f"expected a list of at least 2 captions, got {candidates!r}", field="candidates", **where)
    for k, caption in enumerate(candidates):
        if not isinstance(caption, str) or not caption.strip():
            raise DataError(f"candidate {k} must be a non-empty string, got {caption!r}", field="candidates", **where)
    label = _index(record, "label", where)
    if label >= len(candidates):
        raise DataError(f"label {label} is not an index of the {len(candidates)} candidates", field="label", **where)
    ordered = (candidates[label],) + tuple(c for k, c in enumerate(candidates) if k != label)
    return ({"sentences": ordered, "completions": ordered, "metadata": {"UID": "video"}},
            ImageRef(video, item_index, "video", item_index))


# ---------------------------------------------------------------------------- image sources


class ImageFolder:
    """Image files named by the items' id fields (module doc)."""

    kind = "pixels"

    def __init__(self, root: str | os.PathLike):
        self.root = pathlib.Path(root)
        if not self.root.is_dir():
            raise DataError("image folder not found", file=str(self.root), field="images")

    def key(self, ref: ImageRef) -> Hashable:
        return ref.folder_key

    def describe(self) -> str:
        return f"image folder {self.root}"

    def load(self, keys: Sequence[Hashable], processing: ImageProcessing) -> np.ndarray:
        """(len(keys), size, size, 3) float32 pixels, exactly as training loads them."""
        return np.stack([load_image(self._path(key), processing, record=f"image {key!r}") for key in keys])

    def _path(self, key: str) -> pathlib.Path:
        for suffix in IMAGE_SUFFIXES:
            candidate = self.root / f"{key}{suffix}"
            if candidate.is_file():
                return candidate
        raise DataError(f"no image file {key}{{{','.join(IMAGE_SUFFIXES)}}}", file=str(self.root),
                        field="images", reason="missing_image")


class FeatureRows:
    """Precomputed features, row i for item i of the task (module doc)."""

    kind = "features"

    def __init__(self, path: str | os.PathLike):
        self.store = FeatureStore((os.fspath(path),))

    def key(self, ref: ImageRef) -> Hashable:
        if ref.item_index >= self.store.rows:
            raise DataError(f"the task has more items than the features file has rows ({self.store.rows})",
                            file=self.store.paths[0], record=ref.item_index, field="features")
        return ref.item_index

    def describe(self) -> str:
        return f"features {self.store.describe()}"

    def load(self, keys: Sequence[Hashable], processing: ImageProcessing | None = None) -> np.ndarray:
        """(len(keys), P, E) float32."""
        return np.stack([self.store.row(int(key)) for key in keys])


class SavedImageDataset:
    """A `datasets` split saved with `save_to_disk` (its `state.json` lists the arrow files)."""

    kind = "pixels"

    def __init__(self, root: str | os.PathLike):
        self.root = pathlib.Path(root)
        state = self.root / "state.json"
        if not state.is_file():
            raise DataError("not a dataset saved with save_to_disk (no state.json)", file=str(self.root),
                            field="images")
        try:
            import pyarrow.ipc  # noqa: F401
        except ImportError:
            raise ConfigError(f"reading the saved dataset {self.root} needs pyarrow: pip install pyarrow "
                              f"(the `datasets` package is not needed)") from None
        files = [entry["filename"] for entry in json.loads(state.read_text())["_data_files"]]
        self.table = _read_arrow_files([self.root / name for name in files])
        self._scratch = tempfile.TemporaryDirectory(prefix="jaxllava_images_")

    def key(self, ref: ImageRef) -> Hashable:
        if ref.dataset_row >= self.table.num_rows:
            raise DataError(f"row {ref.dataset_row} is past the dataset's {self.table.num_rows} rows",
                            file=str(self.root), field="images")
        if ref.dataset_column not in self.table.column_names:
            raise DataError(f"no image column {ref.dataset_column!r} (columns: {self.table.column_names})",
                            file=str(self.root), field="images")
        return ref.dataset_row, ref.dataset_column

    def describe(self) -> str:
        return f"saved dataset {self.root}"

    def load(self, keys: Sequence[Hashable], processing: ImageProcessing) -> np.ndarray:
        return np.stack([load_image(self._file(row, column), processing, record=f"row {row}")
                         for row, column in keys])

    def _file(self, row: int, column: str) -> str:
        # datasets' Image feature: a struct {bytes, path}. load_image reads files, so the
        # bytes go to a scratch file once; the pixels are then exactly training's.
        cell = self.table.column(column)[row].as_py()
        if not isinstance(cell, dict) or (cell.get("bytes") is None and not cell.get("path")):
            raise DataError("expected an Image cell {bytes, path}", file=str(self.root), record=f"row {row}",
                            field=column)
        if cell.get("bytes") is None:
            return cell["path"]
        target = os.path.join(self._scratch.name, f"{row}_{column}")
        if not os.path.exists(target):
            with open(target, "wb") as f:
                f.write(cell["bytes"])
        return target


def _read_arrow_files(paths: Sequence[pathlib.Path]):
    import pyarrow as pa
    import pyarrow.ipc

    tables = []
    for path in paths:
        with pa.memory_map(str(path)) as source:
            tables.append(pyarrow.ipc.open_stream(source).read_all())  # save_to_disk writes the stream format
    return pa.concat_tables(tables)


ImageSource = ImageFolder | FeatureRows | SavedImageDataset


def open_image_source(path: str | os.PathLike) -> ImageSource:
    """The source at `path`: a `.npy` file (features), a saved dataset (a directory with state.json)
    or an image folder."""
    path = pathlib.Path(path)
    if path.suffix == ".npy":
        return FeatureRows(path)
    if (path / "state.json").is_file():
        return SavedImageDataset(path)
    return ImageFolder(path)


class VideoFiles:
    """The videos of a video task: files or frame folders at paths relative to `root` (the task
    file's folder), each read with `model.video.frames` evenly spaced frames."""

    kind = "video"

    def __init__(self, root: str | os.PathLike):
        self.root = pathlib.Path(root)

    def key(self, ref: ImageRef) -> Hashable:
        path = self.root / ref.folder_key
        if not path.exists():
            raise DataError("video file or frame folder not found", file=str(path), record=f"item {ref.item_index}",
                            field="video", reason="missing_video")
        return str(path)

    def describe(self) -> str:
        return f"videos under {self.root}"

    def load(self, keys: Sequence[Hashable], processing: ImageProcessing, frames: int) -> np.ndarray:
        """(U, frames, size, size, 3) normalised frames of the videos `keys`."""
        return np.stack([read_video_frames(key, processing, num_frames=frames, record=key) for key in keys])


def default_image_source(task_path: str | os.PathLike) -> pathlib.Path:
    """Where a task's images are when none is named: `images/` beside the task file, or inside
    the task directory."""
    task_path = pathlib.Path(task_path)
    return (task_path if task_path.is_dir() else task_path.parent) / "images"
