"""The video choice task: each candidate caption scored after the model's own video spans, equal to
scoring the row by hand with the model's forward; without vision, the captions alone."""
from __future__ import annotations

import dataclasses
import json

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_video_pipeline import write_frames

from jaxllava.data.images import ImageProcessing
from jaxllava.data.tokenizer import load_tokenizer, special_ids
from jaxllava.data.video import read_video_frames
from jaxllava.errors import ConfigError, DataError
from jaxllava.eval.evaluator import NO_VISION, VIDEO, MinimalPairEvaluator
from jaxllava.model.config import LlamaConfig, ModelConfig, ProjectorConfig, ResamplerConfig, VideoConfig, VisionConfig
from jaxllava.model.llava import LlavaModel

PROCESSING = ImageProcessing(size=16)
CANDIDATES = ["a red circle runs left .", "a red circle runs right .", "a red circle is big ."]


@pytest.fixture(scope="module")
def video_task(tmp_path_factory):
    root = tmp_path_factory.mktemp("video_task")
    lines = []
    for i in range(3):
        write_frames(root / "clips" / f"{i}", colour=(200, 20 * i, 30))
        lines.append({"id": f"q{i}", "video": f"clips/{i}", "candidates": CANDIDATES, "label": i % 3})
    (root / "task.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return root / "task.jsonl"


@pytest.fixture(scope="module")
def tokenizer(word_tokenizer_dir):
    return load_tokenizer(word_tokenizer_dir, video=True)


@pytest.fixture(scope="module")
def model(tokenizer):
    config = ModelConfig(
        lm=LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2,
                       num_kv_heads=2, max_position_embeddings=64),
        vision=VisionConfig(image_size=16, patch_size=8, hidden_size=12, intermediate_size=16, num_layers=1,
                            num_heads=2, pretrained_image_size=16),
        resampler=ResamplerConfig("identity"), projector=ProjectorConfig("linear"),
        video=VideoConfig(frames=3, fast_tokens=1, slow_frames=2), dtype="float32", attention_impl="xla")
    return LlavaModel(config, rngs=nnx.Rngs(0))


def hand_score(model, tokenizer, frames, caption, with_video: bool) -> float:
    ids = special_ids(tokenizer)
    words = tokenizer(caption, add_special_tokens=False)["input_ids"]
    span = ids.video_span(*model.config.video_spans) if with_video else []
    row = np.asarray([ids.bos] + span + words, np.int32)
    n = len(row) - 1
    kwargs = {}
    if with_video:
        mask = np.zeros((1, n), bool)
        mask[0, 1:1 + len(span)] = True
        kwargs = {"frames": jnp.asarray(frames[None]), "video_mask": jnp.asarray(mask)}
    logits = np.asarray(model(jnp.asarray(row[None, :-1]), segment_ids=jnp.ones((1, n), jnp.int32),
                              positions=jnp.arange(n, dtype=jnp.int32)[None], **kwargs), np.float64)[0]
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    scored = range(n - len(words), n)  # every caption token, predicted from what comes before it
    return float(sum(logp[t, row[t + 1]] for t in scored))


def test_video_task_scores_equal_scoring_each_row_by_hand(video_task, tokenizer, model):
    evaluator = MinimalPairEvaluator({"motion": video_task}, tokenizer, image_processing=PROCESSING)
    results = evaluator.evaluate(model)["motion"]
    assert set(results) == {VIDEO, NO_VISION}
    items = [json.loads(line) for line in video_task.read_text().splitlines()]
    for item, with_video, without in zip(items, results[VIDEO].scores, results[NO_VISION].scores):
        frames = read_video_frames(video_task.parent / item["video"], PROCESSING, num_frames=3)
        ordered = [CANDIDATES[item["label"]]] + [c for k, c in enumerate(CANDIDATES) if k != item["label"]]
        np.testing.assert_allclose(with_video, [hand_score(model, tokenizer, frames, c, True) for c in ordered],
                                   rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(without, [hand_score(model, tokenizer, frames, c, False) for c in ordered],
                                   rtol=1e-4, atol=1e-4)
    assert results[VIDEO].chance == pytest.approx(100 / 3)


def test_video_task_needs_a_video_model_and_existing_videos(video_task, tokenizer, model, tmp_path):
    evaluator = MinimalPairEvaluator({"motion": video_task}, tokenizer, image_processing=PROCESSING)
    image_only = LlavaModel(dataclasses.replace(model.config, video=None), rngs=nnx.Rngs(0))
    with pytest.raises(ConfigError, match="needs model.video"):
        evaluator.evaluate(image_only)
    missing = tmp_path / "task.jsonl"
    missing.write_text(json.dumps({"id": "x", "video": "clips/absent", "candidates": CANDIDATES, "label": 0}) + "\n")
    with pytest.raises(DataError, match="video file or frame folder not found"):
        MinimalPairEvaluator({"motion": missing}, tokenizer)
    bad_label = tmp_path / "bad.jsonl"
    bad_label.write_text(json.dumps({"id": "x", "video": "clips", "candidates": CANDIDATES, "label": 3}) + "\n")
    with pytest.raises(DataError, match="label 3 is not an index"):
        MinimalPairEvaluator({"motion": bad_label}, tokenizer)
