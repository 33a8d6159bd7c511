"""Videos → normalised (T, size, size, 3) float32 frames for the vision tower.

A record's `video` is either a video file, decoded with PyAV (FFmpeg's libraries in
manylinux / macOS / Windows wheels on PyPI, so `pip install` needs no system FFmpeg), or a
folder of pre-extracted frames, read in sorted file-name order with Pillow. Which frames
are kept follows the reference's rules (`frame_indices`); each kept frame then goes
through the still-image pipeline of `jaxllava.data.images` (pad or squash to a square,
bicubic resize, rescale and normalise), so a frame gives the same pixels `load_image`
gives for the same picture saved losslessly.

Bad input is a `DataError` with field "video" and a reason to count skips by:
"missing_video" (no such file or folder), "corrupt_video" (undecodable, no video
stream), "empty_video" (no frame at all), "too_many_pixels" (frames larger than
`max_pixels`, refused before decoding); a damaged file in a frame folder keeps the
image reasons ("corrupt_image", ...) and names that file. No frame is ever invented or
borrowed from another sample (README pitfall 21).
"""
from __future__ import annotations

import os

import numpy as np
from PIL import Image

from jaxllava.data.images import ImageProcessing, decoded_rgb, normalise, pad_to_square
from jaxllava.errors import ConfigError, DataError


def _check_count(name: str, value, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ConfigError(f"{name} must be an integer ≥ {minimum}, got {value!r}")


def frame_indices(total_frames: int, *, num_frames: int | None = None, frames_upbound: int | None = None,
                  force_sample: bool = False) -> list[int]:
    """Indices of the frames to keep out of `total_frames`, in order, by the reference's rules
    (the reference repository's llava/utils.py `process_video_with_decord`, with its default
    `split`, the whole video; a record's `meta.split` sub-range is not supported):

    - `num_frames` evenly spaced: frame i is `round(i / (num_frames − 1) · (total − 1))`,
      Python's round, so halves go to the even neighbour;
    - `frames_upbound` (> 0) by linspace: `linspace(0, total − 1, frames_upbound)` truncated
      to integers, used instead when `num_frames` exceeds it or `force_sample` is set;
      `num_frames=None` means this rule alone.

    A video shorter than asked repeats frames (the reference does the same), so the count is
    always `num_frames` or `frames_upbound`: static shapes for the model.
    """
    _check_count("total_frames", total_frames, minimum=1)
    upbound = 0 if frames_upbound is None else frames_upbound
    _check_count("frames_upbound", upbound, minimum=0)
    if num_frames is None:
        if upbound == 0:
            raise ConfigError("give num_frames or a positive frames_upbound to choose video frames")
        use_upbound = True
    else:
        # The reference divides by num_frames − 1; a single frame has no spacing to follow.
        _check_count("num_frames", num_frames, minimum=2)
        use_upbound = upbound > 0 and (num_frames > upbound or force_sample)
    if use_upbound:
        return np.linspace(0, total_frames - 1, upbound, dtype=int).tolist()
    return [round((i / (num_frames - 1)) * (total_frames - 1)) for i in range(num_frames)]


def read_video_frames(path: str | os.PathLike, processing: ImageProcessing, *, num_frames: int | None = None,
                      frames_upbound: int | None = None, force_sample: bool = False,
                      record: str | int | None = None, record_id: str | None = None) -> np.ndarray:
    """The frames `frame_indices` picks from the video file or frame folder at `path`, as float32
    pixels of shape (T, size, size, 3) normalised exactly as `load_image` normalises a still image.
    Raises `DataError` (field "video", naming the file, `record` and `record_id`), see the module doc."""
    location = {"file": os.fspath(path), "record": record, "record_id": record_id, "field": "video"}
    rule = {"num_frames": num_frames, "frames_upbound": frames_upbound, "force_sample": force_sample}
    if os.path.isdir(path):
        frames = _folder_frames(os.fspath(path), processing, rule, location)
    elif os.path.isfile(path):
        frames = _video_file_frames(os.fspath(path), processing, rule, location)
    else:
        raise DataError("video file or frame folder not found", reason="missing_video", **location)
    return np.stack([normalise(_square(frame, processing), processing) for frame in frames])


def _square(rgb: Image.Image, processing: ImageProcessing) -> Image.Image:
    """Steps 4-5 of `jaxllava.data.images` (as `square_image`): pad or squash, bicubic resize."""
    if processing.aspect == "pad":
        rgb = pad_to_square(rgb, processing.background)
    if rgb.size != (processing.size, processing.size):
        rgb = rgb.resize((processing.size, processing.size), Image.Resampling.BICUBIC)
    return rgb


def _folder_frames(folder: str, processing: ImageProcessing, rule: dict, location: dict) -> list[Image.Image]:
    """Pre-extracted frames, one image file each, in sorted file-name order (the reference sorts
    `os.listdir` too; name frames with zero-padded numbers). Hidden files are not frames. The
    frames are chosen by `frame_indices` as for a video file, not by the reference's hard-coded
    10 frames for its `shareVideoGPTV` folders (llava/train/train.py `__getitem__`)."""
    names = sorted(name for name in os.listdir(folder)
                   if not name.startswith(".") and os.path.isfile(os.path.join(folder, name)))
    if not names:
        raise DataError("frame folder holds no frame files", reason="empty_video", **location)
    wanted = frame_indices(len(names), **rule)
    decoded = {index: decoded_rgb(os.path.join(folder, names[index]), processing,
                                   {**location, "file": os.path.join(folder, names[index])})
               for index in sorted(set(wanted))}
    return [decoded[index] for index in wanted]


def _video_file_frames(path: str, processing: ImageProcessing, rule: dict, location: dict) -> list[Image.Image]:
    """Decode twice: once to count the frames (containers such as Matroska do not store the
    count, and a stored count can be wrong), once to keep only the chosen ones, so memory holds
    T frames rather than the whole video."""
    import av  # imported here: only video records need it

    try:
        total = _count_frames(av, path, processing, location)
        if total == 0:
            raise _EmptyVideo()
        wanted = frame_indices(total, **rule)
        decoded = _frames_at(av, path, set(wanted))
    except _EmptyVideo:
        raise DataError("the video stream holds no decodable frame", reason="empty_video", **location) from None
    except (av.error.FFmpegError, OSError, ValueError) as e:
        raise DataError(f"undecodable video ({type(e).__name__}: {e})", reason="corrupt_video", **location) from e
    if len(decoded) != len(set(wanted)):
        raise DataError(f"the second decoding pass found fewer than the {total} frames of the first",
                        reason="corrupt_video", **location)
    return [decoded[index] for index in wanted]


class _EmptyVideo(Exception):
    """A container whose video stream decodes to no frame."""


def _count_frames(av, path: str, processing: ImageProcessing, location: dict) -> int:
    with av.open(path) as container:
        if not container.streams.video:
            raise DataError("the file has no video stream", reason="corrupt_video", **location)
        stream = container.streams.video[0]
        width, height = stream.codec_context.width, stream.codec_context.height
        if width * height > processing.max_pixels:
            raise DataError(f"{width}×{height} = {width * height} pixels per frame, more than "
                            f"data.image.max_pixels={processing.max_pixels}; refused before decoding",
                            reason="too_many_pixels", **location)
        return sum(1 for _ in container.decode(stream))


def _frames_at(av, path: str, indices: set[int]) -> dict[int, Image.Image]:
    last = max(indices)
    frames = {}
    with av.open(path) as container:
        for index, frame in enumerate(container.decode(container.streams.video[0])):
            if index in indices:
                frames[index] = Image.fromarray(frame.to_ndarray(format="rgb24"))
            if index == last:
                break
    return frames
