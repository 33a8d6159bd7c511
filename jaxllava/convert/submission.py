"""`convert export-babylm`: a run's milestone checkpoints as one BabyLM submission repository.

    convert export-babylm --run RUNDIR --out DIR [--verify] [--verify-pairs FILE] [--verify-items N]

BabyLM asks for the model at every word milestone (`chck_1M` ... `chck_10M`, `chck_20M` ...
`chck_100M`, and on to `chck_1000M` outside strict-small), each as a branch of one
repository named like the milestone (the pipeline's README.md, "Submission Requirements";
`eval_zero_shot_fast_all_revisions.sh` loops over exactly those revision names). DIR
becomes a local git repository with:

  - one branch per milestone of the run (the names jaxllava gives them under
    `<run>/milestones/`, `checkpoint.milestone_name`), and `main` = the run's final model;
  - in every branch, the `convert export-hf --what lm` directory (LlamaForCausalLM
    config.json + model.safetensors, the tokenizer, jaxllava_provenance.json);
  - one commit per trained step, in training order, so `git log main` is the training
    history; milestones reached by the same step share its commit. Messages name the
    milestone(s), the step and the words seen.

Only the LM is exported: the BabyLM text pipeline loads `AutoModelForCausalLM`
(evaluation_pipeline/sentence_zero_shot/run.py::get_model), and a run's vision half
(tower, resampler, projector) is left out, with a printed line saying so.

Revisions of a LOCAL repository: transformers ignores `revision=` when the path is a
local directory (transformers/utils/hub.py::cached_files reads the files in the directory
as they are, whatever the revision), so `--revision_name chck_1M` against DIR would
silently score the checked-out branch (main). Either push DIR to the Hugging Face Hub
(`git push --all`; files over 10 MB need git-lfs there) and pass the Hub name, or check
the branch out first (`git -C DIR checkout chck_1M`) before each local evaluation.
`--verify` does the latter without touching DIR: it checks every branch out into a
temporary `git worktree`, loads it as the pipeline does (`AutoModelForCausalLM` and
`AutoProcessor` with `revision=<branch>`), scores a few minimal pairs with the
pipeline's rule (compute_results.py::compute_causal_results, restated in torch) and
requires jaxllava's own scorer (eval/scoring.py) on the milestone checkpoint to give the
same token ids, the same decisions and log-probs within 1e-4.

git is driven through its CLI with the author and committer set and the user's global
and system git configuration ignored, so the export works without any git setup.
"""
from __future__ import annotations

import contextlib
import dataclasses
import glob
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator

import numpy as np

from jaxllava.checkpoint import (CHECKPOINTS_DIR, MILESTONES_DIR, atomic_output_dir, read_checkpoint_config,
                                 read_meta, resolve_checkpoint)
from jaxllava.errors import ConfigError, ConversionError

MAIN = "main"
LOGPROB_TOLERANCE = 1e-4
GIT_IDENTITY = {"GIT_AUTHOR_NAME": "jaxllava", "GIT_AUTHOR_EMAIL": "jaxllava@localhost",
                "GIT_COMMITTER_NAME": "jaxllava", "GIT_COMMITTER_EMAIL": "jaxllava@localhost"}


@dataclasses.dataclass(frozen=True)
class Revision:
    """One commit of the submission: a checkpoint step and the branch names that point at it."""

    step: int
    checkpoint: str  # what `resolve_checkpoint` reads: the step directory
    words_seen: int | None
    branches: tuple[str, ...]  # milestone names, plus MAIN on the final step

    @property
    def message(self) -> str:
        words = "unknown words" if self.words_seen is None else f"{self.words_seen:,} words seen"
        names = ", ".join(b for b in self.branches if b != MAIN) or "final model"
        final = " (final model: main)" if MAIN in self.branches and names != "final model" else ""
        return f"{names}: jaxllava step {self.step}, {words}{final}"


# ----------------------------------------------------------------------------- what the run holds


def milestone_records(run_dir: str) -> list[dict]:
    """The run's milestone index entries (`milestones/<name>.json`), in word order."""
    directory = os.path.join(run_dir, MILESTONES_DIR)
    records = []
    for path in glob.glob(os.path.join(directory, "*.json")):
        with open(path, encoding="utf-8") as f:
            try:
                record = json.load(f)
            except json.JSONDecodeError as e:
                raise ConversionError(f"{path}: not valid JSON ({e})") from None
        missing = [k for k in ("milestone", "name", "step", "checkpoint") if k not in record]
        if missing:
            raise ConversionError(f"{path}: milestone record lacks field(s) {missing}")
        records.append(record)
    if not records:
        raise ConversionError(f"{run_dir}: the run has no milestone checkpoints (no {MILESTONES_DIR}/*.json): "
                              f"train with checkpoint.milestones=true until a word count in "
                              f"checkpoint.milestone_words (default BabyLM's 1M, 2M, ...) is reached")
    return sorted(records, key=lambda r: int(r["milestone"]))


def submission_revisions(run_dir: str) -> list[Revision]:
    """One Revision per distinct step: the milestones' steps in order, then the final step (main)."""
    run_dir = os.path.abspath(run_dir)
    if not os.path.isdir(os.path.join(run_dir, CHECKPOINTS_DIR)):
        raise ConversionError(f"{run_dir}: --run must be a run's work directory (with {MILESTONES_DIR}/), not a "
                              f"step directory")
    final = resolve_checkpoint(run_dir)
    by_step: dict[int, dict] = {}
    for record in milestone_records(run_dir):
        entry = by_step.setdefault(int(record["step"]), {"names": [], "words": record.get("words_seen"),
                                                         "checkpoint": os.path.join(run_dir, record["checkpoint"])})
        entry["names"].append(record["name"])
    final_words = read_meta(final.step_dir).get("words_seen")
    by_step.setdefault(final.step, {"names": [], "words": final_words, "checkpoint": final.step_dir})
    by_step[final.step]["names"].append(MAIN)
    return [Revision(step, entry["checkpoint"], entry["words"], tuple(entry["names"]))
            for step, entry in sorted(by_step.items())]


def vision_left_out_line(model_config) -> str | None:
    """Why the run's vision half is not in the submission (None for a text-only model)."""
    vision = model_config.vision
    if vision is None:
        return None
    return (f"vision: left out of every revision: the {vision.kind} vision input, the "
            f"{model_config.resampler.kind} resampler and the {model_config.projector.kind} projector are not "
            f"exported, because the BabyLM text pipeline loads AutoModelForCausalLM "
            f"(sentence_zero_shot/run.py), so each revision holds the LM alone (LlamaForCausalLM); the whole "
            f"model of one checkpoint: convert export-hf --what llava")


# ----------------------------------------------------------------------------- git


def git(repo: str, *args: str) -> str:
    """Run `git -C repo args` with a fixed identity and no user/system config; returns stdout."""
    env = {**os.environ, **GIT_IDENTITY, "GIT_CONFIG_NOSYSTEM": "1", "GIT_CONFIG_GLOBAL": os.devnull,
           "GIT_TERMINAL_PROMPT": "0"}
    try:
        done = subprocess.run(["git", "-C", repo, *args], env=env, capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise ConversionError("export-babylm needs the git command line tool, and no `git` is on PATH") from None
    if done.returncode != 0:
        raise ConversionError(f"git {' '.join(args)} in {repo} failed ({done.returncode}): "
                              f"{done.stderr.strip() or done.stdout.strip()}")
    return done.stdout


def branches(repo: str) -> dict[str, str]:
    """branch name → commit id."""
    lines = git(repo, "for-each-ref", "--format=%(refname:short) %(objectname)", "refs/heads").split("\n")
    return dict(line.split(" ", 1) for line in lines if line)


def replace_tree(repo: str, source: str) -> None:
    """Make the work tree of `repo` hold exactly the files of `source` (the .git directory stays)."""
    for name in os.listdir(repo):
        if name != ".git":
            path = os.path.join(repo, name)
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            else:
                os.remove(path)
    for name in os.listdir(source):
        shutil.move(os.path.join(source, name), os.path.join(repo, name))


def commit_revision(repo: str, revision: Revision, scratch: str) -> str:
    """Export `revision`'s LM into the work tree, commit it, and point its branches at the commit."""
    from jaxllava.convert.hf import export_lm

    exported = os.path.join(scratch, f"step_{revision.step}")
    export_lm(revision.checkpoint, exported)
    replace_tree(repo, exported)
    git(repo, "add", "--all")
    git(repo, "commit", "--quiet", "--allow-empty", "-m", revision.message)
    commit = git(repo, "rev-parse", "HEAD").strip()
    for name in revision.branches:
        if name != MAIN:  # main is the branch being committed on
            git(repo, "branch", name, commit)
    return commit


# ----------------------------------------------------------------------------- export


def refuse_used_output(out: str) -> None:
    """An existing non-empty --out is refused; an empty directory is taken (and replaced atomically)."""
    if os.path.lexists(out) and (not os.path.isdir(out) or os.path.islink(out) or os.listdir(out)):
        raise ConversionError(f"{os.path.abspath(out)}: --out exists and is not an empty directory; "
                                  f"refusing to write a submission over it")


def export_babylm(run_dir: str, out: str, *, log=print) -> dict:
    """Write the submission repository at `out` (atomically); returns a report."""
    revisions = submission_revisions(run_dir)
    refuse_used_output(out)
    config, _, _ = read_checkpoint_config(revisions[-1].checkpoint)
    line = vision_left_out_line(config.model)
    if line:
        log(line)
    if os.path.isdir(out):
        os.rmdir(out)  # empty (checked above): atomic_output_dir writes a sibling and renames it here
    commits = {}
    with atomic_output_dir(out) as repo, tempfile.TemporaryDirectory(prefix="export-babylm-") as scratch:
        git(repo, "init", "--quiet", "--initial-branch", MAIN)
        for revision in revisions:
            commits[revision.step] = commit_revision(repo, revision, scratch)
            log(f"committed {revision.message} -> {', '.join(revision.branches)}")
    return {"what": "export-babylm", "out": os.path.abspath(out), "vision": line,
            "revisions": [{"branches": list(r.branches), "step": r.step, "words_seen": r.words_seen,
                           "checkpoint": r.checkpoint, "commit": commits[r.step]} for r in revisions]}


# ----------------------------------------------------------------------------- verification


def verification_items(run_dir: str, pairs: str | None, count: int) -> list:
    """The first `count` minimal pairs of `pairs` (a BLiMP or EWoK jsonl file or directory),
    by default of the run's first evaluation task."""
    from jaxllava.eval.evaluator import detect_task_kind
    from jaxllava.eval.minimal_pairs import read_minimal_pairs

    if count < 1:
        raise ConfigError(f"--verify-items must be >= 1, got {count}")
    if pairs is None:
        config, _, _ = read_checkpoint_config(run_dir)
        if not config.eval.tasks:
            raise ConfigError(f"{run_dir}: --verify needs minimal pairs and the run's config has no eval.tasks; "
                              f"pass --verify-pairs FILE")
        pairs = next(iter(config.eval.tasks.values()))
    return read_minimal_pairs(pairs, detect_task_kind(pairs))[:count]


@contextlib.contextmanager
def checked_out(repo: str, branch: str) -> Iterator[str]:
    """A temporary work tree holding `branch` of `repo` (a shared clone: `repo` is only read)."""
    with tempfile.TemporaryDirectory(prefix="export-babylm-verify-") as parent:
        path = os.path.join(parent, branch)
        git(parent, "clone", "--quiet", "--shared", "--branch", branch, os.path.abspath(repo), path)
        yield path


def load_like_pipeline(path: str, revision: str):
    """(model, tokenizer) as evaluation_pipeline/sentence_zero_shot loads a causal model:
    run.py::get_model and dataset.py::CompletionRankingDataset. `revision` is passed as the
    pipeline passes it; for a local directory transformers reads the files as checked out."""
    from transformers import AutoModelForCausalLM, AutoProcessor

    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, revision=revision)
    model.eval()
    processor = AutoProcessor.from_pretrained(path, padding_side="right", revision=revision, trust_remote_code=True)
    tokenizer = processor.tokenizer if hasattr(processor, "tokenizer") else processor
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token_id = tokenizer.eos_token_id
    return model, tokenizer


def pipeline_scores(model, encoded) -> np.ndarray:
    """Row scores as compute_results.py::compute_causal_results computes them (temperature 1):
    the sum over the phrase mask of log_softmax(logits)[next token], one unpadded row at a time."""
    import torch

    scores = np.zeros(encoded.num_rows, np.float64)
    with torch.no_grad():
        for row, (ids, mask) in enumerate(zip(encoded.token_ids, encoded.target_mask)):
            if len(ids) < 2:
                continue  # nothing to predict: the score is an empty sum
            ids = torch.from_numpy(ids.astype(np.int64))
            logits = model(input_ids=ids[None, :-1], attention_mask=torch.ones(1, len(ids) - 1)).logits[0]
            log_probs = torch.log_softmax(logits.float(), dim=-1).gather(-1, ids[1:, None])[:, 0]
            scores[row] = float((log_probs * torch.from_numpy(mask[1:]).float()).sum())
    return scores


def jaxllava_scores(checkpoint: str, items) -> tuple[object, np.ndarray]:
    """(EncodedSet, row scores) of jaxllava's own scorer on the checkpoint's full model and tokenizer."""
    import jax
    import jax.numpy as jnp

    from jaxllava.checkpoint import load_checkpoint_params, model_from_params
    from jaxllava.data.tokenizer import load_tokenizer
    from jaxllava.eval.scoring import encode_candidates, module_logits_fn, score_encoded

    config, params, _ = load_checkpoint_params(checkpoint)
    model = model_from_params(config.model, params)
    encoded = encode_candidates(load_tokenizer(config.data.tokenizer), items)
    logits_fn = jax.tree.map(lambda x: jnp.asarray(x) if isinstance(x, np.ndarray) else x, module_logits_fn(model))
    return encoded, score_encoded(logits_fn, encoded)


def compare_branch(branch: str, items, reference, reference_scores: np.ndarray, model, tokenizer) -> dict:
    """Token ids, decisions and log-probs of one loaded branch against jaxllava's; raises on a difference."""
    from jaxllava.eval.scoring import choose, encode_candidates

    encoded = encode_candidates(tokenizer, items)
    for row, (ours, theirs) in enumerate(zip(reference.token_ids, encoded.token_ids)):
        if not np.array_equal(ours, theirs) or not np.array_equal(reference.target_mask[row], encoded.target_mask[row]):
            raise ConversionError(f"branch {branch}: the exported tokenizer encodes row {row} as {theirs.tolist()}, "
                                  f"jaxllava's as {ours.tolist()}")
    scores = pipeline_scores(model, encoded)
    worst = float(np.max(np.abs(scores - reference_scores))) if scores.size else 0.0
    for i, item in enumerate(items):
        lo, hi = reference.row_start[i], reference.row_start[i + 1]
        if choose(scores[lo:hi]) != choose(reference_scores[lo:hi]):
            raise ConversionError(f"branch {branch}: item {item.id} ({item.source}) chooses candidate "
                                  f"{choose(scores[lo:hi])} in transformers, {choose(reference_scores[lo:hi])} in "
                                  f"jaxllava (scores {scores[lo:hi]} vs {reference_scores[lo:hi]})")
    if not worst <= LOGPROB_TOLERANCE:
        raise ConversionError(f"branch {branch}: log-probs differ from jaxllava's by up to {worst:.3g} "
                              f"(tolerance {LOGPROB_TOLERANCE})")
    return {"branch": branch, "items": len(items), "max_abs_diff": worst}


def verify_submission(repo: str, run_dir: str, items, *, log=print) -> list[dict]:
    """Load every branch of `repo` the way the pipeline does and score `items` against jaxllava's
    scorer on the run's checkpoint of that branch. Raises ConversionError on any difference."""
    revisions = submission_revisions(run_dir)
    expected = sorted(b for r in revisions for b in r.branches)
    found = sorted(branches(repo))
    if found != expected:
        raise ConversionError(f"{repo}: branches {found}, expected one per milestone plus main: {expected}")
    checks = []
    for revision in revisions:
        reference, reference_scores = jaxllava_scores(revision.checkpoint, items)
        for branch in revision.branches:
            with checked_out(repo, branch) as path:
                with open(os.path.join(path, "jaxllava_provenance.json"), encoding="utf-8") as f:
                    source = json.load(f)["exported_from"]
                if os.path.realpath(source) != os.path.realpath(revision.checkpoint):
                    raise ConversionError(f"branch {branch}: exported from {source}, expected {revision.checkpoint}")
                model, tokenizer = load_like_pipeline(path, branch)
                check = compare_branch(branch, items, reference, reference_scores, model, tokenizer)
            checks.append({**check, "step": revision.step})
            log(f"verified {branch} (step {revision.step}): {len(items)} minimal pairs, decisions identical, "
                f"max |log-prob difference| {check['max_abs_diff']:.2g}")
    return checks


# ----------------------------------------------------------------------------- command line


def add_export_babylm_parser(subparsers):
    """`convert export-babylm` and its arguments, on the `convert` subparsers."""
    p = subparsers.add_parser("export-babylm", help="a run's milestone checkpoints -> a BabyLM submission git "
                                                    "repository (one branch per milestone, main = final)")
    p.add_argument("--run", required=True, help="the run's work directory (with milestones/)")
    p.add_argument("--out", required=True, help="new directory (or an empty one) for the git repository")
    p.add_argument("--verify", action="store_true",
                   help="load every branch as the BabyLM pipeline does and check its minimal-pair scores against "
                        "jaxllava's (decisions identical, log-probs within 1e-4)")
    p.add_argument("--verify-pairs", help="BLiMP or EWoK jsonl file or directory for --verify (default: the run's "
                                          "first eval task)")
    p.add_argument("--verify-items", type=int, default=8, help="minimal pairs scored per branch (default 8)")
    return p


def run_export_babylm(options) -> int:
    items = verification_items(options.run, options.verify_pairs, options.verify_items) if options.verify else None
    report = export_babylm(options.run, options.out)
    names = [b for r in report["revisions"] for b in r["branches"]]
    print(f"wrote {report['out']}: a git repository with {len(names)} branches ({', '.join(names)})")
    print(f"note: transformers ignores revision= for a local directory; evaluate a branch locally after "
          f"`git -C {report['out']} checkout <branch>`, or push the repository to the Hub (git push --all)")
    if items is not None:
        verify_submission(report["out"], options.run, items)
    return 0
