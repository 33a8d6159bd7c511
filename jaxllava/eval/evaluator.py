"""Minimal-pair evaluation of a model on a fixed task set: read and encode once, score many times.

    evaluator = MinimalPairEvaluator({"blimp": "evaluation_data/full_eval/blimp_filtered"}, tokenizer,
                                     image_templates=("<image>\\n{text}",))
    results = evaluator.evaluate(model)   # {task: {setting: scoring.Results}}
    evaluator.scalars(results)            # {"eval/blimp/text/accuracy": 61.2, ...}
    evaluator.write(results, out_dir)     # predictions, summaries, pipeline-layout files

Task kind: taken from the first line of the task's first `*.jsonl` file (the pipeline's
`iterdir` order): a record with `Context1` or `Target1` is EWoK, anything else is BLiMP
(original BLiMP and the supplement, told apart by `field` as the pipeline does). The
reader then checks every line against that kind and names any malformed one by file
and line, so a mixed or broken directory is an error, never a silent guess.

Image tasks (VQA, Winoground: eval/multimodal.py, found by their fields) are scored with
their images ("image": each image encoded once, its vectors spliced into every candidate,
eval/image_scoring.py) and without vision ("no_vision": the same items as bare text, the
BabyLM baselines' "no vision" rows), reported side by side; image templates do not apply.
Their images come from `image_sources[name]` or `images/` beside the task file; pixels are
made as training makes them (`image_processing`, e.g. the run's `DataPipeline.processing`).

Settings of text tasks: "text" (bare sentences: the numbers the official pipeline reports) and one
per image template, "image_template" (one) or "image_template_<k>" (several, k from 1).
A template is literal text before the sentence, with no image (scoring.py); the
reference evaluated with "<image>\\n{text}" through gen 19 (README pitfall 28,
docs/reference.md#evaluation).

Training safety: `evaluate` reads the model's state and never writes it, draws no
random numbers, and copies only the (B,) sums back to the host, so evaluating inside
training leaves the run's numbers unchanged. Parameters are jit arguments
(`scoring.module_logits_fn`): the shapes compiled on the first call, one per
(batch, bucket), serve every later call and every checkpoint of the architecture.
The model's parameters decide the devices: on the training mesh, every process calls
`evaluate` with the same tasks and the batch rows are split over the mesh's batch axes
(scoring.py), so loop.py passes `trainer.model(state["params"])` as it is.
"""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from typing import Any, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxllava.data.images import ImageProcessing
from jaxllava.data.tokenizer import special_ids
from jaxllava.errors import ConfigError, DataError
from jaxllava.eval import image_scoring, report
from jaxllava.eval.minimal_pairs import MinimalPairItem, Task, read_minimal_pairs
from jaxllava.eval.multimodal import (IMAGE_TASKS, ImageSource, VideoFiles, default_image_source, open_image_source,
                                      read_image_task, task_kind)
from jaxllava.eval.scoring import (DEFAULT_BUCKETS, EncodedSet, Results, compile_count, decide, encode_candidates,
                                   module_logits_fn, score_encoded)

TEXT = "text"
IMAGE, VIDEO, NO_VISION = "image", "video", "no_vision"
VISUAL_CACHE_BYTES = 256 << 20  # an image task's loaded pixels are kept between evaluations up to this size
EWOK_KEYS = ("Context1", "Target1")
# BLiMP candidates are mostly under 16 tokens (word-level: about 10 with BOS): a
# 16-position bucket halves their padded compute against scoring's smallest (32),
# for one more compiled shape.
BUCKETS = (16,) + tuple(b for b in DEFAULT_BUCKETS if b > 16)


def detect_task_kind(path: str | os.PathLike) -> Task:
    """"ewok" when the first record of the task's first file has EWoK's fields, else "blimp"."""
    path = pathlib.Path(path)
    if path.is_dir():
        first = next((p for p in path.iterdir() if p.suffix == ".jsonl"), None)  # read_files.py order
    else:
        first = path if path.is_file() else None
    if first is None:
        return "blimp"  # the reader reports the missing file or directory
    with first.open("r", encoding="utf-8") as f:
        line = f.readline()
    try:
        record = json.loads(line.strip())
    except json.JSONDecodeError:
        return "blimp"  # the reader reports the bad line with its number
    return "ewok" if isinstance(record, dict) and any(k in record for k in EWOK_KEYS) else "blimp"


def setting_names(image_templates: Sequence[str], bare_text: bool) -> dict[str, Optional[str]]:
    """Setting name → template (None: bare text), in report order."""
    templates = list(image_templates)
    if len(set(templates)) != len(templates):
        raise ConfigError(f"image templates are repeated: {templates}")
    settings: dict[str, Optional[str]] = {TEXT: None} if bare_text else {}
    if len(templates) == 1:
        settings["image_template"] = templates[0]
    else:
        settings.update({f"image_template_{k}": t for k, t in enumerate(templates, start=1)})
    if not settings:
        raise ConfigError("nothing to evaluate: no bare-text setting and no image template")
    return settings


@dataclasses.dataclass
class PreparedTask:
    kind: str  # "blimp", "ewok" (text) or "vqa", "winoground", "video" (image tasks)
    path: str
    items: list[MinimalPairItem]
    encoded: dict[str, EncodedSet]  # text setting → every candidate's token ids and target mask
    settings: dict[str, Optional[str]]  # setting → template (None: bare text, or the image)
    source: Optional[ImageSource] = None  # image tasks: where the images are
    image_keys: Optional[list] = None  # image tasks: the source's key of each item's image
    # Image tasks, filled on first use: the candidates with their image span (per image-token
    # count) and the loaded pixels or features (per ImageProcessing).
    with_images: dict = dataclasses.field(default_factory=dict)
    visual: dict = dataclasses.field(default_factory=dict)

    @property
    def is_image_task(self) -> bool:
        return self.kind in IMAGE_TASKS


class MinimalPairEvaluator:
    """Minimal-pair accuracy of a model on named tasks, under each setting, as the 2025 pipeline scores it.

    tasks: name → a BLiMP/supplement/EWoK `*.jsonl` file or a directory of them.
    tokenizer: the model's fast Hugging Face tokenizer.
    image_templates: templates such as "<image>\\n{text}", reported beside bare text
    (`bare_text=False` drops the bare-text setting). protocol: "2025" or "2024"
    (scoring.py). batch_size, buckets: rows per device batch and padded lengths
    (results do not depend on them beyond float noise).
    """

    def __init__(self, tasks: Mapping[str, str | os.PathLike], tokenizer: Any, *,
                 image_templates: Sequence[str] = (), bare_text: bool = True, protocol: str = "2025",
                 batch_size: int = 64, buckets: Sequence[int] = BUCKETS,
                 image_sources: Optional[Mapping[str, str | os.PathLike]] = None,
                 image_processing: Optional[ImageProcessing] = None, image_batch_size: int = 32):
        if not tasks:
            raise ConfigError("no minimal-pair tasks given")
        if batch_size < 1 or image_batch_size < 1 or not buckets or min(buckets) < 1:
            raise ConfigError(f"batch_size, image_batch_size and buckets must be positive, got {batch_size}, "
                              f"{image_batch_size} and {tuple(buckets)}")
        unknown = set(image_sources or {}) - set(tasks)
        if unknown:
            raise ConfigError(f"image sources for tasks that are not evaluated: {sorted(unknown)}")
        self.tokenizer = tokenizer
        self.settings = setting_names(image_templates, bare_text)
        self.protocol = protocol
        self.batch_size = batch_size
        self.image_batch_size = image_batch_size
        self.image_processing = image_processing
        self.buckets = tuple(sorted(set(int(b) for b in buckets)))
        self.tasks: dict[str, PreparedTask] = {}
        for name, path in tasks.items():
            image_kind = task_kind(path)
            if image_kind is None:
                self.tasks[name] = self._prepare_text_task(name, path)
            else:
                self.tasks[name] = self._prepare_image_task(name, path, image_kind, (image_sources or {}).get(name))
        self.max_token_id = max(int(ids.max()) for task in self.tasks.values()
                                for enc in task.encoded.values() for ids in enc.token_ids)

    def _prepare_text_task(self, name: str, path) -> PreparedTask:
        kind = detect_task_kind(path)
        items = read_minimal_pairs(path, kind)
        if not items:
            raise DataError("no minimal pairs in the task", file=str(path))
        encoded = {setting: encode_candidates(self.tokenizer, items, protocol=self.protocol, image_template=template)
                   for setting, template in self.settings.items()}
        for setting, enc in encoded.items():
            self._check_length(name, setting, items, enc)
        return PreparedTask(kind, str(path), items, encoded, dict(self.settings))

    def _prepare_image_task(self, name: str, path, kind: str, source_path) -> PreparedTask:
        if self.protocol != "2025":
            raise ConfigError(f"task {name!r} ({kind}) exists only in the 2025 pipeline, but protocol is "
                              f"{self.protocol!r}")
        task = read_image_task(path, kind)
        if kind == "video":  # videos lie beside the task file unless a folder is named
            source = VideoFiles(source_path or pathlib.Path(path).parent)
        else:
            source = open_image_source(source_path or default_image_source(path))
        keys = [source.key(ref) for ref in task.images]  # fails now, not hours into training
        encoded = {NO_VISION: encode_candidates(self.tokenizer, task.items)}
        self._check_length(name, NO_VISION, task.items, encoded[NO_VISION])
        visual = VIDEO if kind == "video" else IMAGE
        return PreparedTask(kind, str(path), task.items, encoded, {visual: None, NO_VISION: None}, source, keys)

    @classmethod
    def from_config(cls, eval_config: Any, tokenizer: Any, *,
                    image_processing: Optional[ImageProcessing] = None) -> "MinimalPairEvaluator":
        """The evaluator an `EvalConfig` describes (`tasks`, `image_sources`, `image_templates`,
        `protocol`, `batch_size`, `image_batch_size`)."""
        return cls(eval_config.tasks, tokenizer, image_templates=tuple(eval_config.image_templates),
                   protocol=eval_config.protocol, batch_size=eval_config.batch_size,
                   image_sources=eval_config.image_sources, image_processing=image_processing,
                   image_batch_size=eval_config.image_batch_size)

    def _check_length(self, task: str, setting: str, items: list[MinimalPairItem], encoded: EncodedSet) -> None:
        # Fail before the first evaluation (maybe hours into training), naming the item.
        for row, ids in enumerate(encoded.token_ids):
            if len(ids) - 1 > self.buckets[-1]:
                item = items[int(np.searchsorted(encoded.row_start, row, side="right")) - 1]
                raise DataError(f"task {task!r} ({setting}): a candidate needs {len(ids) - 1} input positions, more "
                                f"than the largest bucket {self.buckets[-1]}", record=item.source,
                                record_id=item.id, field="sentences")

    def evaluate(self, model: nnx.Module | Any, *,
                 image_processing: Optional[ImageProcessing] = None) -> dict[str, dict[str, Results]]:
        """Score every task under every setting: {task: {setting: Results}}.

        model: an NNX module called as `model(input_ids, segment_ids=, positions=)` → logits
        (LlavaModel, Llama), or a scoring `logits_fn` (text tasks only). The module is only read.
        image_processing: how pixels are made for image tasks (default: the constructor's).
        """
        if isinstance(model, nnx.Module):
            vocab_size = _vocab_size(model)
            if vocab_size is not None and self.max_token_id >= vocab_size:
                raise ConfigError(f"the tokenizer produces id {self.max_token_id} but the model has only "
                                  f"{vocab_size} embedding rows")
            # Host (numpy) parameters would be copied to the device on every batch.
            logits_fn = jax.tree.map(lambda x: jnp.asarray(x) if isinstance(x, np.ndarray) else x,
                                     module_logits_fn(model))
        else:
            logits_fn = model
        out: dict[str, dict[str, Results]] = {}
        for name, task in self.tasks.items():
            out[name] = {}
            if task.is_image_task:
                out[name][VIDEO if task.kind == "video" else IMAGE] = self._score_with_images(
                    name, task, model, image_processing or self.image_processing)
            for setting, encoded in task.encoded.items():
                before = compile_count()
                flat = score_encoded(logits_fn, encoded, batch_size=self.batch_size, buckets=self.buckets)
                out[name][setting] = decide(task.items, encoded, flat, compiles=compile_count() - before)
        return out

    def _score_with_images(self, name: str, task: PreparedTask, model: Any,
                           processing: Optional[ImageProcessing]) -> Results:
        vision = getattr(getattr(model, "config", None), "vision", None)
        if not isinstance(model, nnx.Module) or vision is None:
            raise ConfigError(f"task {name!r} ({task.kind}) is scored with images: it needs a LlavaModel with "
                              f"model.vision configured")
        image_tokens, span = model.config.image_tokens, None
        if task.kind == "video":
            span = self._video_span(name, model)
            image_tokens = len(span)
        if image_tokens not in task.with_images:
            candidates = image_scoring.encode_image_candidates(self.tokenizer, task.items, task.image_keys,
                                                               image_tokens, span)
            self._check_length(name, IMAGE, task.items, candidates.encoded)
            task.with_images[image_tokens] = candidates
        candidates = task.with_images[image_tokens]
        if task.source.kind in ("pixels", "video") and processing is None:
            raise ConfigError(f"task {name!r} reads pixels from {task.source.describe()}: pass image_processing "
                              f"(the run's, data.pipeline.image_processing_for(config.data, image_size))")
        before = image_scoring.counts()["scorer_traces"]
        frames = model.config.video.frames if task.kind == "video" else None
        flat = image_scoring.score_with_images(model, candidates,
                                               self._image_loader(task, candidates, processing, frames),
                                               batch_size=self.batch_size, image_batch_size=self.image_batch_size,
                                               buckets=self.buckets)
        return decide(task.items, candidates.encoded, flat,
                      compiles=image_scoring.counts()["scorer_traces"] - before)

    def _video_span(self, name: str, model: Any) -> list[int]:
        """The placeholder ids of one video for `model`: its fast then slow span."""
        if model.config.video is None:
            raise ConfigError(f"task {name!r} (video) is scored with videos: it needs model.video configured")
        ids = special_ids(self.tokenizer)
        if ids.video is None:
            raise ConfigError(f"task {name!r} (video): the tokenizer has no video placeholder tokens; use the "
                              f"run's own tokenizer (the one in its work directory)")
        return ids.video_span(*model.config.video_spans)

    @staticmethod
    def _image_loader(task: PreparedTask, candidates, processing, frames: Optional[int] = None):
        """load(lo, hi) for image_scoring: the source's pixels, features or video frames of unique
        images lo..hi-1, kept between evaluations while they are small (they depend on the
        processing, never on the weights)."""
        cache_key = {"pixels": processing, "video": (processing, frames)}.get(task.source.kind, "features")
        if cache_key not in task.visual:
            task.visual = {cache_key: {}}
        cache = task.visual[cache_key]

        def load(lo: int, hi: int) -> np.ndarray:
            if (lo, hi) in cache:
                return cache[(lo, hi)]
            keys = candidates.image_keys[lo:hi]
            visual = (task.source.load(keys, processing, frames) if task.source.kind == "video"
                      else task.source.load(keys, processing))
            if visual.nbytes * len(candidates.image_keys) / max(hi - lo, 1) <= VISUAL_CACHE_BYTES:
                cache[(lo, hi)] = visual
            return visual

        return load

    # ------------------------------------------------------------------------ reporting

    @staticmethod
    def scalars(results: Mapping[str, Mapping[str, Results]]) -> dict[str, float]:
        """`eval/<task>/<setting>/accuracy`: the macro average over UIDs, in %, for metrics and TensorBoard."""
        return {f"eval/{task}/{setting}/accuracy": float(r.average)
                for task, settings in results.items() for setting, r in settings.items()}

    @staticmethod
    def chances(results: Mapping[str, Mapping[str, Results]]) -> dict[str, float]:
        """`eval/<task>/<setting>/accuracy` → chance accuracy in % (1 / candidates per item)."""
        return {f"eval/{task}/{setting}/accuracy": float(r.chance)
                for task, settings in results.items() for setting, r in settings.items()}

    def example(self, task: str, setting: str) -> dict[str, Any]:
        """Exactly what the model reads for the task's first candidate (README pitfall 28)."""
        prepared = self.tasks[task]
        template = prepared.settings[setting]
        sentence = prepared.items[0].sentences[0]
        if setting in (IMAGE, VIDEO) and prepared.is_image_task:
            encoded = next(iter(prepared.with_images.values())).encoded  # the model's span, once evaluated
        else:
            encoded = prepared.encoded[setting]
        return {"text": sentence if template is None else template.format(text=sentence),
                "input_ids": encoded.token_ids[0].tolist(), "target_mask": encoded.target_mask[0].tolist()}

    def summary(self, results: Mapping[str, Mapping[str, Results]]) -> dict[str, Any]:
        """JSON-able: per task its kind, path and, per setting, the report summary and the exact input."""
        return {task: {"kind": self.tasks[task].kind, "path": self.tasks[task].path,
                       "settings": {setting: {**report.summary(r), "example": self.example(task, setting)}
                                    for setting, r in settings.items()}}
                for task, settings in results.items()}

    def format(self, results: Mapping[str, Mapping[str, Results]]) -> str:
        """Per task: the table of the first setting, then each other setting beside it, each with its
        ties and how many are identical after tokenization (report.py)."""
        blocks = []
        for task, settings in results.items():
            names = list(settings)
            first = settings[names[0]]
            blocks.append(f"== {task} ({self.tasks[task].kind}, {len(first.items)} items), {names[0]}\n"
                          + report.format_table(first))
            for other in names[1:]:
                described = other if self.tasks[task].is_image_task else repr(self.tasks[task].settings[other])
                blocks.append(f"== {task}: {names[0]} vs {other} ({described})\n"
                              + report.format_comparison(first, settings[other], labels=(names[0], other))
                              + f"\nchance {first.chance:.2f}")
        return "\n\n".join(blocks)

    def write(self, results: Mapping[str, Mapping[str, Results]], out_dir: str,
              extra: Optional[Mapping[str, Any]] = None) -> str:
        """Write `<out>/summary.json` and, per task and setting, `<out>/<task>/<setting>/`:
        predictions.jsonl (one line per item), summary.json, and pipeline/ (the official
        best_temperature_report.txt and predictions.json). Returns the summary path."""
        for task, settings in results.items():
            for setting, r in settings.items():
                directory = os.path.join(out_dir, task, setting)
                report.write_predictions(r, os.path.join(directory, "predictions.jsonl"))
                report.write_summary(r, os.path.join(directory, "summary.json"))
                report.write_pipeline_files(r, os.path.join(directory, "pipeline"))
        os.makedirs(out_dir, exist_ok=True)
        path = os.path.join(out_dir, "summary.json")
        with open(path, "w", encoding="utf-8") as f:
            image_sources = {name: task.source.describe() for name, task in self.tasks.items() if task.source}
            json.dump({**(extra or {}), "protocol": self.protocol, "settings": self.settings,
                       **({"image_sources": image_sources} if image_sources else {}),
                       "scalars": self.scalars(results), "tasks": self.summary(results)}, f, indent=2)
            f.write("\n")
        return path


def _vocab_size(model: nnx.Module) -> Optional[int]:
    config = getattr(model, "config", None)
    return getattr(getattr(config, "lm", config), "vocab_size", None)
