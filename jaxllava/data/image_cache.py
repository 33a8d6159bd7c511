"""Pre-processed image cache: decode, pad and resize every image once, ahead of training.

Decoding a photo and resizing it bicubically to the tower's input is most of the
loader's cost (benchmarks/RESULTS.md). `cache_images` writes each image as the
exact size × size RGB picture the tower sees, losslessly (PNG), and a copy of each
record file pointing at the cache. Loading a cached image gives bit-identical
pixels (it is square and of the right size, so nothing is padded or resized
again), at a fraction of the cost. The cache is valid for one image setting (size,
aspect, mean colour for padding); `cache.json` records it.

Bad data is handled as in training: under `on_bad_record: error` the first bad
line, record or image stops the run with its DataError; under `skip` it is left
out of the cache and counted, and the counts go into `cache.json` (training from
the cache then sees none of them, so this is where they are reported). The cache
is built in a hidden sibling directory and renamed to `out` only when complete:
an interrupted run never leaves something at `out` that looks like a cache.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import uuid
from concurrent.futures import ProcessPoolExecutor
from typing import Sequence

from jaxllava.data.config import DataConfig, SourceConfig
from jaxllava.data.images import ImageProcessing, square_image
from jaxllava.data.records import SkipReport, read_records_with_raw
from jaxllava.errors import DataError

_METADATA = "cache.json"


@dataclasses.dataclass
class CacheResult:
    sources: list[SourceConfig]  # the rewritten record files, to train from
    skips: SkipReport  # what was left out under `on_bad_record: skip` (also in cache.json)
    images: int  # images written


def _cache_one(job: tuple[str, str, ImageProcessing, str, str]) -> dict | None:
    """Write one cached image; a DataError comes back as its fields, since an exception
    pickled back from a worker process loses its keyword arguments (and so its reason)."""
    source, target, processing, where, record_id = job
    try:
        picture = square_image(source, processing, record=where, record_id=record_id)
    except DataError as error:
        return {"message": str(error), "file": error.file, "record": error.record, "record_id": error.record_id,
                "field": error.field, "reason": error.reason}
    picture.save(target, format="PNG")
    return None


def _error_from(fields: dict) -> DataError:
    # The message already names file, record, id and field; they are set as attributes only.
    error = DataError(fields["message"], reason=fields["reason"])
    error.file, error.record, error.record_id, error.field = (fields["file"], fields["record"],
                                                              fields["record_id"], fields["field"])
    return error


def cache_images(cfg: DataConfig, processing: ImageProcessing, out: str, *, workers: int = 0) -> CacheResult:
    """Build the cache at `out` (which must not exist); return the sources to train from and the skips.

    Records are validated as in training (errors name file, record and field; image
    paths confined as the source says); text-only records are copied unchanged.
    """
    if os.path.lexists(out):
        raise DataError("the cache directory already exists; remove it or choose another --out", file=out,
                        reason="file")
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    staging = os.path.join(parent, f".{os.path.basename(os.path.abspath(out))}.partial-{uuid.uuid4().hex[:12]}")
    os.mkdir(staging)
    try:
        result = _build(cfg, processing, out, staging, workers)
        os.rename(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return result


def _build(cfg: DataConfig, processing: ImageProcessing, out: str, staging: str, workers: int) -> CacheResult:
    skips = SkipReport()

    def refuse(error: DataError) -> None:
        if cfg.on_bad_record != "skip":
            raise error
        skips.add(error)

    # Per source: (output file name, [(serialised record, index of its image job or None)]).
    outputs: list[tuple[str, list[tuple[str, int | None]]]] = []
    jobs = []
    taken = {_METADATA}
    for k, source in enumerate(cfg.sources):
        folder = f"source{k}_images"
        os.mkdir(os.path.join(staging, folder))
        entries = []
        for record, raw in read_records_with_raw(source.path, image_folder=source.image_folder,
                                                 on_bad_record=cfg.on_bad_record, skips=skips,
                                                 allow_outside=source.allow_outside):
            entry = dict(raw)  # every field kept; only `image` changes
            job = None
            if record.image is not None:
                job, picture = len(jobs), f"{len(jobs):08d}.png"
                entry["image"] = f"{folder}/{picture}"
                jobs.append((record.image, os.path.join(staging, folder, picture), processing,
                             f"{record.file} {record.where}", record.id))
            entries.append((json.dumps(entry), job))
        name = os.path.basename(source.path)
        if name in taken:
            name = f"source{k}_{name}"
        taken.add(name)
        outputs.append((name, entries))

    failed = set()

    def on_result(job: int, fields: dict | None) -> None:
        if fields is not None:
            refuse(_error_from(fields))
            failed.add(job)

    _run(jobs, workers, on_result)

    sources = []
    for (name, entries), source in zip(outputs, cfg.sources):
        lines = [line for line, job in entries if job not in failed]
        with open(os.path.join(staging, name), "w", encoding="utf-8") as f:
            if name.endswith(".jsonl"):
                f.writelines(line + "\n" for line in lines)
            else:
                f.write("[" + ",\n".join(lines) + "]\n")
        # Every cached image lies inside `out`, so the cache needs no allow_outside.
        sources.append(dataclasses.replace(source, path=os.path.join(out, name), image_folder=out,
                                           allow_outside=False))
    images = len(jobs) - len(failed)
    with open(os.path.join(staging, _METADATA), "w", encoding="utf-8") as f:
        json.dump({"image_processing": dataclasses.asdict(processing),
                   "sources": [s.path for s in cfg.sources], "images": images,
                   "skipped": {"total": skips.total, "counts": dict(skips.counts), "examples": skips.examples}},
                  f, indent=2)
    return CacheResult(sources=sources, skips=skips, images=images)


def _run(jobs: list, workers: int, on_result) -> None:
    """Calls `on_result(index, failure)` for each job in order; when it raises, the jobs not yet
    started are cancelled and running ones finish before the exception leaves (so nothing
    writes into the staging directory while it is removed)."""
    if workers <= 0:
        for index, job in enumerate(jobs):
            on_result(index, _cache_one(job))
        return
    with ProcessPoolExecutor(workers) as pool:
        try:
            for index, fields in enumerate(pool.map(_cache_one, jobs, chunksize=64)):
                on_result(index, fields)
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise


def sources_override(sources: Sequence[SourceConfig]) -> str:
    """The `--set data.sources=[...]` value that trains from the cache (JSON, which YAML reads, so
    paths with `: `, `, ` or `#` stay one value)."""
    items = [{"path": s.path, "weight": s.weight, "image_folder": s.image_folder} for s in sources]
    return f"data.sources={json.dumps(items)}"
