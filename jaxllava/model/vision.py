"""Vision towers: one pre-LN ViT with the DINOv2, CLIP and SigLIP variants, and its transformers key map.

Axis letters: see jaxllava/__init__.py.

Variants (transformers `Dinov2Model`, `CLIPVisionModel`, `SiglipVisionModel`):
  dinov2  CLS token, LayerScale on both residual branches, exact-erf GELU,
          final LayerNorm on every token (= last_hidden_state). The mask token
          is a pre-training parameter and is not loaded.
  clip    class embedding, `pre_layrnorm` before the blocks, quick-GELU, no
          bias on the patch projection. Its `post_layernorm` normalises only the
          pooled CLS output, so transformers' last_hidden_state is NOT normed and
          neither is ours (LLaVA reads hidden_states[-2] anyway); the post norm
          is loaded and kept only for export.
  siglip  no CLS, tanh-GELU, post LayerNorm on every token (= last_hidden_state).
          The attention-pooling `head.*` produces a pooled embedding that no
          LLaVA-style model reads, so it is not loaded (its keys come back as
          unused) and exports are written with `vision_use_head: false`.

Feature selection (VisionConfig): `feature_layer` -1 = transformers'
`last_hidden_state` (post-norm for DINOv2 and SigLIP, last block output for
CLIP); k >= 0 = `hidden_states[k]` (0 = the block input: embeddings, after
`pre_layrnorm` for CLIP); k <= -2 = `hidden_states[k]` counted from the end, as
LLaVA's `mm_vision_select_layer=-2`. Blocks after the selected one are not run.
`feature_select` "patch" drops the CLS token, "cls_patch" keeps it in front.

Position embeddings learned on an L×L grid are resized to the input grid g×g
whenever g != L, in one of two modes that differ by up to 1.4 at 224 px
(docs/reference.md#position-embedding-interpolation): "size" = transformers 5
(`F.interpolate(size=(g, g), bicubic, align_corners=False)`), "scale_factor" =
the reference's transformers 4.40 (`scale_factor=(g + 0.1) / L`, so the source
coordinate step is L / (g + 0.1), not L / g). Both use PyTorch's bicubic kernel
(a = -0.75, `CUBIC_PYTORCH`) without antialiasing, in float32.

The conv patch embedding is a reshape + Dense: a stride-p conv with kernel p
sees each p×p patch once, so it is one matmul over flattened patches (rows ×
columns × channels). Pixels beyond grid·p are dropped, as the strided conv does
(SigLIP 384 px with 14 px patches).

Checkpoint names: DINOv2 uses the names `Dinov2Model.save_pretrained` writes
(`attention.attention.query`); CLIP and SigLIP nest under `vision_model.`, the
legacy layout that transformers 4 and 5 both load. Each module declares only the
names that differ from its own (jaxllava.model.hf_keys).
"""
from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from jaxllava.model.config import VisionConfig
from jaxllava.model.hf_keys import Layout
from jaxllava.model.layers import ACTIVATIONS, Dense, LayerNorm
from jaxllava.model.sharding import constrain

# The activation each variant's released checkpoints use (transformers `hidden_act`).
KIND_ACTIVATION = {"dinov2": "gelu", "clip": "quick_gelu", "siglip": "gelu_pytorch_tanh"}
# The module transformers nests CLIP and SigLIP tower tensors under (the legacy layout).
CLIP_SCOPE = "vision_model."
ACT = ("batch", "length", "act_embed")
PATCH_INIT = nnx.initializers.truncated_normal(stddev=0.02)


def full_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """Unmasked softmax attention. q: (B, T, N, H); k, v: (B, S, N, H) → (B, T, N, H).

    Logits and softmax run in float32 whatever the input dtype.
    """
    scale = q.shape[-1] ** -0.5
    logits = jnp.einsum("btnh,bsnh->bnts", q, k, preferred_element_type=jnp.float32) * scale
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bnts,bsnh->btnh", probs, v)


def resize_position_grid(grid: jax.Array, size: int, mode: str) -> jax.Array:
    """Resize an (L, L, E) position grid to (size, size, E) like torch bicubic (see module doc)."""
    source = grid.shape[0]
    if source == size:
        return grid
    grid = grid.astype(jnp.float32)
    method = jax.image.ResizeMethod.CUBIC_PYTORCH
    if mode == "size":
        return jax.image.resize(grid, (size, size, grid.shape[-1]), method=method, antialias=False)
    scale = jnp.full((2,), (size + 0.1) / source, jnp.float32)  # "scale_factor"
    return jax.image.scale_and_translate(grid, (size, size, grid.shape[-1]), (0, 1), scale,
                                         jnp.zeros((2,), jnp.float32), method=method, antialias=False)


class VisionAttention(nnx.Module):
    def __init__(self, width: int, num_heads: int, *, dtype, rngs: nnx.Rngs):
        self.num_heads = num_heads
        qkv_axes = ("vision_embed", "vision_heads")
        self.query = Dense(width, width, axes=qkv_axes, dtype=dtype, rngs=rngs)
        self.key = Dense(width, width, axes=qkv_axes, dtype=dtype, rngs=rngs)
        self.value = Dense(width, width, axes=qkv_axes, dtype=dtype, rngs=rngs)
        self.out = Dense(width, width, axes=("vision_heads", "vision_embed"), dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, t, e = x.shape
        heads = ("batch", "length", "act_heads", None)

        def split(y):
            return constrain(y.reshape(b, t, self.num_heads, e // self.num_heads), heads)

        o = full_attention(split(self.query(x)), split(self.key(x)), split(self.value(x)))
        return self.out(o.reshape(b, t, e))


class VisionMLP(nnx.Module):
    def __init__(self, width: int, hidden: int, activation: Callable, *, dtype, rngs: nnx.Rngs):
        self.fc1 = Dense(width, hidden, axes=("vision_embed", "vision_mlp"), dtype=dtype, rngs=rngs)
        self.fc2 = Dense(hidden, width, axes=("vision_mlp", "vision_embed"), dtype=dtype, rngs=rngs)
        self.activation = activation

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(self.activation(self.fc1(x)))


_CLIP_BLOCK_RENAMES = {"norm1": "layer_norm1", "norm2": "layer_norm2",
                       "attention.query": "self_attn.q_proj", "attention.key": "self_attn.k_proj",
                       "attention.value": "self_attn.v_proj", "attention.out": "self_attn.out_proj"}


class VisionBlock(nnx.Module):
    """Pre-LN block: x + s1·attn(norm1(x)), then + s2·mlp(norm2(x)); s = LayerScale (DINOv2 only)."""

    HF_RENAMES_BY_KIND = {
        "dinov2": {"attention.query": "attention.attention.query", "attention.key": "attention.attention.key",
                   "attention.value": "attention.attention.value", "attention.out": "attention.output.dense",
                   "layer_scale1": "layer_scale1.lambda1", "layer_scale2": "layer_scale2.lambda1"},
        "clip": _CLIP_BLOCK_RENAMES,
        "siglip": _CLIP_BLOCK_RENAMES,
    }

    def __init__(self, config: VisionConfig, *, dtype, rngs: nnx.Rngs):
        e, eps = config.hidden_size, config.layer_norm_eps
        self.kind = config.kind
        self.norm1 = LayerNorm(e, eps=eps, axes=("vision_embed",), dtype=dtype)
        self.attention = VisionAttention(e, config.num_heads, dtype=dtype, rngs=rngs)
        self.norm2 = LayerNorm(e, eps=eps, axes=("vision_embed",), dtype=dtype)
        self.mlp = VisionMLP(e, config.intermediate_size, ACTIVATIONS[KIND_ACTIVATION[config.kind]],
                             dtype=dtype, rngs=rngs)
        if config.kind == "dinov2":
            self.layer_scale1 = nnx.Param(jnp.ones((e,), jnp.float32), axes=("vision_embed",))
            self.layer_scale2 = nnx.Param(jnp.ones((e,), jnp.float32), axes=("vision_embed",))
        else:
            self.layer_scale1 = self.layer_scale2 = None

    def hf_renames(self) -> dict[str, str]:
        return self.HF_RENAMES_BY_KIND[self.kind]

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.attention(self.norm1(x))
        if self.layer_scale1 is not None:
            h = h * self.layer_scale1[...].astype(h.dtype)
        x = constrain(x + h, ACT)
        h = self.mlp(self.norm2(x))
        if self.layer_scale2 is not None:
            h = h * self.layer_scale2[...].astype(h.dtype)
        return constrain(x + h, ACT)


_CLIP_TOWER_RENAMES = {name: CLIP_SCOPE + hf for name, hf in {
    "patch_embed": "embeddings.patch_embedding", "cls_token": "embeddings.class_embedding",
    "position_embedding": "embeddings.position_embedding.weight", "pre_norm": "pre_layrnorm",
    "layers": "encoder.layers", "final_norm": "post_layernorm", "pooled_norm": "post_layernorm"}.items()}

# transformers keeps DINOv2's CLS token as (1, 1, E) and its position table as (1, T, E).
ADD_TWO_AXES = Layout(lambda a: a.reshape(a.shape[2:]), lambda a: a.reshape((1, 1) + a.shape[-1:]))
ADD_ONE_AXIS = Layout(lambda a: a.reshape(a.shape[1:]), lambda a: a.reshape((1,) + a.shape))


def conv_patch_layout(patch: int) -> Layout:
    """torch Conv2d weight (E, 3, p, p) ↔ our (P, E) kernel over patches flattened as (row, column, channel)."""
    return Layout(lambda w: w.transpose(2, 3, 1, 0).reshape(-1, w.shape[0]),
                  lambda k: k.reshape(patch, patch, 3, -1).transpose(3, 2, 0, 1))


class VisionTower(nnx.Module):
    """pixels (B, H, W, 3) float32 normalised, H = W = config.image_size → (B, config.output_tokens, E)."""

    HF_RENAMES_BY_KIND = {
        "dinov2": {"cls_token": "embeddings.cls_token", "position_embedding": "embeddings.position_embeddings",
                   "patch_embed": "embeddings.patch_embeddings.projection", "layers": "encoder.layer",
                   "final_norm": "layernorm"},
        "clip": _CLIP_TOWER_RENAMES,
        "siglip": _CLIP_TOWER_RENAMES,
    }

    def __init__(self, config: VisionConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.config = config
        self.dtype = dtype
        e, p = config.hidden_size, config.patch_size
        self.patch_embed = Dense(p * p * 3, e, axes=(None, "vision_embed"), use_bias=config.kind != "clip",
                                 kernel_init=PATCH_INIT, dtype=dtype, rngs=rngs)
        self.cls_token = (nnx.Param(PATCH_INIT(rngs.params(), (e,), jnp.float32), axes=("vision_embed",))
                          if config.has_cls else None)
        source_grid = config.pretrained_image_size // p
        self.position_embedding = nnx.Param(
            PATCH_INIT(rngs.params(), (source_grid ** 2 + int(config.has_cls), e), jnp.float32),
            axes=(None, "vision_embed"))
        eps = config.layer_norm_eps
        self.pre_norm = (LayerNorm(e, eps=eps, axes=("vision_embed",), dtype=dtype)
                         if config.kind == "clip" else None)
        self.layers = nnx.List([VisionBlock(config, dtype=dtype, rngs=rngs) for _ in range(config.num_layers)])
        self.final_norm = (LayerNorm(e, eps=eps, axes=("vision_embed",), dtype=dtype)
                           if config.kind in ("dinov2", "siglip") else None)
        # CLIP's post_layernorm normalises only the pooled CLS output, which no feature here
        # reads; it is kept (unused) so that an export reproduces the checkpoint.
        self.pooled_norm = (LayerNorm(e, eps=eps, axes=("vision_embed",), dtype=dtype)
                            if config.kind == "clip" else None)

    def hf_renames(self) -> dict[str, str]:
        return self.HF_RENAMES_BY_KIND[self.config.kind]

    def hf_layouts(self) -> dict[str, Layout]:
        conv = {"patch_embed.kernel": conv_patch_layout(self.config.patch_size)}
        if self.config.kind == "dinov2":
            return {**conv, "cls_token": ADD_TWO_AXES, "position_embedding": ADD_ONE_AXIS}
        return conv

    def _blocks_to_run(self) -> int:
        layer, total = self.config.feature_layer, self.config.num_layers
        if layer == -1:
            return total
        return layer if layer >= 0 else total + 1 + layer

    def position_embeddings(self) -> jax.Array:
        """(T, E) for the configured input grid: [CLS position,] then the resized patch grid."""
        table = self.position_embedding[...]
        cls, patches = table[: int(self.config.has_cls)], table[int(self.config.has_cls):]
        source = math.isqrt(patches.shape[0])
        grid = resize_position_grid(patches.reshape(source, source, -1), self.config.grid,
                                    self.config.pos_interpolation)
        return jnp.concatenate([cls, grid.reshape(-1, grid.shape[-1]).astype(table.dtype)], axis=0)

    def embed(self, pixels: jax.Array) -> jax.Array:
        c = self.config
        b, height, width, channels = pixels.shape
        if (height, width, channels) != (c.image_size, c.image_size, 3):
            raise ValueError(f"vision tower expects pixels (B, {c.image_size}, {c.image_size}, 3), "
                             f"got {tuple(pixels.shape)}")
        g, p = c.grid, c.patch_size
        patches = pixels[:, : g * p, : g * p].reshape(b, g, p, g, p, 3).transpose(0, 1, 3, 2, 4, 5)
        x = self.patch_embed(patches.reshape(b, g * g, p * p * 3))
        if self.cls_token is not None:
            cls = jnp.broadcast_to(self.cls_token[...].astype(x.dtype), (b, 1, x.shape[-1]))
            x = jnp.concatenate([cls, x], axis=1)
        x = x + self.position_embeddings().astype(x.dtype)
        if self.pre_norm is not None:
            x = self.pre_norm(x)
        return constrain(x, ACT)

    def hidden_states(self, pixels: jax.Array, num_blocks: int | None = None) -> list[jax.Array]:
        """transformers' `hidden_states`: [block input, block 1 output, ...], none final-normed.

        Runs the first `num_blocks` blocks (all by default); CLS included when the tower has one.
        """
        states = [self.embed(pixels)]
        for block in self.layers[: self.config.num_layers if num_blocks is None else num_blocks]:
            states.append(block(states[-1]))
        return states

    def __call__(self, pixels: jax.Array) -> jax.Array:
        x = self.hidden_states(pixels, self._blocks_to_run())[-1]
        if self.config.feature_layer == -1 and self.final_norm is not None:
            x = self.final_norm(x)
        if self.config.has_cls and self.config.feature_select == "patch":
            x = x[:, 1:]
        return x
