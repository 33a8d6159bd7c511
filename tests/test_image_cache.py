"""The image cache gives bit-identical pixels to decoding the originals."""
from __future__ import annotations

import dataclasses

import numpy as np
from conftest import image_record, text_record, write_json, write_jsonl

from jaxllava.data.config import DataConfig, SourceConfig
from jaxllava.data.image_cache import cache_images
from jaxllava.data.pipeline import DataPipeline, image_processing_for


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
    cached = cache_images(cfg, image_processing_for(cfg, 16), str(tmp_path / "cache"))
    original = DataPipeline(cfg, image_tokens=6, image_size=16)
    from_cache = DataPipeline(dataclasses.replace(cfg, sources=tuple(cached)), image_tokens=6, image_size=16)
    a, b = original.iterator(), from_cache.iterator()
    for _ in range(len(original)):
        x, y = next(a), next(b)
        assert x.stats == y.stats
        for key in x.arrays():
            np.testing.assert_array_equal(x.arrays()[key], y.arrays()[key])
    assert all(p.endswith(".png") for p in from_cache.table.images if p)
