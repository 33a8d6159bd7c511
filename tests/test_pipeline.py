"""The Grain pipeline end to end on small generated data: modality types, placeholders,
packing boundaries, determinism, iterator save/restore, per-process shares, stats."""
from __future__ import annotations

import dataclasses
import os

import numpy as np
import pytest
from conftest import image_record, text_record, write_json, write_jsonl, write_png

from jaxllava.data.batch import IGNORE, ImageBatch, TextBatch, batch_arrays
from jaxllava.data.config import DataConfig, SourceConfig
from jaxllava.data.pipeline import DataPipeline
from jaxllava.data.tokenizer import special_ids
from jaxllava.errors import DataError

N = 6
SENTENCES = ["the dog runs .", "these dogs run .", "a cat sees the dog .", "the big cat runs .",
             "those cats see a dog .", "this dog is small ."]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipe")
    texts = [text_record(i, SENTENCES[i % len(SENTENCES)]) for i in range(37)]
    colours = [(200, 0, 0), (0, 0, 200), (0, 200, 0)]
    images = []
    for i in range(11):
        write_png(str(root / "img" / f"{i}.png"), size=(10 + i, 8), color=colours[i % 3])
        images.append(image_record(i, f"img/{i}.png", ["a red circle", "two blue squares", "one square"][i % 3]))
    return write_jsonl(root / "text.jsonl", texts), write_json(root / "images.json", images)


def pipeline(files, tok_dir, process_index=0, process_count=1, **overrides):
    text, images = files
    settings = dict(sources=(SourceConfig(text), SourceConfig(images)), tokenizer=tok_dir, buckets=(16, 32),
                    text_rows=4, image_rows=2, epochs=2)
    cfg = DataConfig(**{**settings, **overrides})
    return DataPipeline(cfg, image_tokens=N, image_size=8, process_index=process_index,
                        process_count=process_count)


def all_batches(p, **kw):
    it = p.iterator(**kw)
    return [next(it) for _ in range(len(p))]


def test_text_only_batches_carry_no_pixels_and_no_image_ids(files, word_tokenizer_dir):
    p = pipeline(files, word_tokenizer_dir)
    ids = special_ids(p.tokenizer)
    batches = all_batches(p)
    text = [b for b in batches if b.modality == "text"]
    assert text and all(isinstance(b, TextBatch) for b in text)
    for b in text:
        assert not hasattr(b, "pixels") and "pixels" not in batch_arrays(b)
        assert not np.isin(b.input_ids, [ids.im_start, ids.im_patch, ids.im_end]).any()
        assert b.stats.image_tokens == 0


def test_image_rows_have_exactly_n_placeholders_with_no_targets(files, word_tokenizer_dir):
    p = pipeline(files, word_tokenizer_dir)
    ids = special_ids(p.tokenizer)
    image = [b for b in all_batches(p) if b.modality == "image"]
    assert image and all(isinstance(b, ImageBatch) for b in image)
    for b in image:
        assert b.pixels.shape == (2, 8, 8, 3) and b.pixels.dtype == np.float32
        for r in range(2):
            placeholders = np.isin(b.input_ids[r], [ids.im_start, ids.im_patch, ids.im_end])
            if b.image_rows[r]:
                assert placeholders.sum() == N
                assert (b.image_mask[r] == placeholders).all()
                # No position predicts a placeholder, and none inside the span predicts anything
                # except the last (<im_end>) which predicts the caption's first word.
                span = np.flatnonzero(b.image_mask[r])
                assert (b.targets[r, span[0] - 1:span[-1]] == IGNORE).all()
                assert b.targets[r, span[-1]] != IGNORE
            else:
                assert not placeholders.any() and not b.image_mask[r].any()
                assert (b.segment_ids[r] == 0).all()
        assert b.stats.image_tokens == N * int(b.image_rows.sum())


def test_a_span_that_disagrees_with_the_image_token_count_is_refused_where_the_microbatch_is_made(
        files, word_tokenizer_dir):
    """The model overwrites exactly the masked positions, so the builder checks each row: one whole
    span of I placeholders where an image goes, and no placeholder id anywhere else."""
    from jaxllava.data.pipeline import MicrobatchBuilder

    p = pipeline(files, word_tokenizer_dir)
    image_plan = next(plan for plan in p.plans if plan.modality == "image")
    text_plan = next(plan for plan in p.plans if plan.modality == "text")
    p.builder(image_plan), p.builder(text_plan)  # consistent: no error
    wrong_count = MicrobatchBuilder(p.table, p.ids, image_tokens=N + 1, processing=p.processing)
    with pytest.raises(DataError, match=rf"microbatch row 0 holds {N} placeholder ids.*span of {N + 1}"):
        wrong_count(image_plan)
    # a placeholder id inside a text sample (say, a tokenizer that produces one from text)
    (first,) = text_plan.rows[0][:1]
    start = int(p.table.offsets[first]) + 1
    p.table.tokens[start] = p.ids.im_patch  # this test's own pipeline
    with pytest.raises(DataError, match=r"row 0 holds 1 placeholder ids, 0 of them where an image or video goes"):
        p.builder(text_plan)


def test_packed_rows_restart_positions_and_never_target_across_segments(files, word_tokenizer_dir):
    p = pipeline(files, word_tokenizer_dir)
    text = [b for b in all_batches(p) if b.modality == "text"]
    assert any(b.segment_ids.max() > 1 for b in text)  # packing happened
    for b in text:
        for r in range(b.input_ids.shape[0]):
            seg, pos, tgt, inp = b.segment_ids[r], b.positions[r], b.targets[r], b.input_ids[r]
            for t in range(len(seg)):
                if seg[t] == 0:
                    assert tgt[t] == IGNORE
                    continue
                if t == 0 or seg[t - 1] != seg[t]:
                    assert pos[t] == 0
                else:
                    assert pos[t] == pos[t - 1] + 1
                last_of_segment = t + 1 == len(seg) or seg[t + 1] != seg[t]
                if last_of_segment:
                    assert tgt[t] == IGNORE
                else:
                    assert tgt[t] == inp[t + 1]


def test_shapes_stay_in_the_bucket_set(files, word_tokenizer_dir):
    for pack in (True, False):
        p = pipeline(files, word_tokenizer_dir, pack_text=pack)
        shapes = {(b.modality, b.input_ids.shape) for b in all_batches(p)}
        assert {s[1][1] for s in shapes} <= {16, 32}
        assert {s[1][0] for s in shapes if s[0] == "text"} == {4}
        assert {s[1][0] for s in shapes if s[0] == "image"} == {2}


def test_every_sample_is_fed_once_per_epoch_and_words_match(files, word_tokenizer_dir):
    p = pipeline(files, word_tokenizer_dir)
    epoch = p.plans[:p.epoch_starts[1]]
    members = sorted(i for plan in epoch for row in plan.rows for i in row)
    assert members == list(range(len(p.table)))
    words = sum(p.builder.stats(plan).words for plan in epoch)
    assert words == p.summary.words == int(p.table.words.sum())


def test_pipeline_is_deterministic(files, word_tokenizer_dir):
    a = all_batches(pipeline(files, word_tokenizer_dir))
    b = all_batches(pipeline(files, word_tokenizer_dir))
    for x, y in zip(a, b):
        assert x.modality == y.modality
        for k in batch_arrays(x):
            np.testing.assert_array_equal(batch_arrays(x)[k], batch_arrays(y)[k])


def test_iterator_state_restores_mid_epoch(files, word_tokenizer_dir):
    p = pipeline(files, word_tokenizer_dir)
    it = p.iterator()
    for _ in range(5):
        next(it)
    state = it.get_state()
    expected = [next(it) for _ in range(4)]
    fresh = pipeline(files, word_tokenizer_dir).iterator()
    fresh.set_state(state)
    for want in expected:
        got = next(fresh)
        assert got.stats == want.stats
        for k in batch_arrays(want):
            np.testing.assert_array_equal(batch_arrays(got)[k], batch_arrays(want)[k])


def test_process_shares_are_disjoint_and_complete(files, word_tokenizer_dir):
    whole = all_batches(pipeline(files, word_tokenizer_dir))
    parts = [all_batches(pipeline(files, word_tokenizer_dir, process_index=i, process_count=2)) for i in range(2)]
    for k, batch in enumerate(whole):
        joined = np.concatenate([parts[0][k].input_ids, parts[1][k].input_ids])
        np.testing.assert_array_equal(joined, batch.input_ids)
        # Every process reports the global microbatch's stats, so word counts agree across hosts.
        assert parts[0][k].stats == parts[1][k].stats == batch.stats


def test_rows_not_divisible_by_processes_is_an_error(files, word_tokenizer_dir):
    with pytest.raises(DataError, match="not divisible"):
        pipeline(files, word_tokenizer_dir, process_index=0, process_count=3)


def test_modalities_interleave_within_an_epoch(files, word_tokenizer_dir):
    p = pipeline(files, word_tokenizer_dir)
    kinds = [plan.modality for plan in p.plans[:p.epoch_starts[1]]]
    n_image = kinds.count("image")
    half = len(kinds) // 2
    # Each half of the epoch holds about half of the image microbatches.
    assert abs(kinds[:half].count("image") - n_image / 2) <= 1


def test_use_images_false_makes_every_batch_text_only(files, word_tokenizer_dir):
    p = pipeline(files, word_tokenizer_dir, use_images=False)
    assert p.summary.image_samples == 0 and p.summary.text_samples == 48
    assert all(isinstance(b, TextBatch) for b in all_batches(p))


def test_missing_image_is_an_error_naming_file_record_and_field(tmp_path, word_tokenizer_dir):
    path = write_json(tmp_path / "bad.json", [image_record(0, "nowhere.png", "a red circle")])
    cfg = DataConfig(sources=(SourceConfig(path),), tokenizer=word_tokenizer_dir, buckets=(16,))
    with pytest.raises(DataError, match=r"bad.json.*record 0.*id 'i0'.*field 'image'"):
        DataPipeline(cfg, image_tokens=N, image_size=8)


def test_corrupt_image_is_a_counted_skip_under_skip_policy(tmp_path, word_tokenizer_dir):
    (tmp_path / "broken.png").write_bytes(b"not a png at all")
    write_png(str(tmp_path / "ok.png"))
    path = write_json(tmp_path / "recs.json", [image_record(0, "broken.png", "a red circle"),
                                                image_record(1, "ok.png", "a red circle")])
    cfg = DataConfig(sources=(SourceConfig(path),), tokenizer=word_tokenizer_dir, buckets=(16,),
                     on_bad_record="skip", image_rows=1)
    p = DataPipeline(cfg, image_tokens=N, image_size=8)
    assert p.summary.image_samples == 1 and p.table.ids == ["i1"]
    assert p.summary.skips.counts["corrupt_image"] == 1


def test_image_records_need_a_vision_tower(files, word_tokenizer_dir):
    text, images = files
    cfg = DataConfig(sources=(SourceConfig(images),), tokenizer=word_tokenizer_dir, buckets=(16, 32))
    with pytest.raises(DataError, match="vision tower"):
        DataPipeline(cfg, image_tokens=0, image_size=None)


def test_worker_processes_yield_the_same_batches_and_restore_state(files, word_tokenizer_dir):
    p = pipeline(files, word_tokenizer_dir)
    expected = all_batches(p, num_workers=0)
    it = p.iterator(num_workers=2)
    try:
        got = [next(it) for _ in range(6)]
        state = it.get_state()
    finally:
        it.close()
    resumed = pipeline(files, word_tokenizer_dir).iterator(num_workers=2)
    try:
        resumed.set_state(state)
        got += [next(resumed) for _ in range(3)]
    finally:
        resumed.close()
    for want, have in zip(expected, got):
        assert want.stats == have.stats
        for k in batch_arrays(want):
            np.testing.assert_array_equal(batch_arrays(want)[k], batch_arrays(have)[k])


def test_the_fingerprint_covers_everything_that_changes_the_batches_and_nothing_else(files, word_tokenizer_dir,
                                                                                     tmp_path):
    import shutil

    from conftest import make_word_tokenizer

    base = pipeline(files, word_tokenizer_dir).summary.fingerprint
    text, images = files
    changed = {
        "tokenizer": dict(tokenizer=make_word_tokenizer(str(tmp_path / "tok"), extra_words=("zebra",))),
        "buckets": dict(buckets=(16, 48)),
        "weights": dict(sources=(SourceConfig(text, weight=2.0), SourceConfig(images))),
        "epochs": dict(epochs=3),
        "seed": dict(seed=1),
        "rows": dict(text_rows=2),
        "held out": dict(validation_fraction=0.1),
    }
    for what, overrides in changed.items():
        assert pipeline(files, word_tokenizer_dir, **overrides).summary.fingerprint != base, what
    moved = tmp_path / "moved"
    moved.mkdir()
    for path in files:
        shutil.copy(path, moved)
    shutil.copytree(os.path.dirname(images) + "/img", moved / "img")
    same = {"speed only": dict(num_workers=2, prefetch=5), "data moved": dict(sources=(
        SourceConfig(str(moved / os.path.basename(text))), SourceConfig(str(moved / os.path.basename(images)))))}
    for what, overrides in same.items():
        assert pipeline(files, word_tokenizer_dir, **overrides).summary.fingerprint == base, what


def test_image_records_trained_as_text_need_no_image_file(tmp_path, word_tokenizer_dir):
    path = write_jsonl(tmp_path / "r.jsonl", [image_record(0, "absent.png", "a red circle")])
    cfg = DataConfig(sources=(SourceConfig(path),), tokenizer=word_tokenizer_dir, buckets=(16,), text_rows=1,
                     image_rows=1)
    with pytest.raises(DataError, match="absent.png"):
        DataPipeline(cfg, image_tokens=N, image_size=8)
    text = DataPipeline(dataclasses.replace(cfg, use_images=False), image_tokens=N, image_size=8)
    assert text.summary.text_samples == 1 and text.summary.image_samples == 0


def test_a_warm_start_maps_the_cached_table_and_tokenizes_nothing(files, word_tokenizer_dir, tmp_path, monkeypatch):
    import jaxllava.data.pipeline as pipeline_module

    cold = pipeline(files, word_tokenizer_dir, table_cache=str(tmp_path / "tables"), validation_fraction=0.2)
    entries = os.listdir(tmp_path / "tables")
    assert entries == [cold.summary.fingerprint]

    def no_tokenizing(*args, **kwargs):
        raise AssertionError("a warm start must not build the table again")

    monkeypatch.setattr(pipeline_module, "build_sample_table", no_tokenizing)
    monkeypatch.setattr(pipeline_module, "read_source", no_tokenizing)
    warm = pipeline(files, word_tokenizer_dir, table_cache=str(tmp_path / "tables"), validation_fraction=0.2)
    assert isinstance(warm.table.tokens, np.memmap)  # mapped, not read into memory
    assert warm.summary == cold.summary
    for a, b in zip(all_batches(cold), all_batches(warm)):
        for k in batch_arrays(a):
            np.testing.assert_array_equal(batch_arrays(a)[k], batch_arrays(b)[k])
    for a, b in zip(cold.validation.batches(), warm.validation.batches()):
        np.testing.assert_array_equal(a.input_ids, b.input_ids)
    # Another setting is another entry: the cache never serves a table made under other settings.
    monkeypatch.undo()
    pipeline(files, word_tokenizer_dir, table_cache=str(tmp_path / "tables"), buckets=(16, 48))
    assert len(os.listdir(tmp_path / "tables")) == 2
