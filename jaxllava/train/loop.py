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

import collections
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
from jaxllava.data.batch import MODALITIES, BatchStats, Microbatch, batch_arrays
from jaxllava.data.loader import LoaderStopped, LoaderWorkerDied
from jaxllava.errors import TrainingError
from jaxllava.train.metrics import lm_flops_per_token, mfu, peak_memory_gb
from jaxllava.train.setup import Run, banner, close, finished_run, setup
from jaxllava.train.step import TrainStep, check_finite, device_batch, host_metrics


@dataclasses.dataclass(frozen=True)
class Due:
    """What a finished optimizer step calls for."""

    log: bool  # its row goes to metrics.jsonl
    evaluate: bool  # minimal-pair tasks
    validate: bool  # the held-out loss
    save: bool
    final: bool  # no step follows

    @property
    def needs_state(self) -> bool:
        return self.evaluate or self.validate or self.save


def what_is_due(config: ExperimentConfig, step: int, *, total_steps: int, milestones_reached: Sequence[int],
                interrupted: bool) -> Due:
    """The one rule for logging, saving, evaluating and the held-out loss after `step` (from 1).

    `interrupted`: a signal or a dead loader ends the run after this step; it is saved
    but not evaluated, so that a preempted job exits quickly."""
    final = interrupted or step >= total_steps
    finished = final and not interrupted
    every_eval, every_save = config.eval.every_steps, config.checkpoint.every_steps
    evaluate = bool(config.eval.tasks or config.eval.suite) and not interrupted and bool(
        (every_eval and step % every_eval == 0) or (config.eval.at_milestones and milestones_reached)
        or (config.eval.at_end and finished))
    every_validation = config.eval.validation_every_steps
    validate = config.data.validation_fraction > 0 and not interrupted and bool(
        (every_validation and step % every_validation == 0) or evaluate or finished)
    save = bool((every_save and step % every_save == 0) or (config.checkpoint.milestones and milestones_reached)
                or final)
    log = step % config.train.log_every == 0 or step == 1 or bool(milestones_reached) or final
    return Due(log=log, evaluate=evaluate, validate=validate, save=save, final=final)


@dataclasses.dataclass
class LogInterval:
    """Sums over the steps since the last logged row. A logged row's loss is their mean (one step's
    loss swings with its modality mix, so logging single steps drew a sawtooth), and its text and
    image losses are Σ CE / Σ target tokens of each modality over the interval. Saved in every
    checkpoint, so a resumed run logs the numbers the uninterrupted one would have."""

    steps: int = 0
    loss_sum: float = 0.0
    text_ce: float = 0.0
    text_target_tokens: int = 0
    image_ce: float = 0.0
    image_target_tokens: int = 0
    video_ce: float = 0.0
    video_target_tokens: int = 0

    def add(self, metrics: dict[str, float]) -> None:
        self.steps += 1
        self.loss_sum += metrics["loss"]
        for modality in MODALITIES:
            setattr(self, f"{modality}_ce", getattr(self, f"{modality}_ce") + metrics[f"{modality}_ce"])
            setattr(self, f"{modality}_target_tokens",
                    getattr(self, f"{modality}_target_tokens") + int(metrics[f"{modality}_target_tokens"]))

    def close(self) -> dict[str, Any]:
        """The interval's figures for a row; the next interval starts empty."""
        row: dict[str, Any] = {"loss": self.loss_sum / self.steps, "interval_steps": self.steps}
        for modality in MODALITIES:
            tokens = getattr(self, f"{modality}_target_tokens")
            row[f"{modality}_target_tokens"] = tokens
            if tokens:
                row[f"{modality}_loss"] = getattr(self, f"{modality}_ce") / tokens
        self.__init__()
        return row


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
        self.interval = LogInterval(**run.log_interval)
        # The closing headline's training loss: the last steps of the run, enough of them that
        # the modality mix of a short final interval does not decide it.
        self.recent: collections.deque = collections.deque(maxlen=max(10, run.config.train.log_every))
        self.last_validation: Optional[dict] = None
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
            if due.needs_state or any(hook.due(run.step) for hook in self.hooks):
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
        if done.due.validate:
            self.last_validation = self.validate()
        if done.due.save:
            meta = {"words_seen": done.words_seen, "milestones_done": run.tracker.state()["done"],
                    "log_interval": dataclasses.asdict(self.interval)}
            if accuracies is not None:
                meta["eval"] = accuracies
            run.checkpointer.save(done.step, run.state, meta=meta, data_state=done.loaded.data_state,
                                  run_record=run.record, assets=run.assets,
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
        self.interval.add(metrics)
        self.recent.append(metrics)
        if done.due.log:
            row.update(self.interval.close())
            if run.logger is not None:
                run.logger.log(done.step, row)
        return row

    def validate(self) -> dict[str, float]:
        """The held-out loss of the current parameters, over all held-out microbatches, in total and
        per modality: metrics.jsonl (val_loss, val_text_loss, val_image_loss) and stdout."""
        run = self.run
        sums = {m: [0.0, 0] for m in MODALITIES}
        pending = [(batch.modality, run.trainer.loss_sums(run.state, device_batch(batch, run.trainer.mesh)))
                   for batch in run.pipeline.validation.batches()]
        for modality, (ce, tokens) in pending:
            sums[modality][0] += float(ce)
            sums[modality][1] += int(tokens)
        ce, tokens = sum(v[0] for v in sums.values()), sum(v[1] for v in sums.values())
        row = {"val_loss": ce / max(tokens, 1), "val_target_tokens": tokens}
        row.update({f"val_{m}_loss": c / n for m, (c, n) in sums.items() if n})
        if run.primary:
            if run.logger is not None:
                run.logger.log(run.step, row)
            print(json.dumps({"validation": run.step, **row}), flush=True)
        self._last_time = time.monotonic()  # validation time is not step time
        return row

    def evaluate(self, name: str) -> dict[str, float]:
        """Minimal-pair accuracies of the current model: `<workdir>/eval/<name>/`, metrics.jsonl and
        TensorBoard (eval/<task>/<setting>/accuracy). The model is only read."""
        run = self.run
        model = run.trainer.model(run.state["params"])
        scalars = {}
        if run.evaluator is not None:
            # Image tasks make pixels exactly as this run's data pipeline does.
            results = run.evaluator.evaluate(model, image_processing=run.pipeline.processing)
            scalars.update(run.evaluator.scalars(results))
            self.chances.update(run.evaluator.chances(results))
            if run.primary:
                run.evaluator.write(results, os.path.join(run.workdir, "eval", name),
                                    extra={"step": run.step, "words_seen": run.words_seen})
        if run.config.eval.suite:
            scalars.update(self.evaluate_suite(model, name))
        if run.primary:
            if run.logger is not None:
                run.logger.log(run.step, scalars)
            print(json.dumps({"eval": name, "step": run.step, **scalars}), flush=True)
        self._last_time = time.monotonic()  # evaluation time is not step time
        return scalars

    def evaluate_suite(self, model, name: str) -> dict[str, float]:
        """eval.suite's tasks on the current model: `<workdir>/eval/<name>/suite/`, in the pipeline's
        results tree under the revision `name` (a milestone's chck_<N>M, else main)."""
        from jaxllava.eval.suite import run_suite

        run, cfg = self.run, self.run.config.eval
        result = run_suite(model, run.pipeline.tokenizer, suite=cfg.suite, data_root=cfg.suite_root,
                           out=os.path.join(run.workdir, "eval", name, "suite"), workdir=run.workdir,
                           revision=name if name.startswith("chck_") else "main",
                           image_sources=cfg.image_sources, image_processing=run.pipeline.processing,
                           batch_size=cfg.batch_size, primary=run.primary,
                           skip_kinds={"aoa": "AoA needs every milestone: run launch.py eval --suite on the "
                                              "finished run"})
        return {f"eval/suite/{key}": value for key, value in result["scores"].items()}

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
        """What the run did; the training losses are those of its last steps (`recent`)."""
        run = self.run
        window = LogInterval()
        for metrics in self.recent:
            window.add(metrics)
        last = window.close() if window.steps else None
        return {
            "workdir": run.workdir, "steps": run.step, "total_steps": run.total_steps,
            "stopped_by": self.stop_reason or run.end_reason, "signal": signals.received,
            "words_seen": run.words_seen, "milestones": [milestone_name(m) for m in sorted(run.tracker.done)],
            "last_checkpoint": self.last_saved, "resumed_from": run.resumed_from,
            "final_loss": None if last is None else last["loss"],
            "final_losses": None if last is None else {k: last[k] for k in ("text_loss", "image_loss") if k in last},
            "final_loss_steps": None if last is None else last["interval_steps"],
            "held_out_loss": self.last_validation,
            "eval": self.last_eval, "eval_at_start": self.start_eval,
            "skipped": run.pipeline.summary.skips.total,
            "wall_time_s": round(time.monotonic() - run.started, 1),
        }


def _already_complete(finished: dict) -> dict[str, Any]:
    """The summary of a rerun of a finished command, which changes nothing."""
    result = {"workdir": finished["workdir"], "steps": finished["step"], "total_steps": finished["total_steps"],
              "stopped_by": "already complete", "signal": None, "words_seen": finished["words_seen"],
              "milestones": [milestone_name(m) for m in finished["milestones"]],
              "last_checkpoint": finished["step"], "resumed_from": finished["step"], "final_loss": None,
              "held_out_loss": None, "eval": finished["eval"], "eval_at_start": None, "skipped": 0,
              "wall_time_s": 0.0}
    if jax.process_index() == 0:
        print(f"already complete at step {finished['step']} in {finished['workdir']}: nothing to do "
              f"(a new run needs a new workdir)", flush=True)
        print(json.dumps({"summary": result}), flush=True)
    return result


def step_row(stats: Sequence[BatchStats], metrics: dict[str, float], words_seen: int, step_time: float,
             lm_config) -> dict[str, Any]:
    """The metrics row of one optimizer step: what it fed, and how fast."""
    positions = sum(s.rows * s.seq_len for s in stats)
    tokens = positions - sum(s.padding_tokens for s in stats)
    # Model FLOPs of the decoder on the real (non-padding) tokens; the vision tower is not counted.
    flops = sum((s.rows * s.seq_len - s.padding_tokens) * lm_flops_per_token(lm_config, s.seq_len) for s in stats)
    row = {
        "loss": metrics["loss"],  # a logged row replaces it by the interval's mean (LogInterval)
        "step_loss": metrics["loss"],
        "lr": metrics["lr"],
        "grad_norm": metrics["grad_norm"],
        "tokens": tokens,
        "target_tokens": int(metrics["target_tokens"]),
        "text_samples": sum(s.samples for s in stats if s.modality == "text"),
        "image_samples": sum(s.samples for s in stats if s.modality == "image"),
        "image_tokens": sum(s.image_tokens for s in stats),
        "video_samples": sum(s.samples for s in stats if s.modality == "video"),
        "video_tokens": sum(s.video_tokens for s in stats),
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
    finished = finished_run(config, workdir)
    if finished is not None:
        return _already_complete(finished)
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
        print_caption_example(run)
    return result


def print_caption_example(run: Run) -> None:
    """One generated caption for the first training image, beside its reference caption: what the
    model says about an image, not only its scores (single process; not for a features input)."""
    vision = run.config.model.vision
    if vision is None or vision.kind == "features" or jax.process_count() > 1:
        return
    from jaxllava.generate import caption_example, first_image_caption

    example = first_image_caption(run.pipeline.table, run.pipeline.tokenizer)
    if example is not None:
        image, reference = example
        caption = caption_example(run.trainer.model(run.state["params"]), run.pipeline.tokenizer, run.config, image)
        print(f"   caption of {os.path.relpath(image)}: {caption!r} (reference: {reference!r})", flush=True)


def format_summary(result: dict, chances: dict[str, float]) -> str:
    """The closing lines a person reads: what ran, where it stopped, its losses, how well it scores."""
    lines = [f"== {result['workdir']}: {result['steps']} steps (stopped by {result['stopped_by']}), "
             f"{result['words_seen']:,} words seen, last checkpoint {result['last_checkpoint']}, "
             f"{result['wall_time_s']} s"]
    if result["final_loss"] is not None:
        per_modality = ", ".join(f"{k.removesuffix('_loss')} {v:.4f}" for k, v in result["final_losses"].items())
        lines.append(f"   training loss {result['final_loss']:.4f} over the last {result['final_loss_steps']} steps"
                     + (f" ({per_modality})" if per_modality else ""))
    held_out = result["held_out_loss"]
    if held_out:
        per_modality = ", ".join(f"{m} {held_out[f'val_{m}_loss']:.4f}" for m in MODALITIES
                                 if f"val_{m}_loss" in held_out)
        lines.append(f"   held-out loss {held_out['val_loss']:.4f}" + (f" ({per_modality})" if per_modality else ""))
    if result["skipped"]:
        lines.append(f"   {result['skipped']} bad records skipped (data.on_bad_record: skip; reasons in run.json)")
    for key, accuracy in (result["eval"] or {}).items():
        extra = [f"chance {chances[key]:.1f}%"] if key in chances else []
        if result["eval_at_start"] and key in result["eval_at_start"]:
            extra.insert(0, f"at start {result['eval_at_start'][key]:.1f}%")
        name = key.removeprefix("eval/").removesuffix("/accuracy")
        # suite scores are the pipeline's headline numbers: accuracies, but also rho and delta R^2
        value = f"{accuracy:.2f}" if key.startswith("eval/suite/") else f"{accuracy:.1f}%"
        lines.append(f"   {name}: {value}" + (f" ({', '.join(extra)})" if extra else ""))
    return "\n".join(lines)
