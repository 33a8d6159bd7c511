"""The image cache gives bit-identical pixels to decoding the originals, skips bad data as
training does, and appears at `out` only when complete."""
from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import pytest
from conftest import image_record, text_record, write_json, write_jsonl, write_png

from jaxllava.data.batch import batch_arrays
from jaxllava.data.config import DataConfig, SourceConfig
from jaxllava.data.image_cache import cache_images, sources_override
from jaxllava.data.pipeline import DataPipeline, image_processing_for
from jaxllava.errors import DataError


def test_cached_images_give_the_same_batches_as_the_originals(tmp_path, word_tokenizer_dir):
    from PIL import Image

    rng = np.random.default_rng(0)
    images = []
    for i, size in enumerate([(40, 30), (17, 29), (24, 24), (50, 12)]):
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(tmp_path / f"{i}.jpg")
        images.append(image_record(i, f"{i}.jpg", "a red circle"))
    sources = (SourceConfig(write_json(tmp_path / "caps.json", images)),
               SourceConfig(write_jsonl(tmp_path / "text.jsonl", [text_record(9, "the dog runs .")])))
    cfg = DataConfig(sources=sources, tokenizer=word_tokenizer_dir, buckets=(32,), image_rows=2, text_rows=1)
    result = cache_images(cfg, image_processing_for(cfg, 16), str(tmp_path / "cache"))
    assert result.images == 4 and result.skips.total == 0
    original = DataPipeline(cfg, image_tokens=6, image_size=16)
    from_cache = DataPipeline(dataclasses.replace(cfg, sources=tuple(result.sources)), image_tokens=6,
                              image_size=16)
    a, b = original.iterator(), from_cache.iterator()
    for _ in range(len(original)):
        x, y = next(a), next(b)
        assert x.stats == y.stats
        for key in batch_arrays(x):
            np.testing.assert_array_equal(batch_arrays(x)[key], batch_arrays(y)[key])
    assert all(p.endswith(".png") for p in from_cache.table.images if p)


def bad_data(tmp_path):
    """Two sources: one good image, an undecodable one, an invalid JSON line, a bad record, an
    image leaving the folder; and a text file."""
    write_png(str(tmp_path / "ok.png"))
    (tmp_path / "broken.png").write_bytes(b"not a png at all")
    write_png(str(tmp_path.parent / f"{tmp_path.name}_outside.png"))
    lines = [json.dumps(image_record(0, "ok.png", "a red circle")),
             json.dumps(image_record(1, "broken.png", "a red circle")),
             '{"id": "cut", "conversations": [',
             json.dumps({"id": "norole", "conversations": [{"value": "x"}]}),
             json.dumps(image_record(2, f"../{tmp_path.name}_outside.png", "a red circle")),
             json.dumps({**image_record(3, "ok.png", "a blue square"), "origin": {"keep": [1, 2]}})]
    images = tmp_path / "caps.jsonl"
    images.write_text("\n".join(lines) + "\n")
    text = write_json(tmp_path / "text.json", [text_record(9, "the dog runs ."), {"id": "empty"}])
    return (SourceConfig(str(images)), SourceConfig(text, weight=2.0))


def test_skip_policy_skips_and_counts_exactly_what_training_skips(tmp_path, word_tokenizer_dir):
    sources = bad_data(tmp_path)
    cfg = DataConfig(sources=sources, tokenizer=word_tokenizer_dir, buckets=(32,), image_rows=1, text_rows=1,
                     on_bad_record="skip")
    out = tmp_path / "cache"
    result = cache_images(cfg, image_processing_for(cfg, 16), str(out))
    training = DataPipeline(cfg, image_tokens=6, image_size=16)
    assert result.skips.counts == training.skips.counts == {
        "corrupt_image": 1, "json": 1, "role": 1, "image_outside": 1, "conversations": 1}
    assert result.images == 2
    assert [s.weight for s in result.sources] == [1.0, 2.0] and all(s.image_folder == str(out) for s in result.sources)
    from_cache = DataPipeline(dataclasses.replace(cfg, sources=tuple(result.sources)), image_tokens=6, image_size=16)
    assert from_cache.table.ids == training.table.ids == ["i0", "i3", "t9"]
    assert from_cache.skips.total == 0
    cached_records = [json.loads(line) for line in open(result.sources[0].path)]
    assert cached_records[1]["origin"] == {"keep": [1, 2]}  # every other field is kept
    metadata = json.loads((out / "cache.json").read_text())
    assert metadata["images"] == 2
    assert metadata["skipped"]["total"] == 5 and metadata["skipped"]["counts"] == dict(result.skips.counts)
    assert "broken.png" in metadata["skipped"]["examples"]["corrupt_image"][0]
    assert sorted(os.listdir(tmp_path)) == sorted(["cache", "caps.jsonl", "text.json", "ok.png", "broken.png"])


def test_worker_processes_report_image_skips_with_their_reason(tmp_path):
    write_png(str(tmp_path / "ok.png"))
    (tmp_path / "broken.png").write_bytes(b"not a png at all")
    path = write_json(tmp_path / "caps.json", [image_record(i, "broken.png" if i % 2 else "ok.png", "a red circle")
                                               for i in range(6)])
    cfg = DataConfig(sources=(SourceConfig(path),), on_bad_record="skip")
    result = cache_images(cfg, image_processing_for(cfg, 8), str(tmp_path / "cache"), workers=2)
    assert result.skips.counts == {"corrupt_image": 3} and result.images == 3
    assert "record 1" in result.skips.examples["corrupt_image"][0]
    assert [r["id"] for r in json.load(open(result.sources[0].path))] == ["i0", "i2", "i4"]


@pytest.mark.parametrize("workers", [0, 2])
def test_error_policy_stops_at_the_first_bad_image_and_leaves_nothing(tmp_path, workers):
    sources = bad_data(tmp_path)
    cfg = DataConfig(sources=(dataclasses.replace(sources[0], path=write_jsonl(
        tmp_path / "two.jsonl", [image_record(0, "ok.png", "a"), image_record(1, "broken.png", "b")])),))
    with pytest.raises(DataError) as caught:
        cache_images(cfg, image_processing_for(cfg, 8), str(tmp_path / "cache"), workers=workers)
    assert (caught.value.reason, caught.value.record_id, caught.value.field) == ("corrupt_image", "i1", "image")
    assert not [name for name in os.listdir(tmp_path) if "cache" in name]


def test_invalid_line_under_error_policy_names_the_line_and_leaves_nothing(tmp_path):
    cfg = DataConfig(sources=bad_data(tmp_path))
    with pytest.raises(DataError, match="line 3: invalid JSON") as caught:
        cache_images(cfg, image_processing_for(cfg, 8), str(tmp_path / "cache"))
    assert caught.value.file == str(tmp_path / "caps.jsonl")
    assert not [name for name in os.listdir(tmp_path) if "cache" in name]


def test_interrupted_run_leaves_no_partial_cache(tmp_path, monkeypatch):
    import jaxllava.data.image_cache as image_cache

    write_png(str(tmp_path / "ok.png"))
    path = write_json(tmp_path / "caps.json", [image_record(i, "ok.png", "a red circle") for i in range(3)])
    cfg = DataConfig(sources=(SourceConfig(path),))
    real, calls = image_cache.square_image, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(image_cache, "square_image", interrupted)
    with pytest.raises(KeyboardInterrupt):
        cache_images(cfg, image_processing_for(cfg, 8), str(tmp_path / "cache"))
    assert sorted(os.listdir(tmp_path)) == ["caps.json", "ok.png"]


def test_existing_output_directory_is_refused(tmp_path):
    write_png(str(tmp_path / "ok.png"))
    path = write_json(tmp_path / "caps.json", [image_record(0, "ok.png", "a red circle")])
    cfg = DataConfig(sources=(SourceConfig(path),))
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "mine.txt").write_text("keep me")
    with pytest.raises(DataError, match="already exists") as caught:
        cache_images(cfg, image_processing_for(cfg, 8), str(tmp_path / "cache"))
    assert caught.value.file == str(tmp_path / "cache")
    assert os.listdir(tmp_path / "cache") == ["mine.txt"]


def test_images_outside_the_folder_are_cached_when_the_source_allows_them(tmp_path):
    write_png(str(tmp_path / "elsewhere" / "pic.png"))
    (tmp_path / "data").mkdir()
    path = write_jsonl(tmp_path / "data" / "caps.jsonl", [image_record(0, "../elsewhere/pic.png", "a red circle")])
    refused = DataConfig(sources=(SourceConfig(path),))
    with pytest.raises(DataError, match="outside the image folder"):
        cache_images(refused, image_processing_for(refused, 8), str(tmp_path / "cache"))
    allowed = DataConfig(sources=(SourceConfig(path, allow_outside=True),))
    result = cache_images(allowed, image_processing_for(allowed, 8), str(tmp_path / "cache"))
    assert result.images == 1 and not result.sources[0].allow_outside  # the cached copy lies inside the cache
    override = sources_override(result.sources)
    assert json.loads(override.split("=", 1)[1])[0]["image_folder"] == str(tmp_path / "cache")
