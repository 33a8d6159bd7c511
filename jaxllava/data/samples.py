"""Records → token samples: the one place where a record becomes ids and a loss mask.

A sample is a token sequence plus, per token, whether it is a training target
(predicted from the tokens before it). Image samples contain exactly one span of
N placeholder ids, `<im_start> + (N-2)×<im_patch> + <im_end>` (the reference's
expansion, docs/reference.md#image-placeholders), which the model overwrites in
place; the span is never a target. Video samples contain instead one fast span and,
right after it, one slow span (`SpecialIds.video_span`), placed where an image span
would be. Text-only samples contain no placeholder id at all, and their length never
includes image or video tokens (README pitfalls 1-2).

Each sample is built from pieces (BOS, text, image span, EOS), each tokenized on
its own, so the loss mask is exact by construction: no "tokenization mismatch"
fallback that masks a whole sample (docs/reference.md#templates-and-label-masks).

Objectives:
  plain_lm  every turn's text joined by one space, `<image>` removed and its span
            placed first; BOS, no EOS unless `add_eos`; every text token is a target.
            A text-only record becomes exactly `[BOS] + tokenizer(text)` (README pitfall 6).
  captions  the image span (image records) then the assistant turns; targets are
            the assistant tokens (LLaVA's pretraining format).
  chat      a conversation template (templates.py); targets are the assistant
            turns and the EOS after each. The image span opens the user turn that
            holds `<image>` (the first user turn when `<image>` is in an assistant
            turn; right after BOS when there is no user turn).

Whether a sample gets an image (video) span is decided once, by "the record has an
image (video) and data.use_images is on", never by where `<image>` (`<video>`) appears;
the marker text itself is removed from every turn under every objective, never tokenized.
"""
from __future__ import annotations

import dataclasses
from typing import Iterator, Sequence

import numpy as np

from jaxllava.data.config import DataConfig
from jaxllava.data.records import Record, SkipReport
from jaxllava.data.templates import get_template, user_turn
from jaxllava.data.tokenizer import IMAGE_TOKEN, VIDEO_TOKEN, special_ids
from jaxllava.data.words import record_words
from jaxllava.errors import DataError

# A piece is ("bos",), ("eos", target), ("image",), ("video",) or ("text", text, target).
Piece = tuple


def _strip_image_marker(text: str) -> str:
    return text.replace(IMAGE_TOKEN, "").replace(VIDEO_TOKEN, "").strip()


def _image_turn(record: Record) -> int | None:
    """Index of the chat turn the image (video) span opens (see the module doc); None: right after BOS."""
    marker = VIDEO_TOKEN if record.modality == "video" else IMAGE_TOKEN
    users = [i for i, turn in enumerate(record.turns) if turn.role == "user"]
    holding = [i for i in users if marker in record.turns[i].text]
    return holding[0] if holding else (users[0] if users else None)


def record_pieces(record: Record, cfg: DataConfig, *, has_bos: bool) -> list[Piece]:
    """The pieces a record becomes under the configured objective."""
    with_image = record.modality != "text" and cfg.use_images
    visual = ("video",) if record.modality == "video" else ("image",)
    pieces: list[Piece] = [("bos",)] if has_bos else []
    if cfg.objective == "plain_lm":
        text = " ".join(t for t in (_strip_image_marker(turn.text) for turn in record.turns) if t)
        if with_image:
            pieces.append(visual)
        if text:
            pieces.append(("text", text, True))
        if cfg.add_eos:
            pieces.append(("eos", True))
    elif cfg.objective == "captions":
        if with_image:
            pieces.append(visual)
        text = " ".join(t for t in (_strip_image_marker(turn.text) for turn in record.turns
                                    if turn.role == "assistant") if t)
        if text:
            pieces.append(("text", text, True))
        if cfg.add_eos:
            pieces.append(("eos", True))
    elif cfg.objective == "chat":
        template = get_template(cfg.chat_template)
        image_turn = _image_turn(record) if with_image else None
        if with_image and image_turn is None:
            pieces.append(visual)
        first_user = True
        for index, turn in enumerate(record.turns):
            text = _strip_image_marker(turn.text)
            if turn.role == "user":
                if not first_user and template.bos_each_round and has_bos:
                    pieces.append(("bos",))
                head, rest = user_turn(template, text, first=first_user)
                if with_image and index == image_turn:
                    # Tokenized apart, as LLaVA tokenizes the prompt around <image>.
                    if head:
                        pieces.append(("text", head, False))
                    pieces += [visual, ("text", rest, False)]
                else:
                    pieces.append(("text", head + rest, False))
                first_user = False
            else:
                pieces.append(("text", template.assistant.format(text=text), True))
                if template.end_assistant_with_eos:
                    pieces.append(("eos", True))
    else:
        raise DataError(f"unknown objective {cfg.objective!r}", field="data.objective")
    return pieces


@dataclasses.dataclass
class SampleTable:
    """All samples of a dataset as flat arrays (cheap to pickle to loader workers)."""

    tokens: np.ndarray  # int32 (total,)
    is_target: np.ndarray  # bool (total,)
    offsets: np.ndarray  # int64 (n + 1,)
    image_start: np.ndarray  # int32 (n,): index of the image (or video) span, -1 for text-only samples
    words: np.ndarray  # int64 (n,)
    source: np.ndarray  # int32 (n,): index of the source file
    truncated: np.ndarray  # bool (n,)
    images: list  # image path or None, per sample
    is_video: np.ndarray  # bool (n,): a video sample (its span, at image_start, is the video's)
    videos: list  # video path (file or frame folder) or None, per sample
    feature_rows: np.ndarray  # int64 (n,): the sample's row of its source's features, -1 for none
    ids: list  # record id per sample
    origins: list  # "<records file> <record N | line N>" per sample, for error messages

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    @property
    def has_image(self) -> np.ndarray:
        return (self.image_start >= 0) & ~self.is_video

    @property
    def has_video(self) -> np.ndarray:
        return np.asarray(self.is_video, bool)

    def sample(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        lo, hi = self.offsets[i], self.offsets[i + 1]
        return self.tokens[lo:hi], self.is_target[lo:hi]


def build_sample_table(records_by_source: Sequence[Sequence[Record]], tokenizer, cfg: DataConfig, *,
                       image_tokens: int, max_len: int, skips: SkipReport | None = None,
                       chunk: int = 4096, video_spans: tuple[int, int] = (0, 0)) -> SampleTable:
    """Tokenize every record (batched) and check lengths and targets.

    `image_tokens` is N (ModelConfig.image_tokens); `video_spans` the (fast, slow) lengths of a
    video (ModelConfig.video_spans; (0, 0): the model reads no video); `max_len` the largest
    bucket. Errors name the record; under `on_bad_record: skip` they are counted in `skips`.
    """
    ids = special_ids(tokenizer)
    has_bos = ids.bos is not None
    _check_model_reads(records_by_source, cfg, image_tokens, video_spans)
    span = ids.image_span(image_tokens) if image_tokens >= 1 else []
    video_span = ids.video_span(*video_spans) if video_spans != (0, 0) else []

    tokens, is_target, lengths, image_start, words, source, truncated, images, feature_rows, rec_ids, origins = (
        [] for _ in range(11))
    videos = []

    flat = [(s, r) for s, records in enumerate(records_by_source) for r in records]
    for lo in range(0, len(flat), chunk):
        batch = flat[lo:lo + chunk]
        pieces = [record_pieces(r, cfg, has_bos=has_bos) for _, r in batch]
        texts = [p[1] for ps in pieces for p in ps if p[0] == "text"]
        encoded = iter(tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else [])
        for (s, record), record_pieces_ in zip(batch, pieces):
            seq, target, start = assemble_pieces(record_pieces_, encoded, ids, span, video_span)
            try:
                seq, target, cut = _check_sample(record, seq, target, start, max_len, cfg)
            except DataError as error:
                if cfg.on_bad_record == "skip" and skips is not None:
                    skips.add(error)
                    continue
                raise
            tokens.append(np.asarray(seq, np.int32))
            is_target.append(np.asarray(target, bool))
            lengths.append(len(seq))
            image_start.append(start)
            words.append(record_words(record, objective=cfg.objective, rule=cfg.word_rule))
            source.append(s)
            truncated.append(cut)
            images.append(record.image if start >= 0 else None)
            videos.append(record.video if start >= 0 else None)
            feature_rows.append(record.features_row if start >= 0 and record.features_row is not None else -1)
            rec_ids.append(record.id)
            origins.append(f"{record.file} {record.where}")

    offsets = np.zeros(len(lengths) + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return SampleTable(
        tokens=np.concatenate(tokens) if tokens else np.zeros(0, np.int32),
        is_target=np.concatenate(is_target) if is_target else np.zeros(0, bool),
        offsets=offsets,
        image_start=np.asarray(image_start, np.int32),
        words=np.asarray(words, np.int64),
        source=np.asarray(source, np.int32),
        truncated=np.asarray(truncated, bool),
        images=images,
        is_video=np.asarray([v is not None for v in videos], bool),
        videos=videos,
        feature_rows=np.asarray(feature_rows, np.int64),
        ids=rec_ids,
        origins=origins,
    )


def _check_model_reads(records_by_source: Sequence[Sequence[Record]], cfg: DataConfig, image_tokens: int,
                       video_spans: tuple[int, int]) -> None:
    """Image (video) records need a model with a vision input (that reads video), unless trained as text."""
    modalities = {r.modality for rs in records_by_source for r in rs} if cfg.use_images else set()
    if image_tokens < 1 and "image" in modalities:
        raise DataError("image records need a model with a vision input (model.vision); "
                        "set data.use_images=false to train them as text", field="data.use_images")
    if tuple(video_spans) == (0, 0) and "video" in modalities:
        raise DataError("video records need a model that reads video (model.video); set data.use_images=false to "
                        "train them as text", field="model.video")


def assemble_pieces(pieces: list[Piece], encoded: Iterator[list[int]], ids, span: list[int],
                    video_span: Sequence[int] = ()) -> tuple[list[int], list[bool], int]:
    """(ids, is-target per id, index of the image or video span or -1) of one record's pieces; text
    pieces take their ids, in order, from `encoded` (the batch's texts tokenized together)."""
    seq: list[int] = []
    target: list[bool] = []
    start = -1
    for piece in pieces:
        kind = piece[0]
        if kind == "bos":
            seq.append(ids.bos), target.append(False)
        elif kind == "eos":
            if ids.eos is None:
                raise DataError("add_eos is set but the tokenizer has no EOS token", field="data.add_eos")
            seq.append(ids.eos), target.append(piece[1])
        elif kind in ("image", "video"):
            placeholders = span if kind == "image" else video_span
            start = len(seq)
            seq.extend(placeholders), target.extend([False] * len(placeholders))
        else:
            piece_ids = next(encoded)
            seq.extend(piece_ids), target.extend([piece[2]] * len(piece_ids))
    return seq, target, start


def _check_sample(record: Record, seq: list[int], target: list[bool], start: int, max_len: int,
                  cfg: DataConfig) -> tuple[list[int], list[bool], bool]:
    def error(message: str, field: str, reason: str) -> DataError:
        return DataError(message, file=record.file, record=record.where, record_id=record.id, field=field,
                         reason=reason)

    cut = False
    if len(seq) > max_len:
        if start >= 0:
            what = record.modality
            raise error(f"{what} sample has {len(seq)} tokens (with {cfg.objective} and the {what} span) but the "
                        f"largest bucket is {max_len}; its {what} span would be cut", "conversations", "too_long")
        if not cfg.truncate_text:
            raise error(f"text sample has {len(seq)} tokens, more than the largest bucket {max_len} "
                        f"(data.truncate_text is false)", "conversations", "too_long")
        seq, target, cut = seq[:max_len], target[:max_len], True
    # Position 0 is never predicted, so it can never count as a target.
    if not any(target[1:]):
        raise error(f"sample has no training target under objective {cfg.objective!r} (e.g. no assistant text); "
                    f"it would contribute no loss", "conversations", "no_targets")
    return seq, target, cut
