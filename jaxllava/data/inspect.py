"""`launch.py inspect-data`: what the loader will feed, before any training.

Prints a dataset report, then one JSON line per microbatch. Every fact a reader
needs to catch the reference's bug (README pitfall 1) is visible: modality per
microbatch, whether pixels (or video frames) exist, where the image or video tokens
are, padding. The
tokenizer's coverage of the trained text (its `<unk>` rate and the fraction of
words it splits, data/tokenizer.py::table_coverage) is in the report, with a
`warning:` line for each figure past its threshold.
"""
from __future__ import annotations

import collections
import json
from typing import Iterable, TextIO

import numpy as np

from jaxllava.data.batch import IGNORE, ImageBatch, Microbatch, VideoBatch
from jaxllava.data.pipeline import DataPipeline
from jaxllava.data.tokenizer import table_coverage


def _spans(mask: np.ndarray | None, rows: int) -> list[list[int]]:
    """[first, last + 1] of each row's masked positions ([] for none)."""
    if mask is None:
        return [[] for _ in range(rows)]
    spans = []
    for row in mask:
        where = np.flatnonzero(row)
        spans.append([int(where[0]), int(where[-1]) + 1] if len(where) else [])
    return spans


def batch_line(batch: Microbatch) -> dict:
    stats = batch.stats
    rows = len(batch.input_ids)
    line = {
        "modality": stats.modality,
        "rows": int(batch.input_ids.shape[0]),
        "seq_len": int(batch.input_ids.shape[1]),
        "has_pixels": isinstance(batch, ImageBatch),
        "image_token_positions": _spans(batch.image_mask if isinstance(batch, ImageBatch) else None, rows),
        "image_tokens": stats.image_tokens,
        "video_tokens": stats.video_tokens,
        "target_tokens": int((batch.targets != IGNORE).sum()),
        "segments": [int(len(set(row[row > 0].tolist()))) for row in batch.segment_ids],
        "samples": stats.samples,
        "words": stats.words,
        "padding_fraction": round(float((batch.segment_ids == 0).mean()), 4),
    }
    if isinstance(batch, VideoBatch):
        line.update(has_frames=True, frames_shape=list(batch.frames.shape[1:]),
                    video_token_positions=_spans(batch.video_mask, rows))
    return line


def dataset_report(pipeline: DataPipeline, *, microbatches_per_step: int = 1) -> dict:
    table, summary = pipeline.table, pipeline.summary
    lengths, has_image, has_video = table.lengths, table.has_image, table.has_video
    percentiles = {}
    for name, mask in (("text", ~has_image & ~has_video), ("image", has_image), ("video", has_video)):
        if mask.any():
            values = np.percentile(lengths[mask], [50, 90, 99, 100])
            percentiles[name] = dict(zip(("p50", "p90", "p99", "max"), (int(v) for v in values)))
    padding = collections.defaultdict(lambda: [0, 0])
    first_epoch = pipeline.plans.epoch_stats(0, target_counts=pipeline.builder.target_counts,
                                             image_tokens=pipeline.image_tokens,
                                             video_tokens=sum(pipeline.video_spans))
    epoch_end = len(first_epoch)
    for stats in first_epoch:
        key = f"{stats.modality}@{stats.seq_len}"
        padding[key][0] += stats.padding_tokens
        padding[key][1] += stats.rows * stats.seq_len
    return {
        "records_per_file": summary.records_per_file,
        "text_samples": summary.text_samples,
        "image_samples": summary.image_samples,
        "video_samples": summary.video_samples,
        "truncated_text_samples": int(table.truncated.sum()),
        "skipped": dict(summary.skips.counts),
        "token_length_percentiles": percentiles,
        "padding_fraction_per_bucket": {k: round(p / t, 4) for k, (p, t) in sorted(padding.items())},
        "microbatches_per_epoch": epoch_end,
        "optimizer_steps_per_epoch": -(-epoch_end // microbatches_per_step),  # the last step may be short
        "words": summary.words,  # of the distinct samples; an epoch repeats or subsamples them by source weight
        "words_per_epoch": summary.words_per_epoch,
        "image_tokens_per_image": pipeline.image_tokens,
        "video_tokens_per_video": {"fast": pipeline.video_spans[0], "slow": pipeline.video_spans[1]},
        "fingerprint": summary.fingerprint,
        "tokenizer": table_coverage(pipeline.tokenizer, table).as_dict(),
    }


def print_report(report: dict, skips_lines: Iterable[str], out: TextIO) -> None:
    print("== dataset ==", file=out)
    for key, value in report.items():
        print(f"{key}: {json.dumps(value)}", file=out)
    for line in report.get("tokenizer", {}).get("warnings", []):
        print(f"warning: {line}", file=out)
    for line in skips_lines:
        print(line, file=out)
    print("== microbatches ==", file=out)


def inspect(pipeline: DataPipeline, n_batches: int, out: TextIO, *, microbatches_per_step: int = 1) -> None:
    skips = pipeline.summary.skips
    print_report(dataset_report(pipeline, microbatches_per_step=microbatches_per_step),
                 skips.summary_lines() if skips.total else [], out)
    iterator = pipeline.iterator(num_workers=0)
    try:
        for _ in range(min(n_batches, len(pipeline))):
            print(json.dumps(batch_line(next(iterator))), file=out)
    finally:
        close = getattr(iterator, "close", None)
        if close:
            close()
