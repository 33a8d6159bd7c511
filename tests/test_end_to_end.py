"""The README's main job, end to end: the tiny model learns the bundled grammar.

Training on the bundled data (text-only sentences, image captions and questions) must lift the
held-out minimal-pair accuracy well above chance, while the untrained model sits
near chance: the proof that loader, model, step, checkpoint and scorer work together.
The same run must also use its images: the held-out VQA- and Winoground-style items score
far better with their images than without vision.
What it prints into a pipe is what a researcher reads in a SLURM log.
"""
from __future__ import annotations

import json
import os

import launch


def test_tiny_run_learns_the_bundled_grammar_and_reports_it(tmp_path, capsys):
    workdir = str(tmp_path / "run")
    code = launch.main(["train", "--config", "configs/tiny.yaml", "--workdir", workdir,
                        "--set", "logging.tensorboard=false"])
    out = capsys.readouterr().out
    assert code == 0
    summary = next(json.loads(line)["summary"] for line in out.splitlines() if line.startswith('{"summary"'))
    trained = summary["eval"]["eval/sample_pairs/text/accuracy"]
    untrained = summary["eval_at_start"]["eval/sample_pairs/text/accuracy"]
    assert trained >= 80.0, summary
    assert untrained <= 65.0, summary
    assert f"sample_pairs/text: {trained:.1f}% (at start {untrained:.1f}%, chance 50.0%)" in out
    # The bundled VQA- and Winoground-style items (held-out shapes scenes): scored with their images
    # and without vision, both rows in the closing summary.
    for task, chance in (("sample_vqa", 12.5), ("sample_winoground", 50.0)):
        for setting in ("image", "no_vision"):
            accuracy = summary["eval"][f"eval/{task}/{setting}/accuracy"]
            assert f"{task}/{setting}: {accuracy:.1f}% (at start " in out and f"chance {chance:.1f}%)" in out
    # Vision matters: the same held-out items score far better with their images than without.
    # Without, VQA can only learn each question's kind of answer (about 25%); Winoground stays at chance.
    vqa = {s: summary["eval"][f"eval/sample_vqa/{s}/accuracy"] for s in ("image", "no_vision")}
    winoground = {s: summary["eval"][f"eval/sample_winoground/{s}/accuracy"] for s in ("image", "no_vision")}
    assert vqa["image"] >= 2 * 12.5 and vqa["image"] - vqa["no_vision"] >= 20.0, vqa
    assert vqa["no_vision"] <= 35.0, vqa
    assert winoground["image"] >= 70.0 and winoground["image"] - winoground["no_vision"] >= 20.0, winoground
    # The hard held-out pairs (agreement across relative clauses) are learned only in part.
    hard = summary["eval"]["eval/sample_pairs_hard/text/accuracy"]
    assert 60.0 <= hard <= 95.0 and hard < trained, summary
    assert summary["eval_at_start"]["eval/sample_pairs_hard/text/accuracy"] <= 65.0, summary
    # Printed into a pipe (capsys is not a terminal): progress lines every log_every steps with the
    # text and image losses, the parameter count, the frozen random tower said, a held-out loss.
    progress = [line for line in out.splitlines() if line.startswith("step ")]
    # (the last line's window is the 2 steps after step 880, which the data order may fill with images alone)
    assert len(progress) >= summary["steps"] // 10 and all("(text " in line for line in progress[1:-1])
    assert all("image " in line for line in progress[1:])
    assert "parameters: 220,544, 139,712 trained: lm 131,392 (131,392 trained)" in out
    assert "warning: model part 'vision' is frozen" in out
    assert summary["held_out_loss"]["val_loss"] < 3.0 and "held-out loss" in out
    assert f"training loss {summary['final_loss']:.4f} over the last 10 steps (text " in out

    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    steps = [r for r in rows if "loss" in r]
    assert summary["final_loss"] < steps[0]["loss"] / 2.5 and summary["held_out_loss"]["val_loss"] < steps[0]["loss"] / 2
    # Both modalities were fed, and text-only steps carried no image tokens.
    assert sum(r["image_samples"] for r in steps) > 0 and sum(r["text_samples"] for r in steps) > 0
    assert all(r["image_tokens"] == 16 * r["image_samples"] for r in steps)
    assert os.path.isdir(os.path.join(workdir, "checkpoints", str(summary["last_checkpoint"])))
    run = json.load(open(os.path.join(workdir, "run.json")))
    assert run["config"]["data"]["objective"] == "plain_lm"


def test_tiny_features_run_learns_from_babylm_formats_without_a_tower(tmp_path, capsys):
    """configs/tiny_features.yaml: plain-text .train files and a caption list with a features .npy,
    as BabyLM distributes them; no tower exists, each vector becomes 4 image tokens."""
    workdir = str(tmp_path / "run")
    code = launch.main(["train", "--config", "configs/tiny_features.yaml", "--workdir", workdir,
                        "--set", "logging.tensorboard=false"])
    out = capsys.readouterr().out
    assert code == 0
    summary = next(json.loads(line)["summary"] for line in out.splitlines() if line.startswith('{"summary"'))
    assert summary["eval"]["eval/sample_pairs/text/accuracy"] >= 80.0, summary
    assert summary["eval_at_start"]["eval/sample_pairs/text/accuracy"] <= 65.0, summary
    # mlp2x_gelu 64 → 64 → 4 × 64 (expand 4): 4,160 + 16,640 parameters
    assert "parameters: 152,192, 152,192 trained: lm 131,392 (131,392 trained), projector 20,800 (20,800 trained)" in out
    assert "vision" not in out.split("parameters: ")[1].splitlines()[0]
    steps = [r for r in map(json.loads, open(os.path.join(workdir, "metrics.jsonl"))) if "loss" in r]
    assert sum(r["image_samples"] for r in steps) > 0 and sum(r["text_samples"] for r in steps) > 0
    assert all(r["image_tokens"] == 4 * r["image_samples"] for r in steps)
    assert summary["final_losses"]["image_loss"] < steps[0]["loss"] / 3
