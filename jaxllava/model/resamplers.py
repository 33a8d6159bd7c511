"""Resamplers: turn the tower's (B, n_in, Dv) features into the N image tokens, in the vision width Dv.

Every resampler has `output_tokens`, equal to `ModelConfig.image_tokens` (the one
place N is derived; the data pipeline writes exactly N placeholders per image).

  identity      no parameters; the reference's BabyLM setting (256 DINOv2 patch tokens).
  perceiver     Flamingo's Perceiver resampler (REFERENCE.md §1.7 "Other resamplers";
                Alayrac et al. 2022): learned latents attend to concat(media, latents).
  token_packer  TokenPacker (Li et al. 2024, "TokenPacker: Efficient Visual Projector")
                as upstream intended it: each query attends only to its own s×s window
                of the patch grid. The reference fork flattened the windows into global
                attention and took its geometry from the config's 37×37 grid instead of
                the 16×16 input grid (REFERENCE.md §1.7, pitfall 13); here the geometry
                comes from the input grid.
  avg_pool      average pooling of the patch grid with window = stride = pool_stride
                (remainder rows/columns dropped, like torch avg_pool2d); a CLS token
                stays in front.

Attention width is the vision width Dv with head dim Dv / num_heads for both
attention resamplers (flamingo-pytorch fixes dim_head = 64; the reference's
TokenPacker worked in 1024 = DINOv2-L's width with 8 heads). No reference
resampler weights are loaded: the reference never used trained ones (§1.7).

Inputs carry a leading CLS token exactly when the tower has one and
feature_select is "cls_patch" (n_in = grid² + 1). The token packer needs the
grid alone and drops it; the perceiver attends to it like any other token.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from jaxllava.errors import ConfigError
from jaxllava.model.config import ResamplerConfig, VisionConfig
from jaxllava.model.layers import Dense, LayerNorm, gelu_exact
from jaxllava.model.sharding import constrain
from jaxllava.model.vision import full_attention

ACT = ("batch", "length", "act_embed")


def _split_cls(x: jax.Array, vision: VisionConfig) -> tuple[jax.Array | None, jax.Array]:
    """(CLS (B, 1, D) or None, patch grid (B, g, g, D)) of the tower's output."""
    g = vision.grid
    extra = x.shape[1] - g * g
    if extra not in (0, 1) or extra != vision.output_tokens - g * g:
        raise ValueError(f"resampler expects {vision.output_tokens} tokens from the {g}×{g} vision grid, "
                         f"got {x.shape[1]}")
    cls = x[:, :1] if extra else None
    return cls, x[:, extra:].reshape(x.shape[0], g, g, x.shape[-1])


def _heads(x: jax.Array, num_heads: int) -> jax.Array:
    return x.reshape(*x.shape[:-1], num_heads, x.shape[-1] // num_heads)


def _check_heads(width: int, num_heads: int) -> None:
    if num_heads < 1 or width % num_heads:
        raise ConfigError(f"resampler.num_heads {num_heads} must divide the vision width {width}")


class IdentityResampler(nnx.Module):
    def __init__(self, vision: VisionConfig):
        self.output_tokens = vision.output_tokens

    def __call__(self, x: jax.Array) -> jax.Array:
        if x.shape[1] != self.output_tokens:
            raise ValueError(f"identity resampler expects {self.output_tokens} tokens, got {x.shape[1]}")
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
        _check_heads(width, config.num_heads)
        if config.num_latents < 1 or config.depth < 1:
            raise ConfigError(f"perceiver needs num_latents >= 1 and depth >= 1, got {config.num_latents}, "
                              f"{config.depth}")
        self.output_tokens = config.num_latents
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
    """Linear → exact GELU → Linear (D → D → D), the TokenPacker's q/k/v input maps."""

    def __init__(self, width: int, *, dtype, rngs: nnx.Rngs):
        self.fc1 = Dense(width, width, axes=("vision_embed", "vision_mlp"), dtype=dtype, rngs=rngs)
        self.fc2 = Dense(width, width, axes=("vision_mlp", "vision_embed"), dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(gelu_exact(self.fc1(x)))


def resize_bilinear(grid: jax.Array, side: int) -> jax.Array:
    """(B, a, a, D) → (B, side, side, D) like torch bilinear, align_corners=False.

    `jax.image.resize` antialiases when downsampling unless told not to; torch does not.
    """
    if grid.shape[1] == side:
        return grid
    shape = (grid.shape[0], side, side, grid.shape[-1])
    return jax.image.resize(grid.astype(jnp.float32), shape, method="linear", antialias=False).astype(grid.dtype)


class TokenPacker(nnx.Module):
    """Windowed TokenPacker: g×g queries (g² = num_latents), each attending its s×s key window.

    a = input grid side, s = ceil(a / g); queries q0 = bilinear(grid → g×g); keys and
    values come from the grid, bilinearly resized to (g·s)×(g·s) when a != g·s.
    Q, K, V = LN(MLP(·)); O = multi-head attention (with its own q/k/v/out
    projections, like torch nn.MultiheadAttention) of each query over its window;
    output = q0 + W_out·O (W_out without bias), REFERENCE.md §1.7.
    """

    def __init__(self, config: ResamplerConfig, vision: VisionConfig, *, dtype, rngs: nnx.Rngs):
        width = vision.hidden_size
        _check_heads(width, config.num_heads)
        g = math.isqrt(config.num_latents)
        if g < 1 or g * g != config.num_latents:
            raise ConfigError(f"token_packer needs a square resampler.num_latents, got {config.num_latents}")
        if g > vision.grid:
            raise ConfigError(f"token_packer: {g}×{g} queries exceed the {vision.grid}×{vision.grid} vision grid")
        self.vision = vision
        self.output_tokens = config.num_latents
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
        b, d = grid.shape[0], grid.shape[-1]
        g, s, n = self.queries_side, self.window, self.num_heads
        q0 = resize_bilinear(grid, g).reshape(b, g * g, d)
        kv0 = resize_bilinear(grid, g * s)
        q = _heads(self.query(self.q_norm(self.q_mlp(q0))), n)  # (B, g², N, H)
        k = _heads(self.key(self.k_norm(self.k_mlp(kv0))), n)  # (B, gs, gs, N, H)
        v = _heads(self.value(self.v_norm(self.v_mlp(kv0))), n)

        def windows(t):  # (B, gs, gs, N, H) → (B·g², s², N, H), window (i, j) = rows i·s.., columns j·s..
            t = t.reshape(b, g, s, g, s, n, d // n).transpose(0, 1, 3, 2, 4, 5, 6)
            return t.reshape(b * g * g, s * s, n, d // n)

        o = full_attention(q.reshape(b * g * g, 1, n, d // n), windows(k), windows(v))
        o = self.attention_out(o.reshape(b, g * g, d))
        return constrain(q0 + self.out(o), ACT)


class AvgPoolResampler(nnx.Module):
    def __init__(self, config: ResamplerConfig, vision: VisionConfig):
        if not 1 <= config.pool_stride <= vision.grid:
            raise ConfigError(f"avg_pool: resampler.pool_stride must lie in [1, {vision.grid}] "
                              f"(the vision grid), got {config.pool_stride}")
        self.vision = vision
        self.stride = config.pool_stride
        self.side = vision.grid // config.pool_stride
        self.output_tokens = self.side ** 2 + (vision.output_tokens - vision.grid ** 2)

    def __call__(self, x: jax.Array) -> jax.Array:
        cls, grid = _split_cls(x, self.vision)
        b, d, side, s = grid.shape[0], grid.shape[-1], self.side, self.stride
        pooled = grid[:, : side * s, : side * s].reshape(b, side, s, side, s, d).mean(axis=(2, 4), dtype=jnp.float32)
        pooled = pooled.astype(x.dtype).reshape(b, side * side, d)
        return pooled if cls is None else jnp.concatenate([cls, pooled], axis=1)


def make_resampler(config: ResamplerConfig, vision: VisionConfig, *, dtype=jnp.float32,
                   rngs: nnx.Rngs) -> nnx.Module:
    """The resampler named by config.kind; `__call__((B, n_in, Dv)) -> (B, output_tokens, Dv)`."""
    if config.kind == "identity":
        return IdentityResampler(vision)
    if config.kind == "perceiver":
        return PerceiverResampler(config, vision.hidden_size, dtype=dtype, rngs=rngs)
    if config.kind == "token_packer":
        return TokenPacker(config, vision, dtype=dtype, rngs=rngs)
    if config.kind == "avg_pool":
        return AvgPoolResampler(config, vision)
    raise ConfigError(f"resampler.kind must be identity, perceiver, token_packer or avg_pool, got {config.kind!r}")
