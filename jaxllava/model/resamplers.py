"""Resamplers: turn the tower's (B, T, E) outputs (or precomputed features, `vision.kind: features`)
into n vectors (B, n, E) in the vision width E; the projector makes them the I = n · projector.expand
image tokens.

Axis letters: see jaxllava/__init__.py. I is derived in one place only,
`jaxllava.model.config.image_token_count`; the data pipeline writes exactly I
placeholders per image and the LLaVA model checks the encoder's output count
against it at trace time, so the resamplers neither derive nor check it.
Features have no CLS token; token_packer and avg_pool read them as a g×g grid
(ModelConfig requires vision.tokens = g²).

  identity      no parameters; the reference's BabyLM setting (256 DINOv2 patch tokens).
  perceiver     Flamingo's Perceiver resampler (docs/reference.md#perceiver;
                Alayrac et al. 2022): learned latents attend to concat(media, latents).
  token_packer  TokenPacker (Li et al. 2024, "TokenPacker: Efficient Visual Projector")
                as upstream intended it: each query attends only to its own s×s window
                of the patch grid, with the geometry taken from the input grid and
                the config alone (README pitfall 13).
  avg_pool      average pooling of the patch grid with window = stride = pool_stride
                (remainder rows/columns dropped, like torch avg_pool2d); a CLS token
                stays in front.

Attention width is the vision width E with head dim E / num_heads for both
attention resamplers (flamingo-pytorch fixes dim_head = 64; the reference's
TokenPacker worked in 1024 = DINOv2-L's width with 8 heads). No reference
resampler weights are loaded: the reference never used trained ones
(docs/reference.md#resamplers).

Inputs carry a leading CLS token exactly when the tower has one and
feature_select is "cls_patch" (T = grid² + 1). The token packer needs the
grid alone and drops it; the perceiver attends to it like any other token.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from jaxllava.model.config import ResamplerConfig, VisionConfig
from jaxllava.model.layers import Dense, LayerNorm, gelu_exact
from jaxllava.model.sharding import constrain
from jaxllava.model.vision import full_attention

ACT = ("batch", "length", "act_embed")


def _split_cls(x: jax.Array, vision: VisionConfig) -> tuple[jax.Array | None, jax.Array]:
    """(CLS (B, 1, E) or None, patch grid (B, g, g, E)) of the tower's output."""
    g = vision.grid
    extra = x.shape[1] - g * g
    cls = x[:, :1] if extra else None
    return cls, x[:, extra:].reshape(x.shape[0], g, g, x.shape[-1])


def _heads(x: jax.Array, num_heads: int) -> jax.Array:
    return x.reshape(*x.shape[:-1], num_heads, x.shape[-1] // num_heads)


class IdentityResampler(nnx.Module):
    def __call__(self, x: jax.Array) -> jax.Array:
        return x


class PerceiverLayer(nnx.Module):
    """latents += attn(q = LN(latents), kv = concat(LN(media), LN(latents))); latents += FF(latents)."""

    def __init__(self, width: int, config: ResamplerConfig, *, dtype, rngs: nnx.Rngs):
        eps = config.layer_norm_eps
        self.num_heads = config.num_heads
        self.norm_media = LayerNorm(width, eps=eps, axes=("vision_embed",), dtype=dtype)
        self.norm_latents = LayerNorm(width, eps=eps, axes=("vision_embed",), dtype=dtype)
        qkv = ("vision_embed", "vision_heads")
        self.query = Dense(width, width, axes=qkv, use_bias=False, dtype=dtype, rngs=rngs)
        self.key = Dense(width, width, axes=qkv, use_bias=False, dtype=dtype, rngs=rngs)
        self.value = Dense(width, width, axes=qkv, use_bias=False, dtype=dtype, rngs=rngs)
        self.out = Dense(width, width, axes=("vision_heads", "vision_embed"), use_bias=False, dtype=dtype, rngs=rngs)
        self.ff_norm = LayerNorm(width, eps=eps, axes=("vision_embed",), dtype=dtype)
        hidden = config.ff_mult * width
        self.ff_in = Dense(width, hidden, axes=("vision_embed", "vision_mlp"), use_bias=False, dtype=dtype, rngs=rngs)
        self.ff_out = Dense(hidden, width, axes=("vision_mlp", "vision_embed"), use_bias=False, dtype=dtype, rngs=rngs)

    def __call__(self, media: jax.Array, latents: jax.Array) -> jax.Array:
        normed = self.norm_latents(latents)
        context = jnp.concatenate([self.norm_media(media), normed], axis=1)
        q = _heads(self.query(normed), self.num_heads)
        k, v = _heads(self.key(context), self.num_heads), _heads(self.value(context), self.num_heads)
        o = full_attention(q, k, v)
        latents = constrain(latents + self.out(o.reshape(latents.shape)), ACT)
        return constrain(latents + self.ff_out(gelu_exact(self.ff_in(self.ff_norm(latents)))), ACT)


class PerceiverResampler(nnx.Module):
    def __init__(self, config: ResamplerConfig, width: int, *, dtype, rngs: nnx.Rngs):
        # torch.randn latents in flamingo-pytorch's PerceiverResampler
        self.latents = nnx.Param(jax.random.normal(rngs.params(), (config.num_latents, width), jnp.float32),
                                 axes=("latents", "vision_embed"))
        self.layers = nnx.List([PerceiverLayer(width, config, dtype=dtype, rngs=rngs) for _ in range(config.depth)])
        self.norm = LayerNorm(width, eps=config.layer_norm_eps, axes=("vision_embed",), dtype=dtype)
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(self.dtype)
        latents = jnp.broadcast_to(self.latents[...].astype(self.dtype), (x.shape[0],) + self.latents.shape)
        for layer in self.layers:
            latents = layer(x, latents)
        return self.norm(latents)


class TwoLayerMLP(nnx.Module):
    """Linear → exact GELU → Linear (E → E → E), the TokenPacker's q/k/v input maps."""

    def __init__(self, width: int, *, dtype, rngs: nnx.Rngs):
        self.fc1 = Dense(width, width, axes=("vision_embed", "vision_mlp"), dtype=dtype, rngs=rngs)
        self.fc2 = Dense(width, width, axes=("vision_mlp", "vision_embed"), dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(gelu_exact(self.fc1(x)))


def resize_bilinear(grid: jax.Array, side: int) -> jax.Array:
    """(B, a, a, E) → (B, side, side, E) like torch bilinear, align_corners=False.

    `jax.image.resize` antialiases when downsampling unless told not to; torch does not.
    """
    if grid.shape[1] == side:
        return grid
    shape = (grid.shape[0], side, side, grid.shape[-1])
    return jax.image.resize(grid.astype(jnp.float32), shape, method="linear", antialias=False).astype(grid.dtype)


class TokenPacker(nnx.Module):
    """Windowed TokenPacker: g×g queries (g² = num_latents output vectors), each attending its s×s key window.

    a = input grid side, s = ceil(a / g); queries q0 = bilinear(grid → g×g); keys and
    values come from the grid, bilinearly resized to (g·s)×(g·s) when a != g·s.
    Q, K, V = LN(MLP(·)); O = multi-head attention (with its own q/k/v/out
    projections, like torch nn.MultiheadAttention) of each query over its window;
    output = q0 + W_out·O (W_out without bias), docs/reference.md#tokenpacker.
    """

    def __init__(self, config: ResamplerConfig, vision: VisionConfig, *, dtype, rngs: nnx.Rngs):
        width = vision.hidden_size
        g = math.isqrt(config.num_latents)
        self.vision = vision
        self.queries_side = g
        self.window = -(-vision.grid // g)  # s = ceil(a / g)
        self.num_heads = config.num_heads
        eps = config.layer_norm_eps
        self.q_mlp, self.k_mlp, self.v_mlp = (TwoLayerMLP(width, dtype=dtype, rngs=rngs) for _ in range(3))
        self.q_norm, self.k_norm, self.v_norm = (LayerNorm(width, eps=eps, axes=("vision_embed",), dtype=dtype)
                                                 for _ in range(3))
        qkv = ("vision_embed", "vision_heads")
        self.query = Dense(width, width, axes=qkv, dtype=dtype, rngs=rngs)
        self.key = Dense(width, width, axes=qkv, dtype=dtype, rngs=rngs)
        self.value = Dense(width, width, axes=qkv, dtype=dtype, rngs=rngs)
        self.attention_out = Dense(width, width, axes=("vision_heads", "vision_embed"), dtype=dtype, rngs=rngs)
        self.out = Dense(width, width, axes=(None, "vision_embed"), use_bias=False, dtype=dtype, rngs=rngs)
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        _, grid = _split_cls(x.astype(self.dtype), self.vision)
        b, e = grid.shape[0], grid.shape[-1]
        g, s, n = self.queries_side, self.window, self.num_heads
        q0 = resize_bilinear(grid, g).reshape(b, g * g, e)
        kv0 = resize_bilinear(grid, g * s)
        q = _heads(self.query(self.q_norm(self.q_mlp(q0))), n)  # (B, g², N, H)
        k = _heads(self.key(self.k_norm(self.k_mlp(kv0))), n)  # (B, gs, gs, N, H)
        v = _heads(self.value(self.v_norm(self.v_mlp(kv0))), n)

        def windows(t):  # (B, gs, gs, N, H) → (B·g², s², N, H), window (i, j) = rows i·s.., columns j·s..
            t = t.reshape(b, g, s, g, s, n, e // n).transpose(0, 1, 3, 2, 4, 5, 6)
            return t.reshape(b * g * g, s * s, n, e // n)

        o = full_attention(q.reshape(b * g * g, 1, n, e // n), windows(k), windows(v))
        o = self.attention_out(o.reshape(b, g * g, e))
        return constrain(q0 + self.out(o), ACT)


class AvgPoolResampler(nnx.Module):
    def __init__(self, config: ResamplerConfig, vision: VisionConfig):
        self.vision = vision
        self.stride = config.pool_stride

    def __call__(self, x: jax.Array) -> jax.Array:
        cls, grid = _split_cls(x, self.vision)
        b, g, e, s = grid.shape[0], grid.shape[1], grid.shape[-1], self.stride
        side = g // s  # like torch avg_pool2d, windows that do not fit are dropped
        pooled = grid[:, : side * s, : side * s].reshape(b, side, s, side, s, e).mean(axis=(2, 4), dtype=jnp.float32)
        pooled = pooled.astype(x.dtype).reshape(b, side * side, e)
        return pooled if cls is None else jnp.concatenate([cls, pooled], axis=1)


def make_resampler(config: ResamplerConfig, vision: VisionConfig, *, dtype=jnp.float32,
                   rngs: nnx.Rngs) -> nnx.Module:
    """The resampler named by config.kind; `__call__((B, T, E)) -> (B, n, E)`, I = n · projector.expand."""
    builders = {
        "identity": lambda: IdentityResampler(),
        "perceiver": lambda: PerceiverResampler(config, vision.hidden_size, dtype=dtype, rngs=rngs),
        "token_packer": lambda: TokenPacker(config, vision, dtype=dtype, rngs=rngs),
        "avg_pool": lambda: AvgPoolResampler(config, vision),
    }
    return builders[config.kind]()
