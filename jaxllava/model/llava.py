"""LLaVA composition: vision tower → resampler → projector, spliced into the Llama decoder.

An image row carries I placeholder tokens (I = `ModelConfig.image_tokens`, the one
place it is derived); the model overwrites exactly those I embeddings with the I
visual vectors, in order, keeping the sequence length (the reference's in-place
splice, docs/reference.md#image-placeholders). Placeholder embeddings themselves
are never seen.

A text-only call (`pixels=None`) embeds tokens and nothing else: the vision tower,
resampler and projector are not traced, so a text-only step cannot run them
(README pitfall 1). A model built with `config.vision = None` has no vision
parameters at all.

Which parts train is the optimizer's choice (`optim.train_*`; the tower is frozen
by default, docs/reference.md#trainable-parts). The train step differentiates only
the trainable parameters, so a frozen tower's output carries no tangent and no
backward pass runs through it (tests/test_train_step.py counts the matmuls).

Axis letters: see jaxllava/__init__.py.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxllava.model.config import ModelConfig
from jaxllava.model.llama import Llama
from jaxllava.model.projectors import Projector
from jaxllava.model.resamplers import make_resampler
from jaxllava.model.sharding import constrain
from jaxllava.model.vision import VisionTower

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


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
    """`lm` (Llama) plus, when `config.vision` is set, `vision`, `resampler` and `projector`."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        dtype = DTYPES[config.dtype]
        self.config = config
        self.lm = Llama(config.lm, dtype=dtype, attention_impl=config.attention_impl, remat=config.remat,
                        rngs=rngs)
        if config.vision is None:
            self.vision = self.resampler = self.projector = None
            return
        self.vision = VisionTower(config.vision, dtype=dtype, rngs=rngs)
        self.resampler = make_resampler(config.resampler, config.vision, dtype=dtype, rngs=rngs)
        self.projector = Projector(config.projector, config.vision.hidden_size, config.lm.hidden_size,
                                   dtype=dtype, rngs=rngs)

    def encode_images(self, pixels: jax.Array) -> jax.Array:
        """pixels (B, H, W, 3) → (B, I, D) visual vectors in the LM's width."""
        features = self.resampler(self.vision(pixels))
        return constrain(self.projector(features), ("batch", "length", "act_embed"))

    def embed_inputs(self, input_ids: jax.Array, pixels: jax.Array | None = None,
                     image_mask: jax.Array | None = None) -> jax.Array:
        """(B, T) ids [+ pixels (B, H, W, 3), image_mask (B, T)] → (B, T, D) input embeddings."""
        embeds = self.lm.embed(input_ids)
        if pixels is None:
            if image_mask is not None:
                raise ValueError("image_mask given without pixels")
            return embeds
        if self.vision is None:
            raise ValueError("pixels given to a text-only model (model.vision is not configured)")
        if image_mask is None:
            raise ValueError("pixels given without image_mask")
        features = self.encode_images(pixels)
        if features.shape[1] != self.config.image_tokens:
            raise ValueError(f"the image encoder produced {features.shape[1]} vectors per image, "
                             f"config.image_tokens is {self.config.image_tokens}")
        return merge_image_features(embeds, features, image_mask)

    def hidden(self, input_ids: jax.Array, *, segment_ids: jax.Array, positions: jax.Array,
               pixels: jax.Array | None = None, image_mask: jax.Array | None = None) -> jax.Array:
        """Final-normed hidden states (B, T, D), for a loss that projects onto the vocabulary in chunks."""
        embeds = self.embed_inputs(input_ids, pixels, image_mask)
        return self.lm.decode(embeds, segment_ids=segment_ids, positions=positions)

    def __call__(self, input_ids: jax.Array, *, segment_ids: jax.Array, positions: jax.Array,
                 pixels: jax.Array | None = None, image_mask: jax.Array | None = None) -> jax.Array:
        """(B, T, V) float32 logits."""
        return self.lm.logits(self.hidden(input_ids, segment_ids=segment_ids, positions=positions,
                                          pixels=pixels, image_mask=image_mask))
