"""Training metrics: `metrics.jsonl`, TensorBoard scalars, a progress line, FLOPs and MFU.

One row per logged optimizer step, for example:
  step, loss, lr, grad_norm, tokens, text_samples, image_samples, image_tokens,
  video_samples, video_tokens,
  padding_fraction, words_seen, step_time, tokens_per_s, mfu and peak_memory_gb
  (accelerators only).
The logger writes whatever numbers the loop gives it; `MetricsLogger.log` does no
arithmetic so the file is exactly what the loop measured.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any, Optional, TextIO

from jaxllava.data.batch import MODALITIES

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"

# Dense bf16 peak FLOP/s per device (vendor datasheets, without sparsity).
PEAK_BF16_FLOPS = (
    ("H100 PCIe", 756e12),
    ("H100", 989.4e12),  # SXM and NVL; "NVIDIA H100 80GB HBM3"
    ("H200", 989.4e12),  # same GH100 compute as H100 SXM
    ("GH200", 989.4e12),
    ("A100", 312e12),
)


def peak_flops(device) -> Optional[float]:
    """bf16 peak FLOP/s of a JAX device, or None where unknown (CPU)."""
    if getattr(device, "platform", "cpu") == "cpu":
        return None
    kind = getattr(device, "device_kind", "")
    for name, flops in PEAK_BF16_FLOPS:
        if name in kind:
            return flops
    return None


def lm_flops_per_token(lm_config, seq_len: int) -> float:
    """Training FLOPs per token of the decoder: 6·N + 12·L·H·Q·T (PaLM, Appendix B).

    N counts the matmul parameters (attention, MLP and the output projection; the
    embedding lookup is no matmul); the attention term counts the full T×T score
    and value matmuls, as PaLM does, though causal masking could skip half.
    The vision tower's FLOPs are not included.
    """
    d, f, layers = lm_config.hidden_size, lm_config.intermediate_size, lm_config.num_layers
    q = lm_config.resolved_head_dim
    heads, kv_heads = lm_config.num_heads, lm_config.num_kv_heads
    attention = d * heads * q * 2 + d * kv_heads * q * 2  # q and o; k and v
    mlp = 3 * d * f  # gate, up, down (SwiGLU)
    matmul_params = layers * (attention + mlp) + d * lm_config.vocab_size
    return 6.0 * matmul_params + 12.0 * layers * heads * q * seq_len


def mfu(model_flops_per_s: float, devices) -> Optional[float]:
    """Model FLOPs utilisation over `devices`, or None where their peak is unknown."""
    peaks = [peak_flops(d) for d in devices]
    if not peaks or any(p is None for p in peaks):
        return None
    return model_flops_per_s / sum(peaks)


def peak_memory_gb(devices) -> Optional[float]:
    """Largest peak of device memory in use over `devices` (GB), or None where the
    backend keeps no statistics (CPU)."""
    peaks = [(d.memory_stats() or {}).get("peak_bytes_in_use") for d in devices]
    peaks = [p for p in peaks if p is not None]
    return max(peaks) / 1e9 if peaks else None


class StepProfiler:
    """A jax.profiler trace of optimizer steps [first, last] (counted from 1) in `log_dir`.

    The trace starts before the first step is dispatched and stops once the last
    step's results are on the host, so it holds whole steps with the loading overlapped.
    """

    def __init__(self, steps: Optional[tuple[int, int]], log_dir: str):
        self.steps, self.log_dir, self.active = steps, log_dir, False

    def before_step(self, step: int) -> None:
        if self.steps is not None and step == self.steps[0] and not self.active:
            import jax
            jax.profiler.start_trace(self.log_dir)
            self.active = True

    def after_step(self, step: int) -> None:
        if self.active and step >= self.steps[1]:
            self.close()

    def close(self) -> None:
        if self.active:
            import jax
            jax.profiler.stop_trace()
            self.active = False


def _format_duration(seconds: float) -> str:
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"


class MetricsLogger:
    """Appends metric rows to `<workdir>/metrics.jsonl`, TensorBoard and a terminal progress line.

    `keep_through_step`: rows after this step are dropped: those of a run that died before
    its next checkpoint, and every row (-1) when a run starts afresh, so the file holds one
    row per step and per evaluation. Only process 0 should create a logger.
    """

    def __init__(self, workdir: str, *, tensorboard: bool = True, progress: bool = True,
                 total_steps: Optional[int] = None, keep_through_step: int = -1,
                 stream: Optional[TextIO] = None):
        os.makedirs(workdir, exist_ok=True)
        self.path = os.path.join(workdir, METRICS_FILE)
        self._drop_rows_after(keep_through_step)
        self._file = open(self.path, "a", encoding="utf-8")
        self._writer = None
        if tensorboard:
            from tensorboardX import SummaryWriter
            self._writer = SummaryWriter(logdir=os.path.join(workdir, TENSORBOARD_DIR))
        self.stream = stream or sys.stdout
        self.progress = progress
        # A terminal gets one line rewritten in place; a pipe (SLURM, nohup, CI) a plain line per row.
        self._terminal = self.stream.isatty()
        self.total_steps = total_steps
        self._start_time = time.monotonic()
        self._start_step: Optional[int] = None

    def _drop_rows_after(self, step: int) -> None:
        if not os.path.exists(self.path):
            return
        kept = []
        with open(self.path, encoding="utf-8") as f:
            for line in f:
                try:
                    row = json.loads(line)
                except ValueError:  # a line torn by a kill mid-write: its step is lost with it
                    continue
                if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= step:
                    kept.append(line if line.endswith("\n") else line + "\n")
        with open(self.path, "w", encoding="utf-8") as f:
            f.writelines(kept)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        row = {"step": int(step), **{k: _plain(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        if self._writer is not None:
            for name, value in row.items():
                if name != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    # "eval/blimp/text/accuracy" keeps its own group; plain names go under train/
                    self._writer.add_scalar(name if "/" in name else f"train/{name}", value, step)
            self._writer.flush()
        if self.progress and "loss" in row:
            self._progress_line(step, row)

    def _progress_line(self, step: int, row: dict) -> None:
        if self._start_step is None:
            self._start_step, self._start_time = step, time.monotonic()
        parts = [f"step {step}" + (f"/{self.total_steps}" if self.total_steps else "")]
        if isinstance(row.get("loss"), float):
            by_modality = ", ".join(f"{m} {row[f'{m}_loss']:.4f}" for m in MODALITIES
                                    if isinstance(row.get(f"{m}_loss"), float))
            parts.append(f"loss {row['loss']:.4f}" + (f" ({by_modality})" if by_modality else ""))
        if isinstance(row.get("tokens_per_s"), (int, float)):
            parts.append(f"{row['tokens_per_s']:,.0f} tok/s")
        if row.get("words_seen") is not None:
            parts.append(f"{row['words_seen']:,} words")
        done = step - self._start_step
        if self.total_steps and done > 0:
            rate = (time.monotonic() - self._start_time) / done
            parts.append(f"ETA {_format_duration(rate * (self.total_steps - step))}")
        if self._terminal:
            self.stream.write("\r" + " | ".join(parts) + "\033[K")
        else:
            self.stream.write(" | ".join(parts) + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.progress and self._terminal:
            self.stream.write("\n")
            self.stream.flush()
        self._file.close()
        if self._writer is not None:
            self._writer.close()


def _plain(value: Any) -> Any:
    """JSON-friendly scalars: numpy/jax scalars become Python numbers; NaN/inf become strings."""
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value
