"""Epoch planning: modality grouping, buckets, packing, interleaving, weights, determinism."""
from __future__ import annotations

import numpy as np

from jaxllava.data.packing import bucket_for, epoch_samples, interleave, pack_rows, plan_epoch


def plan(lengths, has_image, *, pack=True, seed=0, epoch=0, weights=(1.0,), source=None, buckets=(16, 32)):
    lengths = np.asarray(lengths)
    source = np.zeros(len(lengths), np.int32) if source is None else np.asarray(source)
    return plan_epoch(lengths=lengths, has_image=np.asarray(has_image), source=source, weights=weights,
                      buckets=buckets, text_rows=4, image_rows=2, pack_text=pack, seed=seed, epoch=epoch)


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


def test_packing_fills_rows_and_never_exceeds_row_length():
    lengths = np.array([5, 9, 3, 7, 2, 8, 6])
    rows = pack_rows(np.arange(7), lengths, 10)
    assert sorted(i for r in rows for i in r) == list(range(7))
    assert all(sum(lengths[i] for i in r) <= 10 for r in rows)
    assert rows[0] == (0, 2, 4)  # first fit: 5 + 3 + 2


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
