"""`launch.py eval --suite`: every BabyLM 2025 task found under a data root, in the pipeline's results tree."""
from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest
from flax import nnx

import launch
from jaxllava.checkpoint import write_params_checkpoint
from jaxllava.config import load_config
from jaxllava.errors import ConfigError
from jaxllava.eval.suite import find_suite_tasks
from jaxllava.model.llava import create_model
from jaxllava.model.sharding import make_mesh

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE = os.path.join(ROOT, "data", "sample")


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> str:
    config = load_config(os.path.join(ROOT, "configs", "tiny.yaml"))
    params = nnx.to_pure_dict(nnx.state(create_model(config.model, make_mesh(), 0), nnx.Param))
    folder = tmp_path_factory.mktemp("suite")
    return write_params_checkpoint(str(folder / "tiny"), config, jax.tree.map(np.asarray, params),
                                   config.data.tokenizer, {"imported_from": "test"})


def test_the_bundled_sample_is_scored_through_its_manifest_with_and_without_vision(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "out"
    assert launch.main(["eval", "--checkpoint", tiny_checkpoint, "--suite", "babylm2025", "--data-root", SAMPLE,
                        "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    suite = json.load(open(out / "suite.json"))
    assert set(suite["scores"]) == {"blimp/text", "vqa/image", "vqa/no_vision", "winoground/image",
                                    "winoground/no_vision"}
    assert set(suite["skipped"]) == {"supplement", "ewok", "entity_tracking", "wug_adj", "wug_past", "comps",
                                     "reading", "aoa", "devbench"}
    assert f"skipped reading: not in {os.path.join(SAMPLE, 'babylm_tasks.json')}" in printed
    tree = out / "results" / "tiny" / "main" / "zero_shot" / "causal"
    for task, folder in (("blimp", "blimp_filtered"), ("vqa", "vqa_filtered"), ("winoground", "winoground_filtered")):
        predictions = json.load(open(tree / task / folder / "predictions.json"))
        assert predictions and (tree / task / folder / "best_temperature_report.txt").is_file()
    # The per-task outputs hold both rows of an image task, and the suite's numbers are theirs.
    summary = json.load(open(out / "vqa" / "summary.json"))
    assert summary["scalars"]["eval/vqa/image/accuracy"] == pytest.approx(suite["scores"]["vqa/image"])
    assert summary["scalars"]["eval/vqa/no_vision/accuracy"] == pytest.approx(suite["scores"]["vqa/no_vision"])


def test_a_manifest_naming_no_task_of_the_set_is_refused(tmp_path):
    (tmp_path / "babylm_tasks.json").write_text(json.dumps({"blimpp": "x.jsonl"}))
    with pytest.raises(ConfigError, match=r"babylm_tasks.json: \['blimpp'\] are not tasks of babylm2025"):
        find_suite_tasks(str(tmp_path), "babylm2025")


def test_the_official_layout_is_found_by_directory_name(tmp_path):
    (tmp_path / "fast_eval" / "blimp_fast").mkdir(parents=True)
    (tmp_path / "fast_eval" / "reading").mkdir()
    (tmp_path / "fast_eval" / "reading" / "reading_data.csv").write_text("")
    found, skipped = find_suite_tasks(str(tmp_path), "babylm2025_fast")
    assert [spec.name for spec, _ in found] == ["blimp_fast", "reading"]
    assert "ewok_fast" in {spec.name for spec, _ in skipped}


@pytest.mark.parametrize("argv, message", [
    (["--suite", "babylm2025"], "needs --data-root"),
    (["--suite", "babylm2025", "--data-root", SAMPLE, "--task", "x=y.jsonl"], "either --task"),
    ([], "either --task"),
])
def test_suite_arguments_are_checked_before_loading(argv, message, tiny_checkpoint, capsys):
    assert launch.main(["eval", "--checkpoint", tiny_checkpoint, *argv]) == 2
    assert message in capsys.readouterr().err


def test_a_run_scores_its_suite_at_the_end_in_the_results_tree(tmp_path, capsys):
    workdir = tmp_path / "run"
    argv = ["train", "--config", os.path.join(ROOT, "configs", "tiny.yaml"), "--workdir", str(workdir)]
    for value in ("train.steps=3", "eval.at_start=false", "eval.tasks={}", "eval.suite=babylm2025",
                  f"eval.suite_root={SAMPLE}", "logging.tensorboard=false", "data.validation_fraction=0"):
        argv += ["--set", value]
    assert launch.main(argv) == 0
    out = capsys.readouterr().out
    final = [json.loads(line) for line in open(workdir / "metrics.jsonl")][-1]
    assert final["step"] == 3
    assert {"eval/suite/blimp/text", "eval/suite/vqa/image", "eval/suite/vqa/no_vision"} <= set(final)
    assert f"   suite/vqa/image: {final['eval/suite/vqa/image']:.2f}" in out
    tree = workdir / "eval" / "step_3" / "suite" / "results" / "run" / "main" / "zero_shot" / "causal"
    assert (tree / "vqa" / "vqa_filtered" / "predictions.json").is_file()


def test_suite_and_its_root_go_together():
    with pytest.raises(ConfigError, match="eval.suite and eval.suite_root go together"):
        load_config(os.path.join(ROOT, "configs", "tiny.yaml"), ["eval.suite=babylm2025"])
