"""metrics.jsonl rows, TensorBoard event files, the TTY-only progress line, FLOPs and MFU."""
from __future__ import annotations

import glob
import io
import json
import struct
import types

import numpy as np
import pytest
from tensorboardX.proto import event_pb2

from jaxllava.config import build_config
from jaxllava.errors import ConfigError
from jaxllava.model.config import LlamaConfig
from jaxllava.train.metrics import MetricsLogger, StepProfiler, lm_flops_per_token, mfu, peak_flops, peak_memory_gb


def read_events(logdir: str) -> list[event_pb2.Event]:
    """Parse TFRecord event files (u64 length, u32 crc, payload, u32 crc)."""
    events = []
    for path in glob.glob(f"{logdir}/events.out.tfevents.*"):
        data = open(path, "rb").read()
        offset = 0
        while offset < len(data):
            (length,) = struct.unpack("<Q", data[offset:offset + 8])
            payload = data[offset + 12:offset + 12 + length]
            events.append(event_pb2.Event.FromString(payload))
            offset += 12 + length + 4
    return events


class FakeTTY(io.StringIO):
    def isatty(self):
        return True


def row(loss: float, words: int):
    return {"loss": np.float32(loss), "lr": 1e-3, "tokens": 512, "words_seen": words, "text_samples": 3,
            "image_samples": 1, "tokens_per_s": 1000.0}


def test_rows_are_appended_as_json_lines_with_python_numbers(tmp_path):
    logger = MetricsLogger(str(tmp_path), tensorboard=False, progress=False)
    logger.log(1, row(2.5, 100))
    logger.log(2, row(2.25, 200))
    logger.close()
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2]
    assert rows[1]["loss"] == 2.25 and rows[1]["words_seen"] == 200 and rows[0]["image_samples"] == 1


def test_non_finite_values_are_written_as_strings_so_the_file_stays_json(tmp_path):
    logger = MetricsLogger(str(tmp_path), tensorboard=False, progress=False)
    logger.log(1, {"loss": float("nan"), "grad_norm": float("inf")})
    logger.close()
    loaded = json.loads(open(tmp_path / "metrics.jsonl").read())
    assert loaded["loss"] == "nan" and loaded["grad_norm"] == "inf"


def test_resume_drops_rows_logged_after_the_checkpoint(tmp_path):
    logger = MetricsLogger(str(tmp_path), tensorboard=False, progress=False)
    for step in (1, 2, 3, 4):
        logger.log(step, {"loss": 1.0})
    logger.close()
    resumed = MetricsLogger(str(tmp_path), tensorboard=False, progress=False, keep_through_step=2)
    resumed.log(3, {"loss": 0.5})
    resumed.close()
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [(r["step"], r["loss"]) for r in rows] == [(1, 1.0), (2, 1.0), (3, 0.5)]


def test_a_torn_last_line_is_dropped_on_resume_and_a_new_run_starts_an_empty_file(tmp_path):
    logger = MetricsLogger(str(tmp_path), tensorboard=False, progress=False)
    for step in (1, 2):
        logger.log(step, {"loss": 1.0})
    logger.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "loss": 0.')  # killed mid-write
    resumed = MetricsLogger(str(tmp_path), tensorboard=False, progress=False, keep_through_step=2)
    resumed.log(3, {"loss": 0.5})
    resumed.close()
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [(r["step"], r["loss"]) for r in rows] == [(1, 1.0), (2, 1.0), (3, 0.5)]
    # A run that starts afresh (no checkpoint to resume) keeps no row of an earlier attempt,
    # e.g. the step-0 evaluation of a run that crashed before its first checkpoint.
    fresh = MetricsLogger(str(tmp_path), tensorboard=False, progress=False)
    fresh.log(0, {"eval/x/text/accuracy": 50.0})
    fresh.close()
    assert [json.loads(line)["step"] for line in open(tmp_path / "metrics.jsonl")] == [0]


def test_tensorboard_event_file_holds_the_scalars(tmp_path):
    logger = MetricsLogger(str(tmp_path), tensorboard=True, progress=False)
    logger.log(5, row(3.0, 10))
    logger.log(6, row(2.0, 20))
    logger.close()
    scalars = {(e.step, v.tag): v.simple_value for e in read_events(str(tmp_path / "tensorboard"))
               for v in e.summary.value}
    assert scalars[(5, "train/loss")] == pytest.approx(3.0)
    assert scalars[(6, "train/words_seen")] == pytest.approx(20)
    assert (6, "train/lr") in scalars


def test_progress_rewrites_a_line_on_a_terminal_and_prints_plain_lines_into_a_pipe(tmp_path):
    tty = FakeTTY()
    logger = MetricsLogger(str(tmp_path / "a"), tensorboard=False, progress=True, total_steps=10, stream=tty)
    logger.log(1, row(2.5, 100))
    logger.log(2, row(2.4, 200))
    logger.close()
    assert "step 2/10" in tty.getvalue() and "loss 2.4000" in tty.getvalue() and "ETA" in tty.getvalue()

    assert "\r" in tty.getvalue()

    pipe = io.StringIO()  # not a TTY (SLURM, nohup, CI logs)
    logger = MetricsLogger(str(tmp_path / "b"), tensorboard=False, progress=True, total_steps=10, stream=pipe)
    logger.log(1, {**row(2.5, 100), "text_loss": 2.75, "image_loss": 1.25})
    logger.log(1, {"eval/x/text/accuracy": 50.0})  # evaluation rows are not progress
    logger.log(2, row(2.4, 200))
    logger.close()
    lines = pipe.getvalue().splitlines()
    assert len(lines) == 2 and "\r" not in pipe.getvalue() and "\033" not in pipe.getvalue()
    assert lines[0].startswith("step 1/10 | loss 2.5000 (text 2.7500, image 1.2500)")
    assert lines[1].startswith("step 2/10 | loss 2.4000")
    quiet = io.StringIO()
    logger = MetricsLogger(str(tmp_path / "c"), tensorboard=False, progress=False, stream=quiet)
    logger.log(1, row(2.5, 100))
    logger.close()
    assert quiet.getvalue() == ""


def test_flops_per_token_is_six_n_plus_attention_term():
    lm = LlamaConfig(vocab_size=100, hidden_size=16, intermediate_size=40, num_layers=2, num_heads=4,
                     num_kv_heads=2)
    head_dim = 4
    per_layer = 16 * 4 * head_dim * 2 + 16 * 2 * head_dim * 2 + 3 * 16 * 40
    n = 2 * per_layer + 16 * 100
    assert lm_flops_per_token(lm, seq_len=32) == 6 * n + 12 * 2 * 4 * head_dim * 32
    assert lm_flops_per_token(lm, 64) > lm_flops_per_token(lm, 32)


def test_peak_flops_knows_hopper_and_ampere_and_not_cpu():
    gpu = lambda kind: types.SimpleNamespace(platform="gpu", device_kind=kind)  # noqa: E731
    assert peak_flops(gpu("NVIDIA H100 80GB HBM3")) == pytest.approx(989.4e12)
    assert peak_flops(gpu("NVIDIA H100 PCIe")) == pytest.approx(756e12)
    assert peak_flops(gpu("NVIDIA H200")) == pytest.approx(989.4e12)
    assert peak_flops(gpu("NVIDIA A100-SXM4-80GB")) == pytest.approx(312e12)
    assert peak_flops(gpu("Tesla T4")) is None
    import jax
    assert peak_flops(jax.devices()[0]) is None  # the CPU test machine
    assert mfu(1e15, jax.devices()) is None
    assert mfu(1e15, [gpu("NVIDIA A100-SXM4-40GB")] * 2) == pytest.approx(1e15 / (2 * 312e12))


def test_peak_memory_is_the_largest_device_peak_and_absent_without_statistics():
    device = lambda stats: types.SimpleNamespace(memory_stats=lambda: stats)  # noqa: E731
    assert peak_memory_gb([device({"peak_bytes_in_use": 3e9}), device({"peak_bytes_in_use": 5e9})]) == 5.0
    assert peak_memory_gb([device(None), device({"bytes_in_use": 1})]) is None
    import jax
    assert peak_memory_gb(jax.local_devices()) is None  # XLA's CPU client keeps no statistics


def test_profiler_traces_exactly_the_configured_steps(tmp_path):
    import jax.numpy as jnp

    profiler = StepProfiler((2, 3), str(tmp_path / "profile"))
    traced = []
    for step in range(1, 6):
        profiler.before_step(step)
        traced.append(profiler.active)
        jnp.ones((8, 8)).sum().block_until_ready()
        profiler.after_step(step)
    profiler.close()
    assert traced == [False, True, True, False, False] and not profiler.active
    assert len(glob.glob(str(tmp_path / "profile" / "plugins" / "profile" / "*" / "*.xplane.pb"))) == 1
    off = StepProfiler(None, str(tmp_path / "off"))
    off.before_step(1)
    assert not off.active and not (tmp_path / "off").exists()
    with pytest.raises(ConfigError, match="profile_steps"):
        build_config({"logging": {"profile_steps": [3, 2]}})
