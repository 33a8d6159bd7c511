"""Peak host memory of `convert import-hf` (and `export-hf --what lm`) on a ~1B Llama.

    python benchmarks/convert_memory.py [--layers 22] [--hidden 2048] [--dtype float32] [--keep DIR]

Builds a random LlamaForCausalLM with transformers in a temporary directory
(TinyLlama-1.1B's shape by default: 22 layers, width 2048, MLP 5632, GQA 32/4,
vocabulary 32000), then runs each conversion in a fresh Python process that
reports its own peak RSS (`ru_maxrss`) and its RSS after the imports (jax,
transformers, orbax), so the figures compare the conversion's own memory with
the size of one float32 copy of the model. Prints one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def build(args) -> None:
    import torch
    import transformers

    sys.path.insert(0, os.path.join(REPO, "tests"))
    from conftest import make_word_tokenizer

    config = transformers.LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.mlp,
                                      num_hidden_layers=args.layers, num_attention_heads=args.heads,
                                      num_key_value_heads=args.kv_heads, max_position_embeddings=2048,
                                      tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(config)
    model = model.to_empty(device="cpu").to(getattr(torch, args.dtype))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02)
    model.save_pretrained(os.path.join(args.dir, "lm"))
    make_word_tokenizer(os.path.join(args.dir, "tokenizer"))


def convert(args) -> None:
    import jax
    import orbax.checkpoint  # noqa: F401
    import transformers  # noqa: F401

    import jaxllava.convert.hf  # noqa: F401
    import jaxllava.convert.reference  # noqa: F401
    import jaxllava.model.llava  # noqa: F401
    import launch

    jax.devices()  # the fixed cost of the libraries and the XLA client is the baseline, not the conversion
    baseline = rss_bytes()
    start = time.time()
    if args.stage == "import":
        config = os.path.join(args.dir, "text_only.yaml")
        with open(config, "w") as f:
            f.write(f"base: {os.path.join(REPO, 'configs', 'tiny.yaml')}\nmodel:\n  vision: null\n")
        argv = ["convert", "import-hf", "--lm", os.path.join(args.dir, "lm"), "--tokenizer",
                os.path.join(args.dir, "tokenizer"), "--config", config, "--out", os.path.join(args.dir, "ckpt")]
    else:
        argv = ["convert", "export-hf", "--checkpoint", os.path.join(args.dir, "ckpt"), "--out",
                os.path.join(args.dir, "exported")]
    with open(os.devnull, "w") as devnull:
        stdout, sys.stdout = sys.stdout, devnull
        try:
            code = launch.main(argv)
        finally:
            sys.stdout = stdout
    if code:
        raise SystemExit(f"{args.stage} failed with exit code {code}")
    print(json.dumps({"baseline_rss": baseline, "peak_rss": peak_rss_bytes(), "seconds": time.time() - start}))


def run_stage(args, stage: str) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--stage", stage, "--dir", args.dir]
    cmd += ["--layers", str(args.layers), "--hidden", str(args.hidden), "--mlp", str(args.mlp), "--heads",
            str(args.heads), "--kv-heads", str(args.kv_heads), "--vocab", str(args.vocab), "--dtype", args.dtype]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1]) if stage != "build" else {}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=22)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--mlp", type=int, default=5632)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                        help="dtype of the transformers checkpoint (jaxllava params are float32)")
    parser.add_argument("--stage", choices=["all", "build", "import", "export"], default="all")
    parser.add_argument("--dir", help="work directory (default: a temporary one, deleted afterwards)")
    args = parser.parse_args()
    if args.stage == "build":
        return build(args)
    if args.stage in ("import", "export"):
        return convert(args)

    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        args.dir = tmp
        run_stage(args, "build")
        h, f, n_layers, v = args.hidden, args.mlp, args.layers, args.vocab
        kv = h // args.heads * args.kv_heads
        params = 2 * v * h + h + n_layers * (2 * h * h + 2 * h * kv + 3 * h * f + 2 * h)
        results = {"parameters": params, "model_fp32_bytes": 4 * params, "checkpoint_dtype": args.dtype}
        for stage in ("import", "export"):
            r = run_stage(args, stage)
            results[stage] = {**r, "conversion_bytes": r["peak_rss"] - r["baseline_rss"],
                              "conversion_over_model": round((r["peak_rss"] - r["baseline_rss"]) / (4 * params), 3),
                              "peak_over_model": round(r["peak_rss"] / (4 * params), 3)}
        print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
