"""The step loop: dispatch a step, read the previous one, and do what is due.

    train(config) runs until the first of: the planned last step (`train.steps`, the end
    of the data's epochs, or the step that reaches the word budget: setup.plan_steps, the
    one place the end is decided), a SIGTERM or SIGINT (the step in flight is the last: it
    is saved, and `stopped_by` names the signal), a dead data-loader worker (the step in
    flight is saved, then the error, naming the worker and its signal, is raised), or a non-finite loss (diagnostics are
    written, never a checkpoint, and TrainingError is raised).

The host reads a step's metrics after dispatching the next step, so the devices never
wait while it logs; only a step whose state is needed (a save, an evaluation, a hook)
is waited for before the next one is dispatched. What each step calls for is decided by
one pure function, `what_is_due`; hooks (`Hook(fn, every=n)`) see the state after the
steps they are due at.

Words are the BabyLM words of the samples trained on, added per optimizer step from the
microbatches' stats, and carried in every checkpoint with the milestones reached and the
data iterator's position, so a resumed run reproduces the uninterrupted one.
"""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import threading
import time
from typing import Any, Callable, Optional, Sequence

import jax

from jaxllava.checkpoint import milestone_name, write_diagnostics
from jaxllava.config import ExperimentConfig
from jaxllava.data.batch import BatchStats, Microbatch, batch_arrays
from jaxllava.data.loader import LoaderStopped, LoaderWorkerDied
from jaxllava.errors import TrainingError
from jaxllava.train.metrics import lm_flops_per_token, mfu, peak_memory_gb
from jaxllava.train.setup import Run, banner, close, setup
from jaxllava.train.step import TrainStep, check_finite, device_batch, host_metrics


@dataclasses.dataclass(frozen=True)
class Due:
    """What a finished optimizer step calls for."""

    log: bool  # its row goes to metrics.jsonl
    evaluate: bool
    save: bool
    final: bool  # no step follows


def what_is_due(config: ExperimentConfig, step: int, *, total_steps: int, milestones_reached: Sequence[int],
                interrupted: bool) -> Due:
    """The one rule for logging, saving and evaluating after `step` (counted from 1).

    `interrupted`: a signal or a dead loader ends the run after this step; it is saved
    but not evaluated, so that a preempted job exits quickly."""
    final = interrupted or step >= total_steps
    finished = final and not interrupted
    every_eval, every_save = config.eval.every_steps, config.checkpoint.every_steps
    evaluate = bool(config.eval.tasks) and not interrupted and bool(
        (every_eval and step % every_eval == 0) or (config.eval.at_milestones and milestones_reached)
        or (config.eval.at_end and finished))
    save = bool((every_save and step % every_save == 0) or (config.checkpoint.milestones and milestones_reached)
                or final)
    log = step % config.train.log_every == 0 or step == 1 or bool(milestones_reached) or final
    return Due(log=log, evaluate=evaluate, save=save, final=final)


@dataclasses.dataclass(frozen=True)
class StepEvent:
    """What a hook sees after a step it is due at."""

    step: int
    metrics: dict[str, Any]  # the step's metrics row
    milestones: list[int]  # word milestones reached at this step (checkpointed right after)
    trainer: TrainStep
    state: dict  # the train state after this step; trainer.model(state["params"]) is the model


@dataclasses.dataclass(frozen=True)
class Hook:
    """`fn(StepEvent)` after every `every`-th step (levanter's `add_hook(fn, every=...)`)."""

    fn: Callable[[StepEvent], None]
    every: int = 1

    def due(self, step: int) -> bool:
        return step % self.every == 0


@dataclasses.dataclass
class _Loaded:
    """The microbatches of one optimizer step: host batches (stats, diagnostics), their device
    copies, and the data iterator's state right after them (what a checkpoint of this step stores)."""

    batches: list[Microbatch]
    on_device: list[Microbatch]
    data_state: dict

    @property
    def words(self) -> int:
        return sum(b.stats.words for b in self.batches)


@dataclasses.dataclass
class _Dispatched:
    """An optimizer step sent to the devices."""

    step: int
    device_metrics: dict[str, jax.Array]
    loaded: _Loaded
    words_seen: int  # after this step
    milestones: list[int]
    due: Due


class _Signals:
    """SIGTERM/SIGINT set a flag the loop checks as it dispatches each step; a second one acts as usual."""

    def __init__(self):
        self.received: Optional[int] = None
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.received = signum
        signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class _StepLoop:
    """Advances a `Run` step by step; its state lives in the Run and in a few counters here."""

    def __init__(self, run: Run, hooks: Sequence[Hook]):
        self.run, self.hooks = run, tuple(hooks)
        self.last_row: Optional[dict] = None
        self.last_saved: Optional[int] = None
        self.last_eval: Optional[dict] = None
        self.start_eval: Optional[dict] = None
        self.chances: dict[str, float] = {}
        self.stop_reason: Optional[str] = None
        self._last_time = time.monotonic()

    # -- data

    def load(self) -> Optional[_Loaded]:
        """The next step's microbatches, or None after the last planned step or when a signal
        arrived while waiting for them (the partial step is dropped: nothing of it was trained)."""
        run = self.run
        if run.step >= run.total_steps:
            return None
        batches = []
        for _ in range(run.config.train.grad_accum):
            try:
                batches.append(next(run.iterator))
            except StopIteration:
                break
            except LoaderStopped:
                return None
        if not batches:
            return None
        mesh = run.trainer.mesh
        return _Loaded(batches, [device_batch(b, mesh) for b in batches], run.iterator.get_state())

    # -- the loop

    def run_steps(self, signals: _Signals) -> None:
        """Train until the planned end or a stop. A dead loader worker is raised after the step in
        flight is saved, so the run resumes from it exactly."""
        run = self.run
        run.iterator.should_stop = lambda: signals.received is not None
        worker_died: Optional[LoaderWorkerDied] = None
        if run.evaluator is not None and run.config.eval.at_start and run.step == 0:
            self.start_eval = self.evaluate("step_0")
        loaded = self.load()
        unread: Optional[_Dispatched] = None
        while loaded is not None:
            run.profiler.before_step(run.step + 1)
            run.state, device_metrics = run.trainer.apply(run.state, loaded.on_device)
            run.step += 1
            if unread is not None:
                # Read only now, with this step queued behind it: the devices never idle while the host logs.
                self.last_row, unread = self.read(unread), None
            run.words_seen += loaded.words
            reached = run.tracker.update(run.words_seen)
            following = None
            try:
                following = None if signals.received is not None else self.load()
            except LoaderWorkerDied as error:
                worker_died, self.stop_reason = error, "a dead data-loader worker"
            if signals.received is not None:
                self.stop_reason = f"signal {signal.Signals(signals.received).name}"
            due = what_is_due(run.config, run.step, total_steps=run.total_steps, milestones_reached=reached,
                              interrupted=self.stop_reason is not None)
            current = _Dispatched(run.step, device_metrics, loaded, run.words_seen, reached, due)
            if due.save or due.evaluate or any(hook.due(run.step) for hook in self.hooks):
                self.finish(current)  # this step's state is needed before the next step consumes it
            else:
                unread = current
            loaded = None if due.final else following
        if worker_died is not None:
            raise worker_died

    def finish(self, done: _Dispatched) -> None:
        """Wait for a step, then run its hooks, evaluation and save, in that order. Evaluation only
        reads the parameters, so the checkpoint's metadata can carry its accuracies."""
        run = self.run
        self.last_row = self.read(done)
        for hook in self.hooks:
            if hook.due(done.step):
                hook.fn(StepEvent(done.step, self.last_row, done.milestones, run.trainer, run.state))
        accuracies = None
        if done.due.evaluate:
            name = milestone_name(done.milestones[-1]) if done.milestones else f"step_{done.step}"
            self.last_eval = accuracies = self.evaluate(name)
        if done.due.save:
            meta = {"words_seen": done.words_seen, "milestones_done": run.tracker.state()["done"]}
            if accuracies is not None:
                meta["eval"] = accuracies
            run.checkpointer.save(done.step, run.state, meta=meta, data_state=done.loaded.data_state,
                                  run_record=run.record,
                                  milestones=done.milestones if run.config.checkpoint.milestones else ())
            self.last_saved = done.step

    def read(self, done: _Dispatched) -> dict[str, Any]:
        """Wait for a dispatched step, stop on a non-finite loss, log its row."""
        run = self.run
        metrics = host_metrics(done.device_metrics)
        run.profiler.after_step(done.step)
        try:
            check_finite(metrics, done.step)
        except TrainingError as error:
            self.stop_on_non_finite(error, done, metrics)
        now = time.monotonic()
        row = step_row([b.stats for b in done.loaded.batches], metrics, done.words_seen, now - self._last_time,
                       run.config.model.lm)
        self._last_time = now
        if run.logger is not None and done.due.log:
            run.logger.log(done.step, row)
        return row

    def evaluate(self, name: str) -> dict[str, float]:
        """Minimal-pair accuracies of the current model: `<workdir>/eval/<name>/`, metrics.jsonl and
        TensorBoard (eval/<task>/<setting>/accuracy). The model is only read."""
        run = self.run
        results = run.evaluator.evaluate(run.trainer.model(run.state["params"]))
        scalars = run.evaluator.scalars(results)
        self.chances.update(run.evaluator.chances(results))
        if run.primary:
            run.evaluator.write(results, os.path.join(run.workdir, "eval", name),
                                extra={"step": run.step, "words_seen": run.words_seen})
            if run.logger is not None:
                run.logger.log(run.step, scalars)
            print(json.dumps({"eval": name, "step": run.step, **scalars}), flush=True)
        self._last_time = time.monotonic()  # evaluation time is not step time
        return scalars

    def stop_on_non_finite(self, error: TrainingError, done: _Dispatched, metrics: dict[str, float]) -> None:
        """Save what the failed step saw next to (never into) the checkpoints, then raise."""
        run = self.run
        run.checkpointer.wait()  # a good checkpoint still being written is finished, not replaced
        batches = done.loaded.batches
        where = write_diagnostics(run.workdir, done.step, {
            "error": str(error),
            "metrics": metrics,
            "microbatches": [dataclasses.asdict(b.stats) for b in batches],
            "last_checkpoint": (run.checkpointer.all_steps() or [None])[-1],
        }, {f"microbatch{i}_{name}": value for i, b in enumerate(batches) for name, value in batch_arrays(b).items()})
        raise TrainingError(f"{error}; diagnostics in {where}") from None

    def summary(self, signals: _Signals) -> dict[str, Any]:
        run = self.run
        return {
            "workdir": run.workdir, "steps": run.step, "total_steps": run.total_steps,
            "stopped_by": self.stop_reason or run.end_reason, "signal": signals.received,
            "words_seen": run.words_seen, "milestones": [milestone_name(m) for m in sorted(run.tracker.done)],
            "last_checkpoint": self.last_saved, "resumed_from": run.resumed_from,
            "final_loss": None if self.last_row is None else self.last_row["loss"],
            "eval": self.last_eval, "eval_at_start": self.start_eval,
            "skipped": run.pipeline.summary.skips.total,
            "wall_time_s": round(time.monotonic() - run.started, 1),
        }


def step_row(stats: Sequence[BatchStats], metrics: dict[str, float], words_seen: int, step_time: float,
             lm_config) -> dict[str, Any]:
    """The metrics row of one optimizer step: what it fed, and how fast."""
    positions = sum(s.rows * s.seq_len for s in stats)
    tokens = positions - sum(s.padding_tokens for s in stats)
    # Model FLOPs of the decoder on the real (non-padding) tokens; the vision tower is not counted.
    flops = sum((s.rows * s.seq_len - s.padding_tokens) * lm_flops_per_token(lm_config, s.seq_len) for s in stats)
    row = {
        "loss": metrics["loss"],
        "lr": metrics["lr"],
        "grad_norm": metrics["grad_norm"],
        "tokens": tokens,
        "target_tokens": int(metrics["target_tokens"]),
        "text_samples": sum(s.samples for s in stats if s.modality == "text"),
        "image_samples": sum(s.samples for s in stats if s.modality == "image"),
        "image_tokens": sum(s.image_tokens for s in stats),
        "padding_fraction": 1.0 - tokens / positions,
        "words_seen": words_seen,
        "step_time": step_time,
        "tokens_per_s": tokens / step_time,
    }
    utilisation = mfu(flops / step_time, jax.devices())
    if utilisation is not None:
        row["mfu"] = utilisation
    memory = peak_memory_gb(jax.local_devices())  # other hosts' devices report nothing here
    if memory is not None:
        row["peak_memory_gb"] = memory
    return row


def train(config: ExperimentConfig, workdir: Optional[str] = None, *, hooks: Sequence[Hook] = (),
          compiler_options: Optional[dict] = None) -> dict[str, Any]:
    """Train (or resume) the run in `workdir` (default `config.train.workdir`); returns a summary.

    `hooks` run after the steps they are due at, with the state; `compiler_options` are XLA
    options for the jitted functions (TrainStep).
    """
    run = setup(config, workdir, compiler_options=compiler_options)
    if run.primary:
        print(banner(run), flush=True)
    loop = _StepLoop(run, hooks)
    try:
        with _Signals() as signals:
            loop.run_steps(signals)
    finally:
        close(run)
    result = loop.summary(signals)
    if run.primary:
        print(json.dumps({"summary": result}), flush=True)
        print(format_summary(result, loop.chances), flush=True)
    return result


def format_summary(result: dict, chances: dict[str, float]) -> str:
    """The closing lines a person reads: what ran, where it stopped, how well it scores."""
    loss = "n/a" if result["final_loss"] is None else f"{result['final_loss']:.4f}"
    lines = [f"== {result['workdir']}: {result['steps']} steps (stopped by {result['stopped_by']}), "
             f"{result['words_seen']:,} words seen, final loss {loss}, last checkpoint "
             f"{result['last_checkpoint']}, {result['wall_time_s']} s"]
    if result["skipped"]:
        lines.append(f"   {result['skipped']} bad records skipped (data.on_bad_record: skip; reasons in run.json)")
    for key, accuracy in (result["eval"] or {}).items():
        extra = [f"chance {chances[key]:.1f}%"] if key in chances else []
        if result["eval_at_start"] and key in result["eval_at_start"]:
            extra.insert(0, f"untrained {result['eval_at_start'][key]:.1f}%")
        name = key.removeprefix("eval/").removesuffix("/accuracy")
        lines.append(f"   {name}: {accuracy:.1f}% ({', '.join(extra)})")
    return "\n".join(lines)
