"""Image-conditioned candidate scoring, batched, with each image encoded once.

The rule is the 2025 pipeline's (`evaluation_pipeline/sentence_zero_shot/dataset.py::
process_causal_sentences` with an image, `compute_results.py::compute_causal_results`): a
candidate's score is the sum of log_softmax(logits)[target] over its completion tokens, given
everything before them including the image; the argmax is the prediction, label 0; accuracy is
the macro average over UIDs (scoring.decide).

Where the image goes: the pipeline lets the model's processor put image tokens before the
sentence's tokens and finds the sentence by counting back (`start_idx`). Here the image is
the model's own span, `<im_start> + placeholders + <im_end>` (tokenizer.SpecialIds.image_span),
placed exactly where training's plain_lm and captions objectives place an image record's span
(data/samples.py::record_pieces): after BOS, before the text. So a candidate's ids are
BOS + span + tokenizer(sentence)[1:] (no BOS: span + ids), its target mask is the text-only
rule's (scoring.encode_candidates) with the span never a target, and the model reads exactly
what an image sample looked like in training.

Speed: the tower (or, for features, resampler and projector) runs once per unique image, in
static batches (`encode_images`); its (U, I, D) vectors stay on the device, and each candidate
row takes its image's vectors by index and writes them over its placeholders
(model/llava.py::merge_image_features). The jitted scorer never sees pixels, so it cannot run
the tower. Rows are batched within length buckets as scoring.score_encoded does: one compile
per (rows, bucket), shared by every task and checkpoint of an architecture.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Any, Callable, Hashable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxllava.data.tokenizer import special_ids
from jaxllava.errors import ConfigError
from jaxllava.eval.minimal_pairs import MinimalPairItem
from jaxllava.eval.scoring import DEFAULT_BUCKETS, EncodedSet, on_mesh, encode_candidates
from jaxllava.model.llava import merge_image_features
from jaxllava.model.sharding import activation_sharding, batch_shards, mesh_of


@dataclasses.dataclass(frozen=True)
class ImageCandidates:
    """Every candidate with its image span, and which unique image each row reads."""

    encoded: EncodedSet  # ids with the span spliced in; the span is never a target
    image_start: np.ndarray  # int (rows,): index of the span's first id
    image_of_row: np.ndarray  # int (rows,): index into `image_keys`
    image_keys: tuple  # the unique images, in first-use order
    image_tokens: int


def encode_image_candidates(tokenizer: Any, items: Sequence[MinimalPairItem], image_keys: Sequence[Hashable],
                            image_tokens: int, span: Sequence[int] | None = None) -> ImageCandidates:
    """Tokenise every candidate (2025 rule) and splice the item's image span after BOS (`span`: other
    placeholder ids of that length, a video's fast and slow spans)."""
    if len(image_keys) != len(items):
        raise ValueError(f"{len(image_keys)} image keys for {len(items)} items")
    text = encode_candidates(tokenizer, items)
    key_of_row = [key for i, key in enumerate(image_keys) for _ in range(text.row_start[i], text.row_start[i + 1])]
    return splice_image_spans(tokenizer, text, key_of_row, image_tokens, span)


def splice_image_spans(tokenizer: Any, text: EncodedSet, key_of_row: Sequence[Hashable],
                       image_tokens: int, span: Sequence[int] | None = None) -> ImageCandidates:
    """Put the image span of row r's image (`key_of_row[r]`) after BOS in every encoded row; for
    tasks whose candidates differ by image rather than by text (eval/devbench.py)."""
    if len(key_of_row) != text.num_rows:
        raise ValueError(f"{len(key_of_row)} image keys for {text.num_rows} rows")
    ids = special_ids(tokenizer)
    span = np.asarray(ids.image_span(image_tokens) if span is None else span, np.int32)
    if len(span) != image_tokens:
        raise ValueError(f"a span of {len(span)} ids for {image_tokens} visual vectors")
    unique: dict[Hashable, int] = {}
    token_ids, target_mask, starts, image_of_row = [], [], [], []
    for row_ids, row_mask, key in zip(text.token_ids, text.target_mask, key_of_row):
        at = 1 if ids.bos is not None and row_ids[0] == ids.bos else 0  # record_pieces: BOS, image, text
        token_ids.append(np.concatenate([row_ids[:at], span, row_ids[at:]]))
        target_mask.append(np.concatenate([row_mask[:at], np.zeros(len(span), bool), row_mask[at:]]))
        starts.append(at)
        image_of_row.append(unique.setdefault(key, len(unique)))
    encoded = dataclasses.replace(text, token_ids=tuple(token_ids), target_mask=tuple(target_mask))
    return ImageCandidates(encoded, np.asarray(starts), np.asarray(image_of_row), tuple(unique), image_tokens)


# ---------------------------------------------------------------------------- device side

_counts = {"encoder_traces": 0, "scorer_traces": 0, "images_encoded": 0}


def counts() -> dict[str, int]:
    """Traces of the image encoder and of the scorer, and images sent through the encoder, so far."""
    return dict(_counts)


# What the encoder reads: the model's method for each kind of visual input.
_ENCODERS = {"pixels": "encode_images", "features": "encode_features", "video": "encode_video"}


def _encode(graphdef, state, visual, *, kind: str, mesh):
    _counts["encoder_traces"] += 1  # trace time only
    model = nnx.merge(graphdef, state)
    with contextlib.nullcontext() if mesh is None else activation_sharding(mesh):
        return getattr(model, _ENCODERS[kind])(visual)


def _score(graphdef, state, input_ids, segment_ids, positions, targets, mask, visual, image_mask, *, mesh):
    _counts["scorer_traces"] += 1  # trace time only
    lm = nnx.merge(graphdef, state).lm
    with contextlib.nullcontext() if mesh is None else activation_sharding(mesh):
        embeds = merge_image_features(lm.embed(input_ids), visual, image_mask)
        logits = lm.logits(lm.decode(embeds, segment_ids=segment_ids, positions=positions)).astype(jnp.float32)
    target_logits = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    log_probs = target_logits - jax.nn.logsumexp(logits, axis=-1)  # log_softmax gathered, T = 1
    return jnp.sum(jnp.where(mask, log_probs, 0.0), axis=-1)


@functools.lru_cache(maxsize=None)
def _jitted(mesh, kind: str | None):
    """The encoder of `kind` ("pixels", "features", "video") or the scorer (None) for parameters on
    `mesh`."""
    if kind is None:
        return jax.jit(functools.partial(_score, mesh=mesh), static_argnums=0)
    return jax.jit(functools.partial(_encode, kind=kind, mesh=mesh), static_argnums=0)


def split_model(model: nnx.Module):
    graphdef, state = nnx.split(model)
    # Host (numpy) parameters would be copied to the device on every batch.
    state = jax.tree.map(lambda x: jnp.asarray(x) if isinstance(x, np.ndarray) else x, state)
    return graphdef, state, mesh_of(state)


def rows_per_batch(batch_size: int, rows: int, mesh) -> int:
    shards = 1 if mesh is None else batch_shards(mesh)
    return -(-min(batch_size, max(rows, 1)) // shards) * shards  # rows split evenly over the mesh


def encode_images(model: nnx.Module, visual: np.ndarray, *, batch_size: int = 32) -> jax.Array:
    """(U, H, W, 3) pixels, (U, P, E) features or (U, F, H, W, 3) video frames → (U, I, D) visual
    vectors on the device (for videos I is both spans), each image (video) through the encoder
    once, in batches of one static shape."""
    vision = model.config.vision
    if vision is None:
        raise ConfigError("image tasks need a model with a vision input (model.vision is not configured)")
    kind = "features" if vision.kind == "features" else "pixels"
    expected = (vision.output_tokens, vision.hidden_size) if kind == "features" else (vision.image_size,) * 2 + (3,)
    if visual.ndim == 5 and model.config.video is not None:
        kind, expected = "video", (model.config.video.frames,) + expected
    if tuple(visual.shape[1:]) != expected:
        raise ConfigError(f"images of shape {tuple(visual.shape[1:])}, the model's vision input expects "
                          f"{expected} ({kind})")
    graphdef, state, mesh = split_model(model)
    encode = _jitted(mesh, kind)
    step = rows_per_batch(batch_size, len(visual), mesh)
    chunks = []
    for lo in range(0, len(visual), step):
        chunk = np.zeros((step, *visual.shape[1:]), np.float32)
        chunk[: min(step, len(visual) - lo)] = visual[lo:lo + step]
        chunks.append(encode(graphdef, state, on_mesh(chunk, mesh)))
    _counts["images_encoded"] += len(visual)
    return jnp.concatenate(chunks)[: len(visual)]


def score_with_images(model: nnx.Module, candidates: ImageCandidates,
                      load_visual: Callable[[int, int], np.ndarray], *, batch_size: int = 64,
                      image_batch_size: int = 32, buckets: Sequence[int] = DEFAULT_BUCKETS,
                      images_per_group: int = 1024) -> np.ndarray:
    """Score of every row (float64, row order of `candidates.encoded`).

    load_visual(lo, hi): pixels or features of unique images lo..hi-1 (`candidates.image_keys`).
    Images are taken a group at a time (at most `images_per_group`, so the device holds a
    bounded number of visual vectors): the group is encoded once, then every candidate row
    of its items is scored, batched within length buckets.
    """
    buckets = sorted(set(int(b) for b in buckets))
    encoded = candidates.encoded
    lengths = np.array([len(ids) - 1 for ids in encoded.token_ids])  # model input length
    if lengths.max() > buckets[-1]:
        raise ConfigError(f"a candidate with its image needs {lengths.max()} input positions, more than the "
                          f"largest bucket {buckets[-1]} (row {int(lengths.argmax())}); pass larger buckets")
    graphdef, state, mesh = split_model(model)
    score = _jitted(mesh, None)
    step = rows_per_batch(batch_size, encoded.num_rows, mesh)
    bucket_of_row = np.asarray(buckets)[np.searchsorted(buckets, lengths)]
    order = np.argsort(lengths, kind="stable")
    scores = np.empty(encoded.num_rows, np.float64)
    for lo in range(0, len(candidates.image_keys), images_per_group):
        hi = min(lo + images_per_group, len(candidates.image_keys))
        visual = encode_images(model, load_visual(lo, hi), batch_size=image_batch_size)
        in_group = order[(candidates.image_of_row[order] >= lo) & (candidates.image_of_row[order] < hi)]
        pending = []  # every batch of the group dispatched before any result is read back
        for bucket in buckets:
            rows = in_group[bucket_of_row[in_group] == bucket]
            for start in range(0, len(rows), step):
                chunk = rows[start:start + step]
                arrays, image_index = _pack(candidates, chunk, step, bucket, first_image=lo)
                rows_visual = jnp.take(visual, jnp.asarray(image_index), axis=0)  # stays on the device
                pending.append((chunk, score(graphdef, state, *[on_mesh(a, mesh) for a in arrays[:-1]],
                                             rows_visual, on_mesh(arrays[-1], mesh))))
        for chunk, sums in pending:
            scores[chunk] = np.asarray(sums, np.float64)[: len(chunk)]
    return scores


def _pack(candidates: ImageCandidates, rows: np.ndarray, batch: int, length: int, *, first_image: int):
    encoded = candidates.encoded
    input_ids = np.full((batch, length), encoded.pad_id, np.int32)
    targets = np.zeros((batch, length), np.int32)
    mask = np.zeros((batch, length), bool)
    segment_ids = np.zeros((batch, length), np.int32)
    image_mask = np.zeros((batch, length), bool)
    image_index = np.zeros(batch, np.int32)  # filler rows read image 0 but have no placeholders
    for b, row in enumerate(rows):
        ids, row_mask = encoded.token_ids[row], encoded.target_mask[row]
        n = len(ids) - 1
        input_ids[b, :n], targets[b, :n], mask[b, :n] = ids[:-1], ids[1:], row_mask[1:]
        segment_ids[b, :n] = 1
        start = candidates.image_start[row]
        image_mask[b, start:start + candidates.image_tokens] = True
        image_index[b] = candidates.image_of_row[row] - first_image
    positions = np.broadcast_to(np.arange(length, dtype=np.int32), (batch, length))
    return (input_ids, segment_ids, positions, targets, mask, image_mask), image_index
