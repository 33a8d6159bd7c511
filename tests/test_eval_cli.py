"""`launch.py eval` end to end on a tiny checkpoint written by the conversion path.

The checkpoint is configs/tiny.yaml's LLaVA (tiny tower included) with random weights,
stored by `checkpoint.write_params_checkpoint` with the bundled tokenizer.
"""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from flax import nnx

import launch
from jaxllava.config import load_config
from jaxllava.checkpoint import write_params_checkpoint
from jaxllava.data.tokenizer import load_tokenizer
from jaxllava.errors import ConfigError
from jaxllava.eval.cli import parse_image_templates, parse_tasks
from jaxllava.eval.evaluator import MinimalPairEvaluator
from jaxllava.model.llava import LlavaModel

ROOT = pathlib.Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data" / "sample"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """(work directory, the in-memory model it holds, a 30-pair task file)."""
    root = tmp_path_factory.mktemp("eval_cli")
    config = load_config(ROOT / "configs" / "tiny.yaml")
    model = LlavaModel(config.model, rngs=nnx.Rngs(0))
    workdir = write_params_checkpoint(str(root / "run"), config, nnx.to_pure_dict(nnx.state(model, nnx.Param)),
                                      str(SAMPLE / "tokenizer"), {"imported_from": "test"})
    pairs = root / "pairs.jsonl"
    pairs.write_text("\n".join((SAMPLE / "minimal_pairs.jsonl").read_text().splitlines()[::10]) + "\n")
    return workdir, model, str(pairs)


def test_eval_cli_scores_the_checkpoint_and_writes_every_output(checkpoint, capsys):
    workdir, model, pairs = checkpoint
    code = launch.main(["eval", "--checkpoint", workdir, "--task", f"pairs={pairs}", "--image-template", "none",
                        "--image-template", "<image>\\n{text}", "--batch-size", "16"])
    out = capsys.readouterr().out
    assert code == 0

    run = pathlib.Path(workdir) / "eval" / "0"  # default: <workdir>/eval/<step>
    summary = json.loads((run / "summary.json").read_text())
    assert summary["step"] == 0 and summary["dtype"] == "float32"
    assert summary["settings"] == {"text": None, "image_template": "<image>\n{text}"}  # shell "\n" read as newline
    lines = [json.loads(line) for line in (run / "pairs" / "text" / "predictions.jsonl").read_text().splitlines()]
    assert len(lines) == 30 and lines[0]["id"] == "determiner_noun_agreement_0"

    # The CLI scored the checkpoint's parameters: same scores as the model that was saved.
    tokenizer = load_tokenizer(str(SAMPLE / "tokenizer"))
    expected = MinimalPairEvaluator({"pairs": pairs}, tokenizer, batch_size=16).evaluate(model)["pairs"]["text"]
    np.testing.assert_allclose([line["scores"] for line in lines], np.stack(expected.scores), atol=1e-5, rtol=0)
    assert summary["scalars"]["eval/pairs/text/accuracy"] == pytest.approx(expected.average)

    for setting in ("text", "image_template"):
        setting_summary = json.loads((run / "pairs" / setting / "summary.json").read_text())
        report = (run / "pairs" / setting / "pipeline" / "best_temperature_report.txt").read_text()
        assert f"### AVERAGE ACCURACY\n{setting_summary['average']:.2f}\n" in report
        official = json.loads((run / "pairs" / setting / "pipeline" / "predictions.json").read_text())
        assert sum(len(v["predictions"]) for v in official.values()) == 30
    assert f"{expected.average:.2f}" in out and "chance" in out and "50.00" in out
    assert "text vs image_template" in out and "UID subject_verb_agreement" in out


def test_eval_cli_in_bfloat16_scores_close_to_float32(checkpoint, tmp_path):
    workdir, model, pairs = checkpoint
    code = launch.main(["eval", "--checkpoint", workdir, "--task", f"pairs={pairs}", "--batch-size", "16",
                        "--dtype", "bfloat16", "--out", str(tmp_path)])
    assert code == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["dtype"] == "bfloat16"
    lines = [json.loads(line) for line in (tmp_path / "pairs" / "text" / "predictions.jsonl").read_text().splitlines()]
    scores = np.array([line["scores"] for line in lines])

    tokenizer = load_tokenizer(str(SAMPLE / "tokenizer"))
    float32 = MinimalPairEvaluator({"pairs": pairs}, tokenizer, batch_size=16).evaluate(model)["pairs"]["text"]
    error = np.abs(scores - np.stack(float32.scores))
    assert 1e-4 < error.max() < 0.1  # computed in bf16 (sentence scores are about -27 here), yet close
    # Decisions can differ only where float32's own margin is within the bf16 error.
    margin = np.abs(np.diff(np.stack(float32.scores), axis=1))[:, 0]
    flipped = np.argmax(scores, axis=1) != float32.chosen
    assert np.all(margin[flipped] <= 2 * error.max(axis=1)[flipped])
    assert summary["scalars"]["eval/pairs/text/accuracy"] == pytest.approx(float32.average, abs=10.0)


def test_eval_cli_exits_2_naming_the_file_and_line_of_a_malformed_task(checkpoint, tmp_path, capsys):
    workdir, _, pairs = checkpoint
    broken = tmp_path / "broken.jsonl"
    lines = pathlib.Path(pairs).read_text().splitlines()
    broken.write_text("\n".join([lines[0], lines[1][:-5], lines[2]]) + "\n")  # line 2 cut short
    code = launch.main(["eval", "--checkpoint", workdir, "--task", f"broken={broken}", "--out", str(tmp_path / "o")])
    assert code == 2
    assert f"file {broken}, line 2: invalid JSON" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_task_and_template_arguments_are_checked_before_any_loading(capsys):
    assert launch.main(["eval", "--checkpoint", "/nonexistent", "--task", "pairs.jsonl"]) == 2
    assert "expected NAME=PATH" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="given twice"):
        parse_tasks(["a=x.jsonl", "a=y.jsonl"])
    with pytest.raises(ConfigError, match="letters"):
        parse_tasks(["a/b=x.jsonl"])
    assert parse_tasks(["blimp=dir/", "ewok=e/"]) == {"blimp": "dir/", "ewok": "e/"}
    assert parse_image_templates(None) == (True, ())
    assert parse_image_templates(["<image>\\n{text}"]) == (False, ("<image>\n{text}",))  # template only
    assert parse_image_templates(["none", "<image>\n{text}"]) == (True, ("<image>\n{text}",))


def test_eval_cli_splits_batches_over_every_local_device(checkpoint, tmp_path):
    """8 simulated CPU devices: each holds the model and scores its share of every batch;
    the scores equal the one-device scores of the saved model."""
    workdir, model, pairs = checkpoint
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "launch.py", "eval", "--checkpoint", workdir, "--task", f"pairs={pairs}",
                          "--batch-size", "16", "--out", str(tmp_path)], env=env, cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-4000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["devices"] == 8
    lines = [json.loads(line) for line in (tmp_path / "pairs" / "text" / "predictions.jsonl").read_text().splitlines()]
    tokenizer = load_tokenizer(str(SAMPLE / "tokenizer"))
    expected = MinimalPairEvaluator({"pairs": pairs}, tokenizer, batch_size=16).evaluate(model)["pairs"]["text"]
    np.testing.assert_allclose([line["scores"] for line in lines], np.stack(expected.scores), atol=1e-5, rtol=0)
