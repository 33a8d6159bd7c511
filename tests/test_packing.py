"""Epoch planning: modality grouping, buckets, packing, interleaving, weights, determinism, lazy epochs."""
from __future__ import annotations

import concurrent.futures
import pickle
import sys

import numpy as np
import pytest

from jaxllava.data import packing
from jaxllava.data.packing import (EpochPlans, bucket_for, epoch_samples, interleave, pack_rows, plan_epoch)


def plan(lengths, has_image, *, pack=True, seed=0, epoch=0, weights=(1.0,), source=None, buckets=(16, 32)):
    lengths = np.asarray(lengths)
    source = np.zeros(len(lengths), np.int32) if source is None else np.asarray(source)
    return plan_epoch(lengths=lengths, has_image=np.asarray(has_image), source=source, weights=weights,
                      buckets=buckets, text_rows=4, image_rows=2, pack_text=pack, seed=seed, epoch=epoch)


def padding(lengths, row_offsets, row_len):
    return 1 - lengths.sum() / ((len(row_offsets) - 1) * row_len)


def long_tailed(n, seed=0):
    """Mostly short lines and a long tail up to the row length: where next fit alone wastes most."""
    rng = np.random.default_rng(seed)
    return np.minimum(np.ceil(rng.pareto(1.2, n) * 10) + 2, 512).astype(np.int64)


def short_sentences(n, seed=0):
    """Like the bundled text records (BOS + 4-12 words) in rows of 64 (configs/tiny.yaml)."""
    return np.random.default_rng(seed).integers(5, 14, n)


def test_every_microbatch_is_single_modality_and_covers_each_sample_once():
    rng = np.random.default_rng(1)
    lengths = rng.integers(3, 30, 200)
    has_image = rng.random(200) < 0.3
    plans = plan(lengths, has_image)
    seen = []
    for p in plans:
        members = [i for row in p.rows for i in row]
        assert all(has_image[i] == (p.modality == "image") for i in members)
        seen.extend(members)
    assert sorted(seen) == list(range(200))


def test_shapes_come_from_the_bucket_set():
    rng = np.random.default_rng(2)
    lengths = rng.integers(3, 30, 100)
    for pack in (True, False):
        plans = plan(lengths, rng.random(100) < 0.5, pack=pack)
        assert {p.seq_len for p in plans} <= {16, 32}
        for p in plans:
            assert len(p.rows) == (2 if p.modality == "image" else 4)
            for row in p.rows:
                assert sum(lengths[i] for i in row) <= p.seq_len


def test_unpacked_samples_go_to_the_smallest_bucket_that_holds_them_in_epoch_order():
    rng = np.random.default_rng(4)
    lengths = rng.integers(3, 30, 300)
    has_image = rng.random(300) < 0.5
    plans = plan(lengths, has_image, pack=False)
    for p in plans:
        assert all(bucket_for(int(lengths[i]), (16, 32)) == p.seq_len for row in p.rows for i in row)
    # Within a bucket, rows follow the epoch's shuffled order.
    order = epoch_samples(np.zeros(300, np.int32), [1.0], np.random.default_rng([0, 0]))
    rank = np.argsort(order)
    for modality in ("text", "image"):
        for length in (16, 32):
            chunks = [p for p in plans if p.modality == modality and p.seq_len == length]
            chunks.sort(key=lambda p: rank[p.rows[0][0]])
            members = [i for p in chunks for row in p.rows for i in row]
            assert members == sorted(members, key=lambda i: rank[i])


@pytest.mark.parametrize("lengths, row_len", [
    (long_tailed(20_000), 512),
    (short_sentences(5_000), 64),
    (np.full(300, 64), 64),  # every sample fills a row
    (np.array([64, 1] * 50), 64),
    (np.random.default_rng(3).integers(1, 2049, 3_000), 2048),
    (np.array([7]), 64),
    (np.zeros(0, np.int64), 64),
])
def test_packing_keeps_every_sample_once_and_never_exceeds_the_row(lengths, row_len):
    order = np.random.default_rng(0).permutation(len(lengths))
    members, offsets = pack_rows(order, lengths, row_len)
    assert sorted(members.tolist()) == sorted(order.tolist())
    assert offsets[0] == 0 and offsets[-1] == len(members) and (np.diff(offsets) > 0).all()
    if len(members):
        assert np.add.reduceat(lengths[members], offsets[:-1]).max() <= row_len


def test_packing_refuses_a_sample_longer_than_the_row():
    with pytest.raises(ValueError, match="length 65 exceeds the row length 64"):
        pack_rows(np.arange(2), np.array([3, 65]), 64)


def test_packing_pads_about_as_little_as_first_fit():
    """Next fit alone pads 14.6% of these long-tailed rows (a long sample closes a row early) and
    6.8% of the short-sentence rows; filling the gaps from the last rows gives 0.1% and 1.7%,
    where first fit with 64 open rows gave 0.2% and 2.5%."""
    lengths = long_tailed(20_000)
    _, offsets = pack_rows(np.random.default_rng(0).permutation(len(lengths)), lengths, 512)
    assert padding(lengths, offsets, 512) < 0.005
    lengths = short_sentences(30_000)
    _, offsets = pack_rows(np.random.default_rng(0).permutation(len(lengths)), lengths, 64)
    assert padding(lengths, offsets, 64) < 0.025


def test_packing_work_does_not_grow_with_the_sample_count():
    """Numpy calls, not a Python step per sample: ten times the samples, about the same calls."""
    def calls(n):
        lengths = long_tailed(n, seed=1)
        count = 0

        def profile(frame, event, arg):
            nonlocal count
            count += event == "c_call"

        sys.setprofile(profile)
        try:
            pack_rows(np.arange(n), lengths, 512)
        finally:
            sys.setprofile(None)
        return count

    # First fit made several calls per sample; here the count grows with the depth of the refill.
    assert calls(200_000) < 200_000 / 20 and calls(200_000) < 3 * calls(20_000)


def test_packing_is_deterministic_from_the_order():
    lengths = long_tailed(5_000)
    order = np.random.default_rng(5).permutation(len(lengths))
    first, second = pack_rows(order, lengths, 512), pack_rows(order.copy(), lengths.copy(), 512)
    assert all(np.array_equal(a, b) for a, b in zip(first, second))


def test_image_rows_hold_one_sample_each():
    plans = plan([20] * 5, [True] * 5)
    assert all(len(row) <= 1 for p in plans for row in p.rows)
    # 5 image samples in microbatches of 2 rows: the last one gets an empty filler row.
    assert sum(1 for p in plans for row in p.rows if not row) == 1


def test_interleave_spreads_modalities_evenly():
    text = [("t", k) for k in range(30)]
    image = [("i", k) for k in range(10)]
    out = interleave(text, image)
    assert len(out) == 40 and out.count(("i", 0)) == 1
    kinds = [o[0] for o in out]
    # Every window of 4 microbatches holds exactly one image microbatch (ratio 1:3).
    assert all(kinds[k:k + 4].count("i") == 1 for k in range(0, 40, 4))
    assert [o for o in out if o[0] == "t"] == text  # order within a modality kept


def test_plan_is_deterministic_and_reshuffled_each_epoch():
    rng = np.random.default_rng(3)
    lengths = rng.integers(3, 30, 120)
    has_image = rng.random(120) < 0.4
    assert plan(lengths, has_image, epoch=0) == plan(lengths, has_image, epoch=0)
    assert plan(lengths, has_image, epoch=0) != plan(lengths, has_image, epoch=1)
    assert plan(lengths, has_image, seed=0) != plan(lengths, has_image, seed=1)


def test_source_weights_repeat_or_subsample_records():
    source = np.array([0] * 10 + [1] * 10)
    order = epoch_samples(source, [2.0, 0.5], np.random.default_rng(0))
    counts = np.bincount(order, minlength=20)
    assert (counts[:10] == 2).all()
    assert counts[10:].sum() == 5 and set(counts[10:]) <= {0, 1}


def test_bucket_for_picks_smallest_fitting_bucket():
    assert bucket_for(16, (16, 32)) == 16 and bucket_for(17, (16, 32)) == 32


# ---------------------------------------------------------------- EpochPlans

SETTINGS = dict(weights=(1.0, 0.5), buckets=(16, 32), text_rows=4, image_rows=2, seed=3)


def data(n=400, seed=7):
    rng = np.random.default_rng(seed)
    return dict(lengths=rng.integers(3, 30, n), has_image=rng.random(n) < 0.3, source=(rng.random(n) < 0.5).astype(
        np.int32), words=rng.integers(1, 20, n))


def eager(arrays, epochs, pack=True):
    per_epoch = [plan_epoch(lengths=arrays["lengths"], has_image=arrays["has_image"], source=arrays["source"],
                            pack_text=pack, epoch=e, **SETTINGS) for e in range(epochs)]
    return per_epoch, [p for epoch in per_epoch for p in epoch]


def lazy(arrays, epochs, pack=True, keep=2):
    return EpochPlans(epochs=epochs, pack_text=pack, keep=keep, **arrays, **SETTINGS)


@pytest.mark.parametrize("pack", [True, False])
def test_epoch_plans_equal_planning_every_epoch_up_front(pack):
    arrays = data()
    per_epoch, flat = eager(arrays, 4, pack)
    plans = lazy(arrays, 4, pack, keep=1)
    assert len(plans) == len(flat)
    assert plans.epoch_starts == list(np.cumsum([0] + [len(e) for e in per_epoch[:-1]]))
    assert len(set(len(e) for e in per_epoch)) > 1  # the half-weighted source makes epochs differ
    assert list(plans) == flat
    scrambled = np.random.default_rng(0).permutation(len(flat))  # jumps between epochs, one kept
    assert [plans[int(k)] for k in scrambled] == [flat[k] for k in scrambled]
    assert plans[-1] == flat[-1] and plans[3:9] == flat[3:9] and plans[:plans.epoch_starts[1]] == per_epoch[0]
    with pytest.raises(IndexError):
        plans[len(flat)]


def test_epoch_plans_keep_only_the_last_epochs_planned():
    plans = lazy(data(), 5, keep=2)
    assert plans.planned == ()
    plans[0]
    assert plans.planned == (0,)  # uncounted: indexing plans only the epochs up to the index's
    plans = lazy(data(), 5, keep=2)
    len(plans)  # counting plans every epoch once, the last first: the first two stay planned
    assert plans.planned == (1, 0)
    plans[plans.epoch_starts[3]]
    assert plans.planned == (0, 3)


def test_epoch_plans_pickle_without_their_planned_epochs():
    arrays = data(n=4000)
    plans = lazy(arrays, 3)
    before = len(pickle.dumps(plans))
    assert before < 5 * 4000 + 2048  # the per-sample arrays narrowed: 4 bytes a sample here, not 21
    list(plans)
    after = pickle.dumps(plans)
    copy = pickle.loads(after)
    # Counts and words per microbatch only, not the epochs' sample indices (3 x 4000).
    assert copy.planned == () and len(after) - before < 8 * len(plans) + 1024
    assert list(copy) == list(plans) and copy[5] == plans[5]


def test_epoch_plans_are_safe_to_index_from_threads():
    arrays = data()
    _, flat = eager(arrays, 4)
    plans = lazy(arrays, 4, keep=1)
    scrambled = [int(k) for k in np.random.default_rng(1).permutation(len(flat))]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        assert list(pool.map(plans.__getitem__, scrambled)) == [flat[k] for k in scrambled]


def test_epoch_plans_feed_grain_like_a_list():
    import grain

    arrays = data()
    _, flat = eager(arrays, 2)
    assert list(grain.MapDataset.source(lazy(arrays, 2))) == flat


def words_of(plan, words):
    return sum(int(words[i]) for row in plan.rows for i in row)


@pytest.mark.parametrize("grad_accum", [1, 3])
def test_step_words_match_the_plans_and_stop_at_the_budget(grad_accum):
    arrays = data()
    _, flat = eager(arrays, 3)
    per_microbatch = [words_of(p, arrays["words"]) for p in flat]
    expected = np.array([sum(per_microbatch[k:k + grad_accum]) for k in range(0, len(flat), grad_accum)])
    assert np.array_equal(lazy(arrays, 3).step_words(grad_accum), expected)  # the last step may be short
    budget = int(expected.sum() * 0.2)
    reach = int(np.searchsorted(np.cumsum(expected), budget)) + 1
    plans = lazy(arrays, 3)
    assert np.array_equal(plans.step_words(grad_accum, until_words=budget), expected[:reach])
    assert plans.planned == (0,)  # the budget falls in the first epoch: nothing else was planned
    assert np.array_equal(lazy(arrays, 3).step_words(grad_accum, until_steps=7), expected[:7])
    assert np.array_equal(lazy(arrays, 3).step_words(grad_accum, until_words=budget, until_steps=2), expected[:2])
    assert np.array_equal(lazy(arrays, 3).step_words(grad_accum, until_words=10 ** 9), expected)


def test_epoch_stats_equal_the_builders_stats_of_each_plan():
    from jaxllava.data.pipeline import MicrobatchBuilder
    from jaxllava.data.samples import SampleTable

    arrays = data(n=150)
    n, rng = 150, np.random.default_rng(2)
    offsets = np.zeros(n + 1, np.int64)
    np.cumsum(arrays["lengths"], out=offsets[1:])
    table = SampleTable(tokens=np.zeros(offsets[-1], np.int32), is_target=rng.random(offsets[-1]) < 0.7,
                        offsets=offsets, image_start=np.where(arrays["has_image"], 1, -1).astype(np.int32),
                        words=arrays["words"], source=arrays["source"], truncated=np.zeros(n, bool),
                        images=[None] * n, is_video=np.zeros(n, bool), videos=[None] * n,
                        feature_rows=np.full(n, -1), ids=[str(i) for i in range(n)],
                        origins=[""] * n)
    builder = MicrobatchBuilder(table, None, image_tokens=6, processing=None)
    plans = lazy(arrays, 2)
    for e in range(2):
        stats = plans.epoch_stats(e, target_counts=builder.target_counts, image_tokens=6)
        lo = plans.epoch_starts[e]
        assert stats == [builder.stats(plans[lo + j]) for j in range(len(stats))]
    assert sum(s.words for s in plans.epoch_stats(0, target_counts=builder.target_counts, image_tokens=6)) == \
        plans.microbatch_words(0).sum()


def test_counting_microbatches_plans_each_epoch_once(monkeypatch):
    made = []
    real = packing.layout_epoch
    monkeypatch.setattr(packing, "layout_epoch", lambda **kw: made.append(kw["epoch"]) or real(**kw))
    plans = lazy(data(), 4)
    len(plans), plans.epoch_starts, plans.step_words(2)
    assert sorted(made) == [0, 1, 2, 3]


@pytest.mark.parametrize("with_images", [True, False])
def test_video_microbatches_hold_only_videos_in_their_buckets(with_images):
    rng = np.random.default_rng(5)
    n = 120
    lengths = rng.integers(3, 30, n)
    kind = rng.choice(3, n, p=[0.5, 0.3 if with_images else 0.0, 0.5 if not with_images else 0.2])
    plans = plan_epoch(lengths=lengths, has_image=kind == 1, has_video=kind == 2, video_rows=3,
                       source=np.zeros(n, np.int32), weights=(1.0,), buckets=(16, 32), text_rows=4, image_rows=2,
                       pack_text=True, seed=1, epoch=0)
    videos = [p for p in plans if p.modality == "video"]
    assert all(len(p.rows) == 3 and all(len(r) <= 1 for r in p.rows) for p in videos)
    for plan in plans:
        members = [i for row in plan.rows for i in row]
        assert {int(kind[i]) for i in members} <= {{"text": 0, "image": 1, "video": 2}[plan.modality]}
        assert all(lengths[i] <= plan.seq_len for i in members)
    assert sorted(i for p in plans for row in p.rows for i in row) == list(range(n))  # each sample once
    per_bucket = [int(((kind == 2) & (lengths <= 16)).sum()), int(((kind == 2) & (lengths > 16)).sum())]
    assert len(videos) == sum(-(-count // 3) for count in per_bucket)
    # spread through the epoch, not bunched at one end
    where = [k for k, p in enumerate(plans) if p.modality == "video"]
    assert where[0] < len(plans) // 4 and where[-1] > 3 * len(plans) // 4
