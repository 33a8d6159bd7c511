"""LLaVA composition: vision tower → resampler → projector, spliced into the Llama decoder.

With `config.lape` (the reference's stage 2) the image path is instead tower →
projector → LAPE add → resampler, the reference's own order, with the resampler in
the LM's width (jaxllava/model/lape.py, `ModelConfig.resampler_input`).

An image row carries I placeholder tokens (I = `ModelConfig.image_tokens`, the one
place it is derived); the model overwrites exactly those I embeddings with the I
visual vectors, in order, keeping the sequence length (the reference's in-place
splice, docs/reference.md#image-placeholders). Placeholder embeddings themselves
are never seen.

The visual input is `pixels` (B, H, W, 3) for a model with a tower, or `features`
(B, P, E) for `vision.kind: features` (precomputed tower outputs, e.g. BabyLM's
DINOv2 states), which builds no tower and sends the features down exactly the path
a tower's output takes: resampler → projector → splice.

A video row carries instead a fast then a slow span (`ModelConfig.video_spans`),
filled by `encode_video` from its frames (B, F, H, W, 3) through the same tower,
resampler and projector, frame by frame (docs/reference.md#video).

A text-only call (none given) embeds tokens and nothing else: the vision tower,
resampler and projector are not traced, so a text-only step cannot run them
(README pitfall 1). A model built with `config.vision = None` has no vision
parameters at all.

Each part draws its initial parameters from its own stream, derived from the
seed and the part's name (`PART_STREAMS`), so a part's initial values do not
depend on which other parts exist: a features model starts from the same LM,
resampler and projector as the tower model it replaces, and a text-only model
from the same LM.

Which parts train is the optimizer's choice (`optim.train_*`; the tower is frozen
by default, docs/reference.md#trainable-parts). The train step differentiates only
the trainable parameters, so a frozen tower's output carries no tangent and no
backward pass runs through it (tests/test_train_step.py counts the matmuls).

Axis letters: see jaxllava/__init__.py.
"""
from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

from jaxllava.model.config import ModelConfig
from jaxllava.model.lape import Lape, linear_resize_matrix
from jaxllava.model.llama import Llama
from jaxllava.model.projectors import Projector
from jaxllava.model.resamplers import make_resampler, resize_bilinear
from jaxllava.model.sharding import constrain, tree_shardings
from jaxllava.model.vision import VisionTower

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# Fixed per-part constants folded into the seed's key; never renumber one, or every
# run's initial values for that part change.
PART_STREAMS = {"lm": 0, "vision": 1, "resampler": 2, "projector": 3, "lape": 4}


def part_rngs(rngs: nnx.Rngs) -> dict[str, nnx.Rngs]:
    """One independent stream per model part. The base key is drawn once, whatever the config,
    so each part's stream depends only on the seed and the part's name."""
    base = rngs.params()
    return {name: nnx.Rngs(jax.random.fold_in(base, index)) for name, index in PART_STREAMS.items()}


def merge_image_features(embeds: jax.Array, features: jax.Array, image_mask: jax.Array) -> jax.Array:
    """Write the I visual vectors of each row over its I placeholder positions.

    embeds (B, T, D) token embeddings; features (B, I, D) visual vectors;
    image_mask (B, T) bool, True at the placeholder positions. The k-th True
    position of row b receives features[b, k]. Static shapes: a cumulative sum
    over the mask indexes the features and `where` writes them (maxtext
    `merge_mm_embeddings`); rows without True positions are returned unchanged.
    """
    index = jnp.clip(jnp.cumsum(image_mask.astype(jnp.int32), axis=1) - 1, 0, features.shape[1] - 1)
    gathered = jnp.take_along_axis(features, index[..., None], axis=1)  # (B, T, D)
    return jnp.where(image_mask[..., None], gathered.astype(embeds.dtype), embeds)


class LlavaModel(nnx.Module):
    """`lm` (Llama) plus, when `config.vision` is set, `resampler`, `projector`, (unless
    `vision.kind` is features) the tower `vision`, and (when `config.lape` is set) `lape`."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        dtype = DTYPES[config.dtype]
        self.config = config
        streams = part_rngs(rngs)
        self.lm = Llama(config.lm, dtype=dtype, attention_impl=config.attention_impl, remat=config.remat,
                        rngs=streams["lm"])
        vision = config.vision
        if vision is None:
            self.vision = self.resampler = self.projector = self.lape = None
            return
        self.vision = (None if vision.kind == "features"
                       else VisionTower(vision, dtype=dtype, rngs=streams["vision"]))
        self.resampler = make_resampler(config.resampler, config.resampler_input, dtype=dtype,
                                        rngs=streams["resampler"])
        self.projector = Projector(config.projector, vision.hidden_size, config.lm.hidden_size,
                                   dtype=dtype, rngs=streams["projector"])
        self.lape = (None if config.lape is None
                     else Lape(config.lape, config.lm.hidden_size, rngs=streams["lape"]))

    def encode_images(self, pixels: jax.Array) -> jax.Array:
        """pixels (B, H, W, 3) → (B, I, D) visual vectors in the LM's width."""
        return self.encode_features(self.vision(pixels))

    def encode_features(self, features: jax.Array) -> jax.Array:
        """Tower outputs or precomputed features (B, P, E) → (B, I, D) visual vectors in the LM's width."""
        if self.lape is None:
            visual = self.projector(self.resampler(features))
        else:  # the reference's stage-2 order (module docstring)
            visual = self.resampler(self.lape(self.projector(features)))
        return constrain(visual, ("batch", "length", "act_embed"))

    def encode_video(self, frames: jax.Array) -> jax.Array:
        """frames (B, F, H, W, 3) → (B, F·fast_tokens + slow_frames·I, D): the fast span's vectors then
        the slow span's (`VideoConfig`). Each frame takes the image path; with LAPE, frame t gets
        the temporal term inj_t[t] (`Lape.frames`) where an image gets inj_t[0]."""
        video = self.config.video
        if video is None:
            raise ValueError("video frames given to a model without model.video")
        b, count = frames.shape[:2]
        if count != video.frames:
            raise ValueError(f"{count} frames per video; model.video.frames is {video.frames}")
        tower = self.vision(frames.reshape(b * count, *frames.shape[2:]))
        if self.lape is None:
            per_frame = self.projector(self.resampler(tower))
        else:
            projected = self.projector(tower)
            located = self.lape.frames(projected.reshape(b, count, *projected.shape[1:]))
            per_frame = self.resampler(located.reshape(b * count, *projected.shape[1:]))
        tokens, width = per_frame.shape[1:]
        side, fast_side = math.isqrt(tokens), math.isqrt(video.fast_tokens)
        grids = per_frame.reshape(b * count, side, side, width)
        fast = resize_bilinear(grids, fast_side).reshape(b, count * video.fast_tokens, width)
        # Linear in time, as F.interpolate(mode="linear", align_corners=False) over the frames.
        in_time = jnp.asarray(linear_resize_matrix(count, video.slow_frames), per_frame.dtype)
        slow = jnp.einsum("sf,bfnd->bsnd", in_time, per_frame.reshape(b, count, tokens, width))
        visual = jnp.concatenate([fast, slow.reshape(b, video.slow_frames * tokens, width)], axis=1)
        return constrain(visual, ("batch", "length", "act_embed"))

    def _visual_vectors(self, pixels: jax.Array | None, features: jax.Array | None) -> jax.Array:
        vision = self.config.vision
        given = "pixels" if pixels is not None else "features"
        if vision is None:
            raise ValueError(f"{given} given to a text-only model (model.vision is not configured)")
        if pixels is not None:
            if vision.kind == "features":
                raise ValueError("pixels given to a model without a vision tower (model.vision.kind is "
                                 "features): pass features=")
            return self.encode_images(pixels)
        if vision.kind != "features":
            raise ValueError(f"features given to a model with a {vision.kind} vision tower: pass pixels=")
        expected = (vision.output_tokens, vision.hidden_size)
        if features.ndim != 3 or tuple(features.shape[1:]) != expected:
            raise ValueError(f"features of shape {tuple(features.shape)}; model.vision expects (B, "
                             f"{expected[0]}, {expected[1]}) (B, vision.tokens, vision.hidden_size)")
        return self.encode_features(features)

    def embed_inputs(self, input_ids: jax.Array, pixels: jax.Array | None = None,
                     image_mask: jax.Array | None = None, *, features: jax.Array | None = None,
                     frames: jax.Array | None = None, video_mask: jax.Array | None = None) -> jax.Array:
        """(B, T) ids [+ pixels (B, H, W, 3) or features (B, P, E), and image_mask (B, T); or frames
        (B, F, H, W, 3) and video_mask (B, T)] → (B, T, D) input embeddings."""
        embeds = self.lm.embed(input_ids)
        if frames is not None or video_mask is not None:
            if frames is None or video_mask is None:
                raise ValueError("frames and video_mask go together")
            if pixels is not None or features is not None or image_mask is not None:
                raise ValueError("a video row holds no image: give frames or pixels/features, not both")
            visual = self.encode_video(frames)
            expected = sum(self.config.video_spans)
            if visual.shape[1] != expected:
                raise ValueError(f"the video encoder produced {visual.shape[1]} vectors, the spans hold {expected}")
            return merge_image_features(embeds, visual, video_mask)
        if pixels is not None and features is not None:
            raise ValueError("both pixels and features given: a model reads one of them")
        if pixels is None and features is None:
            if image_mask is not None:
                raise ValueError("image_mask given without pixels or features")
            return embeds
        if image_mask is None:
            raise ValueError(f"{'pixels' if pixels is not None else 'features'} given without image_mask")
        visual = self._visual_vectors(pixels, features)
        if visual.shape[1] != self.config.image_tokens:
            raise ValueError(f"the image encoder produced {visual.shape[1]} vectors per image, "
                             f"config.image_tokens is {self.config.image_tokens}")
        return merge_image_features(embeds, visual, image_mask)

    def hidden(self, input_ids: jax.Array, *, segment_ids: jax.Array, positions: jax.Array,
               pixels: jax.Array | None = None, image_mask: jax.Array | None = None,
               features: jax.Array | None = None, frames: jax.Array | None = None,
               video_mask: jax.Array | None = None) -> jax.Array:
        """Final-normed hidden states (B, T, D), for a loss that projects onto the vocabulary in chunks."""
        embeds = self.embed_inputs(input_ids, pixels, image_mask, features=features, frames=frames,
                                   video_mask=video_mask)
        return self.lm.decode(embeds, segment_ids=segment_ids, positions=positions)

    def __call__(self, input_ids: jax.Array, *, segment_ids: jax.Array, positions: jax.Array,
                 pixels: jax.Array | None = None, image_mask: jax.Array | None = None,
                 features: jax.Array | None = None, frames: jax.Array | None = None,
                 video_mask: jax.Array | None = None) -> jax.Array:
        """(B, T, V) float32 logits."""
        return self.lm.logits(self.hidden(input_ids, segment_ids=segment_ids, positions=positions,
                                          pixels=pixels, image_mask=image_mask, features=features,
                                          frames=frames, video_mask=video_mask))


_INITIALISERS: dict[tuple, tuple] = {}


def create_model(model_config: ModelConfig, mesh, seed: int, *, compiler_options: Optional[dict] = None
                 ) -> LlavaModel:
    """The model with its parameters initialised from `seed` directly in their shardings on `mesh`
    (never whole on one device): what training starts from, and what the feature cache runs.

    The seed's key is an argument of the jitted initialiser, not a constant in it: one compile
    serves every seed of a (config, mesh), and XLA has no constant random tensors to fold at
    compile time. The values equal those of `LlavaModel(model_config, rngs=nnx.Rngs(seed))`."""
    cache_key = (model_config, mesh, tuple(sorted((compiler_options or {}).items())))
    if cache_key not in _INITIALISERS:
        abstract = nnx.eval_shape(lambda: LlavaModel(model_config, rngs=nnx.Rngs(0)))
        graphdef, abstract_state = nnx.split(abstract)
        initialise = jax.jit(lambda key: nnx.state(LlavaModel(model_config, rngs=nnx.Rngs(key))),
                             out_shardings=tree_shardings(abstract_state, mesh), compiler_options=compiler_options)
        _INITIALISERS[cache_key] = graphdef, initialise
    graphdef, initialise = _INITIALISERS[cache_key]
    return nnx.merge(graphdef, initialise(jax.random.key(seed)))
