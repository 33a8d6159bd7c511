"""The Grain pipeline: records → samples → epoch plans → microbatches.

    records (records.py)  →  SampleTable (samples.py, tokenized once, validated)
    →  epoch plans (packing.py, lengths only, same in every process)
    →  grain.MapDataset over the plans  .map(MicrobatchBuilder)  (tokens are sliced,
       images decoded; in worker processes when num_workers > 0)
    →  TextBatch / ImageBatch (batch.py)

Because the plans are fixed and the map is stateless, the iterator's state is
just a position: it can be saved mid-epoch and restored to yield exactly the
batches it would have, whatever the worker count. Each JAX process loads only
its rows of every global microbatch (a disjoint, complete share), and the
`BatchStats` describe the global microbatch so every process counts the same
words.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
from typing import Iterator, Sequence

import numpy as np

from jaxllava.data.batch import IGNORE, BatchStats, ImageBatch, Microbatch, TextBatch
from jaxllava.data.config import DataConfig
from jaxllava.data.images import ImageProcessing, check_image, load_image
from jaxllava.data.loader import LoaderIterator, WorkerGuard
from jaxllava.data.packing import MicrobatchPlan, plan_epoch
from jaxllava.data.records import Record, SkipReport, fingerprint_files, read_records
from jaxllava.data.samples import SampleTable, build_sample_table
from jaxllava.data.tokenizer import TOKENIZER_FILES, SpecialIds, load_tokenizer, special_ids
from jaxllava.errors import DataError


def image_processing_for(cfg: DataConfig, image_size: int) -> ImageProcessing:
    """Image settings: from a local preprocessor_config.json or the config; size = the tower's input."""
    if cfg.image.preprocessor_config:
        processing = ImageProcessing.from_preprocessor_config(cfg.image.preprocessor_config, aspect=cfg.image.aspect)
    else:
        processing = ImageProcessing(size=image_size, aspect=cfg.image.aspect, mean=tuple(cfg.image.mean),
                                     std=tuple(cfg.image.std))
    return dataclasses.replace(processing, size=image_size, max_pixels=cfg.image.max_pixels)


class MicrobatchBuilder:
    """Turns one MicrobatchPlan into this process's rows of the microbatch (picklable for workers)."""

    def __init__(self, table: SampleTable, ids: SpecialIds, *, image_tokens: int,
                 processing: ImageProcessing | None, process_index: int = 0, process_count: int = 1):
        self.table = table
        self.ids = ids
        self.image_tokens = image_tokens
        self.processing = processing
        self.process_index = process_index
        self.process_count = process_count
        # Targets per sample: every target token except position 0 (never predicted).
        starts = table.offsets[:-1]
        counts = np.add.reduceat(table.is_target.astype(np.int64), starts) if len(table) else np.zeros(0, np.int64)
        first = table.is_target[starts] if len(table) else np.zeros(0, bool)
        self.target_counts = counts - first

    def stats(self, plan: MicrobatchPlan) -> BatchStats:
        members = [i for row in plan.rows for i in row]
        lengths = self.table.lengths
        n_images = len(members) if plan.modality == "image" else 0
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
            self._check_placeholders(rows, input_ids, np.zeros(input_ids.shape, bool))
            return TextBatch(input_ids, targets, segment_ids, positions, stats)
        return self._image_batch(plan, rows, input_ids, targets, segment_ids, positions, stats)

    def _check_placeholders(self, rows, input_ids: np.ndarray, image_mask: np.ndarray) -> None:
        """The model overwrites exactly the masked positions with the I visual vectors, so they
        must hold one whole image span each, and no placeholder id may appear anywhere else
        (a text row with one would train on an image token that no image fills)."""
        placeholder = np.isin(input_ids, (self.ids.im_start, self.ids.im_patch, self.ids.im_end))
        span = np.asarray(self.ids.image_span(self.image_tokens)) if self.image_tokens >= 2 else None
        for r, members in enumerate(rows):
            masked = input_ids[r, image_mask[r]]
            good = (np.array_equal(placeholder[r], image_mask[r])
                    and (masked.size == 0 or span is not None and np.array_equal(masked, span)))
            if not good:
                origins = ", ".join(f"{self.table.origins[i]} (id {self.table.ids[i]!r})" for i in members)
                raise DataError(f"microbatch row {r} holds {int(placeholder[r].sum())} image placeholder ids, "
                                f"{int(image_mask[r].sum())} of them where an image goes (expected 0, or one whole "
                                f"span of {self.image_tokens}); samples: {origins}", field="image span",
                                reason="image_span")

    def _image_batch(self, plan, rows, input_ids, targets, segment_ids, positions, stats) -> ImageBatch:
        size = self.processing.size
        # Filler rows (the tail of a bucket) keep zero pixels: they have no
        # placeholder positions and image_rows=False, so nothing of them is spliced.
        pixels = np.zeros((len(rows), size, size, 3), np.float32)
        image_mask = np.zeros(input_ids.shape, bool)
        image_rows = np.zeros((len(rows),), bool)
        for r, members in enumerate(rows):
            if not members:
                continue
            (i,) = members  # one image per row by construction
            start = int(self.table.image_start[i])
            image_mask[r, start:start + self.image_tokens] = True
            image_rows[r] = True
            pixels[r] = load_image(self.table.images[i], self.processing, record=self.table.origins[i],
                                   record_id=self.table.ids[i])
        self._check_placeholders(rows, input_ids, image_mask)
        return ImageBatch(input_ids, targets, segment_ids, positions, pixels, image_mask, image_rows, stats)


@dataclasses.dataclass
class DatasetSummary:
    records_per_file: dict[str, int]
    text_samples: int  # distinct samples trained on (held-out ones excluded)
    image_samples: int
    words: int  # words of the distinct samples
    words_per_epoch: int  # what one epoch feeds: source weights repeat or subsample records
    held_out_samples: int  # data.validation_fraction of the records, never trained on
    skips: SkipReport
    files_sha256: str  # sha256 over the record files' bytes (records.fingerprint_files)
    fingerprint: str  # everything that decides the batches: files, tokenizer, settings


# Settings that change speed only, never a batch: left out of the fingerprint.
_SPEED_ONLY = ("num_workers", "prefetch", "check_images")


def data_fingerprint_sha256(files_sha256: str, cfg: DataConfig, image_tokens: int,
                            processing: ImageProcessing | None) -> str:
    """sha256 of everything that decides the batches: the record files' bytes, the tokenizer's
    files' bytes, every data setting but the speed-only ones, the image-token count and the
    resolved pixel settings (a preprocessor_config.json is read at run time; README pitfall 12).
    Paths are left out (moving the data changes nothing), their contents are in."""
    settings = dataclasses.asdict(cfg)
    for key in _SPEED_ONLY:
        settings.pop(key)
    for source in settings["sources"]:
        source.pop("path")
        source.pop("image_folder")
    settings.pop("tokenizer")
    settings["image"].pop("preprocessor_config")
    tokenizer_files = sorted(os.path.join(cfg.tokenizer, name) for name in TOKENIZER_FILES
                             if os.path.isfile(os.path.join(cfg.tokenizer, name)))
    text = repr((files_sha256, fingerprint_files(tokenizer_files), sorted(settings.items()), image_tokens,
                 processing))
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
    """Reads, validates and tokenizes the configured sources once; serves microbatch iterators."""

    def __init__(self, cfg: DataConfig, *, image_tokens: int, image_size: int | None,
                 process_index: int = 0, process_count: int = 1, tokenizer=None):
        if not cfg.sources:
            raise DataError("data.sources is empty: give at least one record file", field="data.sources")
        for rows, name in ((cfg.text_rows, "data.text_rows"), (cfg.image_rows, "data.image_rows")):
            if rows % process_count:
                raise DataError(f"{name}={rows} is not divisible by the {process_count} processes", field=name)
        self.cfg = cfg
        self.image_tokens = image_tokens
        self.process_index, self.process_count = process_index, process_count
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(cfg.tokenizer)
        self.ids = special_ids(self.tokenizer)
        self.skips = SkipReport()
        records = self._read_sources(image_size)
        records, held_out = split_held_out(records, cfg.validation_fraction, cfg.seed)
        self.table = self._table(records)
        held_out_table = self._table(held_out) if any(held_out) else None
        has_image = self.table.has_image
        if has_image.any() or (held_out_table is not None and held_out_table.has_image.any()):
            if not image_size:
                raise DataError("the data has image records but the model has no vision tower; "
                                "set data.use_images=false or configure model.vision", field="data.use_images")
            self.processing = image_processing_for(cfg, image_size)
        else:
            self.processing = None
        self.builder = self._builder(self.table)
        self.plans: list[MicrobatchPlan] = []
        self.epoch_starts: list[int] = []
        for epoch in range(cfg.epochs):
            self.epoch_starts.append(len(self.plans))
            self.plans.extend(self._plan(self.table, [s.weight for s in cfg.sources], epoch))
        self.validation = None if held_out_table is None else HeldOut(
            held_out_table, self._builder(held_out_table), self._plan(held_out_table, [1.0] * len(held_out), 0))
        files_sha256 = fingerprint_files([s.path for s in cfg.sources])
        first_epoch = self.plans[:self.epoch_starts[1]] if cfg.epochs > 1 else self.plans
        self.summary = DatasetSummary(
            records_per_file={s.path: len(rs) + len(hs) for s, rs, hs in zip(cfg.sources, records, held_out)},
            text_samples=int((~has_image).sum()),
            image_samples=int(has_image.sum()),
            words=int(self.table.words.sum()),
            words_per_epoch=sum(self.builder.stats(plan).words for plan in first_epoch),
            held_out_samples=0 if self.validation is None else len(self.validation.table),
            skips=self.skips,
            files_sha256=files_sha256,
            fingerprint=data_fingerprint_sha256(files_sha256, cfg, image_tokens, self.processing),
        )

    def _read_sources(self, image_size: int | None) -> list[list[Record]]:
        cfg = self.cfg
        # Image records trained as text (use_images: false) need no image file.
        records = [read_records(source.path, image_folder=source.image_folder, on_bad_record=cfg.on_bad_record,
                                skips=self.skips, allow_outside=source.allow_outside,
                                check_image_files=cfg.use_images) for source in cfg.sources]
        if (cfg.check_images or cfg.on_bad_record == "skip") and cfg.use_images and image_size:
            # Under the skip policy images are always decoded now, so a bad one is a counted
            # skip before planning instead of a hole in a batch later.
            processing = image_processing_for(cfg, image_size)
            records = [self._drop_undecodable(rs, processing) for rs in records]
        return records

    def _builder(self, table: SampleTable) -> MicrobatchBuilder:
        return MicrobatchBuilder(table, self.ids, image_tokens=self.image_tokens, processing=self.processing,
                                 process_index=self.process_index, process_count=self.process_count)

    def _plan(self, table: SampleTable, weights: Sequence[float], epoch: int) -> list[MicrobatchPlan]:
        cfg = self.cfg
        return plan_epoch(lengths=table.lengths, has_image=table.has_image, source=table.source, weights=weights,
                          buckets=cfg.buckets, text_rows=cfg.text_rows, image_rows=cfg.image_rows,
                          pack_text=cfg.pack_text, seed=cfg.seed, epoch=epoch)

    def _table(self, records: list[list[Record]]) -> SampleTable:
        return build_sample_table(records, self.tokenizer, self.cfg, image_tokens=self.image_tokens,
                                  max_len=max(self.cfg.buckets), skips=self.skips)

    def _drop_undecodable(self, records: list[Record], processing: ImageProcessing) -> list[Record]:
        """Decode every image once: the first bad one raises its DataError, or under
        `on_bad_record: skip` its record is dropped and counted."""
        kept = []
        for record in records:
            if record.image is not None:
                try:
                    check_image(record.image, processing, record=f"{record.file} {record.where}",
                                record_id=record.id)
                except DataError as error:
                    if self.cfg.on_bad_record != "skip":
                        raise
                    self.skips.add(error)
                    continue
            kept.append(record)
        return kept

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
        for plan in self.plans:
            yield self.builder.stats(plan)


def _mark_absl_flags_parsed() -> None:
    # Grain's worker processes read absl flags; outside absl.app.run they are
    # unparsed and the workers fail
    # (tests/test_pipeline.py::test_worker_processes_yield_the_same_batches_and_restore_state
    # runs two workers).
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
