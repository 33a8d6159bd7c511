"""The training loop: data pipeline → train step → metrics → checkpoints, resumable at any step.

    train(config) runs until the first of: `train.steps` optimizer steps, the end
    of the data's epochs, the word budget (at most one step over it), a SIGTERM or
    SIGINT (it saves, then returns), or a non-finite loss (it writes diagnostics,
    never a checkpoint, and raises TrainingError).

Words are the BabyLM words of the samples actually trained on, added per optimizer
step from the microbatches' stats, and carried in every checkpoint together with
the milestones done and the data iterator's position. A run restarted in the same
work directory resumes from its latest complete checkpoint and reproduces the
uninterrupted run (the reference recounted words by file position and could
skip or repeat milestones on resume, REFERENCE.md §3.3-3.4, §7.16-17).

Multi-host: every process runs this function; `jax.distributed.initialize` is
called when `mesh.distributed` is true (or left null and JAX_COORDINATOR_ADDRESS
is set); each process loads only its rows of each microbatch. Files other than
checkpoints are written by process 0.
"""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import time
from typing import Any, Callable, Iterator, Optional, Sequence

import jax
import numpy as np
from flax import nnx

from jaxllava.config import ExperimentConfig, config_to_dict, dump_yaml
from jaxllava.data.batch import BatchStats, ImageBatch, Microbatch
from jaxllava.data.pipeline import DataPipeline
from jaxllava.errors import ConfigError, TrainingError
from jaxllava.model.llava import LlavaModel, check_image_mask
from jaxllava.model.sharding import make_mesh
from jaxllava.train.checkpoint import Checkpointer, write_diagnostics
from jaxllava.train.config import MeshConfig
from jaxllava.train.metrics import MetricsLogger, lm_flops_per_token, mfu
from jaxllava.train.milestones import BABYLM_MILESTONES, MilestoneTracker, budget_reached, milestone_name
from jaxllava.train.provenance import data_fingerprint, run_record, write_run_json
from jaxllava.train.step import TrainStep, check_finite, device_arrays, tree_shardings

# Config sections whose change would alter the trajectory of a resumed run.
RESUME_MUST_MATCH = ("model", "data", "optim", "train.seed", "train.steps", "train.grad_accum", "train.word_budget")


@dataclasses.dataclass
class StepEvent:
    """What `on_step` sees after each optimizer step (e.g. to evaluate at milestones)."""

    step: int
    metrics: dict[str, Any]
    milestones: list[int]  # word milestones reached at this step
    saved: bool  # a checkpoint of this step was started
    trainer: TrainStep
    state: dict  # the train state after this step; trainer.model(state["params"]) is the model


def maybe_initialize_distributed(mesh: MeshConfig) -> None:
    wanted = mesh.distributed
    if wanted is None:
        wanted = mesh.coordinator_address is not None or "JAX_COORDINATOR_ADDRESS" in os.environ
    if not wanted or jax.distributed.is_initialized():
        return
    # CPU processes talk through gloo (the setting only affects the CPU backend).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=mesh.coordinator_address, num_processes=mesh.num_processes,
                               process_id=mesh.process_id)


def plan_steps(stats: Sequence[BatchStats], grad_accum: int, steps: Optional[int],
               word_budget: Optional[int]) -> tuple[int, str]:
    """(optimizer steps the run will take, why it ends): the LR schedule's horizon.

    The data plan is fixed before training, so the step at which the word budget is
    reached is known exactly; the last step of the data may hold fewer microbatches.
    """
    available = -(-len(stats) // grad_accum)
    if steps is not None and steps > available:
        raise ConfigError(f"train.steps={steps} needs {steps * grad_accum} microbatches; the data's "
                          f"data.epochs give {len(stats)} ({available} steps): raise data.epochs or lower train.steps")
    horizon, reason = (steps, "steps") if steps is not None else (available, "data")
    if word_budget is not None:
        words = np.cumsum([sum(s.words for s in stats[i:i + grad_accum]) for i in range(0, len(stats), grad_accum)])
        reach = int(np.searchsorted(words, word_budget)) + 1  # first step whose total reaches the budget
        if reach <= horizon:
            horizon, reason = reach, "word_budget"
    if horizon < 1:
        raise ConfigError("the data gives no microbatch to train on")
    return horizon, reason


def _resume_mismatch(saved: dict, current: dict) -> list[str]:
    diffs = []
    for key in RESUME_MUST_MATCH:
        a, b = saved, current
        for part in key.split("."):
            a, b = (a or {}).get(part), (b or {}).get(part)
        if a != b:
            diffs.append(key)
    return diffs


def create_model(config: ExperimentConfig, mesh) -> nnx.Module:
    """The model with its parameters initialised directly in their shardings."""
    seed = config.train.seed
    abstract = nnx.eval_shape(lambda: LlavaModel(config.model, rngs=nnx.Rngs(seed)))
    graphdef, abstract_state = nnx.split(abstract)
    shardings = tree_shardings(abstract_state, mesh)
    state = jax.jit(lambda: nnx.state(LlavaModel(config.model, rngs=nnx.Rngs(seed))), out_shardings=shardings)()
    return nnx.merge(graphdef, state)


class _Signals:
    """SIGTERM/SIGINT set a flag the loop checks after each step; a second one acts as usual."""

    def __init__(self):
        self.received: Optional[int] = None
        self._previous = {}

    def __enter__(self):
        if threading_is_main():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.received = signum
        signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def threading_is_main() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _step_row(stats: Sequence[BatchStats], device_metrics: dict, words_seen: int, step_time: float,
              lm_config, devices) -> dict[str, Any]:
    positions = sum(s.rows * s.seq_len for s in stats)
    tokens = positions - sum(s.padding_tokens for s in stats)
    # Model FLOPs of the decoder on the real (non-padding) tokens; the vision tower is not counted.
    flops = sum((s.rows * s.seq_len - s.padding_tokens) * lm_flops_per_token(lm_config, s.seq_len) for s in stats)
    row = {
        "loss": float(device_metrics["loss"]),
        "lr": float(device_metrics["lr"]),
        "grad_norm": float(device_metrics["grad_norm"]),
        "tokens": tokens,
        "target_tokens": int(device_metrics["target_tokens"]),
        "text_samples": sum(s.samples for s in stats if s.modality == "text"),
        "image_samples": sum(s.samples for s in stats if s.modality == "image"),
        "image_tokens": sum(s.image_tokens for s in stats),
        "padding_fraction": 1.0 - tokens / positions,
        "words_seen": words_seen,
        "step_time": step_time,
        "tokens_per_s": tokens / step_time,
    }
    utilisation = mfu(flops / step_time, devices)
    if utilisation is not None:
        row["mfu"] = utilisation
    return row


def _stop_on_non_finite(error: TrainingError, workdir: str, step: int, device_metrics: dict,
                        batches: Sequence[Microbatch], checkpointer: Checkpointer) -> None:
    """Save what the failed step saw next to (never into) the checkpoints, then raise."""
    checkpointer.wait()  # a good checkpoint still being written is finished, not replaced
    where = write_diagnostics(workdir, step, {
        "error": str(error),
        "metrics": {k: float(v) for k, v in device_metrics.items()},
        "microbatches": [dataclasses.asdict(b.stats) for b in batches],
        "last_checkpoint": (checkpointer.all_steps() or [None])[-1],
    }, {f"microbatch{i}_{name}": value for i, b in enumerate(batches) for name, value in b.arrays().items()})
    raise TrainingError(f"{error}; diagnostics in {where}") from None


def _next_step_batches(iterator: Iterator[Microbatch], grad_accum: int) -> list[Microbatch]:
    batches = []
    for _ in range(grad_accum):
        try:
            batches.append(next(iterator))
        except StopIteration:
            break
    return batches


def train(config: ExperimentConfig, workdir: Optional[str] = None, *,
          on_step: Optional[Callable[[StepEvent], None]] = None) -> dict[str, Any]:
    """Train (or resume) the run in `workdir` (default `config.train.workdir`); returns a summary."""
    started = time.monotonic()
    workdir = os.path.abspath(workdir or config.train.workdir)
    maybe_initialize_distributed(config.mesh)
    primary = jax.process_index() == 0
    mesh = make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
    if primary:
        print(f"# jaxllava train: workdir {workdir}\n{dump_yaml(config)}", flush=True)

    vision = config.model.vision
    pipeline = DataPipeline(config.data, image_tokens=config.model.image_tokens,
                            image_size=vision.image_size if vision else None,
                            process_index=jax.process_index(), process_count=jax.process_count())
    stats = list(pipeline.stats())
    grad_accum = config.train.grad_accum
    total_steps, end_reason = plan_steps(stats, grad_accum, config.train.steps, config.train.word_budget)

    model = create_model(config, mesh)
    trainer = TrainStep(model, config.optim, total_steps, mesh, seed=config.train.seed)
    params = nnx.split(model, nnx.Param, ...)[1]
    del model

    checkpointer = Checkpointer(workdir, config.checkpoint)
    milestone_words = config.checkpoint.milestone_words or BABYLM_MILESTONES
    restored = checkpointer.restore_latest(trainer.abstract)
    iterator = pipeline.iterator()
    if restored is None:
        state = trainer.init_state(params)
        step, words_seen, tracker = 0, 0, MilestoneTracker(milestone_words)
    else:
        mismatch = _resume_mismatch(restored.run.get("config", {}), config_to_dict(config))
        if mismatch:
            raise TrainingError(f"{workdir}: cannot resume step {restored.step}: the config differs from the "
                                f"checkpoint's in {', '.join(mismatch)} (use a new workdir)")
        state, step = restored.state, restored.step
        words_seen = int(restored.meta["words_seen"])
        tracker = MilestoneTracker(milestone_words, done=restored.meta["milestones_done"])
        iterator.set_state(restored.data_state)
    del params

    summary = pipeline.summary
    record = run_record(config, mesh, {
        **data_fingerprint([s.path for s in config.data.sources],
                           {"text": summary.text_samples, "image": summary.image_samples}),
        "pipeline_sha256": summary.fingerprint, "words_per_epoch": summary.words})
    record["resumed_from_step"] = None if restored is None else restored.step
    record["total_steps"], record["ends_by"] = total_steps, end_reason
    if primary:
        write_run_json(workdir, record)
        with open(os.path.join(workdir, "config.yaml"), "w", encoding="utf-8") as f:
            f.write(dump_yaml(config))
        with open(os.path.join(workdir, "trainable.json"), "w", encoding="utf-8") as f:
            json.dump(trainer.manifest, f, indent=1)
    logger = (MetricsLogger(workdir, tensorboard=config.logging.tensorboard, progress=config.logging.progress,
                            total_steps=total_steps, resume_step=step) if primary else None)

    milestones_on = config.checkpoint.milestones
    every = config.checkpoint.every_steps
    stop_reason, last_saved, last_row = None, None, None
    last_time = time.monotonic()
    try:
        with _Signals() as signals:
            batches = _next_step_batches(iterator, grad_accum) if step < total_steps else []
            while batches:
                data_state = iterator.get_state()  # the position after exactly this step's microbatches
                for batch in batches:
                    if isinstance(batch, ImageBatch):
                        check_image_mask(batch.image_mask, batch.image_rows, config.model.image_tokens)
                state, device_metrics = trainer.apply(state, [device_arrays(b, mesh) for b in batches])
                # Load the next step's microbatches while this one runs.
                following = _next_step_batches(iterator, grad_accum) if step + 1 < total_steps else []
                try:
                    check_finite(device_metrics, step + 1)
                except TrainingError as error:
                    _stop_on_non_finite(error, workdir, step + 1, device_metrics, batches, checkpointer)
                step += 1
                step_stats = [b.stats for b in batches]
                words_seen += sum(s.words for s in step_stats)
                now = time.monotonic()
                last_row = _step_row(step_stats, device_metrics, words_seen, now - last_time, config.model.lm,
                                     jax.devices())
                last_time = now
                reached = tracker.update(words_seen)
                if budget_reached(words_seen, config.train.word_budget):
                    stop_reason = "word_budget"
                if signals.received is not None:
                    stop_reason = f"signal {signal.Signals(signals.received).name}"
                final = stop_reason is not None or not following
                if logger is not None and (step % config.train.log_every == 0 or step == 1 or reached or final):
                    logger.log(step, last_row)
                save = bool(every and step % every == 0) or bool(milestones_on and reached) or final
                if save:
                    checkpointer.save(step, state, meta={"words_seen": words_seen,
                                                         "milestones_done": tracker.state()["done"]},
                                      data_state=data_state, run_record=record,
                                      milestones=reached if milestones_on else ())
                    last_saved = step
                if on_step is not None:
                    on_step(StepEvent(step, last_row, reached, save, trainer, state))
                batches = [] if final else following
    finally:
        checkpointer.close()
        if logger is not None:
            logger.close()

    result = {
        "workdir": workdir, "steps": step, "total_steps": total_steps, "stopped_by": stop_reason or end_reason,
        "words_seen": words_seen, "milestones": [milestone_name(m) for m in sorted(tracker.done)],
        "last_checkpoint": last_saved, "resumed_from": None if restored is None else restored.step,
        "final_loss": None if last_row is None else last_row["loss"],
        "wall_time_s": round(time.monotonic() - started, 1),
    }
    if primary:
        print(json.dumps({"summary": result}), flush=True)
    return result
