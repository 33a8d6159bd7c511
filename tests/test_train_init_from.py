"""Starting a new run from another checkpoint's parameters (train.init_from), e.g. one that
`launch.py convert import-hf` wrote, and refusing to *resume* an imported work directory."""
from __future__ import annotations

import json
import os
import shutil

import jax
import numpy as np
import pytest

import launch

from jaxllava.config import load_config
from jaxllava.checkpoint import load_checkpoint_params, write_params_checkpoint
from jaxllava.errors import ConfigError, TrainingError
from jaxllava.train.loop import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = ["logging.tensorboard=false", "logging.progress=false", "eval.at_end=false", "eval.at_start=false",
        "train.steps=3", "checkpoint.every_steps=0"]


def config(workdir, *extra):
    return load_config(os.path.join(ROOT, "configs", "tiny.yaml"), FAST + [f"train.workdir={workdir}", *extra])


@pytest.fixture(scope="module")
def first(tmp_path_factory) -> str:
    workdir = str(tmp_path_factory.mktemp("first"))
    train(config(workdir))
    return workdir


def test_a_new_run_starts_from_the_init_from_parameters(first, tmp_path):
    _, trained, _ = load_checkpoint_params(first)
    second = str(tmp_path / "second")
    # lr 0: the second run's parameters stay what it started from.
    train(config(second, f"train.init_from={first}", "optim.lr=0.0"))
    _, started_from, _ = load_checkpoint_params(second)
    flat_a, flat_b = (np.concatenate([np.ravel(x) for x in jax.tree.leaves(p)]) for p in (trained, started_from))
    np.testing.assert_array_equal(flat_a, flat_b)


def test_init_from_a_checkpoint_of_another_model_is_refused(first, tmp_path):
    with pytest.raises(ConfigError, match="init_from.*model differs"):
        train(config(str(tmp_path / "other"), f"train.init_from={first}", "model.lm.num_layers=1"))


def test_an_imported_work_directory_is_not_resumed(first, tmp_path):
    cfg = config(first)
    _, params, _ = load_checkpoint_params(first)
    imported = str(tmp_path / "imported")
    write_params_checkpoint(imported, cfg, params, cfg.data.tokenizer, {"imported_from": "a test"})
    with pytest.raises(TrainingError, match="imported from a test.*train.init_from"):
        train(config(imported))


def test_a_model_mismatch_names_each_differing_field_with_both_values(first, tmp_path):
    with pytest.raises(ConfigError, match=r"model\.lm\.num_layers: 1 vs 2.*model\.lm\.num_heads: 2 vs 4"):
        train(config(str(tmp_path / "other"), f"train.init_from={first}", "model.lm.num_layers=1",
                     "model.lm.num_heads=2", "model.lm.num_kv_heads=2"))


def swapped_tokenizer(directory) -> str:
    """The bundled tokenizer with the ids of "dog" and "dogs" swapped: same size, other words."""
    shutil.copytree(os.path.join(ROOT, "data", "sample", "tokenizer"), directory)
    path = os.path.join(directory, "tokenizer.json")
    spec = json.load(open(path))
    vocab = spec["model"]["vocab"]
    vocab["dog"], vocab["dogs"] = vocab["dogs"], vocab["dog"]
    json.dump(spec, open(path, "w"))
    return str(directory)


def test_init_from_refuses_another_tokenizer_unless_told_to_accept_it(first, tmp_path):
    tokenizer = swapped_tokenizer(tmp_path / "swapped")
    with pytest.raises(ConfigError, match=r"vocabulary differs.*'dog\w*' \d+ vs \d+.*init_from_other_tokenizer"):
        train(config(str(tmp_path / "a"), f"train.init_from={first}", f"data.tokenizer={tokenizer}"))
    summary = train(config(str(tmp_path / "b"), f"train.init_from={first}", f"data.tokenizer={tokenizer}",
                           "train.init_from_other_tokenizer=true"))
    assert summary["steps"] == 3


def test_words_restart_or_continue_after_init_from_as_configured(first, tmp_path, capsys):
    carried = json.load(open(os.path.join(first, "checkpoints", "3", "meta", "metadata")))["words_seen"]
    restart = train(config(str(tmp_path / "restart"), f"train.init_from={first}"))
    assert "words seen restart at 0" in capsys.readouterr().out
    continued = train(config(str(tmp_path / "continue"), f"train.init_from={first}", "train.init_from_words=continue"))
    assert f"words seen continue from its {carried:,}" in capsys.readouterr().out
    assert continued["words_seen"] == carried + restart["words_seen"]


def test_an_import_writes_a_config_that_trains_as_a_base_with_no_overrides(first, tmp_path):
    cfg = config(first)
    _, params, _ = load_checkpoint_params(first)
    imported = str(tmp_path / "imported")
    write_params_checkpoint(imported, cfg, params, cfg.data.tokenizer, {"imported_from": "a test"})
    mine = tmp_path / "mine.yaml"
    mine.write_text(f"base: {imported}/config.yaml\n")
    loaded = load_config(str(mine))
    assert loaded.model == cfg.model and loaded.train.init_from == imported
    summary = train(loaded, str(tmp_path / "run"))
    assert summary["steps"] == 3 and summary["resumed_from"] is None


def test_a_moved_run_evaluates_and_exports_with_its_own_tokenizer_copy(tmp_path, monkeypatch, capsys):
    tokenizer = str(tmp_path / "tokenizer")
    shutil.copytree(os.path.join(ROOT, "data", "sample", "tokenizer"), tokenizer)
    trained = str(tmp_path / "trained")
    train(config(trained, f"data.tokenizer={tokenizer}"))
    moved = str(tmp_path / "elsewhere" / "run")
    shutil.move(trained, moved)
    shutil.rmtree(tokenizer)  # the original tokenizer is gone too
    monkeypatch.chdir(tmp_path)  # and the command runs from another directory
    pairs = os.path.join(ROOT, "data", "sample", "minimal_pairs.jsonl")
    assert launch.main(["eval", "--checkpoint", moved, "--task", f"pairs={pairs}"]) == 0
    step_only = str(tmp_path / "3")  # a step directory copied out of its work directory
    shutil.copytree(os.path.join(moved, "checkpoints", "3"), step_only)
    assert launch.main(["convert", "export-hf", "--checkpoint", step_only, "--out", str(tmp_path / "hf")]) == 0
    assert os.path.exists(tmp_path / "hf" / "tokenizer.json")
    capsys.readouterr()


def test_rerunning_a_finished_run_changes_nothing(first, capsys):
    before = {name: os.path.getmtime(os.path.join(first, name)) for name in ("run.json", "metrics.jsonl")}
    summary = train(config(first))
    out = capsys.readouterr().out
    assert "already complete at step 3" in out and summary["stopped_by"] == "already complete"
    assert summary["last_checkpoint"] == 3
    assert {name: os.path.getmtime(os.path.join(first, name)) for name in before} == before
    assert sorted(os.listdir(os.path.join(first, "checkpoints"))) == ["3"]
