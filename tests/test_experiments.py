"""Experiments: seed and bootstrap intervals, a sweep that resumes, plot figures, compare-models."""
from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest
from PIL import Image

import launch
from jaxllava.errors import ConfigError
from jaxllava.experiments import sweep as sweep_module
from jaxllava.experiments.plots import plot_runs
from jaxllava.experiments.stats import macro_accuracy, paired_bootstrap, seed_interval
from jaxllava.train.loop import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny.yaml")


def test_macro_accuracy_weighs_every_uid_equally():
    correct = np.array([1, 1, 1, 0, 0, 0, 0, 1], float)
    groups = np.array(["a", "a", "a", "a", "a", "a", "b", "b"])
    assert macro_accuracy(correct, groups) == pytest.approx(100 * (3 / 6 + 1 / 2) / 2)


def test_seed_interval_is_students_t():
    interval = seed_interval([60.0, 62.0, 64.0])
    half = 4.302652729911275 * 2.0 / np.sqrt(3)  # t(0.975, 2) × s / √n, s = 2
    assert (interval.mean, interval.low, interval.high) == pytest.approx((62.0, 62 - half, 62 + half))
    assert np.isnan(seed_interval([70.0]).low) and seed_interval([70.0]).format() == "70.0 (n=1)"


def test_paired_bootstrap_finds_a_known_difference_and_covers_it():
    rng = np.random.default_rng(0)
    groups = np.repeat(["u1", "u2", "u3", "u4"], 150)
    p_first = np.repeat([0.5, 0.6, 0.7, 0.8], 150)
    truth = 10.0  # every UID's accuracy is 10 points higher in the second arm
    covered, excluded_zero = 0, 0
    for trial in range(60):
        first = (rng.random((3, 600)) < p_first).astype(float)
        second = (rng.random((3, 600)) < p_first + truth / 100).astype(float)
        interval, p = paired_bootstrap(first, second, groups, samples=400, seed=trial)
        covered += interval.low <= truth <= interval.high
        excluded_zero += interval.low > 0 and p < 0.05
    assert covered >= 51  # nominal 95% of 60 is 57; a broken interval lands far lower
    assert excluded_zero >= 55
    same = (rng.random((2, 600)) < p_first).astype(float)
    interval, p = paired_bootstrap(same, same, groups, samples=200)
    assert interval.mean == 0.0 and interval.low == interval.high == 0.0 and p == 1.0


def test_paired_bootstrap_refuses_arms_on_different_items():
    with pytest.raises(ValueError, match="same items"):
        paired_bootstrap(np.ones((2, 5)), np.ones((2, 6)), np.zeros(5))


def test_runs_are_named_by_config_stem_and_only_picks_one(tmp_path):
    runs = sweep_module.plan_runs(["a/none.yaml", "b/black.yaml"], 2, str(tmp_path))
    assert [(r.arm, r.seed) for r in runs] == [("none", 0), ("none", 1), ("black", 0), ("black", 1)]
    assert runs[3].workdir == str(tmp_path / "black" / "seed_1")
    assert [(r.arm, r.seed) for r in sweep_module.plan_runs(["a/none.yaml", "b/black.yaml"], 2, "o", "black:0")] == \
        [("black", 0)]
    with pytest.raises(ConfigError, match="stems, and these repeat"):
        sweep_module.plan_runs(["a/x.yaml", "b/x.yaml"], 1, "o")
    with pytest.raises(ConfigError, match="names no run"):
        sweep_module.plan_runs(["a/x.yaml"], 1, "o", "x:3")


def test_a_sweep_resumes_after_a_killed_arm_and_writes_its_table(tmp_path, capsys):
    # The shipped experiment, one seed and a few steps.
    configs = [os.path.join(ROOT, "experiments", "black_image", f"{arm}.yaml") for arm in ("none", "black")]
    quick = ["train.steps=8", "eval.at_start=false", "logging.tensorboard=false", "logging.progress=false",
             "eval.validation_every_steps=0", "data.validation_fraction=0"]
    out = str(tmp_path / "sweep")

    def killed_in_second_arm(config):
        if config.data.text_only_images == "black":
            raise KeyboardInterrupt("killed")
        return train(config)

    with pytest.raises(KeyboardInterrupt):
        sweep_module.run_sweep(configs, quick, 1, out, train=killed_in_second_arm)
    first_metrics = open(os.path.join(out, "none", "seed_0", "metrics.jsonl")).read()

    trained = []

    def recording(config):
        trained.append(config.train.workdir)
        return train(config)

    assert sweep_module.run_sweep(configs, quick, 1, out, train=recording) == 0
    # The finished arm was visited and changed nothing; the killed one was trained.
    assert open(os.path.join(out, "none", "seed_0", "metrics.jsonl")).read() == first_metrics
    assert len(trained) == 2
    table = json.load(open(os.path.join(out, "sweep.json")))
    assert table["arms"] == ["none", "black"]
    scores = table["scores"]["sample_pairs/text"]
    summary = json.load(open(os.path.join(out, "none", "seed_0", "eval", "step_8", "summary.json")))
    assert scores["none"]["per_seed"] == [pytest.approx(summary["scalars"]["eval/sample_pairs/text/accuracy"])]
    difference = table["differences"]["sample_pairs/text"]["black - none"]
    assert difference["mean"] == pytest.approx(scores["black"]["mean"] - scores["none"]["mean"])
    assert difference["low"] <= difference["mean"] <= difference["high"]
    text = capsys.readouterr().out
    assert "sample_pairs/text" in text and "black - none" in text and "paired bootstrap" in text
    assert open(os.path.join(out, "table.txt")).read().strip() in text
    # Figures: the sweep's, and launch.py plot's from the same runs, one non-empty PNG per quantity.
    metrics = {k for line in open(os.path.join(out, "none", "seed_0", "metrics.jsonl"))
               for k in json.loads(line) if k.startswith("eval/")}
    assert "eval/sample_pairs/text/accuracy" in metrics
    expected = {"loss.png", "learning_rate.png", "modality_and_padding.png",
                *(k.replace("/", "_") + ".png" for k in metrics)}
    assert set(table["figures"]) == {f"figures/{name}" for name in expected}
    runs = [os.path.join(out, arm, "seed_0") for arm in ("none", "black")]
    assert launch.main(["plot", *runs, "--out", str(tmp_path / "plots")]) == 0
    for name in expected:
        with Image.open(tmp_path / "plots" / name) as image:
            assert image.format == "PNG" and image.size[0] > 300
            assert len(np.unique(np.asarray(image.convert("L")))) > 10  # something is drawn
    with pytest.raises(ConfigError, match="no metrics.jsonl"):
        plot_runs([str(tmp_path)], str(tmp_path / "nothing"))


def seed_checkpoint(folder, seed: int) -> str:
    from flax import nnx

    from jaxllava.checkpoint import write_params_checkpoint
    from jaxllava.config import load_config
    from jaxllava.model.llava import create_model
    from jaxllava.model.sharding import make_mesh

    config = load_config(TINY)
    params = nnx.to_pure_dict(nnx.state(create_model(config.model, make_mesh(), seed), nnx.Param))
    return write_params_checkpoint(str(folder / f"seed_{seed}"), config, jax.tree.map(np.asarray, params),
                                   config.data.tokenizer, {"imported_from": "test"})


def test_compare_models_is_identity_on_itself_and_differs_between_seeds(tmp_path, capsys):
    from jaxllava.experiments.compare import linear_cka

    a, b = seed_checkpoint(tmp_path, 0), seed_checkpoint(tmp_path, 1)
    text = tmp_path / "text.txt"
    text.write_text("the dog runs .\n\nthe dogs run to the ball .\nlook at the cats !\n" * 8)
    pairs = os.path.join(ROOT, "data", "sample", "minimal_pairs.jsonl")
    reports = {}
    for name, (first, second) in {"same": (a, a), "seeds": (a, b)}.items():
        out = tmp_path / name
        assert launch.main(["compare-models", "--checkpoint", first, "--checkpoint", second, "--text", str(text),
                            "--task", f"pairs={pairs}", "--out", str(out)]) == 0
        reports[name] = json.load(open(out / "compare.json"))
        with Image.open(out / "layers.png") as image:
            assert image.format == "PNG"
    same, seeds = reports["same"], reports["seeds"]
    assert same["tokens"] == seeds["tokens"] == 8 * (5 + 8 + 6)  # BOS + words of each line, 24 lines
    assert [row["layer"] for row in same["layers"]] == ["embeddings", "layer 1", "layer 2", "final norm"]
    for row in same["layers"]:
        assert row["cosine"] == pytest.approx(1.0, abs=1e-5) and row["cka"] == pytest.approx(1.0, abs=1e-5)
    assert same["kl_a_b"] == pytest.approx(0.0, abs=1e-6)
    assert all(uid["b_minus_a"] == 0 for uid in same["tasks"]["pairs"].values())
    assert all(row["cosine"] < 0.5 and row["cka"] < 0.99 for row in seeds["layers"]) and seeds["kl_a_b"] > 1e-3
    assert "mean KL(A || B)" in capsys.readouterr().out
    # CKA is invariant to rotation and scale, and not to a shuffle of the tokens.
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 16))
    rotation, _ = np.linalg.qr(rng.normal(size=(16, 16)))
    assert linear_cka(x, 3.0 * x @ rotation) == pytest.approx(1.0)
    assert linear_cka(x, rng.permutation(x)) < 0.3
