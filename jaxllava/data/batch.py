"""Microbatches: the contract between the data pipeline, the model and the train step.

Modality is a type, from the loader to the jitted step. A `TextBatch` has no
pixel field at all, so code that needs pixels cannot be handed a text-only batch;
an `ImageBatch` carries exactly one image per row, a `VideoBatch` one video per row. Both are pytrees of their
arrays: the step receives the same type with the arrays on the devices. Shapes
are static per bucket: B rows × T tokens (axis letters: see jaxllava/__init__.py).

Array conventions (numpy on the host, int32 unless noted):
  input_ids   (B, T)  token ids; padding positions hold the tokenizer's pad id.
  targets     (B, T)  next-token target for each position, already shifted:
                      targets[b, t] is the token the model must predict after
                      reading input_ids[b, :t+1] within the same segment, or
                      IGNORE (-100) where there is no loss (padding, image
                      placeholders, prompt turns, the last token of a segment).
  segment_ids (B, T)  1, 2, ... for the packed segments of a row; 0 on padding.
                      Attention never crosses segments.
  positions   (B, T)  position within the segment (restarts at 0 per segment).
  pixels      (B, side, side, 3) float32, normalised (image batches only).
  frames      (B, F, side, side, 3) float32, normalised: F frames per video (video batches only).
  features    (B, P, E) float32 precomputed vision features (feature batches only).
  image_mask  (B, T) bool: the I placeholder positions the model overwrites with
                      the I visual vectors (image batches only).
  image_rows  (B,) bool: the row holds a real image (False only for the empty
                      rows that fill the last microbatch of an epoch).
  video_mask  (B, T) bool: the fast then slow placeholder positions of the row's
                      video, overwritten by its fast then slow vectors (video batches).
  video_rows  (B,) bool: the row holds a real video.
"""
from __future__ import annotations

import dataclasses
from typing import Literal, Union

import jax
import numpy as np

IGNORE = -100
MODALITIES = ("text", "image", "video")  # every kind of microbatch, in this order everywhere


@dataclasses.dataclass(frozen=True)
class BatchStats:
    """What a microbatch feeds, for logging and the word budget (host-side only)."""

    modality: Literal["text", "image", "video"]
    rows: int
    seq_len: int
    samples: int  # records in this microbatch (a packed row holds several)
    words: int  # BabyLM words of the samples (see jaxllava.data.words)
    target_tokens: int
    image_tokens: int  # image placeholder positions overwritten by visual vectors
    padding_tokens: int
    video_tokens: int = 0  # video placeholder positions (fast and slow spans)

    @property
    def padding_fraction(self) -> float:
        return self.padding_tokens / float(self.rows * self.seq_len)


@dataclasses.dataclass(frozen=True)
class TextBatch:
    input_ids: np.ndarray
    targets: np.ndarray
    segment_ids: np.ndarray
    positions: np.ndarray
    stats: BatchStats | None  # host metadata; None on the device copy

    modality = "text"


@dataclasses.dataclass(frozen=True)
class ImageBatch:
    input_ids: np.ndarray
    targets: np.ndarray
    segment_ids: np.ndarray
    positions: np.ndarray
    pixels: np.ndarray
    image_mask: np.ndarray
    image_rows: np.ndarray
    stats: BatchStats | None  # host metadata; None on the device copy

    modality = "image"


@dataclasses.dataclass(frozen=True)
class FeatureBatch:
    """Image rows whose visual input is precomputed vision features (BabyLM's DINOv2 states, or
    `launch.py cache-features`) instead of pixels: the model has no tower to run. Its samples
    count as image samples (`modality`), with the same placeholder span and mask as an ImageBatch."""

    input_ids: np.ndarray
    targets: np.ndarray
    segment_ids: np.ndarray
    positions: np.ndarray
    features: np.ndarray  # (B, P, E) float32: P feature vectors of width E per row (zeros on filler rows)
    image_mask: np.ndarray
    image_rows: np.ndarray
    stats: BatchStats | None  # host metadata; None on the device copy

    modality = "image"


@dataclasses.dataclass(frozen=True)
class VideoBatch:
    """Rows of one video each: its frames go through the tower frame by frame and fill the row's
    fast and slow spans (jaxllava/model/llava.py `encode_video`)."""

    input_ids: np.ndarray
    targets: np.ndarray
    segment_ids: np.ndarray
    positions: np.ndarray
    frames: np.ndarray  # (B, F, side, side, 3) float32 (zeros on filler rows)
    video_mask: np.ndarray
    video_rows: np.ndarray
    stats: BatchStats | None  # host metadata; None on the device copy

    modality = "video"


Microbatch = Union[TextBatch, ImageBatch, FeatureBatch, VideoBatch]


def batch_arrays(batch: Microbatch) -> dict[str, np.ndarray]:
    """Every array of a microbatch by field name (for diagnostics and comparisons)."""
    return {field.name: getattr(batch, field.name) for field in dataclasses.fields(batch) if field.name != "stats"}


def _register_as_pytree(cls) -> None:
    """The batch types are pytrees of their arrays, so the jitted step receives a TextBatch or
    an ImageBatch, not a dict: modality stays a type on the device too. `stats` travels as
    static metadata (Grain's worker processes move batches as pytrees); the device copy drops
    it (train/step.py `device_batch`) so that every batch of one shape hits one compiled step."""
    names = tuple(field.name for field in dataclasses.fields(cls) if field.name != "stats")

    def flatten(batch):
        return tuple(getattr(batch, name) for name in names), batch.stats

    def unflatten(stats, arrays):
        return cls(**dict(zip(names, arrays)), stats=stats)

    jax.tree_util.register_pytree_node(cls, flatten, unflatten)


_register_as_pytree(TextBatch)
_register_as_pytree(ImageBatch)
_register_as_pytree(FeatureBatch)
_register_as_pytree(VideoBatch)
