"""Epoch plans: which samples go into which row of which microbatch, in what order.

Planning works on sample lengths only (no tokens, no pixels), so it is cheap,
deterministic from (seed, epoch), and identical in every JAX process: each
process then loads only its own rows of every global microbatch.

- Modality grouping: a microbatch is all text-only, all image or all video (README
  pitfalls 3-4: the reference's runs mixed modalities in every microbatch, and its
  grouped sampler appended one mixed tail batch).
- Static shapes: every microbatch has one of the configured bucket lengths and a
  fixed number of rows; the last microbatch of a bucket is filled with empty rows
  (segment id 0, no targets) rather than dropping samples.
- Packing: text-only samples are packed into rows of the largest bucket (`pack_rows`:
  next fit, then the gaps are filled from the last rows; numpy throughout).
- Interleaving: text and image microbatches are spread evenly through the epoch in
  the data's proportion, so an optimizer step never sees a long run of one modality;
  video microbatches are then spread evenly through those (with no video, the plans
  are exactly the two-modality ones).

An epoch is planned as arrays (`EpochLayout`); `EpochPlans` is the sequence of every
epoch's `MicrobatchPlan`s that the loader indexes, planning an epoch when one of its
microbatches is first asked for and keeping only the last few epochs planned.
"""
from __future__ import annotations

import bisect
import collections
import collections.abc
import dataclasses
import threading
from typing import Iterator, Optional, Sequence

import numpy as np

from jaxllava.data.batch import MODALITIES, BatchStats

# Next fit runs in independent blocks of about this many rows' worth of tokens, all blocks
# stepping together, so its Python loop runs about this many times whatever the sample count.
_BLOCK_ROWS = 256
# The last rows are taken apart to fill the other rows' gaps; they hold at least this many
# times the gaps' tokens, so the fill can choose. On the long-tailed lengths of
# benchmarks/startup.py --padding (rows of 2048), 3 pads 0.1% like first fit did; 1 padded 2.4%.
_POOL_RATIO = 3.0
_FILL_ROUNDS = 16  # each round adds at most one sample to a row
_MAX_DEPTH = 8  # what the fill leaves is packed the same way, at most this deep


@dataclasses.dataclass(frozen=True)
class MicrobatchPlan:
    modality: str  # "text" | "image" | "video"
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


# ---------------------------------------------------------------- packing


def pack_rows(order: np.ndarray, lengths: np.ndarray, row_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Pack samples (taken in the given order) into rows of at most `row_len` tokens.

    Returns (members, row_offsets): row r holds `members[row_offsets[r]:row_offsets[r + 1]]`,
    every sample of `order` exactly once, no row empty. Next fit over the order (a row closes
    when the next sample does not fit) leaves a gap at the end of each row, large where a long
    sample closed it; the samples of the last rows are then moved into those gaps, and what
    does not fit is packed again the same way. Numpy throughout: no Python loop per sample.
    """
    order = np.asarray(order, np.int64)
    lens = np.asarray(lengths)[order].astype(np.int64)
    if len(lens) and lens.max() > row_len:
        raise ValueError(f"length {int(lens.max())} exceeds the row length {row_len}")
    row_of, rows = _pack(lens, row_len, 0)
    members = order[np.argsort(row_of, kind="stable")]
    row_offsets = np.zeros(rows + 1, np.int64)
    np.cumsum(np.bincount(row_of, minlength=rows), out=row_offsets[1:])
    return members, row_offsets


def _pack(lens: np.ndarray, row_len: int, depth: int) -> tuple[np.ndarray, int]:
    """(row of each item, row count): next fit, then the last rows' items fill the gaps."""
    row_of = _next_fit(lens, row_len)
    rows = int(row_of[-1]) + 1 if len(row_of) else 0
    if depth == _MAX_DEPTH or rows < 2:
        return row_of, rows
    used = np.bincount(row_of, weights=lens, minlength=rows).astype(np.int64)
    gaps = row_len - used
    # The fewest last rows whose tokens are _POOL_RATIO times the gaps of the rows before them.
    enough = np.flatnonzero(np.cumsum(used[::-1])[::-1][1:] >= _POOL_RATIO * np.cumsum(gaps)[:-1])
    if not len(enough):
        return row_of, rows
    head = int(enough[-1]) + 1
    pool = np.flatnonzero(row_of >= head)
    placed = _fill(gaps[:head], lens[pool])
    if not (placed >= 0).any():
        return row_of, rows
    row_of[pool] = placed
    left = pool[placed < 0]
    if not len(left):
        return row_of, head
    rest, rest_rows = _pack(lens[left], row_len, depth + 1)
    row_of[left] = head + rest
    return row_of, head + rest_rows


def _next_fit(lens: np.ndarray, row_len: int) -> np.ndarray:
    """Row of each item under next fit, run independently in blocks of about _BLOCK_ROWS rows'
    tokens (each block's last row may be short; the fill uses its gap like any other)."""
    n = len(lens)
    if not n:
        return np.zeros(0, np.int64)
    ends = np.cumsum(lens)
    # A block starts with the item that holds each multiple of the block's tokens.
    cur = np.unique(np.searchsorted(ends, np.arange(0, ends[-1], row_len * _BLOCK_ROWS), side="right"))
    stop = np.r_[cur[1:], n]
    found = []
    while len(cur):
        found.append(cur)
        # The first item whose end passes the row: every item is at most row_len, so it is past cur.
        nxt = np.minimum(np.searchsorted(ends, ends[cur] - lens[cur] + row_len, side="right"), stop)
        going = nxt < stop
        cur, stop = nxt[going], stop[going]
    first = np.zeros(n, np.int64)
    first[np.concatenate(found)] = 1
    first[0] = 0
    return np.cumsum(first)


def _fill(gaps: np.ndarray, pool_lens: np.ndarray) -> np.ndarray:
    """Row for each pool item (-1: none). Each round, rows in order of widest gap take the
    longest remaining item that fits; a running maximum makes that one vectorised pass."""
    gaps = gaps.copy()
    placed = np.full(len(pool_lens), -1, np.int64)
    avail = _longest_first(pool_lens)
    for _ in range(_FILL_ROUNDS):
        if not len(avail):
            break
        avail_lens = pool_lens[avail]
        rows = np.flatnonzero(gaps >= avail_lens[-1])
        if not len(rows):
            break
        rows = rows[_longest_first(gaps[rows])]
        fits = np.searchsorted(-avail_lens, -gaps[rows], side="left")  # the longest item that fits
        k = np.arange(len(rows))
        take = k + np.maximum.accumulate(fits - k)  # ... unless a wider gap took it: then the next one
        ok = take < len(avail)
        rows, take = rows[ok], take[ok]
        placed[avail[take]] = rows
        gaps[rows] -= avail_lens[take]
        avail = np.delete(avail, take)
    return placed


def _longest_first(values: np.ndarray) -> np.ndarray:
    """Stable order of non-negative values, largest first; a radix sort where they fit 16 bits."""
    top = int(values.max()) if len(values) else 0
    return np.argsort((top - values).astype(np.uint16 if top < 2 ** 16 else np.int64), kind="stable")


# ---------------------------------------------------------------- one epoch


@dataclasses.dataclass(frozen=True)
class EpochLayout:
    """One epoch's microbatches as arrays; `plan(j)` makes the j-th MicrobatchPlan."""

    members: np.ndarray  # sample indices, row after row
    row_offsets: np.ndarray  # (rows + 1,): row r holds members[row_offsets[r]:row_offsets[r + 1]]
    kind: np.ndarray  # (microbatches,) int8: index into MODALITIES (0 text, 1 image, 2 video)
    seq_len: np.ndarray  # (microbatches,)
    first_row: np.ndarray  # (microbatches,) its first row
    rows_used: np.ndarray  # (microbatches,) rows holding samples; the rest up to the modality's rows are empty
    text_rows: int
    image_rows: int
    video_rows: int

    def __len__(self) -> int:
        return len(self.kind)

    def plan(self, j: int) -> MicrobatchPlan:
        lo = int(self.first_row[j])
        bounds = self.row_offsets[lo:lo + int(self.rows_used[j]) + 1]
        flat = self.members[bounds[0]:bounds[-1]].tolist()
        cuts = (bounds - bounds[0]).tolist()
        rows = tuple(tuple(flat[a:b]) for a, b in zip(cuts, cuts[1:]))
        kind = int(self.kind[j])
        n_rows = (self.text_rows, self.image_rows, self.video_rows)[kind]
        return MicrobatchPlan(MODALITIES[kind], int(self.seq_len[j]), rows + ((),) * (n_rows - len(rows)))

    def plans(self) -> list[MicrobatchPlan]:
        return [self.plan(j) for j in range(len(self))]

    def totals(self, values: np.ndarray) -> np.ndarray:
        """Σ values[i] over each microbatch's samples i (values: one per sample, e.g. words)."""
        values = np.asarray(values)
        running = np.zeros(len(self.members) + 1, np.result_type(values.dtype, np.int64))
        np.cumsum(values[self.members], out=running[1:])
        lo, hi = self._member_bounds()
        return running[hi] - running[lo]

    def samples(self) -> np.ndarray:
        lo, hi = self._member_bounds()
        return hi - lo

    def rows(self) -> np.ndarray:
        """Rows of each microbatch, filler rows included."""
        return np.asarray([self.text_rows, self.image_rows, self.video_rows])[self.kind]

    def _member_bounds(self) -> tuple[np.ndarray, np.ndarray]:
        return self.row_offsets[self.first_row], self.row_offsets[self.first_row + self.rows_used]


def layout_epoch(*, lengths: np.ndarray, has_image: np.ndarray, source: np.ndarray, weights: Sequence[float],
                 buckets: Sequence[int], text_rows: int, image_rows: int, pack_text: bool, seed: int,
                 epoch: int, has_video: Optional[np.ndarray] = None, video_rows: int = 1) -> EpochLayout:
    """Epoch `epoch`'s microbatches: the samples the source weights give, shuffled, split by
    modality, packed or bucketed, each modality's microbatches shuffled, then interleaved."""
    rng = np.random.default_rng([seed, epoch])
    order = epoch_samples(source, weights, rng)
    image_of = np.asarray(has_image)[order]
    video_of = np.zeros(len(order), bool) if has_video is None else np.asarray(has_video, bool)[order]
    text_order, image_order, video_order = order[~image_of & ~video_of], order[image_of], order[video_of]
    if pack_text:
        members, offsets = pack_rows(text_order, lengths, max(buckets))
        first, used = _chunks(len(offsets) - 1, text_rows)
        text = (members, offsets, first, used, np.full(len(first), max(buckets), np.int64))
    else:
        text = _bucketed(text_order, lengths, buckets, text_rows)
    groups = [text, _bucketed(image_order, lengths, buckets, image_rows)]
    # Shuffle microbatch order within each modality so buckets interleave too.
    perms = [rng.permutation(len(groups[0][2])), rng.permutation(len(groups[1][2]))]
    kind = _image_slots(len(perms[0]), len(perms[1])).astype(np.int8)
    if len(video_order):  # drawn only when there are videos: the text and image plans stay as they were
        groups.append(_bucketed(video_order, lengths, buckets, video_rows))
        perms.append(rng.permutation(len(groups[2][2])))
        video_slots = _image_slots(len(kind), len(perms[2]))
        merged = np.full(len(video_slots), 2, np.int8)
        merged[~video_slots] = kind
        kind = merged
    first_row = np.empty(len(kind), np.int64)
    rows_used = np.empty(len(kind), np.int64)
    seq_len = np.empty(len(kind), np.int64)
    shift = 0  # each modality's rows follow the previous one's
    for index, ((_, offsets, first, used, length), perm) in enumerate(zip(groups, perms)):
        mask = kind == index
        first_row[mask], rows_used[mask], seq_len[mask] = first[perm] + shift, used[perm], length[perm]
        shift += len(offsets) - 1
    # Each modality's members follow the previous ones', so its row offsets continue from theirs.
    before = np.cumsum([0] + [len(group[0]) for group in groups])
    row_offsets = [groups[0][1]] + [before[k] + group[1][1:] for k, group in enumerate(groups) if k]
    return EpochLayout(
        members=np.concatenate([group[0] for group in groups]), row_offsets=np.concatenate(row_offsets),
        kind=kind, seq_len=seq_len, first_row=first_row, rows_used=rows_used,
        text_rows=text_rows, image_rows=image_rows, video_rows=video_rows)


def plan_epoch(*, lengths: np.ndarray, has_image: np.ndarray, source: np.ndarray, weights: Sequence[float],
               buckets: Sequence[int], text_rows: int, image_rows: int, pack_text: bool, seed: int,
               epoch: int, has_video: Optional[np.ndarray] = None, video_rows: int = 1) -> list[MicrobatchPlan]:
    return layout_epoch(lengths=lengths, has_image=has_image, source=source, weights=weights, buckets=buckets,
                        text_rows=text_rows, image_rows=image_rows, pack_text=pack_text, seed=seed,
                        epoch=epoch, has_video=has_video, video_rows=video_rows).plans()


def _chunks(rows: int, n_rows: int) -> tuple[np.ndarray, np.ndarray]:
    """(first row, rows used) of each microbatch of `n_rows` rows over `rows` rows; the last may be short."""
    first = np.arange(0, rows, n_rows, dtype=np.int64)
    return first, np.minimum(n_rows, rows - first)


def _bucketed(order: np.ndarray, lengths: np.ndarray, buckets: Sequence[int], n_rows: int):
    """One sample per row, rows grouped by the smallest bucket that holds them, in bucket order:
    (members, row_offsets, first_row, rows_used, seq_len) as in EpochLayout."""
    buckets = np.asarray(buckets, np.int64)
    lens = np.asarray(lengths)[order]
    bucket = np.searchsorted(buckets, lens, side="left")
    if len(lens) and bucket.max() == len(buckets):
        raise ValueError(f"length {int(lens.max())} exceeds the largest bucket {int(buckets[-1])}")
    members = order[np.argsort(bucket, kind="stable")].astype(np.int64)
    counts = np.bincount(bucket, minlength=len(buckets))
    per = -(-counts // n_rows)  # microbatches per bucket
    of = np.repeat(np.arange(len(buckets)), per)
    k = np.arange(int(per.sum())) - np.repeat(np.cumsum(per) - per, per)  # index within the bucket
    first = (np.cumsum(counts) - counts)[of] + k * n_rows
    return (members, np.arange(len(members) + 1, dtype=np.int64), first, np.minimum(n_rows, counts[of] - k * n_rows),
            buckets[of])


def _image_slots(n_text: int, n_image: int) -> np.ndarray:
    """Bresenham: slot k holds an image microbatch when the images due among the first k+1 grow,
    so each prefix holds both modalities in about the overall ratio."""
    total = n_text + n_image
    k = np.arange(total, dtype=np.int64)
    return (k + 1) * n_image // max(total, 1) > k * n_image // max(total, 1)


def interleave(text: list, image: list) -> list:
    """Merge two lists evenly (`_image_slots`), keeping the order within each."""
    text_it, image_it = iter(text), iter(image)
    return [next(image_it) if slot else next(text_it) for slot in _image_slots(len(text), len(image))]


# ---------------------------------------------------------------- all epochs


def _narrow(values: np.ndarray) -> np.ndarray:
    """Integers as the smallest of int8/int16/int32 that holds them (int64 if none does)."""
    values = np.asarray(values)
    low, high = (int(values.min()), int(values.max())) if values.size else (0, 0)
    for dtype in (np.int8, np.int16, np.int32):
        if np.iinfo(dtype).min <= low and high <= np.iinfo(dtype).max:
            return values.astype(dtype)
    return values.astype(np.int64)


class EpochPlans(collections.abc.Sequence):
    """Every epoch's MicrobatchPlans, in training order, as one sequence (what the loader indexes).

    An epoch is planned when one of its microbatches is first asked for; the last `keep`
    planned epochs are kept, so memory holds one or two epochs whatever `epochs` is. The
    plans equal `plan_epoch` for each epoch in turn. `len()` and `epoch_starts` plan every
    epoch once (packing decides how many microbatches an epoch has; the last epoch first, so
    the first ones stay planned) and keep only the counts and the words per microbatch. Pickles without its planned epochs (Grain's workers replan
    the ones they need); thread-safe (Grain's reading threads index it concurrently).

    `words`: the BabyLM words of each sample (SampleTable.words), for `step_words` and
    `microbatch_words`.
    """

    def __init__(self, *, lengths: np.ndarray, has_image: np.ndarray, source: np.ndarray, weights: Sequence[float],
                 buckets: Sequence[int], text_rows: int, image_rows: int, pack_text: bool, seed: int, epochs: int,
                 words: Optional[np.ndarray] = None, keep: int = 2, has_video: Optional[np.ndarray] = None,
                 video_rows: int = 1):
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        # Narrowed: this object is pickled to every loader worker.
        self.lengths = _narrow(lengths)
        self.has_image = np.asarray(has_image, bool)
        self.has_video = None if has_video is None else np.asarray(has_video, bool)
        self.source = _narrow(source)
        self.words = None if words is None else _narrow(words)
        self.settings = dict(weights=tuple(weights), buckets=tuple(buckets), text_rows=text_rows,
                             image_rows=image_rows, pack_text=pack_text, seed=seed, video_rows=video_rows)
        self.epochs = epochs
        self.keep = keep
        self._sizes: list[Optional[int]] = [None] * epochs
        self._words: list[Optional[np.ndarray]] = [None] * epochs
        self._starts: Optional[list[int]] = None
        self._total = 0
        self._planned: collections.OrderedDict[int, EpochLayout] = collections.OrderedDict()
        self._lock = threading.Lock()

    def epoch(self, e: int) -> EpochLayout:
        """Epoch e's layout, planned now unless it is one of the last `keep` planned."""
        if not 0 <= e < self.epochs:
            raise IndexError(f"epoch {e} is outside 0..{self.epochs - 1}")
        with self._lock:
            layout = self._planned.get(e)
            if layout is not None:
                self._planned.move_to_end(e)
                return layout
            layout = layout_epoch(lengths=self.lengths, has_image=self.has_image, source=self.source, epoch=e,
                                  has_video=self.has_video, **self.settings)
            self._sizes[e] = len(layout)
            if self.words is not None and self._words[e] is None:
                self._words[e] = layout.totals(self.words)
            self._planned[e] = layout
            while len(self._planned) > self.keep:
                self._planned.popitem(last=False)
            return layout

    def epoch_size(self, e: int) -> int:
        """Microbatches of epoch e (plans it once if it never was)."""
        size = self._sizes[e]
        return len(self.epoch(e)) if size is None else size

    @property
    def epoch_starts(self) -> list[int]:
        """Index of each epoch's first microbatch."""
        return list(self._counted()[0])

    @property
    def planned(self) -> tuple[int, ...]:
        """The epochs held planned now, least recently used first."""
        return tuple(self._planned)

    def __len__(self) -> int:
        return self._counted()[1]

    def _counted(self) -> tuple[list[int], int]:
        if self._starts is None:
            # Last epoch first, so the first two stay planned for the first microbatches.
            sizes = [self.epoch_size(e) for e in reversed(range(self.epochs))][::-1]
            self._total = int(sum(sizes))  # before _starts: another thread reads _total once _starts is set
            self._starts = [int(s) for s in np.cumsum([0] + sizes[:-1])]
        return self._starts, self._total

    def __getitem__(self, k):
        if isinstance(k, slice):
            return [self[i] for i in range(*k.indices(len(self)))]
        k = int(k)
        if k < 0:
            k += len(self)
        if self._starts is not None:
            if not 0 <= k < self._total:
                raise IndexError(f"microbatch {k} is outside 0..{self._total - 1}")
            e = bisect.bisect_right(self._starts, k) - 1
            return self.epoch(e).plan(k - self._starts[e])
        start = 0  # not counted yet: plan only the epochs up to k's
        for e in range(self.epochs):
            size = self.epoch_size(e)
            if 0 <= k < start + size:
                return self.epoch(e).plan(k - start)
            start += size
        raise IndexError(f"microbatch {k} is outside 0..{start - 1}")

    def __iter__(self) -> Iterator[MicrobatchPlan]:
        for e in range(self.epochs):
            layout = self.epoch(e)
            for j in range(len(layout)):
                yield layout.plan(j)

    def microbatch_words(self, e: int) -> np.ndarray:
        """Words of each microbatch of epoch e (kept once computed; the layout is not)."""
        if self.words is None:
            raise ValueError("EpochPlans was made without words")
        if self._words[e] is None:
            self.epoch(e)
        return self._words[e]

    def epoch_stats(self, e: int, *, target_counts: np.ndarray, image_tokens: int,
                    video_tokens: int = 0) -> list[BatchStats]:
        """What each microbatch of epoch e feeds (MicrobatchBuilder.stats of each plan), from the
        per-sample arrays: `target_counts` as MicrobatchBuilder.target_counts, `image_tokens` N,
        `video_tokens` the fast + slow placeholders of one video."""
        layout = self.epoch(e)
        rows, samples = layout.rows(), layout.samples()
        padding = rows * layout.seq_len - layout.totals(self.lengths)
        words = self.microbatch_words(e)
        targets = layout.totals(target_counts)
        return [BatchStats(modality=MODALITIES[k], rows=int(r), seq_len=int(t), samples=int(s),
                           words=int(w), target_tokens=int(g), image_tokens=int(s) * image_tokens if k == 1 else 0,
                           padding_tokens=int(p), video_tokens=int(s) * video_tokens if k == 2 else 0)
                for k, r, t, s, w, g, p in zip(layout.kind, rows, layout.seq_len, samples, words, targets, padding)]

    def step_words(self, grad_accum: int, *, until_words: Optional[int] = None,
                   until_steps: Optional[int] = None) -> np.ndarray:
        """Words of each optimizer step of `grad_accum` consecutive microbatches (steps run across
        epoch ends; the last step may be short), planning epoch after epoch and stopping at the
        first step whose running total reaches `until_words` or at `until_steps` steps."""
        if until_steps is not None and until_steps < 1:
            raise ValueError(f"until_steps must be >= 1, got {until_steps}")
        steps: list[np.ndarray] = []
        carry = np.zeros(0, np.int64)
        done, total = 0, 0
        for e in range(self.epochs):
            words = np.concatenate([carry, self.microbatch_words(e)])
            whole = len(words) // grad_accum * grad_accum
            new = words[:whole].reshape(-1, grad_accum).sum(axis=1)
            carry = words[whole:]
            stop, finished = len(new), False
            if until_words is not None:
                reached = np.flatnonzero(total + np.cumsum(new) >= until_words)
                if len(reached):
                    stop, finished = int(reached[0]) + 1, True
            if until_steps is not None and done + stop >= until_steps:
                stop, finished = until_steps - done, True
            steps.append(new[:stop])
            if finished:
                return np.concatenate(steps)
            done, total = done + len(new), total + int(new.sum())
        if len(carry):
            steps.append(np.array([carry.sum()], np.int64))
        return np.concatenate(steps) if steps else np.zeros(0, np.int64)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_planned"] = collections.OrderedDict()
        del state["_lock"]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()
