"""Projector: vision width → LM width (docs/reference.md#projector).

`linear` is one nn.Linear; `mlp{k}x_gelu` is LLaVA's nn.Sequential(Linear, GELU,
Linear, GELU, ..., Linear) with k Linear layers and exact (erf) GELU between them
(torch nn.GELU(); jax.nn.gelu defaults to the tanh form). The reference used
`mlp2x_gelu`: Linear(1024, 768), GELU, Linear(768, 768).

Checkpoint names follow LLaVA: `mm_projector.weight` for `linear`,
`mm_projector.{2i}.weight` for the i-th Linear of an MLP (the odd Sequential
indices are the parameter-free GELUs); `hf_renames` declares both.

`expand` = k > 1 (ProjectorConfig.expand) makes the last Linear output k·D and
splits each input vector's output into k consecutive tokens, input-token-major
(a reshape (B, n, k·D) → (B, n·k, D)), so that one global image vector (the
features BabyLM ships) becomes several image tokens. The reference never had it,
so its layout holds only k = 1 (convert/reference.py refuses k > 1).

Maps (B, n, E) → (B, n·k, D), n·k = I; axis letters: see jaxllava/__init__.py.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxllava.model.config import ProjectorConfig
from jaxllava.model.layers import Dense, gelu_exact

# torch nn.Linear's default weight init, U(-1/sqrt(in), 1/sqrt(in)), which the reference used.
TORCH_LINEAR_INIT = nnx.initializers.variance_scaling(1 / 3, "fan_in", "uniform")


class Projector(nnx.Module):
    def __init__(self, config: ProjectorConfig, in_features: int, out_features: int, *, dtype=jnp.float32,
                 rngs: nnx.Rngs):
        depth = config.depth
        self.config = config
        self.out_features = out_features
        self.layers = nnx.List([
            Dense(in_features if i == 0 else out_features, out_features * (config.expand if i == depth - 1 else 1),
                  axes=("vision_embed" if i == 0 else None, "embed"), kernel_init=TORCH_LINEAR_INIT,
                  dtype=dtype, rngs=rngs)
            for i in range(depth)])

    def hf_renames(self) -> dict[str, str]:
        if self.config.kind == "linear":
            return {"layers.0": ""}
        return {f"layers.{i}": str(2 * i) for i in range(len(self.layers))}

    def __call__(self, x: jax.Array) -> jax.Array:
        for i, layer in enumerate(self.layers):
            x = gelu_exact(x) if i else x
            x = layer(x)
        return x.reshape(*x.shape[:-2], x.shape[-2] * self.config.expand, self.out_features)
