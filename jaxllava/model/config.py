"""Model configuration: decoder, vision tower, resampler, projector, and their composition.

`ModelConfig.image_tokens` is the one place where the image-token count I is
derived (tower grid or feature count → resampler output → × projector.expand;
with `lape` the projector comes before the resampler and expand is 1, which gives
the same count; axis letters: see jaxllava/__init__.py).
The data pipeline expands `<image>` to exactly I placeholders from this number, and
the model overwrites exactly those I positions; the reference never saved this
number and changed its default three times (README pitfall 29).
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Literal, Optional

from jaxllava.schema import at_least, positive, require

ComputeDtype = Literal["float32", "bfloat16"]
AttentionImpl = Literal["auto", "xla", "cudnn"]
Remat = Literal["none", "full", "save_dots"]


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama-3 frequency scaling (transformers `rope_type: llama3`)."""

    factor: float = 8.0  # the frequencies of long wavelengths are divided by this
    low_freq_factor: float = 1.0  # wavelengths above original_max_position_embeddings / this are scaled
    high_freq_factor: float = 4.0  # wavelengths below original_max_position_embeddings / this are kept
    original_max_position_embeddings: int = 8192  # the position range the model was pretrained with

    def __post_init__(self):
        positive(self, "factor", "low_freq_factor", "high_freq_factor")
        at_least(self, 1, "original_max_position_embeddings")
        # The smoothing between the two bands divides by their difference.
        require(self.high_freq_factor > self.low_freq_factor, "high_freq_factor",
                f"must be > low_freq_factor ({self.low_freq_factor}), got {self.high_freq_factor}")


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int = 32000  # embedding rows; must cover the tokenizer with its image placeholders (checked by train)
    hidden_size: int = 768  # width of the residual stream and the embeddings
    intermediate_size: int = 3072  # width of each SwiGLU MLP
    num_layers: int = 12  # decoder layers
    num_heads: int = 12  # query heads
    num_kv_heads: int = 12  # key/value heads (grouped-query attention when fewer than num_heads)
    head_dim: Optional[int] = None  # None: hidden_size // num_heads
    rms_norm_eps: float = 1e-5  # epsilon of every RMSNorm
    rope_theta: float = 10000.0  # base of the rotary position embedding frequencies
    rope_scaling: Optional[RopeScaling] = None  # None: plain rotary embeddings; a mapping: Llama-3 scaling
    max_position_embeddings: int = 2048  # positions the LM takes; the largest data bucket must fit (checked)
    tie_word_embeddings: bool = False  # True: the output head is the input embedding matrix (no lm_head)
    attention_bias: bool = False  # biases on the query, key, value and output projections
    mlp_bias: bool = False  # biases on the MLP projections

    def __post_init__(self):
        at_least(self, 1, "vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                 "num_kv_heads", "max_position_embeddings")
        at_least(self, 1, "head_dim", null_ok=True)
        require(self.num_heads % self.num_kv_heads == 0, "num_kv_heads",
                f"must divide num_heads ({self.num_heads}): each key/value head serves a whole group of "
                f"query heads, got {self.num_kv_heads}")
        if self.head_dim is None:
            require(self.hidden_size % self.num_heads == 0, "hidden_size",
                    f"must be a multiple of num_heads ({self.num_heads}) when head_dim is null, "
                    f"got {self.hidden_size}")
        require(self.resolved_head_dim % 2 == 0, "head_dim" if self.head_dim else "hidden_size",
                f"gives an odd head_dim {self.resolved_head_dim}; rotary embeddings rotate pairs of "
                f"dimensions, so it must be even")
        positive(self, "rms_norm_eps", "rope_theta")

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim or self.hidden_size // self.num_heads


VisionKind = Literal["dinov2", "clip", "siglip", "features"]


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    # Tower architecture (transformers' Dinov2, CLIP or SigLIP vision model), or "features":
    # no tower, the model reads precomputed (P, E) feature vectors per image (BabyLM's DINOv2
    # states); for features only `tokens` and `hidden_size` matter, every other field is ignored.
    kind: VisionKind = "dinov2"
    image_size: int = 224  # the input the tower sees (the data pipeline resizes to this); ignored by features
    patch_size: int = 14  # pixels per patch side (grid: image_size // patch_size a side); ignored by features
    hidden_size: int = 1024  # tower width, or the feature width E for features (the width the resampler works in)
    # kind features only: P, the feature vectors per image (1 for one global vector, g² for a
    # g×g patch grid, which avg_pool and token_packer need); a tower's P follows from its grid.
    tokens: int = 1
    intermediate_size: int = 4096  # width of each tower MLP
    num_layers: int = 24  # transformer blocks
    num_heads: int = 16  # attention heads
    layer_norm_eps: float = 1e-6  # epsilon of every LayerNorm
    # Size of the learned position-embedding grid, in pixels (DINOv2: 518 = 37 × 14;
    # CLIP/SigLIP: equal to image_size, so no interpolation).
    pretrained_image_size: int = 518
    # DINOv2 position-embedding interpolation: "size" (transformers 5: bicubic to the
    # target grid) or "scale_factor" (the reference's transformers 4.40:
    # scale_factor=(n+0.1)/37). They differ by up to 1.40 at 224 px
    # (docs/reference.md#position-embedding-interpolation).
    pos_interpolation: Literal["size", "scale_factor"] = "size"
    # -1: the final normalised output (transformers' last_hidden_state, what the
    # reference used); k >= 0: hidden_states[k] (0 = embeddings), before the final norm.
    feature_layer: int = -1
    feature_select: Literal["patch", "cls_patch"] = "patch"  # cls_patch: the CLS token too, in front (SigLIP has none)

    def __post_init__(self):
        at_least(self, 1, "hidden_size", "tokens")
        if self.kind == "features":
            return  # the tower fields are ignored, so their values cannot be wrong
        at_least(self, 1, "patch_size", "intermediate_size", "num_layers", "num_heads")
        for name in ("image_size", "pretrained_image_size"):
            value = getattr(self, name)
            require(value >= self.patch_size, name,
                    f"must be at least one patch (patch_size {self.patch_size} px), got {value}")
        require(self.hidden_size % self.num_heads == 0, "num_heads",
                f"must divide hidden_size ({self.hidden_size}), got {self.num_heads}")
        layers = self.num_layers
        require(-(layers + 1) <= self.feature_layer <= layers, "feature_layer",
                f"must lie in [{-(layers + 1)}, {layers}] for a {layers}-layer tower, got {self.feature_layer}")
        positive(self, "layer_norm_eps")

    @property
    def grid(self) -> int:
        """Side of the square patch grid; for features, of the g×g grid the P vectors form (ModelConfig
        refuses a grid resampler when P is not a square)."""
        if self.kind == "features":
            return math.isqrt(self.tokens)
        return self.image_size // self.patch_size

    @property
    def has_cls(self) -> bool:
        return self.kind not in ("siglip", "features")

    @property
    def output_tokens(self) -> int:
        """Vectors per image the resampler receives."""
        if self.kind == "features":
            return self.tokens
        extra = 1 if (self.feature_select == "cls_patch" and self.has_cls) else 0
        return self.grid * self.grid + extra


ResamplerKind = Literal["identity", "perceiver", "token_packer", "avg_pool"]


@dataclasses.dataclass(frozen=True)
class ResamplerConfig:
    kind: ResamplerKind = "identity"  # tower tokens or features → image tokens; image_token_count gives how many
    num_latents: int = 64  # perceiver latents; token_packer queries (a square number)
    depth: int = 2  # perceiver layers
    num_heads: int = 8  # perceiver and token_packer attention heads; must divide vision.hidden_size
    ff_mult: int = 4  # perceiver feed-forward multiplier
    pool_stride: int = 2  # avg_pool window and stride over the patch grid
    layer_norm_eps: float = 1e-5  # epsilon of the resampler's LayerNorms

    def __post_init__(self):
        at_least(self, 1, "num_latents", "depth", "num_heads", "ff_mult", "pool_stride")
        positive(self, "layer_norm_eps")


PROJECTOR_KIND = re.compile(r"mlp([1-9]\d*)x_gelu")


@dataclasses.dataclass(frozen=True)
class ProjectorConfig:
    kind: str = "mlp2x_gelu"  # "linear" | "mlp{k}x_gelu" (k linear layers, exact GELU between)
    # Output tokens per input token: the last linear layer outputs expand·D and each vector becomes
    # `expand` consecutive image tokens, so one global image vector (BabyLM's features) can fill
    # several; multiplies the image-token count. The reference layout has only 1.
    expand: int = 1

    def __post_init__(self):
        at_least(self, 1, "expand")
        require(self.kind == "linear" or PROJECTOR_KIND.fullmatch(self.kind) is not None, "kind",
                f"projector kind must be 'linear' or 'mlp{{k}}x_gelu' with k >= 1 linear layers "
                f"(e.g. 'mlp2x_gelu'), got {self.kind!r}")

    @property
    def depth(self) -> int:
        return 1 if self.kind == "linear" else int(PROJECTOR_KIND.fullmatch(self.kind).group(1))


@dataclasses.dataclass(frozen=True)
class LapeConfig:
    """The reference's stage-2 spatial/temporal embeddings added to image features (jaxllava/model/lape.py)."""

    tokens: int = 100  # rows of the height and width tables (the reference's spatial_token_num)
    # Rows of the temporal tables; null: `tokens`. The reference sized them by its frame count
    # (--num_frames, 100 by default), and frame t of a video reads row t.
    temporal_tokens: Optional[int] = None

    def __post_init__(self):
        at_least(self, 1, "tokens")
        at_least(self, 1, "temporal_tokens", null_ok=True)

    @property
    def temporal_count(self) -> int:
        return self.tokens if self.temporal_tokens is None else self.temporal_tokens


@dataclasses.dataclass(frozen=True)
class VideoConfig:
    """How a video becomes visual vectors (jaxllava/model/llava.py `encode_video`). Each of `frames`
    frames goes through the image path (I vectors, a g×g grid); then two spans are made, the
    reference's fast and slow ones (docs/reference.md#video).

      fast  every frame, its grid resized to √fast_tokens a side: frames · fast_tokens vectors
      slow  the frames resampled in time to slow_frames (linear, like the reference's temporal
            packer), each keeping its whole grid: slow_frames · I vectors

    Both are parameter-free; the reference's learned fast/slow token packers are not ported."""

    frames: int = 4  # T, frames per video; the data pipeline's frame rule must give exactly this many
    fast_tokens: int = 4  # vectors per frame in the fast span, a square number
    slow_frames: int = 2  # frames of the slow span (≤ frames)

    def __post_init__(self):
        at_least(self, 2, "frames")  # the reference's even spacing divides by frames − 1
        at_least(self, 1, "fast_tokens", "slow_frames")
        side = math.isqrt(self.fast_tokens)
        require(side * side == self.fast_tokens, "fast_tokens",
                f"each frame's grid is resized to a square, so fast_tokens must be a square number (e.g. "
                f"{side * side} or {(side + 1) ** 2}), got {self.fast_tokens}")
        require(self.slow_frames <= self.frames, "slow_frames",
                f"the slow span resamples the {self.frames} frames to fewer, got {self.slow_frames}")


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
    # null: no LAPE (stage 1). A mapping: the reference's stage-2 spatial/temporal embeddings,
    # added to the projected image grid, and the image path becomes tower → projector → LAPE →
    # resampler, with the resampler in the LM's width (docs/reference.md#stage-2-lape-embeddings).
    # Like resampler and projector, ignored by a text-only model (model.vision null).
    lape: Optional[LapeConfig] = None
    # null: video records are refused. A mapping: the model reads videos (frames, fast and slow
    # spans; VideoConfig). Needs a vision tower.
    video: Optional[VideoConfig] = None

    def __post_init__(self):
        vision, resampler = self.vision, self.resampler
        if vision is None:  # a text-only model builds no resampler, projector or LAPE
            require(self.video is None, "video", "a video is read by the vision tower: configure model.vision")
            return
        if self.lape is not None:
            self._check_lape()
        if self.video is not None:
            self._check_video()
        if vision.kind == "features":
            grid = f"the {vision.grid}×{vision.grid} feature grid (vision.tokens {vision.tokens})"
            if resampler.kind in ("token_packer", "avg_pool"):
                require(vision.grid ** 2 == vision.tokens, "vision.tokens",
                        f"the {resampler.kind} resampler works on a square patch grid, so vision.tokens "
                        f"(P feature vectors per image) must be a square number (e.g. {vision.grid ** 2} or "
                        f"{(vision.grid + 1) ** 2}), got {vision.tokens}; identity and perceiver take any P")
        else:
            grid = f"the {vision.grid}×{vision.grid} vision grid (image_size {vision.image_size} // patch_size " \
                   f"{vision.patch_size})"
        if resampler.kind in ("perceiver", "token_packer"):
            width, name = ((vision.hidden_size, "vision.hidden_size") if self.lape is None
                           else (self.lm.hidden_size, "lm.hidden_size, the width it works in after the projector "
                                                      "when model.lape is set"))
            require(width % resampler.num_heads == 0, "resampler.num_heads",
                    f"the {resampler.kind} resampler attends over its input width, so num_heads must divide "
                    f"{name} ({width}), got {resampler.num_heads}")
        if resampler.kind == "token_packer":
            side = math.isqrt(resampler.num_latents)
            require(side * side == resampler.num_latents, "resampler.num_latents",
                    f"token_packer places its queries on a square grid, so num_latents must be a square "
                    f"number (e.g. {side * side} or {(side + 1) ** 2}), got {resampler.num_latents}")
            require(side <= vision.grid, "resampler.num_latents",
                    f"token_packer's {side}×{side} queries ({resampler.num_latents}) exceed {grid}")
        if resampler.kind == "avg_pool":
            require(resampler.pool_stride <= vision.grid, "resampler.pool_stride",
                    f"avg_pool's window must fit in {grid}: pool_stride must lie in [1, {vision.grid}], "
                    f"got {resampler.pool_stride}")

    def _check_lape(self) -> None:
        vision = self.vision
        grid = vision.grid
        if vision.kind == "features":
            require(grid * grid == vision.tokens, "vision.tokens",
                    f"LAPE adds height and width terms to a square grid, so vision.tokens (P feature vectors "
                    f"per image) must be a square number (e.g. {grid * grid}), got {vision.tokens}")
        else:
            require(vision.feature_select == "patch", "vision.feature_select",
                    "LAPE adds height and width terms to the patch grid, which a CLS token is not part of: "
                    "use 'patch' (the reference's setting) with model.lape")
        require(self.projector.expand == 1, "projector.expand",
                f"LAPE adds its terms to the projected g×g grid, one vector per patch; expand must be 1 with "
                f"model.lape, got {self.projector.expand}")

    def _check_video(self) -> None:
        video, vision = self.video, self.vision
        require(vision.kind != "features", "video",
                "videos are decoded to frames for a vision tower; vision.kind features has none")
        tokens = self.image_tokens
        side = math.isqrt(tokens)
        require(side * side == tokens, "video",
                f"a frame's {tokens} image tokens must form a square grid for the fast span's resize "
                f"(use feature_select: patch and projector.expand 1)")
        require(math.isqrt(video.fast_tokens) <= side, "video.fast_tokens",
                f"the fast span shrinks each frame's {side}×{side} grid; fast_tokens must be ≤ {tokens}, got "
                f"{video.fast_tokens}")
        require(video.slow_frames * tokens >= 2, "video.slow_frames",
                f"the slow span holds a start and an end token: slow_frames × {tokens} image tokens must be ≥ 2")
        if self.lape is not None:
            require(video.frames <= self.lape.temporal_count, "video.frames",
                    f"LAPE has {self.lape.temporal_count} temporal embeddings, one per frame; got {video.frames} "
                    f"frames")

    @property
    def video_spans(self) -> tuple[int, int]:
        """(fast, slow) placeholder lengths of one video; (0, 0) without `video`."""
        if self.video is None:
            return 0, 0
        return self.video.frames * self.video.fast_tokens, self.video.slow_frames * self.image_tokens

    @property
    def resampler_input(self) -> Optional[VisionConfig]:
        """What the resampler reads, as a VisionConfig: the tower's (or the features') output, or with LAPE
        the projected g×g grid in the LM's width, which it reads like a features grid."""
        if self.vision is None or self.lape is None:
            return self.vision
        return VisionConfig(kind="features", hidden_size=self.lm.hidden_size, tokens=self.vision.grid ** 2)

    @property
    def image_tokens(self) -> int:
        """I: how many placeholder positions one image occupies in the sequence."""
        return 0 if self.vision is None else image_token_count(self.resampler_input, self.resampler, self.projector)


def image_token_count(vision: VisionConfig, resampler: ResamplerConfig, projector: ProjectorConfig) -> int:
    """I, the number of visual vectors one image becomes (tower grid or features → resampler →
    projector): the one place it is derived. The data pipeline writes exactly I placeholders per
    image, the resampler outputs I / projector.expand vectors, the projector turns each into
    `expand` tokens, and the model overwrites exactly those I positions."""
    return _resampler_output_count(vision, resampler) * projector.expand


def _resampler_output_count(vision: VisionConfig, resampler: ResamplerConfig) -> int:
    kind = resampler.kind
    if kind == "identity":
        return vision.output_tokens
    if kind in ("perceiver", "token_packer"):
        return resampler.num_latents
    side = vision.grid // resampler.pool_stride  # avg_pool: remainder rows and columns dropped
    return side * side + (vision.output_tokens - vision.grid ** 2)
