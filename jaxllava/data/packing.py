"""Epoch plans: which samples go into which row of which microbatch, in what order.

Planning works on sample lengths only (no tokens, no pixels), so it is cheap,
deterministic from (seed, epoch), and identical in every JAX process: each
process then loads only its own rows of every global microbatch.

- Modality grouping: a microbatch is all text-only or all image (README pitfalls 3-4:
  the reference's runs mixed modalities in every microbatch, and its grouped
  sampler appended one mixed tail batch).
- Static shapes: every microbatch has one of the configured bucket lengths and a
  fixed number of rows; the last microbatch of a bucket is filled with empty rows
  (segment id 0, no targets) rather than dropping samples.
- Packing: text-only samples are packed first-fit into rows of the largest bucket.
- Interleaving: text and image microbatches are spread evenly through the epoch in
  the data's proportion, so an optimizer step never sees a long run of one modality.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class MicrobatchPlan:
    modality: str  # "text" | "image"
    seq_len: int
    rows: tuple[tuple[int, ...], ...]  # sample indices per row (empty tuple: a filler row)


def bucket_for(length: int, buckets: Sequence[int]) -> int:
    for b in buckets:
        if length <= b:
            return b
    raise ValueError(f"length {length} exceeds the largest bucket {max(buckets)}")


def epoch_samples(source: np.ndarray, weights: Sequence[float], rng: np.random.Generator) -> np.ndarray:
    """Sample indices of one epoch with per-source weights, shuffled.

    Weight w gives floor(w) copies of every record of that source plus a seeded
    random fraction (w - floor(w)) of its records.
    """
    chosen = []
    for s, weight in enumerate(weights):
        members = np.flatnonzero(source == s)
        whole, frac = int(weight), weight - int(weight)
        chosen.extend([members] * whole)
        if frac > 0:
            k = int(round(frac * len(members)))
            chosen.append(np.sort(rng.choice(members, size=k, replace=False)))
    order = np.concatenate(chosen) if chosen else np.zeros(0, np.int64)
    return order[rng.permutation(len(order))]


def pack_rows(order: np.ndarray, lengths: np.ndarray, row_len: int, max_open: int = 64) -> list[tuple[int, ...]]:
    """First-fit packing of samples (in the given order) into rows of `row_len` tokens."""
    rows: list[list[int]] = []
    space: list[int] = []
    open_rows: list[int] = []  # indices into rows that still have space
    for i in order:
        n = int(lengths[i])
        for k, r in enumerate(open_rows):
            if space[r] >= n:
                rows[r].append(int(i))
                space[r] -= n
                if space[r] == 0:
                    open_rows.pop(k)
                break
        else:
            rows.append([int(i)])
            space.append(row_len - n)
            if space[-1] > 0:
                open_rows.append(len(rows) - 1)
                if len(open_rows) > max_open:
                    open_rows.pop(0)  # close the oldest: keeps packing O(n · max_open)
    return [tuple(r) for r in rows]


def _chunk(rows: list[tuple[int, ...]], n_rows: int, modality: str, seq_len: int) -> list[MicrobatchPlan]:
    plans = []
    for lo in range(0, len(rows), n_rows):
        chunk = rows[lo:lo + n_rows]
        chunk = chunk + [()] * (n_rows - len(chunk))
        plans.append(MicrobatchPlan(modality, seq_len, tuple(chunk)))
    return plans


def _bucketed(order: np.ndarray, lengths: np.ndarray, buckets: Sequence[int], n_rows: int,
              modality: str) -> list[MicrobatchPlan]:
    by_bucket: dict[int, list[tuple[int, ...]]] = {}
    for i in order:
        by_bucket.setdefault(bucket_for(int(lengths[i]), buckets), []).append((int(i),))
    plans = []
    for b in sorted(by_bucket):
        plans.extend(_chunk(by_bucket[b], n_rows, modality, b))
    return plans


def interleave(text: list[MicrobatchPlan], image: list[MicrobatchPlan]) -> list[MicrobatchPlan]:
    """Merge two lists evenly (Bresenham): each prefix holds both in about the overall ratio."""
    total = len(text) + len(image)
    out, t, i = [], 0, 0
    for k in range(total):
        if (k + 1) * len(image) // total > i:  # images due among the first k+1
            out.append(image[i])
            i += 1
        else:
            out.append(text[t])
            t += 1
    return out


def plan_epoch(*, lengths: np.ndarray, has_image: np.ndarray, source: np.ndarray, weights: Sequence[float],
               buckets: Sequence[int], text_rows: int, image_rows: int, pack_text: bool, seed: int,
               epoch: int) -> list[MicrobatchPlan]:
    rng = np.random.default_rng([seed, epoch])
    order = epoch_samples(source, weights, rng)
    text_order = order[~has_image[order]]
    image_order = order[has_image[order]]
    if pack_text:
        text = _chunk(pack_rows(text_order, lengths, max(buckets)), text_rows, "text", max(buckets))
    else:
        text = _bucketed(text_order, lengths, buckets, text_rows, "text")
    image = _bucketed(image_order, lengths, buckets, image_rows, "image")
    # Shuffle microbatch order within each modality so buckets interleave too.
    text = [text[k] for k in rng.permutation(len(text))]
    image = [image[k] for k in rng.permutation(len(image))]
    return interleave(text, image)
