"""Model creation time: how long `create_model` takes to give the first and a second seed's
parameters on one device, split into trace + compile and run (what keeps a run from its first step).

    python benchmarks/init_time.py [--config benchmarks/babylm_reference_sample.yaml]

The first call traces and compiles the jitted initialiser (the seed's key is its argument); the
second seed reuses that compile, so its time is the random generation alone.
"""
from __future__ import annotations

import argparse
import platform
import time

import jax
from flax import nnx

from jaxllava.config import load_config
from jaxllava.model.llava import create_model
from jaxllava.model.sharding import make_mesh


def timed_create(model_config, mesh, seed: int) -> float:
    start = time.perf_counter()
    jax.block_until_ready(nnx.state(create_model(model_config, mesh, seed)))
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="benchmarks/babylm_reference_sample.yaml")
    args = parser.parse_args()
    model_config = load_config(args.config).model
    mesh = make_mesh(devices=jax.devices()[:1])
    first = timed_create(model_config, mesh, 0)
    second = timed_create(model_config, mesh, 1)
    params = sum(x.size for x in jax.tree.leaves(nnx.state(create_model(model_config, mesh, 2), nnx.Param)))
    print(f"{args.config}: {params / 1e6:.1f}M parameters on {jax.devices()[0].device_kind} "
          f"({platform.processor() or platform.machine()})")
    print(f"first seed (trace, compile, run): {first:.1f} s; second seed (run only): {second:.1f} s")


if __name__ == "__main__":
    main()
