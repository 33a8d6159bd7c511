"""configs/tiny_video.yaml end to end on the bundled clips: inspect-data shows the video
microbatches, and a short run feeds the text and video kinds, logs the video counts and learns from
the frames (its held-out video loss falls below what a model blind to them can reach). The full
run's motion accuracy is in data/README.md."""
from __future__ import annotations

import json
import math
import os

import launch
from jaxllava.config import load_config
from jaxllava.train.loop import train

CONFIG = "configs/tiny_video.yaml"
VIDEO_TOKENS = 4 * 4 + 2 * 16  # fast: 4 frames × 2×2; slow: 2 frames × the 4×4 grid


def test_inspect_data_reports_video_samples_and_video_microbatches(capsys):
    assert launch.main(["inspect-data", "--config", CONFIG, "--batches", "12"]) == 0
    out = capsys.readouterr().out
    report = dict(line.split(": ", 1) for line in out.split("== microbatches ==")[0].splitlines()[1:]
                  if ": " in line)
    assert json.loads(report["video_samples"]) == 720 - 36 and json.loads(report["image_samples"]) == 0
    assert json.loads(report["video_tokens_per_video"]) == {"fast": 16, "slow": 32}
    lines = [json.loads(line) for line in out.split("== microbatches ==")[1].splitlines() if line.startswith("{")]
    videos = [line for line in lines if line["modality"] == "video"]
    assert videos and all(line["has_frames"] and line["frames_shape"] == [4, 32, 32, 3] for line in videos)
    assert all(line["video_tokens"] == VIDEO_TOKENS * line["samples"] for line in videos)
    assert all("has_frames" not in line and line["video_tokens"] == 0 for line in lines if line["modality"] == "text")


def blind_loss_floor() -> float:
    """The lowest held-out loss per caption token a model that ignores the frames can reach: the
    colour (1 of 7), shape (1 of 3) and motion (1 of 4) are drawn independently of everything
    else, so their information must come from the frames. Every caption word is one token and a
    target (the word-level sample tokenizer, plain_lm)."""
    records = json.load(open("data/sample/videos.json"))
    targets = sum(len(r["conversations"][1]["value"].split()) for r in records)
    return (math.log(7) + math.log(3) + math.log(4)) * len(records) / targets


def test_a_short_tiny_video_run_logs_what_it_fed_and_learns_from_the_frames(tmp_path, capsys):
    workdir = tmp_path / "run"
    config = load_config(CONFIG, [f"train.workdir={workdir}", "data.epochs=2", "eval.validation_every_steps=40",
                                  "checkpoint.every_steps=1000", "eval.at_start=false"])
    summary = train(config)
    assert "684 video samples" in capsys.readouterr().out  # the start banner
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    steps = [row for row in rows if "step_loss" in row]
    assert sum(row["video_samples"] for row in steps) > 0 and all(row["image_samples"] == 0 for row in steps)
    assert all(row["video_tokens"] == VIDEO_TOKENS * row["video_samples"] for row in steps)
    last = [row for row in rows if "val_video_loss" in row][-1]["val_video_loss"]
    floor = blind_loss_floor()  # about 0.81
    assert last < 0.75 * floor, (last, floor)  # what the frames show reaches the captions
    assert {"eval/sample_video_motion/video/accuracy",
            "eval/sample_video_motion/no_vision/accuracy"} <= set(summary["eval"])
