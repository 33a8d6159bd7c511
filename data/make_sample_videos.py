"""Generate the bundled tiny video set (deterministic, offline).

    python data/make_sample_videos.py --out data/sample

Writes, under --out (next to the still-image sample that data/make_sample_data.py writes, whose
tokenizer it needs: run that script first):
  videos/NNNN.mp4        720 training clips: one coloured shape on white, 64x64 pixels, 8 frames,
                         MPEG-4 Part 2 in an MP4 container (yuv420p, constant quantiser 2, so
                         the colours survive the encoding)
  videos/NNNN/           every 20th training clip instead as a frame folder, frame_00.png ..
                         frame_07.png (64x64 RGB), so the frame-folder reading path runs on
                         bundled data too
  videos.json            LLaVA-format video records ("<video>" -> the caption); the clip's
                         drawing is kept under the extra key "motion"
  videos_eval/NNNN.mp4   48 held-out clips from their own generator, never in videos.json
  videos_eval.jsonl      the video choice task (jaxllava/eval/multimodal.py): the clip, its
                         caption, and the 4 captions of the same colour and shape with each
                         motion (left, right, up, still, in that order); label = the true one

The shape runs left, runs right, jumps (moves up) or sits still, and the caption says which
("a red circle runs left ."), in words the sample tokenizer already has. The path's midpoint is
drawn uniformly over the places the whole path fits, so a middle frame puts the shape anywhere
with the same chance whatever the motion, and a still shape may sit anywhere; on a 64-px canvas
the first and last frames do hint at the direction (a path that starts at the left edge can only
run right). The travel (TRAVEL, 30-38 px: about two of the tiny tower's 8-px patches at 32 px)
is long so that the motion is plain to a tiny model; with 16-24 px it learned the colours and
shapes but not the motion in the same number of steps. 720 clips, because 240 were too few to
learn the motion from without overfitting (configs/tiny_video.yaml).

Shapes are large (radius 8-10 px) because the tiny tower sees a frame at 32 px in 8-px
patches (data/make_sample_data.py, RADIUS_ADDED). Every random choice comes from a seeded
`random.Random`; JSON is written with sorted keys, so a re-run gives the same JSON bytes. The
video and PNG bytes also depend on the FFmpeg that PyAV bundles and on the zlib that Pillow
links, so they may differ across versions while decoding to (nearly) the same pixels.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import random
import shutil
import sys

import numpy as np

# The colours and the drawing of the still-image sample, so a frame shows a shape exactly as a
# sample image does.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from make_sample_data import COLOURS, SHAPES, draw_scene, save_png, write_json_lines, write_jsonl

SEED = 20240612  # the training clips
EVAL_SEED = 20240613  # the held-out clips: their own generator
NUM_VIDEOS = 720
NUM_EVAL_VIDEOS = 48
FRAME_FOLDER_EVERY = 20
SIZE = 64
FRAMES = 8
FPS = 8
RADIUS = (8, 10)  # inclusive range, px on the 64-px side
TRAVEL = (30, 38)  # inclusive range of the distance a moving shape covers, px
MARGIN = 1  # px of white kept between the shape and the edge
# The candidates' order in videos_eval.jsonl, and the caption of each motion.
DIRECTIONS = ("left", "right", "up", "still")
VERBS = {"left": "runs left", "right": "runs right", "up": "jumps", "still": "sits"}
STEP = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "still": (0, 0)}


def caption(direction: str, colour: str, shape: str) -> str:
    return f"a {colour} {shape} {VERBS[direction]} ."


def motion_path(rng: random.Random, direction: str, radius: int) -> tuple[list[int], list[int]]:
    """(start, end) centres. A moving shape's midpoint is uniform over where its whole path fits
    (see the module doc); the cross axis, and a still shape, are uniform over the canvas."""
    low, high = radius + MARGIN, SIZE - 1 - radius - MARGIN
    dx, dy = STEP[direction]
    travel = rng.randint(*TRAVEL) if direction != "still" else 0
    start, end = [], []
    for step in (dx, dy):
        if step == 0:
            at = rng.randint(low, high)
            start.append(at)
            end.append(at)
        else:
            first = rng.randint(low, high - travel)  # the path's lower end
            start.append(first if step > 0 else first + travel)
            end.append(first + travel if step > 0 else first)
    return start, end


def frame_centres(motion: dict) -> list[tuple[int, int]]:
    (x0, y0), (x1, y1) = motion["start"], motion["end"]
    return [(round(x0 + (x1 - x0) * t / (FRAMES - 1)), round(y0 + (y1 - y0) * t / (FRAMES - 1)))
            for t in range(FRAMES)]


def draw_frames(motion: dict) -> list:
    scene = {"colour": motion["colour"], "shape": motion["shape"], "radius": motion["radius"],
             "mode": "RGB", "width": SIZE, "height": SIZE}
    return [draw_scene({**scene, "centres": [list(centre)]}) for centre in frame_centres(motion)]


def make_motions(rng: random.Random, count: int, taken: set[tuple] = frozenset()) -> list[dict]:
    """`count` clips, motions balanced: each block of 4 holds every motion once, in a random order.
    A motion's colours and shapes go round all 21 pairs in shuffled passes, so they spread evenly.
    A clip whose drawing is in `taken` is drawn again (held-out clips repeat no training clip)."""
    pairs = [(colour, shape) for colour in sorted(COLOURS) for shape in sorted(SHAPES)]
    queues: dict[str, list] = {direction: [] for direction in DIRECTIONS}
    motions = []
    for _ in range(count // len(DIRECTIONS)):
        for direction in rng.sample(DIRECTIONS, len(DIRECTIONS)):
            if not queues[direction]:
                queues[direction] = rng.sample(pairs, len(pairs))
            colour, shape = queues[direction].pop()
            while True:
                radius = rng.randint(*RADIUS)
                start, end = motion_path(rng, direction, radius)
                motion = {"direction": direction, "colour": colour, "shape": shape, "radius": radius,
                          "start": start, "end": end}
                if drawing_key(motion) not in taken:
                    break
            motions.append(motion)
    return motions


def drawing_key(motion: dict) -> tuple:
    return (motion["colour"], motion["shape"], motion["radius"], tuple(motion["start"]), tuple(motion["end"]))


def write_mp4(frames: list, path: pathlib.Path) -> None:
    import av

    with av.open(str(path), "w") as container:
        # qmin = qmax = 2: a constant, fine quantiser (PyAV ignores unknown option names, so
        # ffmpeg's command-line "-qscale" would silently do nothing here).
        stream = container.add_stream("mpeg4", rate=FPS, options={"qmin": "2", "qmax": "2"})
        stream.width, stream.height, stream.pix_fmt = SIZE, SIZE, "yuv420p"
        stream.thread_count = 1  # one thread: the same bytes on every machine with this FFmpeg
        for image in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.asarray(image), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def write_frame_folder(frames: list, folder: pathlib.Path) -> None:
    folder.mkdir()
    for t, image in enumerate(frames):
        save_png(image, folder / f"frame_{t:02d}.png", transparent=False)


def check_vocabulary(texts: list[str], tokenizer_file: pathlib.Path) -> None:
    try:
        vocabulary = set(json.loads(tokenizer_file.read_text(encoding="utf-8"))["model"]["vocab"])
    except (OSError, ValueError, KeyError) as e:
        raise SystemExit(f"{tokenizer_file}: cannot read the word-level vocabulary ({e}); "
                         "run data/make_sample_data.py first") from e
    unknown = sorted({w for text in texts for w in text.split()} - vocabulary)
    if unknown:
        raise ValueError(f"caption words missing from {tokenizer_file}: {unknown}")


# ---------------------------------------------------------------- main
OUTPUTS = ("videos", "videos_eval", "videos.json", "videos_eval.jsonl")


def generate(out: pathlib.Path) -> None:
    # Every caption any clip can get, checked before anything is written.
    check_vocabulary([caption(d, c, s) for d in DIRECTIONS for c in COLOURS for s in SHAPES],
                     out / "tokenizer" / "tokenizer.json")
    for name in OUTPUTS:  # only what this script writes, so a re-run leaves no stale files
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()

    (out / "videos").mkdir()
    records = []
    motions = make_motions(random.Random(SEED), NUM_VIDEOS)
    for index, motion in enumerate(motions, start=1):
        frames = draw_frames(motion)
        if index % FRAME_FOLDER_EVERY == 0:
            name = f"videos/{index:04d}"
            write_frame_folder(frames, out / name)
        else:
            name = f"videos/{index:04d}.mp4"
            write_mp4(frames, out / name)
        text = caption(motion["direction"], motion["colour"], motion["shape"])
        records.append({"id": f"vid-{index:04d}", "video": name, "motion": motion,
                        "conversations": [{"from": "human", "value": "<video>"}, {"from": "gpt", "value": text}]})
    folder_directions = {r["motion"]["direction"] for r in records if not r["video"].endswith(".mp4")}
    assert folder_directions == set(DIRECTIONS), f"frame folders miss a motion: {sorted(folder_directions)}"
    write_json_lines(out / "videos.json", records)

    (out / "videos_eval").mkdir()
    items = []
    taken = {drawing_key(m) for m in motions}
    for index, motion in enumerate(make_motions(random.Random(EVAL_SEED), NUM_EVAL_VIDEOS, taken), start=1):
        name = f"videos_eval/{index:04d}.mp4"
        write_mp4(draw_frames(motion), out / name)
        candidates = [caption(d, motion["colour"], motion["shape"]) for d in DIRECTIONS]
        label = DIRECTIONS.index(motion["direction"])
        items.append({"id": f"vid-eval-{index:04d}", "video": name, "caption": candidates[label],
                      "candidates": candidates, "label": label, "motion": motion})
    write_jsonl(out / "videos_eval.jsonl", items)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path(__file__).parent / "sample")
    generate(parser.parse_args().out)


if __name__ == "__main__":
    main()
