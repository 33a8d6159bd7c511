"""Loader throughput: samples/s and tokens/s for text-only and 224-px image microbatches.

    python benchmarks/data_throughput.py [--workers 0 1 2 4] [--text 20000] [--images 2000]

Builds synthetic records in a temporary folder (child-directed-style sentences;
JPEG photos-like noise images of mixed sizes), then times full passes of the
pipeline per modality and worker count. Results go in benchmarks/RESULTS.md with
the command and the machine.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time

import numpy as np


def make_data(root: str, n_text: int, n_images: int, seed: int = 0) -> tuple[str, str]:
    from PIL import Image

    rng = np.random.default_rng(seed)
    words = "the a dog dogs cat cats runs run sees see red blue big small on left right this these".split()
    with open(os.path.join(root, "text.jsonl"), "w") as f:
        for i in range(n_text):
            text = " ".join(rng.choice(words, size=rng.integers(5, 40)))
            f.write(json.dumps({"id": f"t{i}", "conversations": [{"from": "human", "value": ""},
                                                                 {"from": "gpt", "value": text}]}) + "\n")
    os.makedirs(os.path.join(root, "img"), exist_ok=True)
    distinct = 64  # distinct files, reused by the records, so setup stays quick
    for k in range(distinct):
        w, h = int(rng.integers(300, 640)), int(rng.integers(300, 640))
        pixels = rng.integers(0, 255, (h // 8, w // 8, 3), dtype=np.uint8)
        Image.fromarray(pixels).resize((w, h)).save(os.path.join(root, "img", f"{k}.jpg"), quality=90)
    records = []
    for i in range(n_images):
        caption = " ".join(rng.choice(words, size=rng.integers(5, 30)))
        records.append({"id": f"i{i}", "image": f"img/{i % distinct}.jpg",
                        "conversations": [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": caption}]})
    with open(os.path.join(root, "images.json"), "w") as f:
        json.dump(records, f)
    return os.path.join(root, "text.jsonl"), os.path.join(root, "images.json")


def time_pass(pipeline, workers: int, max_batches: int) -> tuple[float, int, int]:
    it = pipeline.iterator(num_workers=workers)
    first = next(it)  # worker start-up is not throughput
    samples = tokens = 0
    start = time.perf_counter()
    n = min(max_batches, len(pipeline)) - 1
    for _ in range(n):
        batch = next(it)
        samples += batch.stats.samples
        tokens += int((batch.segment_ids > 0).sum())
    elapsed = time.perf_counter() - start
    del first
    close = getattr(it, "close", None)
    if close:
        close()
    return elapsed, samples, tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--text", type=int, default=20000)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--tokenizer", default="data/sample/tokenizer")
    parser.add_argument("--max-batches", type=int, default=200)
    parser.add_argument("--cached", action="store_true", help="also time images from the pre-processed cache")
    args = parser.parse_args()

    from jaxllava.data.config import DataConfig, SourceConfig
    from jaxllava.data.pipeline import DataPipeline

    print(f"machine: {platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} cores")
    with tempfile.TemporaryDirectory() as root:
        text_path, image_path = make_data(root, args.text, args.images)
        setups = {
            "text (packed, 2048-token rows)": (text_path, dict(buckets=(2048,), text_rows=16), 0, None),
            "image (224 px, 256 tokens)": (image_path, dict(buckets=(512,), image_rows=32), 256, 224),
        }
        if args.cached:
            from jaxllava.data.image_cache import cache_images
            from jaxllava.data.pipeline import image_processing_for

            cfg = DataConfig(sources=(SourceConfig(image_path),), tokenizer=args.tokenizer)
            start = time.perf_counter()
            (cached,) = cache_images(cfg, image_processing_for(cfg, 224), os.path.join(root, "cache"),
                                     workers=os.cpu_count() or 1).sources
            print(f"image cache written in {time.perf_counter() - start:.1f}s")
            setups["image from the cache (launch.py cache-images)"] = (
                cached.path, dict(buckets=(512,), image_rows=32), 256, 224)
        for name, (path, extra, n_tokens, size) in setups.items():
            cfg = DataConfig(sources=(SourceConfig(path),), tokenizer=args.tokenizer, **extra)
            start = time.perf_counter()
            pipeline = DataPipeline(cfg, image_tokens=n_tokens, image_size=size)
            print(f"{name}: index built in {time.perf_counter() - start:.1f}s "
                  f"({len(pipeline.table)} samples, {len(pipeline)} microbatches)")
            for workers in args.workers:
                elapsed, samples, tokens = time_pass(pipeline, workers, args.max_batches)
                print(f"  workers={workers}: {samples / elapsed:,.0f} samples/s, {tokens / elapsed:,.0f} tokens/s "
                      f"({samples} samples in {elapsed:.2f}s)")


if __name__ == "__main__":
    main()
