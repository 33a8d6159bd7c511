"""Vision towers: one pre-LN ViT with the DINOv2, CLIP and SigLIP variants, and its HF weight map.

Axis letters: B batch, T tokens, N heads, H head dim, D width, P = patch·patch·3.

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

Position embeddings learned on a G×G grid are resized to the input grid g×g
whenever g != G, in one of two modes that differ by up to 1.4 at 224 px
(JAX_NOTES.md, REFERENCE.md §1.4): "size" = transformers 5
(`F.interpolate(size=(g, g), bicubic, align_corners=False)`), "scale_factor" =
the reference's transformers 4.40 (`scale_factor=(g + 0.1) / G`, so the source
coordinate step is G / (g + 0.1), not G / g). Both use PyTorch's bicubic kernel
(a = -0.75, `CUBIC_PYTORCH`) without antialiasing, in float32.

The conv patch embedding is a reshape + Dense: a stride-p conv with kernel p
sees each p×p patch once, so it is one matmul over flattened patches (rows ×
columns × channels). Pixels beyond grid·p are dropped, as the strided conv does
(SigLIP 384 px with 14 px patches).
"""
from __future__ import annotations

import math
from typing import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxllava.errors import ConfigError, ConversionError
from jaxllava.model.config import VisionConfig
from jaxllava.model.hf_weights import (LINEAR, SAME, Entry, Layout, entries_state_dict, load_entries,
                                       unused_keys)
from jaxllava.model.layers import ACTIVATIONS, Dense, LayerNorm
from jaxllava.model.sharding import constrain

# The activation each variant's released checkpoints use (transformers `hidden_act`).
KIND_ACTIVATION = {"dinov2": "gelu", "clip": "quick_gelu", "siglip": "gelu_pytorch_tanh"}
# transformers `model_type` values of a vision tower's config.json.
HF_MODEL_TYPES = {"dinov2": "dinov2", "clip_vision_model": "clip", "clip": "clip",
                  "siglip_vision_model": "siglip", "siglip": "siglip"}
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
    """Resize a (G, G, D) position grid to (size, size, D) like torch bicubic (see module doc)."""
    source = grid.shape[0]
    if source == size:
        return grid
    grid = grid.astype(jnp.float32)
    method = jax.image.ResizeMethod.CUBIC_PYTORCH
    if mode == "size":
        return jax.image.resize(grid, (size, size, grid.shape[-1]), method=method, antialias=False)
    if mode == "scale_factor":
        scale = jnp.full((2,), (size + 0.1) / source, jnp.float32)
        return jax.image.scale_and_translate(grid, (size, size, grid.shape[-1]), (0, 1), scale,
                                             jnp.zeros((2,), jnp.float32), method=method, antialias=False)
    raise ConfigError(f"vision.pos_interpolation must be 'size' or 'scale_factor', got {mode!r}")


class VisionAttention(nnx.Module):
    def __init__(self, width: int, num_heads: int, *, dtype, rngs: nnx.Rngs):
        if width % num_heads:
            raise ConfigError(f"vision.hidden_size {width} is not divisible by vision.num_heads {num_heads}")
        self.num_heads = num_heads
        qkv_axes = ("vision_embed", "vision_heads")
        self.query = Dense(width, width, axes=qkv_axes, dtype=dtype, rngs=rngs)
        self.key = Dense(width, width, axes=qkv_axes, dtype=dtype, rngs=rngs)
        self.value = Dense(width, width, axes=qkv_axes, dtype=dtype, rngs=rngs)
        self.out = Dense(width, width, axes=("vision_heads", "vision_embed"), dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, t, d = x.shape
        heads = ("batch", "length", "act_heads", None)

        def split(y):
            return constrain(y.reshape(b, t, self.num_heads, d // self.num_heads), heads)

        o = full_attention(split(self.query(x)), split(self.key(x)), split(self.value(x)))
        return self.out(o.reshape(b, t, d))


class VisionMLP(nnx.Module):
    def __init__(self, width: int, hidden: int, activation: Callable, *, dtype, rngs: nnx.Rngs):
        self.fc1 = Dense(width, hidden, axes=("vision_embed", "vision_mlp"), dtype=dtype, rngs=rngs)
        self.fc2 = Dense(hidden, width, axes=("vision_mlp", "vision_embed"), dtype=dtype, rngs=rngs)
        self.activation = activation

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(self.activation(self.fc1(x)))


class VisionBlock(nnx.Module):
    """Pre-LN block: x + s1·attn(norm1(x)), then + s2·mlp(norm2(x)); s = LayerScale (DINOv2 only)."""

    def __init__(self, config: VisionConfig, *, dtype, rngs: nnx.Rngs):
        d, eps = config.hidden_size, config.layer_norm_eps
        self.norm1 = LayerNorm(d, eps=eps, axes=("vision_embed",), dtype=dtype)
        self.attention = VisionAttention(d, config.num_heads, dtype=dtype, rngs=rngs)
        self.norm2 = LayerNorm(d, eps=eps, axes=("vision_embed",), dtype=dtype)
        self.mlp = VisionMLP(d, config.intermediate_size, ACTIVATIONS[KIND_ACTIVATION[config.kind]],
                             dtype=dtype, rngs=rngs)
        if config.kind == "dinov2":
            self.layer_scale1 = nnx.Param(jnp.ones((d,), jnp.float32), axes=("vision_embed",))
            self.layer_scale2 = nnx.Param(jnp.ones((d,), jnp.float32), axes=("vision_embed",))
        else:
            self.layer_scale1 = self.layer_scale2 = None

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.attention(self.norm1(x))
        if self.layer_scale1 is not None:
            h = h * self.layer_scale1[...].astype(h.dtype)
        x = constrain(x + h, ACT)
        h = self.mlp(self.norm2(x))
        if self.layer_scale2 is not None:
            h = h * self.layer_scale2[...].astype(h.dtype)
        return constrain(x + h, ACT)


def validate_vision_config(config: VisionConfig) -> None:
    if config.kind not in KIND_ACTIVATION:
        raise ConfigError(f"vision.kind must be one of {sorted(KIND_ACTIVATION)}, got {config.kind!r}")
    if config.grid < 1 or config.pretrained_image_size // config.patch_size < 1:
        raise ConfigError(f"vision.image_size {config.image_size} / pretrained_image_size "
                          f"{config.pretrained_image_size} must be at least one patch ({config.patch_size} px)")
    if config.feature_select not in ("patch", "cls_patch"):
        raise ConfigError(f"vision.feature_select must be 'patch' or 'cls_patch', got {config.feature_select!r}")
    layers = config.num_layers
    if not -(layers + 1) <= config.feature_layer <= layers:
        raise ConfigError(f"vision.feature_layer must lie in [{-(layers + 1)}, {layers}] for a "
                          f"{layers}-layer tower, got {config.feature_layer}")
    if config.pos_interpolation not in ("size", "scale_factor"):
        raise ConfigError(f"vision.pos_interpolation must be 'size' or 'scale_factor', "
                          f"got {config.pos_interpolation!r}")


class VisionTower(nnx.Module):
    """pixels (B, H, W, 3) float32 normalised, H = W = config.image_size → (B, config.output_tokens, D)."""

    def __init__(self, config: VisionConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        validate_vision_config(config)
        self.config = config
        self.dtype = dtype
        d, p = config.hidden_size, config.patch_size
        self.patch_embed = Dense(p * p * 3, d, axes=(None, "vision_embed"), use_bias=config.kind != "clip",
                                 kernel_init=PATCH_INIT, dtype=dtype, rngs=rngs)
        self.cls_token = (nnx.Param(PATCH_INIT(rngs.params(), (d,), jnp.float32), axes=("vision_embed",))
                          if config.has_cls else None)
        source_grid = config.pretrained_image_size // p
        self.position_embedding = nnx.Param(
            PATCH_INIT(rngs.params(), (source_grid ** 2 + int(config.has_cls), d), jnp.float32),
            axes=(None, "vision_embed"))
        eps = config.layer_norm_eps
        self.pre_norm = (LayerNorm(d, eps=eps, axes=("vision_embed",), dtype=dtype)
                         if config.kind == "clip" else None)
        self.layers = nnx.List([VisionBlock(config, dtype=dtype, rngs=rngs) for _ in range(config.num_layers)])
        self.final_norm = (LayerNorm(d, eps=eps, axes=("vision_embed",), dtype=dtype)
                           if config.kind in ("dinov2", "siglip") else None)
        # CLIP's post_layernorm normalises only the pooled CLS output, which no feature here
        # reads; it is kept (unused) so that an export reproduces the checkpoint.
        self.pooled_norm = (LayerNorm(d, eps=eps, axes=("vision_embed",), dtype=dtype)
                            if config.kind == "clip" else None)

    def _blocks_to_run(self) -> int:
        layer, total = self.config.feature_layer, self.config.num_layers
        if layer == -1:
            return total
        return layer if layer >= 0 else total + 1 + layer

    def position_embeddings(self) -> jax.Array:
        """(T, D) for the configured input grid: [CLS position,] then the resized patch grid."""
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


# ----------------------------------------------------------------------------------------------
# transformers checkpoints


def vision_config_from_hf(config_dict: Mapping, *, image_size: int, pos_interpolation: str = "size",
                          feature_layer: int = -1, feature_select: str = "patch") -> VisionConfig:
    """VisionConfig from a transformers config.json dict (Dinov2Model, CLIP(Vision)Model, Siglip(Vision)Model).

    `image_size` is the input the tower will see (the config's own image_size is
    the grid the position embeddings were trained on). Architectures this tower
    does not implement are rejected by field rather than loaded approximately.
    """
    model_type = config_dict.get("model_type")
    if model_type in ("clip", "siglip"):  # a full two-tower config: take its vision half
        config_dict = config_dict.get("vision_config") or {}
    kind = HF_MODEL_TYPES.get(model_type)
    if kind is None:
        raise ConversionError(f"config.json: model_type {model_type!r} is not a supported vision tower "
                              f"(supported: {sorted(HF_MODEL_TYPES)})")
    defaults = {"dinov2": dict(hidden_act="gelu", layer_norm_eps=1e-6, patch_size=14, image_size=224),
                "clip": dict(hidden_act="quick_gelu", layer_norm_eps=1e-5, patch_size=32, image_size=224),
                "siglip": dict(hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6, patch_size=16,
                               image_size=224)}[kind]

    def field(name, default=None):
        value = config_dict.get(name, defaults.get(name, default))
        if value is None:
            raise ConversionError(f"config.json: field {name!r} is missing")
        return value

    if field("hidden_act") != KIND_ACTIVATION[kind]:
        raise ConversionError(f"config.json: field 'hidden_act' is {field('hidden_act')!r}; the {kind} tower "
                              f"implements {KIND_ACTIVATION[kind]!r}")
    if field("num_channels", 3) != 3:
        raise ConversionError(f"config.json: field 'num_channels' is {field('num_channels')}; only RGB (3)")
    hidden = int(field("hidden_size"))
    if kind == "dinov2":
        for name, supported in (("use_swiglu_ffn", False), ("qkv_bias", True)):
            if config_dict.get(name, supported) != supported:
                raise ConversionError(f"config.json: field {name!r} = {config_dict[name]!r} is not supported "
                                      f"(only {supported!r})")
        intermediate = int(hidden * field("mlp_ratio", 4))
    else:
        intermediate = int(field("intermediate_size"))
    return VisionConfig(
        kind=kind, image_size=image_size, patch_size=int(field("patch_size")), hidden_size=hidden,
        intermediate_size=intermediate, num_layers=int(field("num_hidden_layers")),
        num_heads=int(field("num_attention_heads")), layer_norm_eps=float(field("layer_norm_eps")),
        pretrained_image_size=int(field("image_size")), pos_interpolation=pos_interpolation,
        feature_layer=feature_layer, feature_select=feature_select)


def vision_hf_config(config: VisionConfig) -> dict:
    """The transformers config.json dict of a tower-only model (inverse of vision_config_from_hf)."""
    common = dict(hidden_size=config.hidden_size, num_hidden_layers=config.num_layers,
                  num_attention_heads=config.num_heads, num_channels=3, patch_size=config.patch_size,
                  image_size=config.pretrained_image_size, layer_norm_eps=config.layer_norm_eps,
                  hidden_act=KIND_ACTIVATION[config.kind])
    if config.kind == "dinov2":
        if config.intermediate_size % config.hidden_size:
            raise ConversionError(f"DINOv2 export needs intermediate_size ({config.intermediate_size}) to be a "
                                  f"multiple of hidden_size ({config.hidden_size}): transformers derives it "
                                  f"from mlp_ratio")
        return dict(common, model_type="dinov2", architectures=["Dinov2Model"], qkv_bias=True,
                    mlp_ratio=config.intermediate_size // config.hidden_size, layerscale_value=1.0,
                    use_swiglu_ffn=False, use_mask_token=False)
    if config.kind == "clip":
        return dict(common, model_type="clip_vision_model", architectures=["CLIPVisionModel"],
                    intermediate_size=config.intermediate_size)
    return dict(common, model_type="siglip_vision_model", architectures=["SiglipVisionModel"],
                intermediate_size=config.intermediate_size, vision_use_head=False)


ADD_TWO_AXES = Layout(lambda a: a.reshape(a.shape[2:]), lambda a: a.reshape((1, 1) + a.shape[-1:]))
ADD_ONE_AXIS = Layout(lambda a: a.reshape(a.shape[1:]), lambda a: a.reshape((1,) + a.shape))


def _conv_layout(patch: int) -> Layout:
    # torch Conv2d weight (D, C, p, p) ↔ our (p·p·C, D) over patches flattened as (row, column, channel)
    return Layout(lambda w: w.transpose(2, 3, 1, 0).reshape(-1, w.shape[0]),
                   lambda k: k.reshape(patch, patch, 3, -1).transpose(3, 2, 0, 1))


def _dense(hf_name: str, dense: Dense) -> list:
    entries = [(f"{hf_name}.weight", dense.kernel, LINEAR)]
    if dense.bias is not None:
        entries.append((f"{hf_name}.bias", dense.bias, SAME))
    return entries


def _norm(hf_name: str, norm: LayerNorm) -> list:
    return [(f"{hf_name}.weight", norm.scale, SAME), (f"{hf_name}.bias", norm.bias, SAME)]


def vision_weight_map(tower: VisionTower) -> list[Entry]:
    """(name relative to the tower, parameter, layout) for every parameter, in transformers' legacy names.

    DINOv2 uses the names `Dinov2Model.save_pretrained` writes (`attention.attention.query`);
    CLIP/SigLIP names are relative to the `vision_model.` module (see load_hf_vision_weights).
    """
    conv = _conv_layout(tower.config.patch_size)
    if tower.config.kind == "dinov2":
        entries = [("embeddings.cls_token", tower.cls_token, ADD_TWO_AXES),
                   ("embeddings.position_embeddings", tower.position_embedding, ADD_ONE_AXIS),
                   ("embeddings.patch_embeddings.projection.weight", tower.patch_embed.kernel, conv),
                   ("embeddings.patch_embeddings.projection.bias", tower.patch_embed.bias, SAME)]
        for i, block in enumerate(tower.layers):
            n = f"encoder.layer.{i}"
            entries += (_norm(f"{n}.norm1", block.norm1)
                        + _dense(f"{n}.attention.attention.query", block.attention.query)
                        + _dense(f"{n}.attention.attention.key", block.attention.key)
                        + _dense(f"{n}.attention.attention.value", block.attention.value)
                        + _dense(f"{n}.attention.output.dense", block.attention.out)
                        + [(f"{n}.layer_scale1.lambda1", block.layer_scale1, SAME)]
                        + _norm(f"{n}.norm2", block.norm2)
                        + _dense(f"{n}.mlp.fc1", block.mlp.fc1) + _dense(f"{n}.mlp.fc2", block.mlp.fc2)
                        + [(f"{n}.layer_scale2.lambda1", block.layer_scale2, SAME)])
        return entries + _norm("layernorm", tower.final_norm)

    entries = [("embeddings.patch_embedding.weight", tower.patch_embed.kernel, conv),
               ("embeddings.position_embedding.weight", tower.position_embedding, SAME)]
    if tower.patch_embed.bias is not None:
        entries.append(("embeddings.patch_embedding.bias", tower.patch_embed.bias, SAME))
    if tower.cls_token is not None:
        entries.append(("embeddings.class_embedding", tower.cls_token, SAME))
    if tower.pre_norm is not None:
        entries += _norm("pre_layrnorm", tower.pre_norm)
    for i, block in enumerate(tower.layers):
        n = f"encoder.layers.{i}"
        entries += (_norm(f"{n}.layer_norm1", block.norm1)
                    + _dense(f"{n}.self_attn.q_proj", block.attention.query)
                    + _dense(f"{n}.self_attn.k_proj", block.attention.key)
                    + _dense(f"{n}.self_attn.v_proj", block.attention.value)
                    + _dense(f"{n}.self_attn.out_proj", block.attention.out)
                    + _norm(f"{n}.layer_norm2", block.norm2)
                    + _dense(f"{n}.mlp.fc1", block.mlp.fc1) + _dense(f"{n}.mlp.fc2", block.mlp.fc2))
    post_norm = tower.final_norm if tower.final_norm is not None else tower.pooled_norm
    return entries + _norm("post_layernorm", post_norm)


def _tower_prefix(tower: VisionTower, tensors, prefix: str) -> str:
    # transformers < 5 and two-tower CLIPModel/SiglipModel checkpoints (and LLaVA's
    # vision_tower.vision_tower.*) nest CLIP/SigLIP under `vision_model.`; transformers 5's
    # CLIPVisionModel.save_pretrained does not. Both are read.
    nested = f"{prefix}vision_model."
    if tower.config.kind != "dinov2" and f"{nested}embeddings.patch_embedding.weight" in tensors:
        return nested
    return prefix


def load_hf_vision_weights(tower: VisionTower, tensors, *, prefix: str = "") -> list[str]:
    """Load a transformers vision checkpoint (a CheckpointTensors or any name → array mapping).

    Strict: a missing tensor or a shape mismatch raises ConversionError naming the
    tensor and both shapes. Returns the unused checkpoint keys under `prefix`
    (DINOv2 mask_token, SigLIP head.*, or anything unexpected)
    for the caller to check.
    """
    used = load_entries(vision_weight_map(tower), tensors, prefix=_tower_prefix(tower, tensors, prefix))
    return unused_keys(tensors, used, prefix)


def vision_hf_state_dict(tower: VisionTower, *, prefix: str = "") -> dict[str, np.ndarray]:
    """Tower parameters under transformers' legacy names (CLIP/SigLIP nested in `vision_model.`),
    which transformers 4 and 5 both load."""
    inner = prefix if tower.config.kind == "dinov2" else f"{prefix}vision_model."
    return entries_state_dict(vision_weight_map(tower), prefix=inner)
