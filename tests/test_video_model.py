"""Videos in the model: the fast and slow spans against a PyTorch restatement of their math, both
spans spliced (the reference's upstream bug kept only the slow one), LAPE's temporal row per
frame, text-only isolation with LAPE and video on, and the config checks."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import nnx
from test_lape import reads_params

from jaxllava.config import load_config
from jaxllava.errors import ConfigError
from jaxllava.model.config import (LapeConfig, LlamaConfig, ModelConfig, ProjectorConfig, ResamplerConfig,
                                   VideoConfig, VisionConfig)
from jaxllava.model.llava import LlavaModel

WIDTH = 8
LM = LlamaConfig(vocab_size=40, hidden_size=WIDTH, intermediate_size=16, num_layers=1, num_heads=2, num_kv_heads=2,
                 max_position_embeddings=64)
TOWER = VisionConfig(image_size=16, patch_size=4, hidden_size=12, intermediate_size=16, num_layers=1, num_heads=2,
                     pretrained_image_size=16)  # a 4×4 patch grid: I = 16
VIDEO = VideoConfig(frames=3, fast_tokens=4, slow_frames=2)  # spans: fast 3·4 = 12, slow 2·16 = 32
FAST, SLOW = 12, 32


def _model(**changes) -> LlavaModel:
    config = dict(lm=LM, vision=TOWER, resampler=ResamplerConfig("identity"), projector=ProjectorConfig("linear"),
                  video=VIDEO, dtype="float32")
    return LlavaModel(ModelConfig(**{**config, **changes}), rngs=nnx.Rngs(0))


def _frames(batch: int = 2, seed: int = 1) -> jax.Array:
    return jnp.asarray(np.random.RandomState(seed).randn(batch, VIDEO.frames, 16, 16, 3).astype(np.float32))


def _video_batch():
    """Row 0 holds a video's fast and slow spans at positions 2..45; row 1 is text."""
    rng = np.random.RandomState(2)
    ids = rng.randint(3, 40, (2, 52)).astype(np.int32)
    mask = np.zeros((2, 52), bool)
    mask[0, 2:2 + FAST + SLOW] = True
    return {"input_ids": jnp.asarray(ids), "segment_ids": jnp.ones((2, 52), jnp.int32),
            "positions": jnp.asarray(np.tile(np.arange(52, dtype=np.int32), (2, 1))),
            "frames": _frames(), "video_mask": jnp.asarray(mask)}


def test_spans_equal_torch_bilinear_per_frame_and_linear_in_time():
    """fast: each frame's 4×4 grid of image vectors, F.interpolate(bilinear, align_corners=False) to 2×2;
    slow: the frames, F.interpolate(linear, align_corners=False) from 3 to 2, each whole grid."""
    model = _model()
    frames = _frames()
    encoded = np.asarray(model.encode_video(frames))
    assert encoded.shape == (2, FAST + SLOW, WIDTH)
    per_frame = torch.from_numpy(np.asarray(model.encode_images(frames.reshape(6, 16, 16, 3))))  # (B·F, 16, D)
    grids = per_frame.reshape(6, 4, 4, WIDTH).permute(0, 3, 1, 2)
    fast = F.interpolate(grids, size=(2, 2), mode="bilinear", align_corners=False, antialias=False)
    fast = fast.permute(0, 2, 3, 1).reshape(2, FAST, WIDTH)
    in_time = per_frame.reshape(2, 3, 16 * WIDTH).permute(0, 2, 1)  # (B, 16·D, F)
    slow = F.interpolate(in_time, size=2, mode="linear", align_corners=False).permute(0, 2, 1).reshape(2, SLOW, WIDTH)
    np.testing.assert_allclose(encoded, torch.cat([fast, slow], dim=1).numpy(), rtol=0, atol=1e-5)


def test_both_spans_are_spliced_and_nothing_else_changes():
    model = _model()
    batch = _video_batch()
    tokens = np.asarray(model.lm.embed(batch["input_ids"]))
    merged = np.asarray(model.embed_inputs(batch["input_ids"], frames=batch["frames"], video_mask=batch["video_mask"]))
    visual = np.asarray(model.encode_video(batch["frames"]))
    np.testing.assert_array_equal(merged[1], tokens[1])  # the text row
    outside = ~np.asarray(batch["video_mask"][0])
    np.testing.assert_array_equal(merged[0, outside], tokens[0, outside])
    fast, slow = merged[0, 2:2 + FAST], merged[0, 2 + FAST:2 + FAST + SLOW]
    np.testing.assert_allclose(fast, visual[0, :FAST], rtol=0, atol=1e-6)
    np.testing.assert_allclose(slow, visual[0, FAST:], rtol=0, atol=1e-6)
    # Each span holds visual vectors, not the placeholder embeddings it replaced.
    assert np.abs(fast - tokens[0, 2:2 + FAST]).max() > 1e-2 and np.abs(slow - tokens[0, 2 + FAST:46]).max() > 1e-2


def test_every_frame_reaches_both_spans():
    """Changing the last frame changes its fast vectors and the slow span, and no other frame's fast vectors."""
    model = _model()
    frames = _frames()
    changed = frames.at[:, -1].add(1.0)
    a, b = np.asarray(model.encode_video(frames)), np.asarray(model.encode_video(changed))
    per = VIDEO.fast_tokens
    np.testing.assert_array_equal(a[:, :2 * per], b[:, :2 * per])
    assert np.abs(a[:, 2 * per:FAST] - b[:, 2 * per:FAST]).max() > 1e-3
    assert np.abs(a[:, FAST:] - b[:, FAST:]).max() > 1e-3


def test_with_lape_frame_t_gets_the_temporal_row_t():
    model = _model(lape=LapeConfig(tokens=10))
    frames = _frames(batch=1)
    encoded = np.asarray(model.encode_video(frames))
    projected = model.projector(model.vision(frames[0]))  # (F, 16, D): the reference's order, per frame
    spatial = np.asarray(model.lape.spatial(4)).reshape(16, WIDTH)
    temporal = np.asarray(model.lape.injection("temporal"))
    per_frame = np.asarray(projected) + spatial[None] + temporal[:3, None]
    expected_fast = per_frame.reshape(3, 4, 4, WIDTH)
    expected_fast = F.interpolate(torch.from_numpy(expected_fast).permute(0, 3, 1, 2), size=(2, 2),
                                  mode="bilinear", align_corners=False).permute(0, 2, 3, 1).reshape(1, FAST, WIDTH)
    np.testing.assert_allclose(encoded[:, :FAST], expected_fast.numpy(), rtol=0, atol=1e-5)
    as_images = np.asarray(model.lape(projected))  # every frame with inj_t[0]
    assert np.abs(as_images - per_frame).max() > 1e-3


def test_text_only_call_with_lape_and_video_reads_no_vision_parameter():
    """README pitfall 1 with LAPE and video on: a text-only call traces no tower, resampler, projector or LAPE."""
    model = _model(lape=LapeConfig(tokens=10))
    batch = _video_batch()
    text = {k: batch[k] for k in ("input_ids", "segment_ids", "positions")}
    parts = ("vision", "resampler", "projector", "lape")
    assert not reads_params(model, parts, text)
    assert reads_params(model, ("vision",), batch) and reads_params(model, ("lape",), batch)


def test_video_inputs_are_checked():
    model = _model()
    batch = _video_batch()
    with pytest.raises(ValueError, match="frames and video_mask go together"):
        model.embed_inputs(batch["input_ids"], frames=batch["frames"])
    with pytest.raises(ValueError, match="4 frames per video; model.video.frames is 3"):
        model.encode_video(jnp.zeros((1, 4, 16, 16, 3)))
    with pytest.raises(ValueError, match="without model.video"):
        _model(video=None).encode_video(batch["frames"])


@pytest.mark.parametrize("override, field", [
    ("model.video.fast_tokens=3", "model.video.fast_tokens"),
    ("model.video={frames: 2, slow_frames: 3}", "model.video.slow_frames"),
    ("model.video.frames=1", "model.video.frames"),
    ("model.video.fast_tokens=25", "model.video.fast_tokens"),  # more than the 4×4 grid
    ("model.vision={kind: features, hidden_size: 64, tokens: 16}", "model.video"),
    ("model.vision=null", "model.video"),
    ("model.projector.expand=2", "model.video"),  # 32 tokens per frame: no square grid
    ("model.lape={tokens: 10, temporal_tokens: 2}", "model.video.frames"),
])
def test_video_configs_that_cannot_work_are_refused_naming_the_field(override, field):
    with pytest.raises(ConfigError, match=field):
        load_config("configs/tiny.yaml", ["model.video={frames: 4, fast_tokens: 4, slow_frames: 2}", override])


def test_video_is_off_by_default_and_set_from_yaml():
    assert ModelConfig().video is None
    config = load_config("configs/tiny.yaml", ["model.video={frames: 4, fast_tokens: 4, slow_frames: 2}"])
    assert config.model.video == VideoConfig(frames=4, fast_tokens=4, slow_frames=2)
    assert config.model.video_spans == (16, 32)
