"""data.text_only_images: black — the reference's black-image behaviour as an explicit, visible ablation."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

import launch
from jaxllava.config import load_config
from jaxllava.data.batch import ImageBatch, TextBatch
from jaxllava.data.pipeline import DataPipeline
from jaxllava.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny.yaml")
QUICK = ["data.epochs=1", "data.validation_fraction=0"]


def pipeline(*overrides):
    config = load_config(TINY, [*QUICK, *overrides])
    return config, DataPipeline.for_model(config.data, config.model)


def test_black_moves_every_text_sample_to_the_image_side_exactly():
    config, off = pipeline()
    _, on = pipeline("data.text_only_images=black")
    assert off.summary.text_samples > 0 and on.summary.text_samples == 0
    assert on.summary.image_samples == off.summary.text_samples + off.summary.image_samples
    assert on.summary.words == off.summary.words  # the same text is trained on
    assert on.summary.fingerprint != off.summary.fingerprint
    black = (0.0 - np.array(on.processing.mean)) / np.array(on.processing.std)  # pixel 0, normalised
    was_text = {i for i, has in zip(off.table.ids, off.table.has_image) if not has}
    blacks = images = 0
    for batch in on.iterator():
        assert isinstance(batch, ImageBatch)
        for r in np.flatnonzero(batch.image_rows):
            images += 1
            is_black = np.allclose(batch.pixels[r], black, atol=1e-6)
            blacks += is_black
        assert batch.stats.image_tokens == config.model.image_tokens * int(batch.image_rows.sum())
    off_rows = sum(b.stats.samples for b in off.iterator())  # per epoch: a source weight repeats records
    assert images == off_rows and blacks == len(was_text)


def test_off_no_text_sample_holds_an_image_or_a_placeholder():
    _, off = pipeline()
    ids = off.ids
    placeholders = (ids.im_start, ids.im_patch, ids.im_end)
    texts = 0
    for batch in off.iterator():
        if isinstance(batch, TextBatch):
            texts += batch.stats.samples
            assert batch.stats.image_tokens == 0 and not np.isin(batch.input_ids, placeholders).any()
    assert texts == off.summary.text_samples


@pytest.mark.parametrize("extra, message", [
    (["model.vision=null"], "needs a vision tower"),
    (["model.vision={kind: features, hidden_size: 64, tokens: 1}"], "precomputed features"),
    (["data.use_images=false"], "use_images is false"),
])
def test_black_without_a_tower_is_refused_by_name(extra, message):
    with pytest.raises(ConfigError, match=rf"text_only_images.*{message}"):
        load_config(TINY, ["data.text_only_images=black", *extra])


def test_a_black_run_says_so_in_its_banner_run_json_and_step_metrics(tmp_path, capsys):
    workdir = tmp_path / "black"
    argv = ["train", "--config", TINY, "--workdir", str(workdir)]
    for value in [*QUICK, "data.text_only_images=black", "train.steps=3", "train.log_every=1", "eval.at_start=false",
                  "eval.tasks={}", "logging.tensorboard=false"]:
        argv += ["--set", value]
    assert launch.main(argv) == 0
    out = capsys.readouterr().out
    assert "ablation on: data.text_only_images=black: every text-only sample gets a black image and 16 image " \
           "placeholder tokens" in out
    _, off = pipeline()
    assert f"data: 0 text-only and {off.summary.text_samples + off.summary.image_samples} image samples" in out
    run = json.load(open(workdir / "run.json"))
    assert run["data"]["ablations"] and run["config"]["data"]["text_only_images"] == "black"
    steps = [r for r in map(json.loads, open(workdir / "metrics.jsonl")) if "loss" in r]
    assert all(r["text_samples"] == 0 and r["image_tokens"] == 16 * r["image_samples"] > 0 for r in steps)
