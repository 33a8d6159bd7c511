"""Image-conditioned VQA-format evaluation throughput: items/s with and without vision.

    python benchmarks/eval_multimodal_throughput.py [--config configs/tiny.yaml] [--repeat 8]
                                                    [--batch-size 64] [--image-batch-size 32]

A random-weight model built from the config's `model:` (tiny.yaml: 2-layer Llama, tiny
DINOv2-style tower, 16 image tokens), scored through `MinimalPairEvaluator` on the bundled
data/sample/multimodal/vqa.jsonl (240 items, 8 candidates, 60 images) repeated --repeat
times (each copy points at the same 60 images, so the tower still runs once per image;
--distinct-images gives every copy its own image ids, i.e. one tower pass per 4 items as in
the bundled set). Timed: the first evaluation (compilation included) and a second one with
other weights (steady state). items/s is from the steady state and counts both the image and
the no_vision settings' work in one evaluation.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
VQA = os.path.join(ROOT, "data", "sample", "multimodal", "vqa.jsonl")
IMAGES = os.path.join(ROOT, "data", "sample", "multimodal", "images")


def write_task(out: str, repeat: int, distinct_images: bool) -> str:
    lines = [json.loads(line) for line in open(VQA, encoding="utf-8")]
    images = sorted({line["image_id"] for line in lines})
    os.makedirs(os.path.join(out, "images"))
    records = []
    for copy in range(repeat):
        shift = copy * len(images) if distinct_images else 0
        for line in lines:
            records.append({**line, "image_id": line["image_id"] + shift,
                            "idx_in_hf_dataset": line["idx_in_hf_dataset"] + shift})
    for image_id in {r["image_id"] for r in records}:
        shutil.copy(os.path.join(IMAGES, f"{image_id % len(images)}.png"), os.path.join(out, "images", f"{image_id}.png"))
    path = os.path.join(out, "vqa.jsonl")
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=os.path.join(ROOT, "configs", "tiny.yaml"))
    parser.add_argument("--repeat", type=int, default=8)
    parser.add_argument("--distinct-images", action="store_true")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--image-batch-size", type=int, default=32)
    args = parser.parse_args()

    import jax
    from flax import nnx

    from jaxllava.config import load_config
    from jaxllava.data.pipeline import image_processing_for
    from jaxllava.data.tokenizer import load_tokenizer
    from jaxllava.eval import image_scoring
    from jaxllava.eval.evaluator import MinimalPairEvaluator
    from jaxllava.model.llava import LlavaModel

    config = load_config(args.config, [])
    tokenizer = load_tokenizer(config.data.tokenizer)
    processing = image_processing_for(config.data, config.model.vision.image_size)
    with tempfile.TemporaryDirectory() as tmp:
        path = write_task(tmp, args.repeat, args.distinct_images)
        started = time.perf_counter()
        evaluator = MinimalPairEvaluator({"vqa": path}, tokenizer, image_processing=processing,
                                         batch_size=args.batch_size, image_batch_size=args.image_batch_size)
        prepare_s = time.perf_counter() - started
        items = len(evaluator.tasks["vqa"].items)
        timings, accuracies = [], []
        for seed in (0, 1):
            model = LlavaModel(config.model, rngs=nnx.Rngs(seed))
            before = image_scoring.counts()
            started = time.perf_counter()
            results = evaluator.evaluate(model)
            timings.append(time.perf_counter() - started)
            accuracies.append({k: round(r.average, 2) for k, r in results["vqa"].items()})
            encoded = image_scoring.counts()["images_encoded"] - before["images_encoded"]
    print(json.dumps({
        "device": jax.devices()[0].device_kind, "platform": platform.machine(), "config": os.path.relpath(args.config, ROOT),
        "items": items, "candidates": items * 8, "unique_images_encoded_per_evaluation": encoded,
        "batch_size": args.batch_size, "prepare_s": round(prepare_s, 2), "first_evaluation_s": round(timings[0], 2),
        "steady_evaluation_s": round(timings[1], 2), "items_per_s": round(items / timings[1], 1),
        "accuracy_random_weights": accuracies[1]}, indent=1))


if __name__ == "__main__":
    main()
