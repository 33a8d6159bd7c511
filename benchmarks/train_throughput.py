"""End-to-end training throughput against the train step alone.

    python benchmarks/train_throughput.py --config configs/tiny.yaml [--steps 60] [--warmup 10]
        [--set key=value ...]

1. "loop": `jaxllava.train.loop.train` as `launch.py train` runs it (Grain loader,
   host→device transfer, the step, metrics.jsonl/TensorBoard with every step logged,
   async checkpoints at the config's interval), timed from the end of step `warmup`
   to the end of step `warmup + steps` by the loop's own step times (compilation
   excluded).
2. "step": the same microbatches, already on the devices, through `TrainStep.apply`
   back to back: the ceiling the loop can reach.

Prints one JSON line per mode (steps/s, tokens/s, MFU where the device's peak is
known) and the loop/step ratio, the overhead of everything around the step.
Record results with the command and the machine in benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import tempfile
import sys
import time

import jax
from flax import nnx

from jaxllava.config import load_config
from jaxllava.data.pipeline import DataPipeline
from jaxllava.model.sharding import make_mesh
from jaxllava.train.loop import train
from jaxllava.model.llava import create_model
from jaxllava.train.setup import plan_run
from jaxllava.train.metrics import lm_flops_per_token, mfu
from jaxllava.train.step import TrainStep, device_batch, host_metrics


_START = time.perf_counter()


def phase(message: str) -> None:
    """Progress on stderr, so a run cut off by a time limit still says where it was."""
    print(f"[{time.perf_counter() - _START:7.1f} s] {message}", file=sys.stderr, flush=True)


def step_flops(stats, lm_config) -> float:
    return sum((s.rows * s.seq_len - s.padding_tokens) * lm_flops_per_token(lm_config, s.seq_len) for s in stats)


def report(mode: str, steps: int, tokens: int, flops: float, seconds: float) -> dict:
    row = {"mode": mode, "steps": steps, "seconds": round(seconds, 3), "steps_per_s": steps / seconds,
           "tokens_per_s": tokens / seconds, "mfu": mfu(flops / seconds, jax.devices())}
    print(json.dumps(row), flush=True)
    return row


def time_loop(config, warmup: int, steps: int) -> dict:
    """The loop as launch.py runs it, timed from its own metrics rows (every step logged):
    a hook would make the loop wait for every step before dispatching the next."""
    config = dataclasses.replace(config, train=dataclasses.replace(config.train, log_every=1))
    with tempfile.TemporaryDirectory() as workdir:
        train(config, workdir)
        with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
            rows = {row["step"]: row for row in map(json.loads, f) if "loss" in row}
    window = range(warmup + 1, warmup + steps + 1)
    # step_time is the time between the host reading consecutive steps
    return {"tokens": sum(rows[k]["tokens"] for k in window), "seconds": sum(rows[k]["step_time"] for k in window)}


def time_step(config, warmup: int, steps: int) -> tuple[dict, int, float]:
    mesh = make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
    pipeline = DataPipeline.for_model(config.data, config.model)
    total, _ = plan_run(pipeline, config.train)
    phase(f"data planned: {total} steps")
    model = create_model(config.model, mesh, config.train.seed)
    trainer = TrainStep(model, config.optim, total, mesh, seed=config.train.seed)
    state = trainer.init_state(nnx.split(model, nnx.Param, ...)[1])
    phase("model and optimizer state created")
    iterator = pipeline.iterator()
    per_step = [[next(iterator) for _ in range(config.train.grad_accum)] for _ in range(warmup + steps)]
    on_device = [[device_batch(b, mesh) for b in batches] for batches in per_step]
    phase(f"{len(per_step)} steps of microbatches on the devices")
    for k, arrays in enumerate(on_device[:warmup]):  # compile every shape
        state, metrics = trainer.apply(state, arrays)
        host_metrics(metrics)
        shapes = " ".join(f"{b.stats.modality}:{b.stats.rows}x{b.stats.seq_len}" for b in per_step[k])
        phase(f"warm-up step {k + 1} ({shapes}), {TrainStep.compile_count()} compiles so far")
    start = time.perf_counter()
    for arrays in on_device[warmup:]:
        state, metrics = trainer.apply(state, arrays)
    host_metrics(metrics)
    seconds = time.perf_counter() - start
    stats = [b.stats for batches in per_step[warmup:] for b in batches]
    tokens = sum(s.rows * s.seq_len - s.padding_tokens for s in stats)
    return {"tokens": tokens, "seconds": seconds}, tokens, step_flops(stats, config.model.lm)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--steps", type=int, default=60, help="timed optimizer steps")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps first (compilation)")
    args = parser.parse_args()
    overrides = [f"train.steps={args.warmup + args.steps}", "train.word_budget=null", "logging.progress=false",
                 *args.overrides]
    config = load_config(args.config, overrides)
    print(json.dumps({"machine": platform.node(), "devices": [d.device_kind for d in jax.devices()],
                      "config": args.config, "overrides": args.overrides}), flush=True)

    step, tokens, flops = time_step(config, args.warmup, args.steps)
    phase("step mode timed; now the loop")
    step_row = report("step", args.steps, step["tokens"], flops, step["seconds"])
    loop = time_loop(config, args.warmup, args.steps)
    assert loop["tokens"] == tokens, "the loop and the step mode must time the same microbatches"
    loop_row = report("loop", args.steps, loop["tokens"], flops, loop["seconds"])
    print(json.dumps({"loop_over_step": loop_row["tokens_per_s"] / step_row["tokens_per_s"]}), flush=True)


if __name__ == "__main__":
    main()
