"""Small building blocks shared by the decoder, the vision towers and the connectors.

Parameters are float32 (`param_dtype`); computation runs in `dtype` (bfloat16 by
default in training). Each parameter records its logical axes (see sharding.py).
Kernels are stored (in, out): PyTorch's nn.Linear stores (out, in), so weight
loaders transpose.

Porting traps named here (README pitfall 34): torch's nn.GELU is the exact
erf form, jax.nn.gelu defaults to the tanh approximation; torch LayerNorm eps is
1e-5 and DINOv2's is 1e-6, so every LayerNorm takes eps explicitly.
"""
from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

Initializer = Callable[..., jax.Array]
default_kernel_init: Initializer = nnx.initializers.normal(stddev=0.02)


def gelu_exact(x):
    return jax.nn.gelu(x, approximate=False)


def gelu_tanh(x):
    return jax.nn.gelu(x, approximate=True)


def quick_gelu(x):
    # CLIP's activation: x * sigmoid(1.702 x)
    return x * jax.nn.sigmoid(1.702 * x)


ACTIVATIONS: dict[str, Callable] = {
    "gelu": gelu_exact,
    "gelu_pytorch_tanh": gelu_tanh,
    "gelu_tanh": gelu_tanh,
    "quick_gelu": quick_gelu,
    "silu": jax.nn.silu,
}


class Dense(nnx.Module):
    """y = x @ kernel (+ bias); kernel (in, out) with logical axes `axes`."""

    def __init__(self, in_features: int, out_features: int, *, axes: Sequence[str | None],
                 use_bias: bool = True, dtype=jnp.float32, param_dtype=jnp.float32,
                 kernel_init: Initializer = default_kernel_init, rngs: nnx.Rngs):
        self.kernel = nnx.Param(kernel_init(rngs.params(), (in_features, out_features), param_dtype),
                                axes=tuple(axes))
        self.bias = (nnx.Param(jnp.zeros((out_features,), param_dtype), axes=(axes[-1],))
                     if use_bias else None)
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        y = jnp.dot(x.astype(self.dtype), self.kernel[...].astype(self.dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


class Embed(nnx.Module):
    """Token embedding table (vocab, features)."""

    def __init__(self, num_embeddings: int, features: int, *, axes: Sequence[str | None] = ("vocab", "embed"),
                 dtype=jnp.float32, param_dtype=jnp.float32,
                 embedding_init: Initializer = default_kernel_init, rngs: nnx.Rngs):
        self.embedding = nnx.Param(embedding_init(rngs.params(), (num_embeddings, features), param_dtype),
                                   axes=tuple(axes))
        self.dtype = dtype

    def __call__(self, ids: jax.Array) -> jax.Array:
        return jnp.take(self.embedding[...], ids, axis=0).astype(self.dtype)

    def attend(self, x: jax.Array) -> jax.Array:
        """Logits against the table (tied output layer)."""
        return jnp.dot(x.astype(self.dtype), self.embedding[...].astype(self.dtype).T)


class RMSNorm(nnx.Module):
    """Llama RMSNorm: normalise in float32, round to `dtype`, then scale in `dtype`.

    transformers' LlamaRMSNorm returns `weight * normed.to(input_dtype)` with the
    weight in the model dtype; the scale here is a float32 parameter, so it is cast
    to `dtype` first: a float32 scale times a bfloat16 value would promote to
    float32 and multiply by the unrounded scale, which differs from transformers in
    the last bfloat16 bit.
    """

    def __init__(self, features: int, *, eps: float, axes: Sequence[str | None] = ("embed",),
                 dtype=jnp.float32, param_dtype=jnp.float32):
        self.scale = nnx.Param(jnp.ones((features,), param_dtype), axes=tuple(axes))
        self.eps = eps
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.scale[...].astype(self.dtype) * normed.astype(self.dtype)


class LayerNorm(nnx.Module):
    """LayerNorm with an explicit eps (no default: torch uses 1e-5, DINOv2 1e-6, Flax 1e-6)."""

    def __init__(self, features: int, *, eps: float, axes: Sequence[str | None] = ("embed",),
                 dtype=jnp.float32, param_dtype=jnp.float32):
        self.scale = nnx.Param(jnp.ones((features,), param_dtype), axes=tuple(axes))
        self.bias = nnx.Param(jnp.zeros((features,), param_dtype), axes=tuple(axes))
        self.eps = eps
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * self.scale[...] + self.bias[...]).astype(self.dtype)
