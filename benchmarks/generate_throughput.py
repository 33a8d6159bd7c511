"""Generation throughput: prefill time and decoded tokens/s of the KV-cache generator.

    python benchmarks/generate_throughput.py [--preset tiny baby_llama] [--batch 1 8] [--prompt-len 32]
                                             [--new-tokens 128] [--dtype float32|bfloat16] [--sample]

Random-weight text-only models built from configs/presets/lm/<preset>.yaml, run through
`jaxllava.model.decode.Generator` (jitted prefill + one jitted step per token) on
whatever device JAX sees. Prompts are random ids of --prompt-len tokens; no EOS, so
every run decodes exactly --new-tokens tokens per row. Each (preset, batch) runs once to
compile, then is timed twice with the compiled code; the better time counts.
tokens/s = batch × new tokens / (generation time); the prefill is timed alone too
(a generation of one token).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time

import yaml

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def model_config(preset: str, dtype: str):
    from jaxllava.model.config import LlamaConfig, ModelConfig

    with open(os.path.join(ROOT, "configs", "presets", "lm", f"{preset}.yaml")) as f:
        lm = yaml.safe_load(f)["model"]["lm"]
    return ModelConfig(lm=LlamaConfig(**lm), vision=None, dtype=dtype, attention_impl="auto")


def _best_time(run, repeats: int = 2) -> float:
    run()  # compile
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - started)
    return best


def bench(preset: str, batch: int, prompt_len: int, new_tokens: int, dtype: str, sample: bool) -> dict:
    import jax
    import numpy as np
    from flax import nnx

    from jaxllava.model.decode import Generator, Sampling, left_padded, prompt_bucket
    from jaxllava.model.llava import LlavaModel

    config = model_config(preset, dtype)
    model = LlavaModel(config, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    prompts = [rng.integers(1, config.lm.vocab_size, prompt_len).tolist() for _ in range(batch)]
    prompt_batch = left_padded(prompts, pad_id=0, length=prompt_bucket(prompt_len))
    generator = Generator(model, eos_id=None)
    sampling = Sampling(temperature=0.8, top_p=0.9, seed=0) if sample else Sampling()
    cache_len = prompt_batch.input_ids.shape[1] + new_tokens

    def generate(tokens: int):
        return lambda: generator.generate(prompt_batch, tokens, sampling, cache_len=cache_len).tokens

    prefill_s = _best_time(generate(1))
    total_s = _best_time(generate(new_tokens))
    decode_s = max(total_s - prefill_s, 1e-9)
    return {"preset": preset, "device": jax.devices()[0].device_kind, "platform": jax.default_backend(),
            "dtype": dtype, "batch": batch, "prompt_len": prompt_len, "new_tokens": new_tokens,
            "sampling": "top_p" if sample else "greedy", "prefill_s": round(prefill_s, 4),
            "generate_s": round(total_s, 4), "tokens_per_s": round(batch * new_tokens / total_s, 1),
            "decode_ms_per_step": round(1000 * decode_s / max(new_tokens - 1, 1), 3), "host": platform.node()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", nargs="+", default=["tiny", "baby_llama"])
    parser.add_argument("--batch", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--sample", action="store_true", help="temperature 0.8, top-p 0.9 instead of greedy")
    args = parser.parse_args()
    for preset in args.preset:
        for batch in args.batch:
            row = bench(preset, batch, args.prompt_len, args.new_tokens, args.dtype, args.sample)
            print(json.dumps(row), flush=True)
            print(f"{preset} on {row['device']} ({row['dtype']}, batch {batch}, {row['sampling']}): "
                  f"{row['tokens_per_s']:.1f} tokens/s, {row['decode_ms_per_step']:.2f} ms per decode step, "
                  f"prefill of {args.prompt_len} tokens {1000 * row['prefill_s']:.1f} ms", flush=True)


if __name__ == "__main__":
    main()
