"""Microbatches: the contract between the data pipeline, the model and the train step.

Modality is a type. A `TextBatch` has no pixel field at all, so code that needs
pixels cannot be handed a text-only batch; an `ImageBatch` carries exactly one
image per row. Shapes are static per bucket: B rows × T tokens.

Array conventions (all numpy on the host, int32 unless noted):
  input_ids   (B, T)  token ids; padding positions hold the tokenizer's pad id.
  targets     (B, T)  next-token target for each position, already shifted:
                      targets[b, t] is the token the model must predict after
                      reading input_ids[b, :t+1] within the same segment, or
                      IGNORE (-100) where there is no loss (padding, image
                      placeholders, prompt turns, the last token of a segment).
  segment_ids (B, T)  1, 2, ... for the packed segments of a row; 0 on padding.
                      Attention never crosses segments.
  positions   (B, T)  position within the segment (restarts at 0 per segment).
  pixels      (B, H, W, 3) float32, normalised (image batches only).
  image_mask  (B, T) bool: the N placeholder positions the model overwrites with
                      the N visual vectors (image batches only).
  image_rows  (B,) bool: the row holds a real image (False only for the empty
                      rows that fill the last microbatch of an epoch).
"""
from __future__ import annotations

import dataclasses
from typing import Literal, Union

import numpy as np

IGNORE = -100


@dataclasses.dataclass(frozen=True)
class BatchStats:
    """What a microbatch feeds, for logging and the word budget (host-side only)."""

    modality: Literal["text", "image"]
    rows: int
    seq_len: int
    samples: int  # records in this microbatch (a packed row holds several)
    words: int  # BabyLM words of the samples (see jaxllava.data.words)
    target_tokens: int
    image_tokens: int  # placeholder positions overwritten by visual vectors
    padding_tokens: int

    @property
    def padding_fraction(self) -> float:
        return self.padding_tokens / float(self.rows * self.seq_len)


@dataclasses.dataclass(frozen=True)
class TextBatch:
    input_ids: np.ndarray
    targets: np.ndarray
    segment_ids: np.ndarray
    positions: np.ndarray
    stats: BatchStats

    modality = "text"

    def arrays(self) -> dict[str, np.ndarray]:
        """The arrays the jitted step consumes (no host-side metadata)."""
        return {
            "input_ids": self.input_ids,
            "targets": self.targets,
            "segment_ids": self.segment_ids,
            "positions": self.positions,
        }


@dataclasses.dataclass(frozen=True)
class ImageBatch:
    input_ids: np.ndarray
    targets: np.ndarray
    segment_ids: np.ndarray
    positions: np.ndarray
    pixels: np.ndarray
    image_mask: np.ndarray
    image_rows: np.ndarray
    stats: BatchStats

    modality = "image"

    def arrays(self) -> dict[str, np.ndarray]:
        return {
            "input_ids": self.input_ids,
            "targets": self.targets,
            "segment_ids": self.segment_ids,
            "positions": self.positions,
            "pixels": self.pixels,
            "image_mask": self.image_mask,
            "image_rows": self.image_rows,
        }


Microbatch = Union[TextBatch, ImageBatch]
