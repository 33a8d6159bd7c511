"""Data configuration: which records, how they become token sequences, how they are batched."""
from __future__ import annotations

import dataclasses
import math
from typing import Literal, Optional, Union

from jaxllava.data.templates import TEMPLATES
from jaxllava.schema import at_least, path_field, positive, require


# ImageNet statistics: DINOv2's (and most towers') normalisation, the default when no
# preprocessor_config.json is given.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclasses.dataclass(frozen=True)
class SourceConfig:
    # The records: format llava, one .json list or .jsonl file of LLaVA records; text, a plain-text
    # file or a glob of them (BabyLM's *.train); captions, a .json list of caption strings or a
    # .jsonl file of {"caption": ..., "image": ...} objects.
    path: str = path_field()
    weight: float = 1.0  # copies per epoch: 2.0 repeats every record, 0.5 takes a seeded half
    image_folder: Optional[str] = path_field(None)  # image paths are relative to this (default: the file's folder)
    # video paths (a video file or a folder of frames) are relative to this (default: the file's folder)
    video_folder: Optional[str] = path_field(None)
    # Image and video paths must resolve inside image_folder / video_folder (no "..", absolute
    # paths or symlinks leading out) unless this is true.
    allow_outside: bool = False
    format: Literal["llava", "text", "captions"] = "llava"  # how `path` is read (see path)
    # Precomputed vision features instead of image files: one .npy, or a list concatenated in
    # order, of shape (rows, E) or (rows, P, E); row i belongs to the source's i-th image record
    # (captions: its i-th caption). Needs model.vision.kind: features.
    features: Union[str, tuple[str, ...]] = path_field(())
    # text format: "line" (each non-empty line is a sample), "paragraph" (blank lines end a
    # sample), or "chunk" (consecutive lines joined while they fit in chunk_tokens tokens).
    text_unit: Literal["line", "paragraph", "chunk"] = "line"
    chunk_tokens: int = 512  # the token budget of a text_unit: chunk sample

    def __post_init__(self):
        require(bool(self.path), "path", "must name a record file (or a glob of text files), got an empty string")
        # A weight of 0, below 0 or NaN used to drop the source without a word.
        positive(self, "weight")
        if isinstance(self.features, str):  # one path or a list of them, one spelling inside
            object.__setattr__(self, "features", (self.features,) if self.features else ())
        require(all(self.features), "features", f"every features path must be non-empty, got {list(self.features)}")
        require(not self.features or self.format != "text", "features",
                "a text source has no image records to pair with features")
        at_least(self, 1, "chunk_tokens")


@dataclasses.dataclass(frozen=True)
class ImageConfig:
    # A local preprocessor_config.json (DINOv2 / CLIP / SigLIP); when set it gives
    # mean/std; size always follows the vision tower's image_size.
    preprocessor_config: Optional[str] = path_field(None)
    aspect: Literal["pad", "resize"] = "pad"  # the reference's image_aspect_ratio=pad
    mean: tuple[float, float, float] = IMAGENET_MEAN  # per channel (R, G, B), subtracted after scaling to [0, 1]
    std: tuple[float, float, float] = IMAGENET_STD  # per channel; pixels are divided by it after the mean
    # Images with more pixels (width × height) are refused before they are decoded: a small
    # compressed file can hold a huge picture that takes gigabytes to decode.
    max_pixels: int = 50_000_000

    def __post_init__(self):
        for name in ("mean", "std"):
            values = getattr(self, name)
            require(len(values) == 3 and all(math.isfinite(v) for v in values), name,
                    f"must be three finite numbers (R, G, B), got {list(values)}")
        require(all(v > 0 for v in self.std), "std", f"every value must be > 0 (pixels are divided by it), "
                                                     f"got {list(self.std)}")
        at_least(self, 1, "max_pixels")


@dataclasses.dataclass(frozen=True)
class VideoFramesConfig:
    """Which frames of a video record are kept: the reference's rule (jaxllava/data/video.py
    `frame_indices`). It must give exactly model.video.frames frames (checked at start)."""

    num_frames: int = 4  # evenly spaced frames: i / (num_frames − 1) of the way through, rounded
    # > 0: linspace(0, total − 1, frames_upbound) instead, when num_frames exceeds it or force_sample
    frames_upbound: int = 0
    force_sample: bool = False  # use frames_upbound's linspace even when num_frames does not exceed it

    def __post_init__(self):
        at_least(self, 2, "num_frames")
        at_least(self, 0, "frames_upbound")
        require(not self.force_sample or self.frames_upbound > 0, "force_sample",
                "force_sample picks frames_upbound frames by linspace; set frames_upbound > 0")

    def rule(self) -> dict:
        """The rule as `jaxllava.data.video.read_video_frames` (and `frame_indices`) take it."""
        return {"num_frames": self.num_frames, "frames_upbound": self.frames_upbound,
                "force_sample": self.force_sample}

    @property
    def count(self) -> int:
        """Frames the rule keeps per video."""
        upbound = self.frames_upbound > 0 and (self.num_frames > self.frames_upbound or self.force_sample)
        return self.frames_upbound if upbound else self.num_frames


@dataclasses.dataclass(frozen=True)
class DataConfig:
    sources: tuple[SourceConfig, ...] = ()  # the record files, mixed by weight
    tokenizer: str = path_field("")  # a local Hugging Face tokenizer directory
    # plain_lm: every turn joined by one space (the reference's USE_PLAIN_LM);
    # captions: image placeholder + assistant turns, loss on assistant turns;
    # chat: a conversation template, loss on assistant turns.
    objective: Literal["plain_lm", "captions", "chat"] = "plain_lm"
    chat_template: str = "llama_2"  # the chat objective's template, a name in data/templates.py
    add_eos: bool = False  # the reference's plain LM appended no EOS (README pitfall 10)
    use_images: bool = True  # False: image and video records are trained as text-only records
    # An ablation, never a default: "black" gives every text-only record a black image and a full
    # image-placeholder span, the reference's behaviour that cost it 14 BLiMP points (README
    # pitfall 1). Such samples are then image samples everywhere: counted, batched and logged as
    # images, and the start banner and run.json say the ablation is on. Needs a vision tower.
    text_only_images: Literal["none", "black"] = "none"
    # error: a bad record, image or sample stops the run, named; skip: it is dropped, counted
    # by reason and reported (start banner, run.json data.skipped, final summary).
    on_bad_record: Literal["error", "skip"] = "error"
    # Decode every image once at start, so a corrupt one stops the run (or is skipped)
    # before training instead of when its batch comes up. Always done under "skip".
    check_images: bool = False
    # Words the budget counts: "trained" = whitespace words of every turn the model
    # is trained on; "reference" = the reference's rule (assistant turns, alnum split).
    word_rule: Literal["trained", "reference"] = "trained"
    image: ImageConfig = dataclasses.field(default_factory=ImageConfig)
    video: VideoFramesConfig = dataclasses.field(default_factory=VideoFramesConfig)
    # Static sequence lengths; every microbatch has one of these lengths.
    buckets: tuple[int, ...] = (128, 256, 512, 1024, 2048)
    pack_text: bool = True  # several text-only samples per row
    truncate_text: bool = True  # over-long text-only samples are cut to the largest bucket (else error/skip)
    text_rows: int = 8  # rows per text-only microbatch (global, across processes)
    image_rows: int = 8  # rows per image microbatch (global)
    video_rows: int = 4  # rows per video microbatch (global): one video, frames × the tower's work, per row
    epochs: int = 1  # passes over the data, each in its own seeded order
    seed: int = 0  # the order of each epoch and the records a fractional source weight takes
    # A folder for tokenized sample tables, keyed by the data fingerprint: a restart, and every
    # other process of a multi-host run (on shared storage), maps the table instead of reading
    # and tokenizing every record again. null: no cache.
    table_cache: Optional[str] = path_field(None)
    # Fraction of each source's records held out (seeded by data.seed) and never trained on;
    # their loss is logged as val_loss (eval.validation_every_steps, and at the end).
    validation_fraction: float = 0.0
    num_workers: int = 0  # Grain worker processes building microbatches (0: in the main process)
    prefetch: int = 2  # microbatches buffered per worker

    def __post_init__(self):
        require(self.chat_template in TEMPLATES, "chat_template",
                f"must be one of {', '.join(sorted(TEMPLATES))}, got {self.chat_template!r}")
        buckets = list(self.buckets)
        require(bool(buckets), "buckets", "must list at least one sequence length, got []")
        # The shortest sequence that trains anything is a token and the target after it.
        require(all(b >= 2 for b in buckets), "buckets",
                f"every bucket must be >= 2 tokens (a 1-token row cannot hold a token and its target, so "
                f"it has no training target), got {buckets}")
        require(all(a < b for a, b in zip(buckets, buckets[1:])), "buckets",
                f"must be strictly increasing (a sample goes to the first bucket it fits), got {buckets}")
        at_least(self, 1, "text_rows", "image_rows", "video_rows", "epochs", "prefetch")
        require(math.isfinite(self.validation_fraction) and 0.0 <= self.validation_fraction < 1.0,
                "validation_fraction", f"must be in [0, 1), got {self.validation_fraction!r}")
        at_least(self, 0, "num_workers")
        require(self.text_only_images == "none" or self.use_images, "text_only_images",
                "'black' gives text-only samples an image, but data.use_images is false")
