"""Model configuration: decoder, vision tower, resampler, projector, and their composition.

`ModelConfig.image_tokens` is the one place where the image-token count N is
derived (tower grid → resampler output). The data pipeline expands `<image>` to
exactly N placeholders from this number, and the model overwrites exactly those N
positions; the reference never saved this number and changed its default three
times (REFERENCE.md §1.8, pitfall 29).
"""
from __future__ import annotations

import dataclasses
import re
from typing import Literal, Optional


ComputeDtype = Literal["float32", "bfloat16"]
AttentionImpl = Literal["auto", "xla", "cudnn"]
Remat = Literal["none", "full", "save_dots"]


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama-3 frequency scaling (transformers `rope_type: llama3`)."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int = 32000
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_layers: int = 12
    num_heads: int = 12
    num_kv_heads: int = 12
    head_dim: Optional[int] = None  # None: hidden_size // num_heads
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: Optional[RopeScaling] = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim or self.hidden_size // self.num_heads


VisionKind = Literal["dinov2", "clip", "siglip"]


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    kind: VisionKind = "dinov2"
    image_size: int = 224  # the input the tower sees (the data pipeline resizes to this)
    patch_size: int = 14
    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_layers: int = 24
    num_heads: int = 16
    layer_norm_eps: float = 1e-6
    # Size of the learned position-embedding grid, in pixels (DINOv2: 518 = 37 × 14;
    # CLIP/SigLIP: equal to image_size, so no interpolation).
    pretrained_image_size: int = 518
    # DINOv2 position-embedding interpolation: "size" (transformers 5: bicubic to the
    # target grid) or "scale_factor" (the reference's transformers 4.40:
    # scale_factor=(n+0.1)/37). They differ by up to 1.40 at 224 px (JAX_NOTES.md).
    pos_interpolation: Literal["size", "scale_factor"] = "size"
    # -1: the final normalised output (transformers' last_hidden_state, what the
    # reference used); k >= 0: hidden_states[k] (0 = embeddings), before the final norm.
    feature_layer: int = -1
    feature_select: Literal["patch", "cls_patch"] = "patch"

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def has_cls(self) -> bool:
        return self.kind != "siglip"

    @property
    def output_tokens(self) -> int:
        extra = 1 if (self.feature_select == "cls_patch" and self.has_cls) else 0
        return self.grid * self.grid + extra


ResamplerKind = Literal["identity", "perceiver", "token_packer", "avg_pool"]


@dataclasses.dataclass(frozen=True)
class ResamplerConfig:
    kind: ResamplerKind = "identity"
    num_latents: int = 64  # perceiver latents; token_packer queries (a square number)
    depth: int = 2  # perceiver layers
    num_heads: int = 8
    ff_mult: int = 4  # perceiver feed-forward multiplier
    pool_stride: int = 2  # avg_pool window and stride over the patch grid
    layer_norm_eps: float = 1e-5


@dataclasses.dataclass(frozen=True)
class ProjectorConfig:
    kind: str = "mlp2x_gelu"  # "linear" | "mlp{k}x_gelu" (k linear layers, exact GELU between)

    @property
    def depth(self) -> int:
        if self.kind == "linear":
            return 1
        match = re.fullmatch(r"mlp(\d+)x_gelu", self.kind)
        if not match or int(match.group(1)) < 1:
            raise ValueError(f"projector kind must be 'linear' or 'mlp{{k}}x_gelu', got {self.kind!r}")
        return int(match.group(1))


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    lm: LlamaConfig = dataclasses.field(default_factory=LlamaConfig)
    vision: Optional[VisionConfig] = None  # None: a text-only model with no vision parameters
    resampler: ResamplerConfig = dataclasses.field(default_factory=ResamplerConfig)
    projector: ProjectorConfig = dataclasses.field(default_factory=ProjectorConfig)
    dtype: ComputeDtype = "bfloat16"  # compute; parameters stay float32
    attention_impl: AttentionImpl = "auto"  # auto: cudnn on GPU when supported
    # Rematerialisation of decoder layers: "none", "full" (recompute everything), or
    # "save_dots" (keep matmul outputs without batch dims, recompute the rest).
    remat: Remat = "none"

    @property
    def image_tokens(self) -> int:
        """N: how many placeholder positions one image occupies in the sequence."""
        return 0 if self.vision is None else image_token_count(self.vision, self.resampler)


def image_token_count(vision: VisionConfig, resampler: ResamplerConfig) -> int:
    """N, the number of visual vectors one image becomes (tower grid → resampler): the one
    place it is derived. The data pipeline writes exactly N placeholders per image, the
    resamplers output exactly N vectors, and the model overwrites exactly those N positions."""
    kind = resampler.kind
    if kind == "identity":
        return vision.output_tokens
    if kind in ("perceiver", "token_packer"):
        return resampler.num_latents
    side = vision.grid // resampler.pool_stride  # avg_pool: remainder rows and columns dropped
    return side * side + (vision.output_tokens - vision.grid ** 2)
