"""Pre-processed image cache: decode, pad and resize every image once, ahead of training.

Decoding a photo and resizing it bicubically to the tower's input is most of the
loader's cost (benchmarks/RESULTS.md). `cache_images` writes each image as the
exact size × size RGB picture the tower sees, losslessly (PNG), and a copy of each
record file pointing at the cache. Loading a cached image gives bit-identical
pixels (it is square and of the right size, so nothing is padded or resized
again), at a fraction of the cost. The cache is valid for one image setting (size,
aspect, mean colour for padding); `cache.json` records it.
"""
from __future__ import annotations

import dataclasses
import json
import os
from concurrent.futures import ProcessPoolExecutor
from typing import Sequence

from jaxllava.data.config import DataConfig, SourceConfig
from jaxllava.data.images import ImageProcessing, square_image
from jaxllava.data.records import SkipReport, read_records


def _cache_one(job: tuple[str, str, ImageProcessing, str, str]) -> None:
    source, target, processing, where, record_id = job
    os.makedirs(os.path.dirname(target), exist_ok=True)
    square_image(source, processing, record=where, record_id=record_id).save(target, format="PNG")


def _raw_by_where(path: str) -> dict[str, dict]:
    """The raw JSON objects of a record file keyed like `Record.where` ("record 3" / "line 4")."""
    with open(path, "rb") as f:
        if path.endswith(".jsonl"):
            return {f"line {n}": json.loads(line) for n, line in enumerate(f, start=1) if line.strip()}
        return {f"record {n}": obj for n, obj in enumerate(json.load(f))}


def cache_images(cfg: DataConfig, processing: ImageProcessing, out: str, *, workers: int = 0) -> list[SourceConfig]:
    """Write the cache under `out`; return the sources to train from (the rewritten record files).

    Records are validated as in training (errors name file, record and field); text-only
    records are copied unchanged.
    """
    os.makedirs(out, exist_ok=True)
    sources, jobs = [], []
    for k, source in enumerate(cfg.sources):
        skips = SkipReport()
        records = read_records(source.path, image_folder=source.image_folder, on_bad_record=cfg.on_bad_record,
                               skips=skips)
        raw = _raw_by_where(source.path)
        folder = f"source{k}_images"
        rewritten = []
        for record in records:
            entry = dict(raw[record.where])  # every field kept; only `image` changes
            if record.image is not None:
                name = f"{len(jobs):08d}.png"
                jobs.append((record.image, os.path.join(out, folder, name), processing,
                             f"{record.file} {record.where}", record.id))
                entry["image"] = f"{folder}/{name}"
            rewritten.append(entry)
        path = os.path.join(out, os.path.basename(source.path))
        if os.path.exists(path):
            path = os.path.join(out, f"source{k}_{os.path.basename(source.path)}")
        with open(path, "w", encoding="utf-8") as f:
            if path.endswith(".jsonl"):
                f.writelines(json.dumps(r) + "\n" for r in rewritten)
            else:
                json.dump(rewritten, f)
        sources.append(dataclasses.replace(source, path=path, image_folder=out))
    if workers > 0:
        with ProcessPoolExecutor(workers) as pool:
            list(pool.map(_cache_one, jobs, chunksize=64))
    else:
        for job in jobs:
            _cache_one(job)
    with open(os.path.join(out, "cache.json"), "w", encoding="utf-8") as f:
        json.dump({"image_processing": dataclasses.asdict(processing),
                   "sources": [s.path for s in cfg.sources], "images": len(jobs)}, f, indent=2)
    return sources


def sources_override(sources: Sequence[SourceConfig]) -> str:
    """The `--set data.sources=[...]` value that trains from the cache."""
    items = ", ".join(f"{{path: {s.path}, weight: {s.weight}, image_folder: {s.image_folder}}}" for s in sources)
    return f"data.sources=[{items}]"
