"""The bundled video sample (data/sample/videos*) is complete, decodable, in the tokenizer's words,
held out where it must be, and shows the motion its caption names."""
from __future__ import annotations

import collections
import importlib.util
import json
import pathlib

import numpy as np
import pytest

from jaxllava.data.images import ImageProcessing
from jaxllava.data.video import read_video_frames

ROOT = pathlib.Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data" / "sample"
GENERATOR = ROOT / "data" / "make_sample_videos.py"
PROCESSING = ImageProcessing(size=32)  # the tiny tower's input side


def _load_generator():
    spec = importlib.util.spec_from_file_location("make_sample_videos", GENERATOR)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gen = _load_generator()


@pytest.fixture(scope="module")
def records() -> list[dict]:
    return json.loads((SAMPLE / "videos.json").read_text())


@pytest.fixture(scope="module")
def eval_items() -> list[dict]:
    return [json.loads(line) for line in (SAMPLE / "videos_eval.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def vocabulary() -> set[str]:
    return set(json.loads((SAMPLE / "tokenizer" / "tokenizer.json").read_text())["model"]["vocab"])


def _rgb(frames: np.ndarray) -> np.ndarray:
    """Normalised frames back to 0..255 RGB."""
    return (frames * np.asarray(PROCESSING.std) + np.asarray(PROCESSING.mean)) / PROCESSING.rescale


def _centres(rgb: np.ndarray) -> np.ndarray:
    """(T, 2) x, y centre of mass of each frame's non-white pixels, weighted by how far from white."""
    weight = np.clip(255 - rgb.min(axis=-1), 0, None)
    weight = np.where(weight > 40, weight, 0)  # bicubic ringing on the white is not the shape
    ys, xs = np.mgrid[:rgb.shape[1], :rgb.shape[2]]
    total = weight.sum(axis=(1, 2))
    assert (total > 0).all(), "a frame shows no shape"
    return np.stack([(weight * xs).sum(axis=(1, 2)) / total, (weight * ys).sum(axis=(1, 2)) / total], axis=1)


def test_records_are_complete_balanced_and_their_videos_exist(records):
    assert len(records) == gen.NUM_VIDEOS
    assert len({r["id"] for r in records}) == len(records)
    per_motion = gen.NUM_VIDEOS // len(gen.DIRECTIONS)
    assert collections.Counter(r["motion"]["direction"] for r in records) == {d: per_motion for d in gen.DIRECTIONS}
    videos = (SAMPLE / "videos").resolve()
    folders = 0
    for r in records:
        assert r["conversations"][0] == {"from": "human", "value": "<video>"}, r["id"]
        path = (SAMPLE / r["video"]).resolve()
        assert path.parent == videos, (r["id"], r["video"])
        if r["video"].endswith(".mp4"):
            assert path.is_file() and path.stat().st_size > 0, r["id"]
        else:
            folders += 1
            assert sorted(p.name for p in path.iterdir()) == [f"frame_{t:02d}.png" for t in range(gen.FRAMES)], r["id"]
    assert folders == gen.NUM_VIDEOS // gen.FRAME_FOLDER_EVERY


def test_captions_name_the_motion_in_the_tokenizers_words(records, eval_items, vocabulary):
    for r in records:
        m = r["motion"]
        text = r["conversations"][1]["value"]
        assert text == gen.caption(m["direction"], m["colour"], m["shape"]), r["id"]
        assert set(text.split()) <= vocabulary, r["id"]
    for item in eval_items:
        assert all(set(c.split()) <= vocabulary for c in item["candidates"]), item["id"]


def test_eval_items_are_held_out_and_labelled(records, eval_items):
    assert len(eval_items) == gen.NUM_EVAL_VIDEOS
    assert collections.Counter(i["motion"]["direction"] for i in eval_items) == {d: 12 for d in gen.DIRECTIONS}
    assert not {r["id"] for r in records} & {i["id"] for i in eval_items}
    assert not {r["video"] for r in records} & {i["video"] for i in eval_items}
    for item in eval_items:
        m = item["motion"]
        assert item["candidates"] == [gen.caption(d, m["colour"], m["shape"]) for d in gen.DIRECTIONS], item["id"]
        assert item["candidates"][item["label"]] == item["caption"], item["id"]
        assert gen.DIRECTIONS[item["label"]] == m["direction"], item["id"]
        assert (SAMPLE / item["video"]).is_file() and item["video"].startswith("videos_eval/"), item["id"]


def _some(records, eval_items):
    """Two clips of each motion (the first frame folder among them) and two held-out clips."""
    chosen = [next(r for r in records if not r["video"].endswith(".mp4"))]
    for direction in gen.DIRECTIONS:
        chosen += [r for r in records if r["motion"]["direction"] == direction and r["video"].endswith(".mp4")][:2]
    return [(r["video"], r["motion"]) for r in chosen] + [(i["video"], i["motion"]) for i in eval_items[:2]]


def test_decoded_frames_show_the_shape_colour_and_motion(records, eval_items):
    for video, motion in _some(records, eval_items):
        frames = read_video_frames(SAMPLE / video, PROCESSING, num_frames=gen.FRAMES, record=video)
        assert frames.shape == (gen.FRAMES, 32, 32, 3) and frames.dtype == np.float32, video
        rgb = _rgb(frames)
        # The shape's colour: the pixels far from white, nearest to the record's colour.
        core = rgb[rgb.min(axis=-1) < 255 - 150] if motion["colour"] != "yellow" else rgb[rgb[..., 2] < 100]
        seen = np.median(core, axis=0)
        nearest = min(gen.COLOURS, key=lambda c: np.abs(np.asarray(gen.COLOURS[c]) - seen).sum())
        assert nearest == motion["colour"], (video, seen)
        # The motion: the centre moves ~8-12 px (of 32) the named way, and not at all when still.
        dx, dy = _centres(rgb)[-1] - _centres(rgb)[0]
        expected = {"left": (dx < -6 and abs(dy) < 1), "right": (dx > 6 and abs(dy) < 1),
                    "up": (dy < -6 and abs(dx) < 1), "still": (abs(dx) < 0.5 and abs(dy) < 0.5)}
        assert expected[motion["direction"]], (video, motion["direction"], dx, dy)


def test_the_models_four_frames_still_show_the_motion(records):
    """configs/tiny_video.yaml keeps 4 evenly spaced frames: the motion is still monotone in them."""
    for r in [r for r in records if r["motion"]["direction"] in ("left", "right")][:4]:
        xs = _centres(_rgb(read_video_frames(SAMPLE / r["video"], PROCESSING, num_frames=4)))[:, 0]
        steps = np.diff(xs) * (1 if r["motion"]["direction"] == "right" else -1)
        assert (steps > 1).all(), (r["id"], xs)


def test_the_generator_reproduces_the_bundled_json(tmp_path):
    """A re-run writes the same JSON (the video bytes may depend on the FFmpeg version)."""
    (tmp_path / "tokenizer").mkdir()
    (tmp_path / "tokenizer" / "tokenizer.json").write_bytes((SAMPLE / "tokenizer" / "tokenizer.json").read_bytes())
    gen.generate(tmp_path)
    for name in ("videos.json", "videos_eval.jsonl"):
        assert (tmp_path / name).read_bytes() == (SAMPLE / name).read_bytes(), name


def test_captions_outside_the_vocabulary_are_refused(tmp_path):
    (tmp_path / "tokenizer").mkdir()
    (tmp_path / "tokenizer" / "tokenizer.json").write_text(json.dumps({"model": {"vocab": {"a": 0, ".": 1}}}))
    with pytest.raises(ValueError, match="caption words missing"):
        gen.generate(tmp_path)
    assert not (tmp_path / "videos").exists()
