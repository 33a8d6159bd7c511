"""Video frames: the reference's frame-index rules, decoded pixels equal to still images, bad-video errors."""
from __future__ import annotations

import av
import numpy as np
import pytest
from PIL import Image

from jaxllava.data.config import VideoFramesConfig
from jaxllava.data.images import ImageProcessing, load_image
from jaxllava.data.video import frame_indices, read_video_frames
from jaxllava.errors import ConfigError, DataError

WIDTH, HEIGHT, FRAMES = 48, 32, 9  # non-square, so the "pad" path is exercised; even sides for yuv420p
PROCESSING = ImageProcessing(size=24)


def reference_frame_indices(total, num_frames, frames_upbound=0, force_sample=False):
    """The reference's rule restated (llava/utils.py `process_video_with_decord`, split = whole video)."""
    duration = total
    frame_idx = [0 + round((i / (num_frames - 1)) * (duration - 1)) for i in range(num_frames)]
    if frames_upbound > 0 and (len(frame_idx) > frames_upbound or force_sample):
        frame_idx = np.linspace(0, duration - 1, frames_upbound, dtype=int).tolist()
    return frame_idx


@pytest.mark.parametrize("total, num_frames, frames_upbound, force_sample", [
    (10, 4, 0, False), (100, 100, 0, False), (97, 8, 0, False), (1000, 7, 0, False),
    (3, 5, 0, False),  # fewer frames than asked: repeats
    (1, 4, 0, False),  # a one-frame video
    (100, 100, 4, False),  # more frames than the upper bound: linspace
    (7, 4, 4, False),  # the Italian runs' num_frames = frames_upbound = 4: even spacing stays
    (7, 4, 4, True), (50, 3, 8, True), (3, 10, 8, False), (2, 16, 5, False),
])
def test_frame_indices_follow_the_reference_formula(total, num_frames, frames_upbound, force_sample):
    got = frame_indices(total, num_frames=num_frames, frames_upbound=frames_upbound, force_sample=force_sample)
    assert got == reference_frame_indices(total, num_frames, frames_upbound, force_sample)
    assert len(got) == (frames_upbound if frames_upbound and (num_frames > frames_upbound or force_sample)
                        else num_frames)
    # data.video's static frame count (checked against model.video.frames at start) is the rule's
    assert VideoFramesConfig(num_frames, frames_upbound, force_sample).count == len(got)
    assert all(0 <= i < total for i in got) and got == sorted(got)


def test_frame_indices_worked_examples():
    """Hand-computed: Python's round sends halves to the even neighbour; linspace truncates."""
    assert frame_indices(10, num_frames=4) == [0, 3, 6, 9]
    assert frame_indices(3, num_frames=5) == [0, 0, 1, 2, 2]  # 0.5 → 0, 1.5 → 2
    assert frame_indices(100, num_frames=100, frames_upbound=4) == [0, 33, 66, 99]
    assert frame_indices(10, frames_upbound=4) == [0, 3, 6, 9]
    assert frame_indices(5, frames_upbound=3) == [0, 2, 4]
    assert frame_indices(2, frames_upbound=4) == [0, 0, 0, 1]


def test_frame_indices_upbound_alone_is_linspace():
    for total, upbound in [(1, 1), (9, 4), (250, 16), (3, 8)]:
        expected = np.linspace(0, total - 1, upbound, dtype=int).tolist()
        assert frame_indices(total, frames_upbound=upbound) == expected


@pytest.mark.parametrize("kwargs", [{}, {"frames_upbound": 0}, {"num_frames": 1}, {"num_frames": 0},
                                    {"num_frames": 4, "frames_upbound": -1}, {"num_frames": True},
                                    {"num_frames": 2.0}])
def test_frame_indices_rejects_bad_settings(kwargs):
    with pytest.raises(ConfigError):
        frame_indices(10, **kwargs)


def moving_square(index: int) -> np.ndarray:
    """A red square sliding right over a blue-green gradient, so every frame differs."""
    y, x = np.mgrid[:HEIGHT, :WIDTH]
    frame = np.stack([np.zeros_like(x), 4 * x, 6 * y], axis=-1).astype(np.uint8)
    left = 4 * index
    frame[8:20, left:left + 12] = (230, 40, 30)
    return frame


def write_video(path, codec: str, pix_fmt: str):
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=4)
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, pix_fmt
        stream.bit_rate = 2_000_000  # lossy codecs: a quality at which only chroma subsampling shows
        for index in range(FRAMES):
            for packet in stream.encode(av.VideoFrame.from_ndarray(moving_square(index), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


@pytest.fixture(scope="module")
def frame_pngs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("frames")
    for index in range(FRAMES):
        Image.fromarray(moving_square(index)).save(folder / f"frame_{index:03d}.png")
    return folder


def still_images(frame_pngs, indices) -> np.ndarray:
    return np.stack([load_image(frame_pngs / f"frame_{i:03d}.png", PROCESSING) for i in indices])


@pytest.mark.parametrize("aspect", ["pad", "resize"])
def test_frame_folder_equals_load_image_exactly(frame_pngs, aspect):
    processing = ImageProcessing(size=24, aspect=aspect)
    (frame_pngs / ".DS_Store").write_bytes(b"not a frame")  # hidden files are not frames
    got = read_video_frames(frame_pngs, processing, num_frames=4)
    indices = frame_indices(FRAMES, num_frames=4)
    expected = np.stack([load_image(frame_pngs / f"frame_{i:03d}.png", processing) for i in indices])
    assert got.dtype == np.float32 and got.shape == (4, 24, 24, 3)
    np.testing.assert_array_equal(got, expected)


def test_lossless_video_equals_load_image_exactly(tmp_path, frame_pngs):
    video = write_video(tmp_path / "square.mkv", "ffv1", "bgr0")  # FFV1 RGB: lossless
    got = read_video_frames(video, PROCESSING, num_frames=100, frames_upbound=5)
    np.testing.assert_array_equal(got, still_images(frame_pngs, np.linspace(0, FRAMES - 1, 5, dtype=int)))


def test_lossy_video_frames_match_their_source_frames(tmp_path, frame_pngs):
    video = write_video(tmp_path / "square.mp4", "mpeg4", "yuv420p")
    indices = frame_indices(FRAMES, num_frames=4)
    got = read_video_frames(video, PROCESSING, num_frames=4)
    assert got.shape == (4, 24, 24, 3)
    every_still = still_images(frame_pngs, range(FRAMES))
    unit = 1 / np.asarray(PROCESSING.std, np.float32) / 255  # one 8-bit step after normalisation
    for frame, index in zip(got, indices):
        errors = np.abs(every_still - frame).mean(axis=(1, 2, 3))
        assert np.argmin(errors) == index  # the frame the rule picked, not a neighbour
        assert np.abs((frame - every_still[index]) / unit).mean() < 6  # codec tolerance, in 8-bit steps


def test_video_shorter_than_asked_repeats_frames(tmp_path, frame_pngs):
    video = write_video(tmp_path / "square.mkv", "ffv1", "bgr0")
    got = read_video_frames(video, PROCESSING, num_frames=12)
    np.testing.assert_array_equal(got, still_images(frame_pngs, frame_indices(FRAMES, num_frames=12)))


def expect_video_error(path, reason, *, file=None, processing=PROCESSING):
    with pytest.raises(DataError) as caught:
        read_video_frames(path, processing, num_frames=4, record=7, record_id="clip-7")
    error = caught.value
    assert (error.field, error.reason, error.record, error.record_id) == ("video", reason, 7, "clip-7")
    assert error.file == str(file or path) and str(file or path) in str(error) and "'video'" in str(error)
    return error


def test_bad_videos_are_named_errors(tmp_path):
    expect_video_error(tmp_path / "absent.mp4", "missing_video")
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(b"this is not a video" * 50)
    expect_video_error(garbage, "corrupt_video")
    truncated = tmp_path / "truncated.mp4"
    truncated.write_bytes(write_video(tmp_path / "whole.mp4", "mpeg4", "yuv420p").read_bytes()[:200])
    expect_video_error(truncated, "corrupt_video")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / ".hidden").write_bytes(b"")
    expect_video_error(tmp_path / "empty", "empty_video")


def test_video_with_too_many_pixels_is_refused(tmp_path):
    video = write_video(tmp_path / "square.mkv", "ffv1", "bgr0")
    small_budget = ImageProcessing(size=24, max_pixels=WIDTH * HEIGHT - 1)
    expect_video_error(video, "too_many_pixels", processing=small_budget)


def test_corrupt_frame_in_folder_names_the_frame(tmp_path, frame_pngs):
    folder = tmp_path / "clip"
    folder.mkdir()
    for index in range(FRAMES):
        (folder / f"frame_{index:03d}.png").write_bytes((frame_pngs / f"frame_{index:03d}.png").read_bytes())
    bad = folder / "frame_008.png"  # the last frame, always picked
    bad.write_bytes(bad.read_bytes()[:60])
    error = expect_video_error(folder, "corrupt_image", file=bad)
    assert "truncated or undecodable" in str(error)
