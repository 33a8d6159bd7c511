"""The training loop end to end on CPU: resume after SIGTERM equals the uninterrupted run, word
budget and milestone checkpoints, NaN stop, provenance files, bounded compiles, config guards."""
from __future__ import annotations

import dataclasses
import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from conftest import image_record, text_record, write_json, write_jsonl, write_png

from jaxllava.config import build_config, config_to_dict, dump_yaml, load_config
from jaxllava.errors import ConfigError, TrainingError
from jaxllava.train.loop import Hook, train
from jaxllava.train.setup import plan_steps
from jaxllava.train.optimizer import path_str

FAST_COMPILE = {"xla_backend_optimization_level": 0}  # halves CPU compile time; numerics unchanged
SENTENCES = ["the dog runs .", "these dogs run .", "a cat sees the dog .", "the big cat runs .",
             "those cats see a dog .", "this dog is small .", "two red circles on the left ."]
CAPTIONS = ["a red circle", "two blue squares", "one square on the right"]


@pytest.fixture(scope="module")
def data(tmp_path_factory, word_tokenizer_dir):
    root = tmp_path_factory.mktemp("loop_data")
    texts = [text_record(i, SENTENCES[i % len(SENTENCES)]) for i in range(40)]
    images = []
    for i in range(8):
        write_png(str(root / "img" / f"{i}.png"), size=(12, 10), color=(60 * (i % 4), 40, 200 - 20 * i))
        images.append(image_record(i, f"img/{i}.png", CAPTIONS[i % 3]))
    pairs = [{"sentence_good": good, "sentence_bad": bad, "UID": "agreement", "field": "morphology",
              "linguistics_term": "agreement"}
             for good, bad in (("the dog runs .", "the dog run ."), ("these dogs run .", "these dogs runs ."),
                               ("the cats see a dog .", "the cats sees a dog ."))]
    return {"text": write_jsonl(root / "text.jsonl", texts), "images": write_json(root / "images.json", images),
            "tokenizer": word_tokenizer_dir, "pairs": write_jsonl(root / "pairs.jsonl", pairs)}


def config(data, **sections):
    raw = {
        "model": {"lm": {"vocab_size": 64, "hidden_size": 32, "intermediate_size": 64, "num_layers": 1,
                         "num_heads": 4, "num_kv_heads": 2, "max_position_embeddings": 64},
                  "vision": {"kind": "dinov2", "image_size": 16, "patch_size": 8, "hidden_size": 16,
                             "intermediate_size": 32, "num_layers": 1, "num_heads": 2, "pretrained_image_size": 16},
                  "dtype": "float32", "attention_impl": "xla"},
        "data": {"sources": [{"path": data["text"]}, {"path": data["images"]}], "tokenizer": data["tokenizer"],
                 "buckets": [32], "text_rows": 4, "image_rows": 4, "epochs": 3},
        "optim": {"lr": 1e-2, "warmup_steps": 1},
        "train": {"grad_accum": 2, "log_every": 1},
        "checkpoint": {"every_steps": 2, "keep_last": 2},
        "logging": {"tensorboard": False, "progress": False},
    }
    for section, values in sections.items():
        raw[section] = {**raw.get(section, {}), **values}
    return build_config(raw)


def metrics_rows(workdir, kind: str = "train") -> list[dict]:
    """metrics.jsonl rows of training steps ("train") or of evaluations ("eval")."""
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    return [r for r in rows if ("loss" in r) == (kind == "train")]


class Recorder:
    """A hook after every step: keeps each step's row and compile count, the final params, and can send a signal."""

    def __init__(self, signal_at: int | None = None):
        self.signal_at, self.rows, self.compiles, self.params = signal_at, {}, [], None

    def __call__(self, event):
        self.rows[event.step] = event.metrics
        self.compiles.append(event.trainer.compile_count())
        self.params = {path_str(kp): np.asarray(v)
                       for kp, v in jax.tree_util.tree_flatten_with_path(event.state["params"])[0]}
        if event.step == self.signal_at:
            os.kill(os.getpid(), signal.SIGTERM)


@pytest.fixture(scope="module")
def budget_config(data):
    """A budget that ends the run mid-data, with two small word milestones."""
    base = config(data)
    from jaxllava.data.pipeline import DataPipeline
    pipeline = DataPipeline(base.data, image_tokens=base.model.image_tokens, image_size=16)
    stats = list(pipeline.stats())
    step_words = [sum(s.words for s in stats[i:i + 2]) for i in range(0, len(stats), 2)]
    cumulative = np.cumsum(step_words)
    assert len(cumulative) >= 6
    budget = int(cumulative[3] + cumulative[4]) // 2  # reached during step 5
    milestones = (int(cumulative[0]), int(cumulative[1]) + 1)  # at step 1 and step 3
    return config(data, train={"word_budget": budget}, checkpoint={"milestone_words": milestones},
                  eval={"tasks": {"pairs": data["pairs"]}, "batch_size": 4},
                  logging={"profile_steps": [2, 3]}), cumulative


@pytest.fixture(scope="module")
def uninterrupted(budget_config, tmp_path_factory):
    cfg, _ = budget_config
    workdir = str(tmp_path_factory.mktemp("uninterrupted"))
    recorder = Recorder()
    summary = train(cfg, workdir, hooks=[Hook(recorder)], compiler_options=FAST_COMPILE)
    return workdir, summary, recorder


def test_sigterm_saves_and_the_resumed_run_equals_the_uninterrupted_one(budget_config, uninterrupted, tmp_path):
    cfg, _ = budget_config
    ref_dir, ref_summary, ref = uninterrupted
    workdir = str(tmp_path / "run")
    # A signal is seen when the next step is dispatched; that step finishes, is saved, and the run ends.
    first = train(cfg, workdir, hooks=[Hook(Recorder(signal_at=1))], compiler_options=FAST_COMPILE)
    assert first["stopped_by"] == "signal SIGTERM" and first["steps"] == 2 and first["last_checkpoint"] == 2
    second_rec = Recorder()
    second = train(cfg, workdir, hooks=[Hook(second_rec)], compiler_options=FAST_COMPILE)
    assert second["resumed_from"] == 2 and second["steps"] == ref_summary["steps"]
    assert second["words_seen"] == ref_summary["words_seen"]
    assert second["milestones"] == ref_summary["milestones"]
    ours = [(r["step"], r["loss"], r["lr"], r["words_seen"]) for r in metrics_rows(workdir)]
    theirs = [(r["step"], r["loss"], r["lr"], r["words_seen"]) for r in metrics_rows(ref_dir)]
    assert ours == theirs  # exact: same data order, same LR, same arithmetic
    assert metrics_rows(workdir, "eval") == metrics_rows(ref_dir, "eval")  # no evaluation on SIGTERM
    assert second_rec.params.keys() == ref.params.keys()
    for path in ref.params:
        np.testing.assert_array_equal(second_rec.params[path], ref.params[path], err_msg=path)


def test_word_budget_stops_within_one_step_and_milestones_are_checkpointed(budget_config, uninterrupted):
    cfg, cumulative = budget_config
    workdir, summary, _ = uninterrupted
    budget = cfg.train.word_budget
    assert summary["stopped_by"] == "word_budget" and summary["steps"] == 5
    assert summary["words_seen"] == cumulative[4]
    assert cumulative[3] < budget <= summary["words_seen"]
    run = json.load(open(os.path.join(workdir, "run.json")))
    assert run["total_steps"] == 5 and run["ends_by"] == "word_budget"  # the LR horizon ends at the budget
    # every_steps=2 and keep_last=2 keep steps 4 and 5; milestones (steps 1 and 3) are kept forever
    assert sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints"))) == [1, 3, 4, 5]
    entries = sorted(json.load(open(os.path.join(workdir, "milestones", f)))["step"]
                     for f in os.listdir(os.path.join(workdir, "milestones")) if f.endswith(".json"))
    assert entries == [1, 3]
    meta = json.load(open(os.path.join(workdir, "checkpoints", "3", "meta", "metadata")))
    assert meta["milestones"] == [cfg.checkpoint.milestone_words[1]] and meta["words_seen"] == cumulative[2]


def test_evaluation_runs_at_milestones_and_at_the_end(budget_config, uninterrupted):
    cfg, _ = budget_config
    workdir, summary, _ = uninterrupted
    names = sorted(os.listdir(os.path.join(workdir, "eval")))
    milestone_dirs = [f"chck_{w}" for w in cfg.checkpoint.milestone_words]  # words under 1000 print as-is
    assert names == sorted(milestone_dirs + ["step_5"])
    rows = metrics_rows(workdir, "eval")
    assert [r["step"] for r in rows] == [1, 3, 5]
    accuracy = rows[-1]["eval/pairs/text/accuracy"]
    assert 0.0 <= accuracy <= 100.0 and summary["eval"] == {"eval/pairs/text/accuracy": accuracy}
    written = json.load(open(os.path.join(workdir, "eval", "step_5", "summary.json")))
    assert written["step"] == 5 and written["scalars"]["eval/pairs/text/accuracy"] == accuracy
    # The checkpoints saved at evaluated steps carry the accuracies in their metadata.
    meta = json.load(open(os.path.join(workdir, "checkpoints", "5", "meta", "metadata")))
    assert meta["eval"] == {"eval/pairs/text/accuracy": accuracy}


def test_run_writes_provenance_config_manifest_and_metrics(budget_config, uninterrupted, data):
    cfg, _ = budget_config
    workdir, summary, _ = uninterrupted
    run = json.load(open(os.path.join(workdir, "run.json")))
    assert run["config"] == config_to_dict(cfg)
    assert run["data"]["counts"] == {"text": 40, "image": 8, "video": 0, "held_out": 0}
    assert len(run["data"]["sha256"]) == 64
    assert set(run["code"]) >= {"commit", "dirty", "diff_sha256"} and run["devices"]["mesh"]["data"] == 1
    assert load_config(os.path.join(workdir, "config.yaml")) == cfg
    checkpoint_run = json.load(open(os.path.join(workdir, "checkpoints", "5", "run", "metadata")))
    assert checkpoint_run["config"] == run["config"]
    manifest = json.load(open(os.path.join(workdir, "trainable.json")))
    assert manifest["lm/lm_head/kernel"] is True and not any(v for k, v in manifest.items() if k.startswith("vision/"))
    rows = metrics_rows(workdir)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    for key in ("loss", "lr", "grad_norm", "tokens", "text_samples", "image_samples", "image_tokens",
                "padding_fraction", "words_seen", "step_time", "tokens_per_s"):
        assert key in rows[-1], key
    assert sum(r["image_samples"] for r in rows) > 0 and sum(r["text_samples"] for r in rows) > 0
    assert rows[-1]["words_seen"] == summary["words_seen"]
    assert rows[0]["lr"] == 0.0 and rows[1]["lr"] > 0  # HF warmup: the first update has lr 0
    traces = glob.glob(os.path.join(workdir, "profile", "process_0", "plugins", "profile", "*", "*.xplane.pb"))
    assert len(traces) == 1  # logging.profile_steps: one trace of steps 2-3


def test_compilations_stop_after_both_modalities_were_seen(uninterrupted):
    _, _, recorder = uninterrupted
    # The count is process-wide (runs with equal settings share compiled code), so it is
    # checked relative to the first step: after the step where both modalities have been
    # fed, nothing compiles again.
    steps = sorted(recorder.rows)
    seen_text = seen_image = False
    for k, step in enumerate(steps):
        seen_text |= recorder.rows[step]["text_samples"] > 0
        seen_image |= recorder.rows[step]["image_samples"] > 0
        if seen_text and seen_image:
            break
    assert seen_text and seen_image
    assert recorder.compiles[-1] - recorder.compiles[0] <= 3  # text@32, image@32, the update
    assert len(set(recorder.compiles[k:])) == 1


def test_resuming_with_a_different_config_is_refused(budget_config, uninterrupted):
    cfg, _ = budget_config
    workdir, _, _ = uninterrupted
    changed = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, lr=5e-3))
    with pytest.raises(TrainingError, match="config differs from the checkpoint's in optim"):
        train(changed, workdir, compiler_options=FAST_COMPILE)


@pytest.mark.parametrize("every_steps", [1, 0], ids=["saving_every_step", "read_one_step_late"])
def test_non_finite_loss_stops_with_diagnostics_and_no_bad_checkpoint(data, tmp_path, every_steps):
    # lr 1e30 blows the weights up after the first real update (step 1 has warmup lr 0).
    # Without saves, a step's metrics are read after the next step is dispatched: the
    # error must still name the step that went bad, and nothing may be saved.
    cfg = config(data, optim={"lr": 1e30, "warmup_steps": 1, "grad_clip": None},
                 checkpoint={"every_steps": every_steps})
    workdir = str(tmp_path / "nan")
    with pytest.raises(TrainingError, match=r"step (\d+): non-finite .*diagnostics in .*diagnostics/step_\1") as info:
        train(cfg, workdir, compiler_options=FAST_COMPILE)
    bad_step = int(info.value.args[0].split("step ")[1].split(":")[0])
    checkpoints = os.path.join(workdir, "checkpoints")
    saved = sorted(int(d) for d in os.listdir(checkpoints)) if os.path.isdir(checkpoints) else []
    good = bad_step - 1 if every_steps else None
    assert (max(saved) if saved else None) == good  # every good step was saved (if asked), the failed one never
    rows = metrics_rows(workdir)
    assert rows and all(np.isfinite(r["loss"]) for r in rows) and rows[-1]["step"] < bad_step
    diagnostics = os.path.join(workdir, "diagnostics", f"step_{bad_step}")
    info_json = json.load(open(os.path.join(diagnostics, "info.json")))
    assert info_json["last_checkpoint"] == good and len(info_json["microbatches"]) == 2
    assert "microbatch0_input_ids" in np.load(os.path.join(diagnostics, "arrays.npz"))


def test_steps_between_saves_are_read_after_the_next_one_is_dispatched(budget_config, uninterrupted, tmp_path,
                                                                     monkeypatch):
    """The host reads a step's metrics only once the next step is queued, so the device
    never waits for logging; the run's numbers equal the step-by-step (hook) run's."""
    import jaxllava.train.loop as loop
    from jaxllava.train.step import TrainStep

    cfg, _ = budget_config
    cfg = dataclasses.replace(cfg, checkpoint=dataclasses.replace(cfg.checkpoint, every_steps=0, milestones=False),
                              eval=dataclasses.replace(cfg.eval, at_milestones=False))
    events = []
    apply, read = TrainStep.apply, loop.host_metrics
    monkeypatch.setattr(TrainStep, "apply", lambda self, *a: (events.append("dispatch"), apply(self, *a))[1])
    monkeypatch.setattr(loop, "host_metrics", lambda metrics: (events.append("read"), read(metrics))[1])
    workdir = str(tmp_path / "pipelined")
    train(cfg, workdir, compiler_options=FAST_COMPILE)
    # steps 1-4 are read one step late; step 5, the last, is read before its final save
    assert events == ["dispatch", "dispatch", "read", "dispatch", "read", "dispatch", "read", "dispatch", "read",
                      "read"]
    ours, theirs = metrics_rows(workdir), metrics_rows(uninterrupted[0])
    assert [r["step"] for r in ours] == [r["step"] for r in theirs] == [1, 2, 3, 4, 5]
    assert [r["loss"] for r in ours] == [r["loss"] for r in theirs]
    assert [r["words_seen"] for r in ours] == [r["words_seen"] for r in theirs]


def test_plan_steps_counts_partial_last_step_and_rejects_too_many_steps():
    step_words = [30, 70, 50]  # microbatch words (10, 20), (30, 40), (50,): five microbatches, three steps
    assert plan_steps(step_words, 5, 2, None, None) == (3, "data")
    assert plan_steps(step_words, 5, 2, 2, None) == (2, "steps")
    assert plan_steps(step_words, 5, 2, None, 31) == (2, "word_budget")  # 30 after step 1, 100 after step 2
    # A budget equal to a step's total ends at that step; one step later would stretch the
    # learning-rate schedule past the run, so it would never reach its floor.
    assert plan_steps(step_words, 5, 2, None, 30) == (1, "word_budget")
    assert plan_steps(step_words, 5, 2, None, 100) == (2, "word_budget")
    assert plan_steps(step_words, 5, 2, None, 10_000) == (3, "data")
    assert plan_steps(step_words, 5, 2, None, 100, words_before=80) == (1, "word_budget")
    with pytest.raises(ConfigError, match="train.steps=4 needs 8 microbatches"):
        plan_steps(step_words, 5, 2, 4, None)


TWO_PROCESS_SCRIPT = """
import json, sys
from jaxllava.config import load_config
from jaxllava.train.loop import train
path, workdir, process_id, port = sys.argv[1:5]
config = load_config(path, ["mesh.distributed=true", f"mesh.coordinator_address=localhost:{port}",
                            "mesh.num_processes=2", f"mesh.process_id={process_id}",
                            "eval.tasks={}"])  # training only: halves what each process compiles
summary = train(config, workdir, compiler_options={"xla_backend_optimization_level": 0})
print("DONE", json.dumps(summary))
"""


def test_two_processes_with_gloo_give_the_single_process_losses(budget_config, uninterrupted, tmp_path):
    cfg, _ = budget_config
    ref_dir, ref_summary, _ = uninterrupted
    path = tmp_path / "config.yaml"
    path.write_text(dump_yaml(cfg))
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device per process
    env["JAX_PLATFORMS"] = "cpu"
    workdir = str(tmp_path / "run")
    procs = [subprocess.Popen([sys.executable, "-c", TWO_PROCESS_SCRIPT, str(path), workdir, str(i), str(port)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    outputs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outputs):
        assert p.returncode == 0 and "DONE" in out, err[-4000:]
    summaries = [json.loads(out.split("DONE ", 1)[1]) for out, _ in outputs]
    assert all(s["words_seen"] == ref_summary["words_seen"] for s in summaries)  # global stats on every process
    ours, theirs = metrics_rows(workdir), metrics_rows(ref_dir)
    assert [r["step"] for r in ours] == [r["step"] for r in theirs]
    np.testing.assert_allclose([r["loss"] for r in ours], [r["loss"] for r in theirs], rtol=1e-5)
    data_files = sorted(os.listdir(os.path.join(workdir, "checkpoints", "5", "data")))
    assert [f for f in data_files if f.endswith(".json")] == ["process_0-of-2.json", "process_1-of-2.json"]


def test_resume_check_ignores_speed_only_settings_and_names_real_changes():
    from jaxllava.train.setup import resume_mismatch
    saved = config_to_dict(build_config({}))
    faster = config_to_dict(build_config({"data": {"num_workers": 4, "prefetch": 8}, "model": {"remat": "full"},
                                          "logging": {"progress": False}, "checkpoint": {"keep_last": 9}}))
    assert resume_mismatch(saved, faster) == []
    changed = config_to_dict(build_config({"data": {"seed": 5}, "train": {"grad_accum": 3}}))
    assert resume_mismatch(saved, changed) == ["data", "train.grad_accum"]


def test_a_damaged_latest_checkpoint_is_set_aside_and_the_previous_one_resumed(budget_config, uninterrupted,
                                                                               tmp_path, capsys):
    cfg, _ = budget_config
    ref_dir, _, _ = uninterrupted
    workdir = str(tmp_path / "run")
    shutil.copytree(ref_dir, workdir, symlinks=True)
    shutil.rmtree(os.path.join(workdir, "checkpoints", "5"))  # killed after step 4 was saved
    for path in glob.glob(os.path.join(workdir, "checkpoints", "4", "state", "**", "d", "*"), recursive=True):
        os.truncate(path, 100)  # a disk that filled up mid-write
    capsys.readouterr()
    summary = train(cfg, workdir, compiler_options=FAST_COMPILE)
    captured = capsys.readouterr()
    assert "checkpoint step 4" in captured.err and "4.unreadable" in captured.err
    assert "resuming from step 3" in captured.out
    assert summary["resumed_from"] == 3 and summary["steps"] == 5
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["1", "3", "4", "4.unreadable", "5"]
    ours = [(r["step"], r["loss"], r["words_seen"]) for r in metrics_rows(workdir)]
    assert ours == [(r["step"], r["loss"], r["words_seen"]) for r in metrics_rows(ref_dir)]


def test_a_tokenizer_larger_than_the_vocabulary_is_refused_at_start(data, tmp_path):
    raw = config_to_dict(config(data))
    raw["model"]["lm"]["vocab_size"] = 20  # the word tokenizer has 38 tokens with the image placeholders
    cfg = build_config(raw)
    with pytest.raises(ConfigError, match=r"tokenizer has \d+ tokens .* model.lm.vocab_size is 20"):
        train(cfg, str(tmp_path / "run"), compiler_options=FAST_COMPILE)
    assert not os.path.exists(tmp_path / "run" / "checkpoints")


def test_skipped_records_are_reported_in_the_banner_run_json_and_summary(data, tmp_path, capsys):
    bad = write_jsonl(tmp_path / "bad.jsonl", [text_record(0, "the dog runs ."), {"id": "x", "conversations": 5},
                                               {"id": "y", "image": "missing.png", "conversations": [
                                                   {"from": "human", "value": "<image>"},
                                                   {"from": "gpt", "value": "a red circle"}]}])
    raw = config_to_dict(config(data, train={"steps": 1}))
    raw["data"]["sources"].append({"path": bad})
    raw["data"]["on_bad_record"] = "skip"
    workdir = str(tmp_path / "run")
    summary = train(build_config(raw), workdir, compiler_options=FAST_COMPILE)
    out = capsys.readouterr().out
    assert "skipped 2 bad records" in out.split("starting a new run")[0]  # the banner, before the first step
    assert summary["skipped"] == 2 and "2 bad records skipped" in out.split('{"summary"')[1]
    skipped = json.load(open(os.path.join(workdir, "run.json")))["data"]["skipped"]
    assert skipped["total"] == 2 and skipped["by_reason"] == {"conversations": 1, "missing_image": 1}
    assert any("bad.jsonl" in e and "'y'" in e for e in skipped["examples"]["missing_image"])


# Long enough that each worker still owes batches when one is killed after step 1 (Grain keeps a
# few batches per worker in flight), with a pause per step so the kill lands mid-run.
LONG_RUN = ["train.word_budget=null", "train.steps=8", "data.epochs=8", "checkpoint.every_steps=3",
            "eval.tasks={}"]
WORKER_RUN_SCRIPT = """
import sys, time
from jaxllava.config import load_config
from jaxllava.train.loop import Hook, train
path, workdir, overrides = sys.argv[1], sys.argv[2], sys.argv[3:]
config = load_config(path, overrides + ["data.num_workers=2", "data.prefetch=1"])
train(config, workdir, hooks=[Hook(lambda event: time.sleep(0.3))],
      compiler_options={"xla_backend_optimization_level": 0})
print("DONE")
"""


def _loader_workers(parent: int) -> list[int]:
    """Children of `parent` that jaxllava's loader named as its workers (`jxl-w<index>-...`)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{entry}/comm") as f:
                comm = f.read().strip()
        except OSError:
            continue
        if int(fields[1]) == parent and comm.startswith("jxl-w") and fields[0] != "Z":
            pids.append(int(entry))
    return pids


def test_a_killed_loader_worker_ends_the_run_with_its_name_and_the_resumed_run_is_exact(budget_config, tmp_path):
    cfg, _ = budget_config
    path = tmp_path / "config.yaml"
    path.write_text(dump_yaml(cfg))
    ref_dir = str(tmp_path / "reference")  # the same run without workers, uninterrupted
    reference = train(load_config(str(path), LONG_RUN), ref_dir, compiler_options=FAST_COMPILE)
    workdir = str(tmp_path / "run")
    command = [sys.executable, "-c", WORKER_RUN_SCRIPT, str(path), workdir, *LONG_RUN]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        metrics = os.path.join(workdir, "metrics.jsonl")
        while not (os.path.exists(metrics) and os.path.getsize(metrics)) and time.monotonic() < deadline:
            time.sleep(0.1)  # step 1 has been trained
        workers = _loader_workers(proc.pid)
        assert len(workers) == 2, workers
        os.kill(workers[1], signal.SIGKILL)
        killed = time.monotonic()
        out, err = proc.communicate(timeout=60)
        assert time.monotonic() - killed < 60
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0 and "DONE" not in out
    assert f"(pid {workers[1]}) was killed by signal SIGKILL" in err, err[-3000:]
    saved = sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())
    assert saved and max(saved) < reference["steps"]  # the step in flight was saved
    time.sleep(1.0)  # the surviving worker notices its parent is gone
    assert all(not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split(") ")[1][0] == "Z"
               for pid in workers)
    resumed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0 and "DONE" in resumed.stdout, resumed.stderr[-3000:]
    assert f"resuming from step {max(saved)}" in resumed.stdout
    ours = [(r["step"], r["loss"], r["words_seen"]) for r in metrics_rows(workdir)]
    assert ours == [(r["step"], r["loss"], r["words_seen"]) for r in metrics_rows(ref_dir)]


def test_logged_losses_are_interval_means_with_text_and_image_apart_and_a_held_out_loss(data, tmp_path):
    raw = config_to_dict(config(data, train={"log_every": 3, "steps": 7}, eval={"validation_every_steps": 4}))
    raw["data"].update(validation_fraction=0.25, epochs=5)
    cfg = build_config(raw)
    per_step = {}
    workdir = str(tmp_path / "run")
    summary = train(cfg, workdir, hooks=[Hook(lambda event: per_step.__setitem__(event.step, event.metrics))],
                    compiler_options=FAST_COMPILE)
    rows = metrics_rows(workdir)
    assert [(r["step"], r["interval_steps"]) for r in rows] == [(1, 1), (3, 2), (6, 3), (7, 1)]
    start = 1
    for row in rows:
        steps = range(start, row["step"] + 1)
        assert row["loss"] == pytest.approx(np.mean([per_step[s]["step_loss"] for s in steps]), rel=1e-9)
        for modality in ("text", "image"):
            fed = sum(per_step[s][f"{modality}_samples"] for s in steps)
            assert (f"{modality}_loss" in row) == (fed > 0)  # a modality the interval never fed has no loss
        start = row["step"] + 1
    text_rows = [r for r in rows if "text_loss" in r and "image_loss" in r]
    assert text_rows and all(r["text_loss"] != r["image_loss"] for r in text_rows)
    validation = [r for r in metrics_rows(workdir, "eval") if "val_loss" in r]
    assert [r["step"] for r in validation] == [4, 7]  # every 4 steps and at the end
    assert summary["held_out_loss"] == {k: v for k, v in validation[-1].items() if k != "step"}
    run = json.load(open(os.path.join(workdir, "run.json")))
    assert run["data"]["counts"]["held_out"] == 12 and run["data"]["counts"]["text"] == 30  # 25% of 40 + 8 held
    counts = run["parameters"]
    assert counts["all"]["total"] == sum(c["total"] for part, c in counts.items() if part != "all")
    assert counts["vision"]["trainable"] == 0 and counts["lm"]["trainable"] == counts["lm"]["total"] > 0
