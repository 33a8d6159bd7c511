"""convert export-babylm: a tiny run's milestones as a git repository, one branch each, loaded like the pipeline."""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from scipy.special import log_softmax

import launch
from jaxllava.checkpoint import load_checkpoint_params, model_from_params
from jaxllava.config import load_config
from jaxllava.convert import submission
from jaxllava.convert.submission import (add_export_babylm_parser, branches, checked_out, git, run_export_babylm,
                                         verification_items, verify_submission, vision_left_out_line)
from jaxllava.errors import ConversionError
from jaxllava.eval.scoring import module_logits_fn

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "configs", "tiny.yaml")
PAIRS = os.path.join(REPO, "data", "sample", "minimal_pairs.jsonl")
# tiny.yaml's LM on its text alone (the quickest run to train), 400-800 words a step: step 1 reaches
# 1 and 2 at once (one commit, two branches), step 2 reaches 1000, step 3, the final model, none.
MILESTONE_WORDS = "[1,2,1000]"
TEXT_ONLY = ["--set", "model.vision=null", "--set", f"data.sources=[{{path: {REPO}/data/sample/text.jsonl}}]"]
QUIET = ["--set", "eval.at_start=false", "--set", "eval.at_milestones=false", "--set", "eval.at_end=false",
         "--set", "eval.validation_every_steps=0", "--set", "logging.tensorboard=false",
         "--set", "checkpoint.every_steps=0", "--set", "checkpoint.async_save=false",
         "--set", "data.validation_fraction=0"]


def export_babylm(*argv: str) -> tuple[int, str]:
    """`convert export-babylm ARGV` through the parser the convert CLI registers; (code, stdout)."""
    parser = argparse.ArgumentParser()
    add_export_babylm_parser(parser.add_subparsers(dest="what", required=True))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = run_export_babylm(parser.parse_args(["export-babylm", *argv]))
    return code, out.getvalue()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("babylm") / "run")
    assert launch.main(["train", "--config", TINY, "--workdir", workdir, "--set", "train.steps=3",
                        "--set", "checkpoint.milestones=true", "--set", f"checkpoint.milestone_words={MILESTONE_WORDS}",
                        *TEXT_ONLY, *QUIET]) == 0
    return workdir


@pytest.fixture(scope="module")
def exported(run, tmp_path_factory):
    out = tmp_path_factory.mktemp("submission") / "repo"
    out.mkdir()  # an existing empty directory is taken
    code, stdout = export_babylm("--run", run, "--out", str(out), "--verify", "--verify-pairs", PAIRS,
                                 "--verify-items", "6")
    assert code == 0
    return str(out), stdout


def milestones_by_step(run: str) -> dict[int, list[dict]]:
    records = {}
    for name in sorted(os.listdir(os.path.join(run, "milestones"))):
        if name.endswith(".json"):
            with open(os.path.join(run, "milestones", name)) as f:
                record = json.load(f)
            records.setdefault(record["step"], []).append(record)
    return {step: sorted(group, key=lambda r: r["milestone"]) for step, group in sorted(records.items())}


def test_one_branch_per_milestone_and_main_holds_the_final_step(run, exported):
    repo, _ = exported
    by_step = milestones_by_step(run)
    assert [[r["name"] for r in group] for group in by_step.values()] == [["chck_1", "chck_2"], ["chck_1k"]]
    heads = branches(repo)
    assert sorted(heads) == ["chck_1", "chck_1k", "chck_2", "main"]
    assert heads["chck_1"] == heads["chck_2"]  # one step crossed both milestones: one commit
    assert len({heads["chck_1"], heads["chck_1k"], heads["main"]}) == 3
    # Training order: main's history is 1/2 → 1k → final, each message with its step and words seen.
    log = git(repo, "log", "--format=%s", "main").strip().split("\n")
    expected = [f"{', '.join(r['name'] for r in group)}: jaxllava step {step}, {group[0]['words_seen']:,} words seen"
                for step, group in by_step.items()]
    assert log[::-1][:-1] == expected
    assert log[0].startswith("final model: jaxllava step 3, ")
    assert git(repo, "status", "--porcelain") == ""  # the work tree is main, committed
    for name in ("config.json", "model.safetensors", "tokenizer.json", "jaxllava_provenance.json"):
        assert os.path.isfile(os.path.join(repo, name))


def test_verify_loaded_every_branch_and_agreed_with_jaxllava(exported):
    _, stdout = exported
    for branch in ("chck_1", "chck_2", "chck_1k", "main"):
        assert f"verified {branch} (step " in stdout
    assert "6 minimal pairs, decisions identical" in stdout
    assert "vision:" not in stdout  # a text-only run loses nothing


def test_vision_half_is_named_as_left_out():
    line = vision_left_out_line(load_config(TINY).model)
    assert "dinov2" in line and "identity resampler" in line and "mlp2x_gelu" in line
    assert "AutoModelForCausalLM" in line


@pytest.mark.parametrize("branch, checkpoint", [("chck_1k", "milestones/chck_1k"), ("main", "")])
def test_branch_logits_match_the_jaxllava_checkpoint(run, exported, branch, checkpoint):
    repo, _ = exported
    config, params, _ = load_checkpoint_params(os.path.join(run, checkpoint) if checkpoint else run)
    model = model_from_params(config.model, params)
    ids = np.array([[1, 7, 12, 30, 5, 9, 2, 14]], np.int32)
    # jitted: one compile serves both branches (same architecture), eager dispatch is slower on CPU.
    ours = logits_of(module_logits_fn(model), jnp.asarray(ids), jnp.ones_like(ids), jnp.arange(8)[None])
    with checked_out(repo, branch) as path:
        lm = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
        with torch.no_grad():
            theirs = lm(input_ids=torch.from_numpy(ids.astype(np.int64))).logits.numpy()
    np.testing.assert_allclose(log_softmax(np.asarray(ours), -1), log_softmax(theirs, -1), atol=1e-4)


@jax.jit
def logits_of(logits_fn, input_ids, segment_ids, positions):
    return logits_fn(input_ids, segment_ids, positions)


def test_transformers_ignores_revision_for_a_local_directory(exported):
    # Why --verify loads each branch from its own checkout: revision= on a local path reads
    # the checked-out files (main), not the branch.
    repo, _ = exported
    by_revision = transformers.AutoModelForCausalLM.from_pretrained(repo, revision="chck_1k")
    with checked_out(repo, "chck_1k") as path:
        chck_1k = transformers.AutoModelForCausalLM.from_pretrained(path)
    main = transformers.AutoModelForCausalLM.from_pretrained(repo)
    weight = "model.embed_tokens.weight"
    assert torch.equal(by_revision.state_dict()[weight], main.state_dict()[weight])
    assert not torch.equal(chck_1k.state_dict()[weight], main.state_dict()[weight])


def test_verify_catches_a_branch_with_other_weights(run, exported, tmp_path):
    repo, _ = exported
    tampered = str(tmp_path / "tampered")
    shutil.copytree(repo, tampered, symlinks=True)
    main_weights = os.path.join(tmp_path, "main.safetensors")
    shutil.copy(os.path.join(tampered, "model.safetensors"), main_weights)
    git(tampered, "checkout", "--quiet", "chck_1")
    shutil.copy(main_weights, os.path.join(tampered, "model.safetensors"))
    git(tampered, "commit", "--quiet", "--all", "-m", "chck_1 with main's weights")
    items = verification_items(run, PAIRS, 6)
    with pytest.raises(ConversionError, match=r"branch chck_1: (item .* chooses|log-probs differ)"):
        verify_submission(tampered, run, items, log=lambda line: None)


def test_refuses_a_non_empty_out_before_writing(run, tmp_path):
    out = tmp_path / "used"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ConversionError, match="not an empty directory"):
        export_babylm("--run", run, "--out", str(out))
    assert os.listdir(out) == ["notes.txt"]


def test_refuses_a_run_without_milestones(run, tmp_path):
    copy = str(tmp_path / "no_milestones")
    shutil.copytree(run, copy, symlinks=True)
    shutil.rmtree(os.path.join(copy, "milestones"))
    with pytest.raises(ConversionError, match="no milestone checkpoints"):
        export_babylm("--run", copy, "--out", str(tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out")


def test_main_shares_the_commit_of_a_milestone_reached_by_the_final_step(run, tmp_path):
    copy = str(tmp_path / "ends_at_milestone")
    shutil.copytree(run, copy, symlinks=True)
    shutil.rmtree(os.path.join(copy, "checkpoints", "3"))  # the run now ends at step 2, where chck_1k was saved
    revisions = submission.submission_revisions(copy)
    assert [(r.step, r.branches) for r in revisions] == [(1, ("chck_1", "chck_2")), (2, ("chck_1k", "main"))]
    assert revisions[-1].message.startswith("chck_1k: jaxllava step 2, ")
    assert revisions[-1].message.endswith(" (final model: main)")


def test_refuses_a_step_directory_as_run(run, tmp_path):
    with pytest.raises(ConversionError, match="must be a run's work directory"):
        submission.submission_revisions(os.path.join(run, "checkpoints", "1"))
