"""Minimal-pair evaluation throughput: pairs/s and the projected time for the full filtered BLiMP.

    python benchmarks/eval_throughput.py [--preset tiny baby_llama] [--data PATH] [--max-pairs N]
                                         [--batch-size 64] [--dtype float32|bfloat16] [--tokenizer DIR]

Random-weight text-only models built from configs/presets/lm/<preset>.yaml, scored
through `MinimalPairEvaluator` (2025 protocol, bare text) on whatever device JAX sees.
Data: --data, else the BabyLM-filtered BLiMP (67 files, 59,875 pairs) at
shared/babylm_eval/blimp_filtered (repository checkout, then /work/shared), else the
bundled data/sample/minimal_pairs.jsonl. --max-pairs keeps the first
ceil(N / files) lines of every file (all paradigms stay represented), for CPUs.

Timed: encoding (host, once per task set), the first evaluation (compilation
included) and a second one with other weights (steady state: no compilation, as for
every later checkpoint in training). pairs/s is from the steady state. The bundled
word-level tokenizer gives about one token per word; a subword tokenizer (TinyLlama's,
for baby_llama) gives somewhat longer rows: pass it with --tokenizer when available.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import tempfile
import time

import yaml

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
BLIMP_PAIRS = 59_875  # filtered BLiMP, 67 paradigms (docs/evaluation.md#data-sets)
BLIMP_CANDIDATES = ("shared/babylm_eval/blimp_filtered", "/work/shared/babylm_eval/blimp_filtered")


def default_data() -> str:
    for path in BLIMP_CANDIDATES:
        full = os.path.join(ROOT, path)
        if os.path.isdir(full):
            return full
    return os.path.join(ROOT, "data", "sample", "minimal_pairs.jsonl")


def limited_copy(path: str, max_pairs: int, directory: str) -> str:
    """The first ceil(max_pairs / files) lines of every *.jsonl file of `path`, in `directory`."""
    files = ([os.path.join(path, n) for n in sorted(os.listdir(path)) if n.endswith(".jsonl")]
             if os.path.isdir(path) else [path])
    per_file = math.ceil(max_pairs / len(files))
    for file in files:
        with open(file, encoding="utf-8") as f:
            lines = [line for _, line in zip(range(per_file), f)]
        with open(os.path.join(directory, os.path.basename(file)), "w", encoding="utf-8") as f:
            f.writelines(lines)
    return directory


def model_config(preset: str, dtype: str):
    from jaxllava.model.config import LlamaConfig, ModelConfig

    with open(os.path.join(ROOT, "configs", "presets", "lm", f"{preset}.yaml")) as f:
        lm = yaml.safe_load(f)["model"]["lm"]
    return ModelConfig(lm=LlamaConfig(**lm), vision=None, dtype=dtype, attention_impl="auto")


def bench(preset: str, data: str, tokenizer, batch_size: int, dtype: str, source: str) -> dict:
    import jax
    from flax import nnx

    from jaxllava.eval.evaluator import MinimalPairEvaluator
    from jaxllava.model.llava import LlavaModel

    config = model_config(preset, dtype)
    started = time.perf_counter()
    evaluator = MinimalPairEvaluator({"blimp": data}, tokenizer, batch_size=batch_size)
    encode_s = time.perf_counter() - started
    task = evaluator.tasks["blimp"]
    pairs = len(task.items)
    tokens = sum(len(ids) for ids in task.encoded["text"].token_ids)

    times = []
    for seed in (0, 1):
        model = LlavaModel(config, rngs=nnx.Rngs(seed))
        started = time.perf_counter()
        results = evaluator.evaluate(model)["blimp"]["text"]
        times.append(time.perf_counter() - started)
        del model
    pairs_per_s = pairs / times[1]
    return {"preset": preset, "device": jax.devices()[0].device_kind, "platform": jax.default_backend(),
            "dtype": dtype, "batch_size": batch_size, "pairs": pairs, "uids": len(results.accuracy["UID"]),
            "tokens_per_pair": round(tokens / pairs, 2), "encode_s": round(encode_s, 3),
            "first_eval_s": round(times[0], 3), "steady_eval_s": round(times[1], 3),
            "pairs_per_s": round(pairs_per_s, 2), "projected_full_blimp_s": round(BLIMP_PAIRS / pairs_per_s, 1),
            "host": platform.node(), "data": source}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", nargs="+", default=["tiny", "baby_llama"])
    parser.add_argument("--data", default=None, help="BLiMP-format *.jsonl file or directory")
    parser.add_argument("--max-pairs", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--tokenizer", default=os.path.join(ROOT, "data", "sample", "tokenizer"))
    args = parser.parse_args()

    from jaxllava.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(args.tokenizer)
    data = source = args.data or default_data()
    with tempfile.TemporaryDirectory() as tmp:
        if args.max_pairs:
            data = limited_copy(data, args.max_pairs, tmp)
        for preset in args.preset:
            row = bench(preset, data, tokenizer, args.batch_size, args.dtype, source)
            print(json.dumps(row), flush=True)
            print(f"{preset}: {row['pairs']} pairs ({row['uids']} UIDs) on {row['device']} ({row['dtype']}, "
                  f"batch {row['batch_size']}): {row['pairs_per_s']:.1f} pairs/s steady, {row['steady_eval_s']:.1f} s "
                  f"(first call with compilation {row['first_eval_s']:.1f} s, encoding {row['encode_s']:.1f} s); "
                  f"full BLiMP ({BLIMP_PAIRS} pairs) projected {row['projected_full_blimp_s']:.0f} s", flush=True)


if __name__ == "__main__":
    main()
