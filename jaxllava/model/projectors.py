"""Projector: vision width → LM width (REFERENCE.md §1.6).

`linear` is one nn.Linear; `mlp{k}x_gelu` is LLaVA's nn.Sequential(Linear, GELU,
Linear, GELU, ..., Linear) with k Linear layers and exact (erf) GELU between them
(torch nn.GELU(); jax.nn.gelu defaults to the tanh form). The reference used
`mlp2x_gelu`: Linear(1024, 768), GELU, Linear(768, 768).

Checkpoint names follow LLaVA: `mm_projector.weight` for `linear`,
`mm_projector.{2i}.weight` for the i-th Linear of an MLP (the odd Sequential
indices are the parameter-free GELUs).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxllava.errors import ConfigError
from jaxllava.model.config import ProjectorConfig
from jaxllava.model.layers import Dense, gelu_exact
from jaxllava.model.hf_weights import LINEAR, SAME, entries_state_dict, load_entries, unused_keys

# torch nn.Linear's default weight init, U(-1/sqrt(in), 1/sqrt(in)), which the reference used.
TORCH_LINEAR_INIT = nnx.initializers.variance_scaling(1 / 3, "fan_in", "uniform")


def projector_depth(config: ProjectorConfig) -> int:
    try:
        return config.depth
    except ValueError as e:
        raise ConfigError(f"projector.kind: {e}") from None


class Projector(nnx.Module):
    def __init__(self, config: ProjectorConfig, in_features: int, out_features: int, *, dtype=jnp.float32,
                 rngs: nnx.Rngs):
        depth = projector_depth(config)
        self.config = config
        self.layers = nnx.List([
            Dense(in_features if i == 0 else out_features, out_features,
                  axes=("vision_embed" if i == 0 else None, "embed"), kernel_init=TORCH_LINEAR_INIT,
                  dtype=dtype, rngs=rngs)
            for i in range(depth)])

    def __call__(self, x: jax.Array) -> jax.Array:
        for i, layer in enumerate(self.layers):
            x = gelu_exact(x) if i else x
            x = layer(x)
        return x


def _projector_weight_map(projector: Projector) -> list:
    names = [""] if projector.config.kind == "linear" else [f"{2 * i}." for i in range(len(projector.layers))]
    entries = []
    for name, layer in zip(names, projector.layers):
        entries += [(f"{name}weight", layer.kernel, LINEAR), (f"{name}bias", layer.bias, SAME)]
    return entries


def load_projector_weights(projector: Projector, tensors, *, prefix: str = "model.mm_projector.") -> list[str]:
    """Strict load (ConversionError names a missing tensor or both shapes); returns unused keys under prefix."""
    used = load_entries(_projector_weight_map(projector), tensors, prefix=prefix)
    return unused_keys(tensors, used, prefix)


def projector_hf_state_dict(projector: Projector, *, prefix: str = "model.mm_projector.") -> dict[str, np.ndarray]:
    return entries_state_dict(_projector_weight_map(projector), prefix=prefix)
