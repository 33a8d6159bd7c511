"""Starting a new run from another checkpoint's parameters (train.init_from), e.g. one that
`launch.py convert import-hf` wrote, and refusing to *resume* an imported work directory."""
from __future__ import annotations

import jax
import numpy as np
import pytest

from jaxllava.config import load_config
from jaxllava.checkpoint import load_checkpoint_params, write_params_checkpoint
from jaxllava.errors import ConfigError, TrainingError
from jaxllava.train.loop import train

FAST = ["logging.tensorboard=false", "logging.progress=false", "eval.at_end=false", "eval.at_start=false",
        "train.steps=3", "checkpoint.every_steps=0"]


def config(workdir, *extra):
    return load_config("configs/tiny.yaml", FAST + [f"train.workdir={workdir}", *extra])


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
