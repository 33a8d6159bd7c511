"""LAPE: the reference's stage-2 spatial and temporal embeddings, added to image features
(docs/reference.md#stage-2-lape-embeddings; optional, `model.lape`).

Three axes, height, width and time, each with an input table `Embedding(n, D)` and an
output projection `Linear(D, n)` without bias (stored (n, D) by torch, (D, n) here as
every Dense kernel), n = `lape.tokens` (`lape.temporal_tokens` for time). Each forward
builds one injection table per axis,

    inj = (reparam(W_in, R) + reparam(W_out, R)) / 2                   (n, D)
    reparam(W, R) = W + R @ W - stop_gradient(R @ W),   R[i, j] = 2^-|i - j|

whose value is the average of the two tables and whose gradient also flows through
R @ W, so each row's gradient spreads to its neighbours ("neighbouring token
propagation"). R is fixed: the reference registered it as a buffer and never trained
it; here it is a constant (`reparam_matrix`) and the importer checks a checkpoint's
buffers against it.

An image's g×g grid of visual vectors (after the projector, in the LM's width) gets

    x[r, c] += interp(inj_h, n → g)[r] + interp(inj_w, n → g)[c] + inj_t[0]

with interp PyTorch's F.interpolate(mode="linear", align_corners=False) along the
table's rows (rows of the grid are height, columns width); frame t of a video gets
inj_t[t] instead of inj_t[0]. The reference also added 0 · sum(inj_t) to images,
which changes neither the value nor any gradient, so it is left out.

Order: with LAPE the image path is the reference's tower → projector → LAPE add →
resampler (the resampler then works in the LM's width), not stage 1's tower →
resampler → projector (`ModelConfig.resampler_input`, `LlavaModel.encode_features`).

The six tables are the reference's `model.{temporal,spatial_height,spatial_width}_
{input,output}_embeddings.weight` under the same attribute names, so their transformers
names need no renames (jaxllava/model/hf_keys.py). The reference also looked up its
`<TEMP-INPUT>`-style tokens in `[embed_tokens; W_in tables]`, but token ids never
exceed the vocabulary there, so text embedding is plain `embed_tokens` and those
tokens are ordinary vocabulary items.

Initialisation is torch's default, as the reference created these modules after
loading the LM: Embedding N(0, 1), Linear U(±1/√D).

Axis letters: see jaxllava/__init__.py.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxllava.model.config import LapeConfig
from jaxllava.model.layers import Dense, Embed
from jaxllava.model.projectors import TORCH_LINEAR_INIT

AXES = ("temporal", "spatial_height", "spatial_width")  # the reference's attribute prefixes
TABLE_AXES = ("latents", "embed")


@functools.lru_cache(maxsize=None)
def reparam_matrix(n: int) -> np.ndarray:
    """R[i, j] = 2^-|i-j| (float32; exact: the exponent never goes below float32's normal range for n ≤ 127)."""
    index = np.arange(n)
    return np.exp2(-np.abs(index[:, None] - index[None, :]).astype(np.float64)).astype(np.float32)


def reparam(weight: jax.Array, matrix: np.ndarray) -> jax.Array:
    """W + R@W - stop_gradient(R@W): the value of W, with the gradient through R@W (same order of
    operations as the reference, so the value rounds the same way)."""
    spread = jnp.asarray(matrix, weight.dtype) @ weight
    return weight + spread - jax.lax.stop_gradient(spread)


@functools.lru_cache(maxsize=None)
def linear_resize_matrix(source: int, target: int) -> np.ndarray:
    """(target, source) weights of torch F.interpolate(mode="linear", align_corners=False) from
    `source` to `target` samples (no antialiasing): sample j reads the source at
    (j + 0.5) · source / target - 0.5, clamped at 0, between its two neighbours. The position
    is computed in float32 as torch does for float32 inputs, so the weights round alike."""
    f32 = np.float32
    weights = np.zeros((target, source), np.float32)
    scale = f32(source) / f32(target)
    for j in range(target):
        position = max(scale * (f32(j) + f32(0.5)) - f32(0.5), f32(0.0))
        low = int(position)
        high = min(low + 1, source - 1)
        fraction = position - f32(low)
        weights[j, low] += f32(1.0) - fraction
        weights[j, high] += fraction
    return weights


class Lape(nnx.Module):
    def __init__(self, config: LapeConfig, width: int, *, rngs: nnx.Rngs):
        self.config = config
        for axis in AXES:
            n = config.temporal_count if axis == "temporal" else config.tokens
            setattr(self, f"{axis}_input_embeddings",
                    Embed(n, width, axes=TABLE_AXES, embedding_init=nnx.initializers.normal(1.0), rngs=rngs))
            setattr(self, f"{axis}_output_embeddings",
                    Dense(width, n, axes=TABLE_AXES[::-1], use_bias=False, kernel_init=TORCH_LINEAR_INIT,
                          rngs=rngs))

    def injection(self, axis: str) -> jax.Array:
        """(n, D) float32: the average of the axis's reparametrised input and output tables."""
        table_in = getattr(self, f"{axis}_input_embeddings").embedding[...]
        table_out = getattr(self, f"{axis}_output_embeddings").kernel[...].T  # torch's (n, D) weight
        matrix = reparam_matrix(table_in.shape[0])
        return (reparam(table_in, matrix) + reparam(table_out, matrix)) / 2

    def spatial(self, side: int) -> jax.Array:
        """(side, side, D) float32: height terms down the rows plus width terms along the columns."""
        n = self.config.tokens
        resize = jnp.asarray(linear_resize_matrix(n, side))
        height = resize @ self.injection("spatial_height")
        width = resize @ self.injection("spatial_width")
        return height[:, None, :] + width[None, :, :]

    def __call__(self, x: jax.Array) -> jax.Array:
        """Images: (B, g², D) visual vectors of a g×g grid, row-major → the same plus LAPE (height, width,
        and time step 0)."""
        side = _grid_side(x.shape[-2])
        terms = self.spatial(side).reshape(side * side, -1) + self.injection("temporal")[0]
        return (x.astype(jnp.float32) + terms).astype(x.dtype)

    def frames(self, x: jax.Array) -> jax.Array:
        """Videos: (B, T, g², D), frame t of each video → plus the spatial terms and inj_t[t]
        (T ≤ temporal_tokens; the reference sized the temporal tables by its frame count)."""
        frames, side = x.shape[1], _grid_side(x.shape[-2])
        if frames > self.config.temporal_count:
            raise ValueError(f"{frames} frames per video, but model.lape has "
                             f"{self.config.temporal_count} temporal embeddings")
        spatial = self.spatial(side).reshape(1, side * side, -1)
        temporal = self.injection("temporal")[:frames, None, :]
        return (x.astype(jnp.float32) + spatial + temporal).astype(x.dtype)


def _grid_side(count: int) -> int:
    side = math.isqrt(count)
    if side * side != count:
        raise ValueError(f"LAPE adds position terms to a square grid of visual vectors, got {count} vectors")
    return side
