"""Source formats (llava, text, captions) and precomputed features: parsing, errors, memory mapping,
and the microbatches they become (feature rows are image rows with no pixels; text stays text)."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import ml_dtypes
import numpy as np
import pytest
from conftest import image_record, text_record, write_json, write_jsonl, write_png

from jaxllava.data.batch import FeatureBatch, TextBatch
from jaxllava.data.config import DataConfig, SourceConfig
from jaxllava.data.pipeline import DataPipeline
from jaxllava.data.records import SkipReport
from jaxllava.data.sources import FeatureStore, read_source
from jaxllava.data.tokenizer import load_tokenizer, special_ids
from jaxllava.errors import DataError

N = 4  # image tokens per record in these pipelines


def read(source: SourceConfig, tokenizer, on_bad_record="error"):
    skips = SkipReport()
    store = FeatureStore(source.features) if source.features else None
    records = read_source(source, features=store, on_bad_record=on_bad_record, skips=skips, tokenizer=tokenizer)
    return records, store, skips


@pytest.fixture(scope="module")
def tok(word_tokenizer_dir):
    return load_tokenizer(word_tokenizer_dir)


# ----------------------------------------------------------------------------- text


def test_text_lines_paragraphs_and_chunks(tmp_path, tok):
    path = tmp_path / "a.train"
    path.write_text("the dog runs .\n\nthe cat runs .\nthe cats run .\n\n\na red circle\n")
    lines, _, _ = read(SourceConfig(str(path), format="text"), tok)
    assert [(r.where, r.turns[0].text, r.modality) for r in lines] == [
        ("line 1", "the dog runs .", "text"), ("line 3", "the cat runs .", "text"),
        ("line 4", "the cats run .", "text"), ("line 7", "a red circle", "text")]
    assert all(r.turns[0].role == "assistant" for r in lines)  # a target under every objective
    paragraphs, _, _ = read(SourceConfig(str(path), format="text", text_unit="paragraph"), tok)
    assert [(r.where, r.turns[0].text) for r in paragraphs] == [
        ("line 1", "the dog runs ."), ("lines 3-4", "the cat runs .\nthe cats run ."), ("line 7", "a red circle")]
    # 4 words (+1 for the line break) per line: two lines fit in 10 tokens, not three
    chunks, _, _ = read(SourceConfig(str(path), format="text", text_unit="chunk", chunk_tokens=10), tok)
    assert [(r.where, r.turns[0].text) for r in chunks] == [
        ("lines 1-3", "the dog runs .\nthe cat runs ."), ("lines 4-7", "the cats run .\na red circle")]


def test_a_glob_reads_every_match_in_order_and_a_glob_matching_nothing_is_an_error(tmp_path, tok):
    for name, text in (("b.train", "two\n"), ("a.train", "one\n"), ("c.txt", "no\n")):
        (tmp_path / name).write_text(text)
    records, _, _ = read(SourceConfig(str(tmp_path / "*.train"), format="text"), tok)
    assert [(os.path.basename(r.file), r.turns[0].text) for r in records] == [("a.train", "one"), ("b.train", "two")]
    with pytest.raises(DataError, match=r"nothing\*\.train.*the glob matches no file"):
        read(SourceConfig(str(tmp_path / "nothing*.train"), format="text"), tok)


def test_empty_and_undecodable_text_files_are_named_or_counted_skips(tmp_path, tok):
    (tmp_path / "empty.train").write_text("\n\n  \n")
    (tmp_path / "ok.train").write_text("the dog runs .\n")
    with pytest.raises(DataError, match=r"empty\.train.*no text in the file"):
        read(SourceConfig(str(tmp_path / "*.train"), format="text"), tok)
    records, _, skips = read(SourceConfig(str(tmp_path / "*.train"), format="text"), tok, "skip")
    assert len(records) == 1 and skips.counts == {"empty_file": 1}
    (tmp_path / "bad.txt").write_bytes(b"fine\n\xff\xfe broken\n")
    with pytest.raises(DataError, match=r"bad\.txt, line 2: not UTF-8"):
        read(SourceConfig(str(tmp_path / "bad.txt"), format="text"), tok)


# ----------------------------------------------------------------------------- features


def save(path, array) -> str:
    np.save(path, array)
    return str(path)


def test_feature_files_of_every_dtype_and_rank_concatenate_in_order(tmp_path):
    rows = np.arange(5 * 3, dtype=np.float32).reshape(5, 3)
    first = save(tmp_path / "a.npy", rows[:2].astype(np.float16))
    second = save(tmp_path / "b.npy", rows[2:].astype(ml_dtypes.bfloat16))  # numpy stores it as 2-byte void
    store = FeatureStore((first, second))
    assert store.rows == 5 and store.shape == (1, 3)
    np.testing.assert_array_equal(np.stack([store.row(i) for i in range(5)])[:, 0], rows)
    grid = FeatureStore((save(tmp_path / "g.npy", np.ones((2, 4, 3), np.float32)),))
    assert grid.shape == (4, 3) and grid.row(1).shape == (4, 3)
    with pytest.raises(DataError, match=r"disagree on the shape of a row"):
        FeatureStore((first, str(tmp_path / "g.npy")))
    with pytest.raises(DataError, match=r"int64 \(3,\)"):
        FeatureStore((save(tmp_path / "i.npy", np.arange(3)),))


def test_a_row_with_nan_is_an_error_naming_file_and_row(tmp_path):
    array = np.ones((4, 2), np.float32)
    array[2, 1] = np.inf
    store = FeatureStore((save(tmp_path / "f.npy", array),))
    assert list(store.bad_rows()) == [2]
    with pytest.raises(DataError, match=r"f\.npy, row 2.*NaN or inf"):
        store.row(2)


def test_feature_files_are_memory_mapped_and_not_pickled(tmp_path):
    big = np.lib.format.open_memmap(str(tmp_path / "big.npy"), mode="w+", dtype=np.float32, shape=(40_000, 1024))
    big[-1] = 7.0  # 160 MB on disk
    big.flush()
    del big
    script = textwrap.dedent(f"""
        import pickle, resource
        from jaxllava.data.sources import FeatureStore
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        store = FeatureStore(({str(tmp_path / 'big.npy')!r},))
        assert store.row(39_999)[0, 0] == 7.0
        assert len(pickle.dumps(store)) < 10_000  # a worker reopens the file
        print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
    """)
    grown_mb = int(subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                                  timeout=120).stdout)
    assert grown_mb < 40, grown_mb


# ----------------------------------------------------------------------------- captions and llava with features


def test_captions_pair_with_feature_rows_and_a_count_mismatch_names_both_files(tmp_path, tok):
    captions = write_json(tmp_path / "caps.json", ["a red circle", "two blue squares", "one square"])
    feats = save(tmp_path / "caps.npy", np.zeros((3, 8), np.float32))
    records, store, _ = read(SourceConfig(captions, format="captions", features=feats), tok)
    assert [(r.features_row, r.image, r.modality, r.turns[-1].text) for r in records] == [
        (0, None, "image", "a red circle"), (1, None, "image", "two blue squares"), (2, None, "image", "one square")]
    short = save(tmp_path / "short.npy", np.zeros((2, 8), np.float32))
    with pytest.raises(DataError, match=r"caps\.json.*3 image records, but the features \(.*short\.npy\) have 2 rows"):
        read(SourceConfig(captions, format="captions", features=short), tok)


def test_captions_with_image_files_and_bad_entries(tmp_path, tok):
    write_png(str(tmp_path / "img" / "0.png"))
    path = write_jsonl(tmp_path / "caps.jsonl", [{"caption": "a red circle", "image": "img/0.png", "id": "c0"},
                                                 {"caption": 5}, {"caption": "no picture"}, ["x"]])
    with pytest.raises(DataError, match=r"line 2.*'caption'.*got int"):
        read(SourceConfig(path, format="captions"), tok)
    records, _, skips = read(SourceConfig(path, format="captions"), tok, "skip")
    assert [(r.id, r.image.endswith("0.png"), r.modality) for r in records] == [("c0", True, "image")]
    assert skips.counts == {"turn_text": 1, "image_field": 1, "not_object": 1}


def test_llava_records_with_features_count_rows_over_image_entries_bad_ones_included(tmp_path, tok):
    records = [text_record(0, "the dog runs ."), image_record(1, "gone.png", "a red circle"),
               {"id": "bad", "image": "x.png", "conversations": "broken"}, image_record(3, "gone.png", "one square")]
    path = write_jsonl(tmp_path / "r.jsonl", records)
    feats = save(tmp_path / "r.npy", np.arange(3 * 2, dtype=np.float32).reshape(3, 2))
    read_back, _, skips = read(SourceConfig(path, features=feats), tok, "skip")
    assert [(r.id, r.features_row, r.image) for r in read_back] == [("t0", None, None), ("i1", 0, None),
                                                                     ("i3", 2, None)]
    assert skips.counts == {"conversations": 1}  # the missing image files are never looked at


# ----------------------------------------------------------------------------- pipelines


@pytest.fixture()
def feature_data(tmp_path):
    texts = write_jsonl(tmp_path / "text.jsonl", [text_record(i, "the dog runs .") for i in range(10)])
    captions = write_json(tmp_path / "caps.json", ["a red circle", "two blue squares", "one square"] * 2)
    rng = np.random.default_rng(0)
    feats = save(tmp_path / "caps.npy", rng.normal(size=(6, 2, 8)).astype(np.float32))
    return texts, captions, feats


def feature_pipeline(word_tokenizer_dir, feature_data, **overrides):
    texts, captions, feats = feature_data
    cfg = DataConfig(sources=(SourceConfig(texts), SourceConfig(captions, format="captions", features=feats)),
                     tokenizer=word_tokenizer_dir, buckets=(16,), text_rows=4, image_rows=2, **overrides)
    return DataPipeline(cfg, image_tokens=N, features_shape=(2, 8))


def test_feature_microbatches_carry_the_rows_and_no_pixels_and_text_stays_text(word_tokenizer_dir, feature_data):
    pipeline = feature_pipeline(word_tokenizer_dir, feature_data)
    ids = special_ids(pipeline.tokenizer)
    batches = [pipeline.builder(plan) for plan in pipeline.plans]
    features = [b for b in batches if b.modality == "image"]
    assert features and all(isinstance(b, FeatureBatch) and not hasattr(b, "pixels") for b in features)
    stored = np.load(feature_data[2])
    for batch, plan in zip(batches, pipeline.plans):
        if isinstance(batch, TextBatch):
            assert not np.isin(batch.input_ids, [ids.im_start, ids.im_patch, ids.im_end]).any()
            continue
        assert batch.features.shape == (2, 2, 8) and batch.features.dtype == np.float32
        for r, members in enumerate(plan.rows):
            if members:
                row = int(pipeline.table.feature_rows[members[0]])
                np.testing.assert_array_equal(batch.features[r], stored[row])
                assert batch.image_mask[r].sum() == N
    assert pipeline.summary.image_samples == 6 and pipeline.summary.text_samples == 10


def test_feature_sources_need_a_features_model_of_their_shape(word_tokenizer_dir, feature_data):
    texts, captions, feats = feature_data
    cfg = DataConfig(sources=(SourceConfig(captions, format="captions", features=feats),), tokenizer=word_tokenizer_dir,
                     buckets=(16,), text_rows=4, image_rows=2)
    with pytest.raises(DataError, match="vision input is not features"):
        DataPipeline(cfg, image_tokens=N, image_size=8)
    with pytest.raises(DataError, match=r"rows of shape \(2, 8\).*tokens 1, hidden_size 8"):
        DataPipeline(cfg, image_tokens=N, features_shape=(1, 8))


def test_a_nan_row_is_a_counted_skip_at_start_or_stops_the_batch_that_reads_it(word_tokenizer_dir, feature_data,
                                                                              tmp_path):
    texts, captions, feats = feature_data
    array = np.load(feats)
    array[4, 0, 0] = np.nan
    bad = save(tmp_path / "bad.npy", array)
    data = (texts, captions, bad)
    skipped = feature_pipeline(word_tokenizer_dir, data, on_bad_record="skip")
    assert skipped.summary.image_samples == 5 and skipped.skips.counts == {"bad_features": 1}
    with pytest.raises(DataError, match=r"bad\.npy.*row 4"):
        feature_pipeline(word_tokenizer_dir, data, check_images=True)
    lazy = feature_pipeline(word_tokenizer_dir, data)  # error mode without check_images: found when read
    with pytest.raises(DataError, match=r"bad\.npy, row 4"):
        for plan in lazy.plans:
            lazy.builder(plan)
