"""The Grain pipeline: records → samples → epoch plans → microbatches.

    records (records.py)  →  SampleTable (samples.py, tokenized once, validated)
    →  epoch plans (packing.py, lengths only, same in every process)
    →  grain.MapDataset over the plans  .map(MicrobatchBuilder)  (tokens are sliced,
       images decoded; in worker processes when num_workers > 0)
    →  TextBatch / ImageBatch / FeatureBatch / VideoBatch (batch.py)

Because the plans are fixed and the map is stateless, the iterator's state is
just a position: it can be saved mid-epoch and restored to yield exactly the
batches it would have, whatever the worker count. Each JAX process loads only
its rows of every global microbatch (a disjoint, complete share), and the
`BatchStats` describe the global microbatch so every process counts the same
words.
"""
from __future__ import annotations

import collections
import dataclasses
import hashlib
import os
from typing import Iterator, Optional, Sequence

import numpy as np

from jaxllava.data.batch import IGNORE, BatchStats, FeatureBatch, ImageBatch, Microbatch, TextBatch, VideoBatch
from jaxllava.data.config import DataConfig, VideoFramesConfig
from jaxllava.data.images import BLACK_IMAGE, ImageProcessing, check_image, load_image
from jaxllava.data.loader import LoaderIterator, WorkerGuard
from jaxllava.data.packing import EpochPlans, MicrobatchPlan, plan_epoch
from jaxllava.data.records import Record, SkipReport, fingerprint_files
from jaxllava.data.sources import FeatureStore, features_identity, read_source, text_files
from jaxllava.data.samples import SampleTable, build_sample_table
from jaxllava.data.table_cache import entry_directory, load_tables, save_tables
from jaxllava.data.tokenizer import TOKENIZER_FILES, SpecialIds, load_tokenizer, special_ids
from jaxllava.data.video import read_video_frames
from jaxllava.errors import DataError


def image_processing_for(cfg: DataConfig, image_size: int) -> ImageProcessing:
    """Image settings: from a local preprocessor_config.json or the config; size = the tower's input."""
    if cfg.image.preprocessor_config:
        processing = ImageProcessing.from_preprocessor_config(cfg.image.preprocessor_config, aspect=cfg.image.aspect)
    else:
        processing = ImageProcessing(size=image_size, aspect=cfg.image.aspect, mean=tuple(cfg.image.mean),
                                     std=tuple(cfg.image.std))
    return dataclasses.replace(processing, size=image_size, max_pixels=cfg.image.max_pixels)


def _target_counts(table: SampleTable, chunk: int = 1 << 18) -> np.ndarray:
    """Targets per sample: every target token except position 0 (never predicted). Counted a
    chunk of samples at a time: one int64 copy of a 100M-token mask would cost 0.8 GB."""
    counts = np.zeros(len(table), np.int64)
    for lo in range(0, len(table), chunk):
        hi = min(lo + chunk, len(table))
        start, stop = int(table.offsets[lo]), int(table.offsets[hi])
        mask = np.asarray(table.is_target[start:stop])
        cumulative = np.concatenate([[0], np.cumsum(mask, dtype=np.int64)])
        bounds = np.asarray(table.offsets[lo:hi + 1]) - start
        counts[lo:hi] = cumulative[bounds[1:]] - cumulative[bounds[:-1]] - mask[bounds[:-1]]
    return counts


class MicrobatchBuilder:
    """Turns one MicrobatchPlan into this process's rows of the microbatch (picklable for workers)."""

    def __init__(self, table: SampleTable, ids: SpecialIds, *, image_tokens: int,
                 processing: ImageProcessing | None, features: Sequence[Optional[FeatureStore]] = (),
                 features_shape: Optional[tuple[int, int]] = None, process_index: int = 0, process_count: int = 1,
                 video_spans: tuple[int, int] = (0, 0), video_frames: Optional[VideoFramesConfig] = None):
        """`features`: each source's FeatureStore (None for a source without); with `features_shape`
        (P, E) set, image rows are FeatureBatches read from them, else ImageBatches of decoded pixels.
        `video_spans`: (fast, slow) placeholders of a video; `video_frames`: which frames are read."""
        self.table = table
        self.ids = ids
        self.image_tokens = image_tokens
        self.video_spans = tuple(video_spans)
        self.video_frames = video_frames
        self.processing = processing
        self.features = tuple(features)
        self.features_shape = features_shape
        self.process_index = process_index
        self.process_count = process_count
        self.target_counts = _target_counts(table)

    def stats(self, plan: MicrobatchPlan) -> BatchStats:
        members = [i for row in plan.rows for i in row]
        lengths = self.table.lengths
        n_images = len(members) if plan.modality == "image" else 0
        n_videos = len(members) if plan.modality == "video" else 0
        used = int(sum(int(lengths[i]) for i in members))
        return BatchStats(
            modality=plan.modality,
            rows=len(plan.rows),
            seq_len=plan.seq_len,
            samples=len(members),
            words=int(sum(int(self.table.words[i]) for i in members)),
            target_tokens=int(sum(int(self.target_counts[i]) for i in members)),
            image_tokens=n_images * self.image_tokens,
            padding_tokens=len(plan.rows) * plan.seq_len - used,
            video_tokens=n_videos * sum(self.video_spans),
        )

    def local_rows(self, plan: MicrobatchPlan) -> tuple[tuple[int, ...], ...]:
        per = len(plan.rows) // self.process_count
        return plan.rows[self.process_index * per:(self.process_index + 1) * per]

    def __call__(self, plan: MicrobatchPlan) -> Microbatch:
        rows = self.local_rows(plan)
        b, t = len(rows), plan.seq_len
        input_ids = np.full((b, t), self.ids.pad, np.int32)
        targets = np.full((b, t), IGNORE, np.int32)
        segment_ids = np.zeros((b, t), np.int32)
        positions = np.zeros((b, t), np.int32)
        for r, members in enumerate(rows):
            cursor = 0
            for seg, i in enumerate(members, start=1):
                tokens, is_target = self.table.sample(i)
                n = len(tokens)
                sl = slice(cursor, cursor + n)
                input_ids[r, sl] = tokens
                segment_ids[r, sl] = seg
                positions[r, sl] = np.arange(n)
                # Pre-shifted: position p predicts token p+1 of the same segment,
                # so no target ever crosses a packing boundary.
                shifted = np.where(is_target[1:], tokens[1:], IGNORE)
                targets[r, cursor:cursor + n - 1] = shifted
                cursor += n
        stats = self.stats(plan)
        if plan.modality == "text":
            self._check_placeholders(rows, input_ids, np.zeros(input_ids.shape, bool), None)
            return TextBatch(input_ids, targets, segment_ids, positions, stats)
        if plan.modality == "video":
            return self._video_batch(rows, input_ids, targets, segment_ids, positions, stats)
        return self._image_batch(plan, rows, input_ids, targets, segment_ids, positions, stats)

    def _check_placeholders(self, rows, input_ids: np.ndarray, mask: np.ndarray, span: Optional[list[int]]
                            ) -> None:
        """The model overwrites exactly the masked positions with visual vectors, so they must hold
        one whole `span` (an image's or a video's placeholder ids) each, and no placeholder id may
        appear anywhere else (a text row with one would train on a token that nothing fills)."""
        ids = (self.ids.im_start, self.ids.im_patch, self.ids.im_end) + (self.ids.video or ())
        placeholder = np.isin(input_ids, ids)
        for r, members in enumerate(rows):
            masked = input_ids[r, mask[r]]
            good = (np.array_equal(placeholder[r], mask[r])
                    and (masked.size == 0 or span is not None and np.array_equal(masked, span)))
            if not good:
                origins = ", ".join(f"{self.table.origins[i]} (id {self.table.ids[i]!r})" for i in members)
                raise DataError(f"microbatch row {r} holds {int(placeholder[r].sum())} placeholder ids, "
                                f"{int(mask[r].sum())} of them where an image or video goes (expected 0, or one "
                                f"whole span of {0 if span is None else len(span)}); samples: {origins}",
                                field="image span", reason="image_span")

    def _video_batch(self, rows, input_ids, targets, segment_ids, positions, stats) -> VideoBatch:
        count, side = self.video_frames.count, self.processing.size
        frames = np.zeros((len(rows), count, side, side, 3), np.float32)
        video_mask = np.zeros(input_ids.shape, bool)
        video_rows = np.zeros((len(rows),), bool)
        span = self.ids.video_span(*self.video_spans)
        for r, members in enumerate(rows):
            if not members:
                continue
            (i,) = members  # one video per row by construction
            start = int(self.table.image_start[i])
            video_mask[r, start:start + len(span)] = True
            video_rows[r] = True
            frames[r] = read_video_frames(self.table.videos[i], self.processing, **self.video_frames.rule(),
                                          record=self.table.origins[i], record_id=self.table.ids[i])
        self._check_placeholders(rows, input_ids, video_mask, span)
        return VideoBatch(input_ids, targets, segment_ids, positions, frames, video_mask, video_rows, stats)

    def _image_batch(self, plan, rows, input_ids, targets, segment_ids, positions, stats
                     ) -> ImageBatch | FeatureBatch:
        # Filler rows (the tail of a bucket) keep zeros: they have no placeholder
        # positions and image_rows=False, so nothing of them is spliced.
        shape = self.features_shape or (self.processing.size, self.processing.size, 3)
        visual = np.zeros((len(rows), *shape), np.float32)
        image_mask = np.zeros(input_ids.shape, bool)
        image_rows = np.zeros((len(rows),), bool)
        for r, members in enumerate(rows):
            if not members:
                continue
            (i,) = members  # one image per row by construction
            start = int(self.table.image_start[i])
            image_mask[r, start:start + self.image_tokens] = True
            image_rows[r] = True
            if self.features_shape is not None:
                visual[r] = self.features[self.table.source[i]].row(int(self.table.feature_rows[i]))
            else:
                visual[r] = load_image(self.table.images[i], self.processing, record=self.table.origins[i],
                                       record_id=self.table.ids[i])
        self._check_placeholders(rows, input_ids, image_mask,
                                 self.ids.image_span(self.image_tokens) if self.image_tokens >= 1 else None)
        kind = ImageBatch if self.features_shape is None else FeatureBatch
        return kind(input_ids, targets, segment_ids, positions, visual, image_mask, image_rows, stats)


@dataclasses.dataclass
class DatasetSummary:
    records_per_file: dict[str, int]
    text_samples: int  # distinct samples trained on (held-out ones excluded)
    image_samples: int
    video_samples: int
    words: int  # words of the distinct samples
    words_per_epoch: int  # what one epoch feeds: source weights repeat or subsample records
    held_out_samples: int  # data.validation_fraction of the records, never trained on
    skips: SkipReport
    files_sha256: str  # sha256 over the record files' bytes (records.fingerprint_files)
    fingerprint: str  # everything that decides the batches: files, tokenizer, settings


# Settings that change speed only, never a batch: left out of the fingerprint.
_SPEED_ONLY = ("num_workers", "prefetch", "check_images", "table_cache")


def data_fingerprint_sha256(files_sha256: str, cfg: DataConfig, image_tokens: int,
                            processing: ImageProcessing | None, features: str = "",
                            video_spans: tuple[int, int] = (0, 0)) -> str:
    """sha256 of everything that decides the batches: the record files' bytes, the tokenizer's
    files' bytes, every data setting but the speed-only ones, the image-token count, the video
    spans and the resolved pixel settings (a preprocessor_config.json is read at run time; README
    pitfall 12). Paths are left out (moving the data changes nothing), their contents are in.
    The video settings count only for a model that reads video, so fingerprints made before
    video existed still match."""
    settings = dataclasses.asdict(cfg)
    for key in _SPEED_ONLY:
        settings.pop(key)
    if tuple(video_spans) == (0, 0):
        settings.pop("video"), settings.pop("video_rows")
    else:
        settings["video_spans"] = tuple(video_spans)
    for source in settings["sources"]:
        for key in ("path", "image_folder", "video_folder", "features"):  # contents count, not where they lie
            source.pop(key)
    settings.pop("tokenizer")
    settings["image"].pop("preprocessor_config")
    tokenizer_files = sorted(os.path.join(cfg.tokenizer, name) for name in TOKENIZER_FILES
                             if os.path.isfile(os.path.join(cfg.tokenizer, name)))
    text = repr((files_sha256, fingerprint_files(tokenizer_files), sorted(settings.items()), image_tokens,
                 processing, features))
    return hashlib.sha256(text.encode()).hexdigest()


def split_held_out(records: list[list[Record]], fraction: float, seed: int
                   ) -> tuple[list[list[Record]], list[list[Record]]]:
    """(training records, held-out records) per source: a seeded `fraction` of each source's
    records, the same in every process and on every resume, is never trained on."""
    if fraction <= 0:
        return records, [[] for _ in records]
    train, held = [], []
    for index, source in enumerate(records):
        count = int(round(fraction * len(source)))
        chosen = set(np.random.default_rng([seed, index, 7]).permutation(len(source))[:count].tolist())
        train.append([r for k, r in enumerate(source) if k not in chosen])
        held.append([r for k, r in enumerate(source) if k in chosen])
    return train, held


@dataclasses.dataclass
class HeldOut:
    """The held-out records' microbatches (one pass, source weights ignored), for the held-out loss."""

    table: SampleTable
    builder: MicrobatchBuilder
    plans: list[MicrobatchPlan]

    def batches(self) -> Iterator[Microbatch]:
        """This process's rows of every held-out microbatch, built in this process."""
        return (self.builder(plan) for plan in self.plans)


class DataPipeline:
    """Reads, validates and tokenizes the configured sources once; serves microbatch iterators.

    Image records are image files decoded for a vision tower (`image_size`), or rows of
    precomputed features for a model whose vision input is features (`features_shape` (P, E));
    `for_model` takes both from a ModelConfig."""

    def __init__(self, cfg: DataConfig, *, image_tokens: int, image_size: int | None = None,
                 features_shape: Optional[tuple[int, int]] = None, process_index: int = 0, process_count: int = 1,
                 tokenizer=None, video_spans: tuple[int, int] = (0, 0), video_frames: int = 0):
        """`video_spans` (fast, slow) and `video_frames` (frames per video) come from model.video
        (`for_model`); (0, 0): the model reads no video, and video records are refused."""
        if not cfg.sources:
            raise DataError("data.sources is empty: give at least one record file", field="data.sources")
        for rows, name in ((cfg.text_rows, "data.text_rows"), (cfg.image_rows, "data.image_rows"),
                           (cfg.video_rows, "data.video_rows")):
            if rows % process_count:
                raise DataError(f"{name}={rows} is not divisible by the {process_count} processes", field=name)
        self.video_spans = tuple(video_spans)
        if self.video_spans != (0, 0) and cfg.video.count != video_frames:
            raise DataError(f"data.video keeps {cfg.video.count} frames per video (num_frames {cfg.video.num_frames}, "
                            f"frames_upbound {cfg.video.frames_upbound}, force_sample {cfg.video.force_sample}) but "
                            f"model.video.frames is {video_frames}: the model's input shape needs exactly that many",
                            field="data.video")
        self.cfg = cfg
        self.image_tokens = image_tokens
        self.features_shape = features_shape
        self.process_index, self.process_count = process_index, process_count
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(
            cfg.tokenizer, video=self.video_spans != (0, 0))
        self.ids = special_ids(self.tokenizer)
        self.features = [FeatureStore(s.features) if s.features else None for s in cfg.sources]
        self.record_files = [f for s in cfg.sources for f in (text_files(s.path) if s.format == "text" else [s.path])]
        self.processing = image_processing_for(cfg, image_size) if image_size and cfg.use_images else None
        files_sha256 = fingerprint_files(self.record_files)
        fingerprint = data_fingerprint_sha256(
            files_sha256, cfg, image_tokens, self.processing,
            features=features_identity([p for store in self.features if store for p in store.paths]),
            video_spans=self.video_spans)
        tables, meta = self._tables(fingerprint, image_size)
        self.table = tables["train"]
        self.skips = SkipReport(collections.Counter(meta["skips"]["counts"]), meta["skips"]["examples"])
        self.builder = self._builder(self.table)
        self.plans = EpochPlans(lengths=self.table.lengths, has_image=self.table.has_image, source=self.table.source,
                                words=self.table.words, weights=[s.weight for s in cfg.sources], buckets=cfg.buckets,
                                text_rows=cfg.text_rows, image_rows=cfg.image_rows, pack_text=cfg.pack_text,
                                seed=cfg.seed, epochs=cfg.epochs, has_video=self.table.has_video,
                                video_rows=cfg.video_rows)
        held = tables.get("held_out")
        self.validation = None if held is None else HeldOut(held, self._builder(held), plan_epoch(
            lengths=held.lengths, has_image=held.has_image, source=held.source, weights=[1.0] * len(cfg.sources),
            buckets=cfg.buckets, text_rows=cfg.text_rows, image_rows=cfg.image_rows, pack_text=cfg.pack_text,
            seed=cfg.seed, epoch=0, has_video=held.has_video, video_rows=cfg.video_rows))
        has_image, has_video = self.table.has_image, self.table.has_video
        self.summary = DatasetSummary(
            records_per_file=meta["records_per_file"],
            text_samples=int((~has_image & ~has_video).sum()),
            image_samples=int(has_image.sum()),
            video_samples=int(has_video.sum()),
            words=int(self.table.words.sum()),
            words_per_epoch=int(self.plans.microbatch_words(0).sum()),
            held_out_samples=0 if held is None else len(held),
            skips=self.skips,
            files_sha256=files_sha256,
            fingerprint=fingerprint,
        )

    @property
    def epoch_starts(self) -> list[int]:
        return self.plans.epoch_starts

    def _tables(self, fingerprint: str, image_size: int | None) -> tuple[dict[str, SampleTable], dict]:
        """The training (and held-out) sample tables, and what reading found: mapped from
        `data.table_cache` when an entry for this fingerprint is there, else read, checked and
        tokenized now (and stored there for the next start and the other processes)."""
        for index, store in enumerate(self.features):
            self._check_features(index, store)
        entry_dir = entry_directory(self.cfg.table_cache, fingerprint) if self.cfg.table_cache else None
        entry = load_tables(entry_dir) if entry_dir else None
        if entry is not None:
            return dict(entry.tables), entry.meta
        self.skips = SkipReport()
        records = self._read_sources(image_size)
        records, held_out = split_held_out(records, self.cfg.validation_fraction, self.cfg.seed)
        tables = {"train": self._table(records)}
        if any(held_out):
            tables["held_out"] = self._table(held_out)
        meta = {"records_per_file": {s.path: len(rs) + len(hs)
                                     for s, rs, hs in zip(self.cfg.sources, records, held_out)},
                "skips": {"counts": dict(self.skips.counts), "examples": self.skips.examples}}
        if entry_dir is None:
            return tables, meta
        save_tables(entry_dir, tables, meta=meta)
        entry = load_tables(entry_dir)  # mapped: a loader worker then receives a path, not the tokens
        return dict(entry.tables), entry.meta

    @classmethod
    def for_model(cls, cfg: DataConfig, model, **kwargs) -> "DataPipeline":
        """The pipeline that feeds `model` (a ModelConfig): its image-token count, and image files
        for a tower or feature rows for a features input."""
        vision = model.vision
        if vision is not None and vision.kind == "features":
            kwargs["features_shape"] = (vision.tokens, vision.hidden_size)
        elif vision is not None:
            kwargs["image_size"] = vision.image_size
        if model.video is not None:
            kwargs.update(video_spans=model.video_spans, video_frames=model.video.frames)
        return cls(cfg, image_tokens=model.image_tokens, **kwargs)

    def _read_sources(self, image_size: int | None) -> list[list[Record]]:
        """Every source's records; bad images or feature rows are found now under `skip` or
        `data.check_images`."""
        cfg = self.cfg
        records = []
        for index, (source, store) in enumerate(zip(cfg.sources, self.features)):
            rs = read_source(source, features=store, on_bad_record=cfg.on_bad_record, skips=self.skips,
                             tokenizer=self.tokenizer, use_images=cfg.use_images)
            if cfg.text_only_images == "black":
                rs = [dataclasses.replace(r, image=BLACK_IMAGE) if r.modality == "text" else r for r in rs]
            if cfg.use_images:
                self._check_image_files(index, rs, image_size)
            records.append(rs)
        if cfg.use_images and (cfg.check_images or cfg.on_bad_record == "skip"):
            processing = image_processing_for(cfg, image_size) if image_size else None
            records = [self._drop_undecodable(rs, processing, store) for rs, store in zip(records, self.features)]
        return records

    def _check_features(self, index: int, store: Optional[FeatureStore]) -> None:
        """Feature rows need a features input of their shape."""
        source = f"data.sources.{index}"
        if store is not None and not self.cfg.use_images:
            return
        if store is not None and self.features_shape is None:
            raise DataError(f"{source} has features ({store.describe()}) but the model's vision input is not "
                            f"features: set model.vision.kind: features", field=f"{source}.features")
        if store is not None and tuple(store.shape) != tuple(self.features_shape):
            raise DataError(f"the features have rows of shape {tuple(store.shape)} (P, E) but model.vision says "
                            f"tokens {self.features_shape[0]}, hidden_size {self.features_shape[1]}",
                            file=store.describe(), field="features")

    def _check_image_files(self, index: int, records: list[Record], image_size: int | None) -> None:
        """Image files and videos need a vision tower."""
        source = f"data.sources.{index}"
        images = sum(r.image is not None or r.video is not None for r in records)
        if images and not image_size:
            what = ("reads features: give the source features:" if self.features_shape is not None
                    else "has no vision tower: configure model.vision, or set data.use_images=false")
            raise DataError(f"{source} has {images} records with image files or videos, but the model {what}",
                            file=self.cfg.sources[index].path, field="image")

    def _drop_undecodable(self, records: list[Record], processing: ImageProcessing | None,
                          store: Optional[FeatureStore]) -> list[Record]:
        """Decode every image and video and read every feature row once: the first bad one raises
        its DataError, or under `on_bad_record: skip` its record is dropped and counted."""
        bad_rows = set(store.bad_rows()) if store is not None else set()
        kept = []
        for record in records:
            try:
                if record.image is not None and processing is not None:
                    check_image(record.image, processing, record=f"{record.file} {record.where}",
                                record_id=record.id)
                if record.video is not None and processing is not None and self.video_spans != (0, 0):
                    read_video_frames(record.video, processing, **self.cfg.video.rule(),
                                      record=f"{record.file} {record.where}", record_id=record.id)
                if record.features_row in bad_rows:
                    raise DataError(f"its features ({store.where(record.features_row)}) hold NaN or inf",
                                    file=record.file, record=record.where, record_id=record.id, field="features",
                                    reason="bad_features")
            except DataError as error:
                if self.cfg.on_bad_record != "skip":
                    raise
                self.skips.add(error)
                continue
            kept.append(record)
        return kept

    def _builder(self, table: SampleTable) -> MicrobatchBuilder:
        return MicrobatchBuilder(table, self.ids, image_tokens=self.image_tokens, processing=self.processing,
                                 features=self.features, features_shape=self.features_shape,
                                 process_index=self.process_index, process_count=self.process_count,
                                 video_spans=self.video_spans, video_frames=self.cfg.video)

    def _table(self, records: list[list[Record]]) -> SampleTable:
        return build_sample_table(records, self.tokenizer, self.cfg, image_tokens=self.image_tokens,
                                  max_len=max(self.cfg.buckets), skips=self.skips, video_spans=self.video_spans)

    def __len__(self) -> int:
        return len(self.plans)

    def dataset(self):
        """A grain MapDataset of this process's microbatches, in training order."""
        import grain

        return grain.MapDataset.source(self.plans).map(self.builder)

    def iterator(self, num_workers: int | None = None) -> LoaderIterator:
        """A checkpointable iterator (`get_state()` / `set_state(state)`) over all epochs that never
        blocks forever: a dead worker raises `LoaderWorkerDied`, and `should_stop` (assign a
        predicate) returns control while it waits. Close it (`close()`) to stop the workers."""
        import grain

        workers = self.cfg.num_workers if num_workers is None else num_workers
        # Without workers, threads still overlap image decoding (PIL releases the GIL);
        # the map is stateless, so prefetching never changes the order.
        threads = 0 if workers > 0 else min(8, os.cpu_count() or 1)
        iterable = self.dataset().to_iter_dataset(grain.ReadOptions(num_threads=threads,
                                                                    prefetch_buffer_size=2 * threads))
        guard = None
        if workers > 0:
            _mark_absl_flags_parsed()
            guard = WorkerGuard()  # names the workers for the liveness check; they exit when we do
            iterable = iterable.mp_prefetch(grain.MultiprocessingOptions(
                num_workers=workers, per_worker_buffer_size=self.cfg.prefetch), worker_init_fn=guard)
        return LoaderIterator(iter(iterable), guard=guard)

    def stats(self) -> Iterator[BatchStats]:
        """Every microbatch's stats, epoch by epoch (each epoch planned once, then let go)."""
        for epoch in range(self.cfg.epochs):
            yield from self.plans.epoch_stats(epoch, target_counts=self.builder.target_counts,
                                              image_tokens=self.image_tokens, video_tokens=sum(self.video_spans))


def _mark_absl_flags_parsed() -> None:
    # Grain's worker processes read absl flags; outside absl.app.run they are
    # unparsed and the workers fail
    # (tests/test_pipeline.py::test_worker_processes_yield_the_same_batches_and_restore_state
    # runs two workers).
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
