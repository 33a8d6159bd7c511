"""The training loop: data pipeline → train step → metrics → checkpoints, resumable at any step.

    train(config) runs until the first of: `train.steps` optimizer steps, the end
    of the data's epochs, the word budget (at most one step over it), a SIGTERM or
    SIGINT (the step dispatched next is the last: it saves, then returns), or a
    non-finite loss (it writes diagnostics, never a checkpoint, and raises TrainingError).

The host reads a step's metrics after dispatching the next step, so the devices
never wait while it logs; only a step whose state is needed (a save, an
evaluation, an `on_step` hook) is waited for before the next one is dispatched.

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
import functools
import json
import os
import signal
import threading
import time
from typing import Any, Callable, Iterator, Optional, Sequence

import jax
import numpy as np
from flax import nnx

from jaxllava.config import ExperimentConfig, config_to_dict, dump_yaml
from jaxllava.data.batch import BatchStats, ImageBatch, Microbatch
from jaxllava.data.pipeline import DataPipeline
from jaxllava.errors import ConfigError, TrainingError
from jaxllava.eval.evaluator import MinimalPairEvaluator
from jaxllava.model.config import ModelConfig
from jaxllava.model.llava import LlavaModel, check_image_mask
from jaxllava.model.sharding import make_mesh
from jaxllava.checkpoint import Checkpointer, milestone_name, write_diagnostics
from jaxllava.train.config import MeshConfig
from jaxllava.train.metrics import MetricsLogger, StepProfiler, lm_flops_per_token, mfu, peak_memory_gb
from jaxllava.train.milestones import BABYLM_MILESTONES, MilestoneTracker, budget_reached
from jaxllava.provenance import data_fingerprint, run_record, write_run_json
from jaxllava.model.sharding import tree_shardings
from jaxllava.train.step import TrainStep, check_finite, device_arrays, host_metrics

# Config sections whose change would alter the trajectory of a resumed run, and the
# settings inside them that may change (speed only, same numbers).
RESUME_MUST_MATCH = ("model", "data", "optim", "train.seed", "train.steps", "train.grad_accum", "train.word_budget")
RESUME_MAY_CHANGE = ("data.num_workers", "data.prefetch", "model.remat")


@dataclasses.dataclass
class _Dispatched:
    """An optimizer step sent to the devices whose metrics the host has not read yet."""

    step: int
    device_metrics: dict[str, jax.Array]
    batches: list[Microbatch]
    words_seen: int  # after this step
    log: bool  # whether its row goes to metrics.jsonl


@dataclasses.dataclass
class StepEvent:
    """What `on_step` sees after each optimizer step (e.g. to evaluate at milestones)."""

    step: int
    metrics: dict[str, Any]
    milestones: list[int]  # word milestones reached at this step (checkpointed right after)
    trainer: TrainStep
    state: dict  # the train state after this step; trainer.model(state["params"]) is the model


def maybe_initialize_distributed(mesh: MeshConfig) -> None:
    wanted = mesh.distributed
    if wanted is None:
        wanted = mesh.coordinator_address is not None or "JAX_COORDINATOR_ADDRESS" in os.environ
    if not wanted or jax.distributed.is_initialized():
        return
    # CPU processes talk through gloo (the setting only affects the CPU backend; newer
    # jax versions may have dropped the option once gloo became the default).
    try:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    except AttributeError:
        pass
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


def check_config(config: ExperimentConfig) -> None:
    """Cross-section rules no single section can check."""
    longest, positions = max(config.data.buckets), config.model.lm.max_position_embeddings
    if longest > positions:
        # The reference trained 32768-token samples on a 2048-position LM unchecked (REFERENCE.md §7.27).
        raise ConfigError(f"data.buckets go up to {longest} tokens but model.lm.max_position_embeddings is "
                          f"{positions}: lower the buckets or raise the position range")


def _resume_mismatch(saved: dict, current: dict) -> list[str]:
    """Dotted keys of RESUME_MUST_MATCH whose values differ between two config dicts."""

    def pick(config: dict, key: str):
        value = config
        for part in key.split("."):
            value = (value or {}).get(part)
        if isinstance(value, dict):
            value = {k: v for k, v in value.items() if f"{key}.{k}" not in RESUME_MAY_CHANGE}
        return value

    return [key for key in RESUME_MUST_MATCH if pick(saved, key) != pick(current, key)]


def create_model(model_config: ModelConfig, mesh, seed: int, *, compiler_options: Optional[dict] = None
                 ) -> nnx.Module:
    """The model with its parameters initialised directly in their shardings (never whole on one device)."""
    abstract = nnx.eval_shape(lambda: LlavaModel(model_config, rngs=nnx.Rngs(seed)))
    graphdef, abstract_state = nnx.split(abstract)
    shardings = tree_shardings(abstract_state, mesh)
    state = jax.jit(lambda: nnx.state(LlavaModel(model_config, rngs=nnx.Rngs(seed))), out_shardings=shardings,
                    compiler_options=compiler_options)()
    return nnx.merge(graphdef, state)


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


def _step_row(stats: Sequence[BatchStats], metrics: dict[str, float], words_seen: int, step_time: float,
              lm_config, devices) -> dict[str, Any]:
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
    utilisation = mfu(flops / step_time, devices)
    if utilisation is not None:
        row["mfu"] = utilisation
    memory = peak_memory_gb(jax.local_devices())  # other hosts' devices report nothing here
    if memory is not None:
        row["peak_memory_gb"] = memory
    return row


def _stop_on_non_finite(error: TrainingError, workdir: str, step: int, metrics: dict[str, float],
                        batches: Sequence[Microbatch], checkpointer: Checkpointer) -> None:
    """Save what the failed step saw next to (never into) the checkpoints, then raise."""
    checkpointer.wait()  # a good checkpoint still being written is finished, not replaced
    where = write_diagnostics(workdir, step, {
        "error": str(error),
        "metrics": metrics,
        "microbatches": [dataclasses.asdict(b.stats) for b in batches],
        "last_checkpoint": (checkpointer.all_steps() or [None])[-1],
    }, {f"microbatch{i}_{name}": value for i, b in enumerate(batches) for name, value in b.arrays().items()})
    raise TrainingError(f"{error}; diagnostics in {where}") from None


def _start_or_resume(config: ExperimentConfig, workdir: str, trainer: TrainStep, params, checkpointer: Checkpointer,
                     iterator) -> tuple[dict, int, int, MilestoneTracker, Optional[int]]:
    """(train state, step, words seen, milestone tracker, step resumed from or None)."""
    milestone_words = config.checkpoint.milestone_words or BABYLM_MILESTONES
    imported = checkpointer.latest_meta().get("imported_from")
    if imported:
        raise TrainingError(f"{workdir} holds a checkpoint imported from {imported}, not a training run; "
                            f"start a new run from it with --set train.init_from={workdir}")
    restored = checkpointer.restore_latest(trainer.abstract)
    if restored is None:
        return trainer.init_state(params), 0, 0, MilestoneTracker(milestone_words), None
    mismatch = _resume_mismatch(restored.run.get("config", {}), config_to_dict(config))
    if mismatch:
        raise TrainingError(f"{workdir}: cannot resume step {restored.step}: the config differs from the "
                            f"checkpoint's in {', '.join(mismatch)} (use a new workdir)")
    iterator.set_state(restored.data_state)
    tracker = MilestoneTracker(milestone_words, done=restored.meta["milestones_done"])
    return restored.state, restored.step, int(restored.meta["words_seen"]), tracker, restored.step


def _params_from_checkpoint(config: ExperimentConfig, params: nnx.State) -> nnx.State:
    """`params` with their values from `config.train.init_from`, kept in their shardings."""
    from jaxllava.checkpoint import load_checkpoint_params, read_checkpoint_config

    source = config.train.init_from
    stored, _, _ = read_checkpoint_config(source)
    if stored.model != config.model:
        mine, theirs = config_to_dict(config.model), config_to_dict(stored.model)
        raise ConfigError(f"train.init_from={source}: its model differs from this config's in "
                          f"{', '.join(f'model.{k}' for k in mine if mine[k] != theirs[k])}")
    shardings = nnx.to_pure_dict(jax.tree.map(lambda x: x.sharding, params))
    _, values, _ = load_checkpoint_params(source, shardings=shardings)
    nnx.replace_by_pure_dict(params, values)
    return params


def _write_run_files(workdir: str, config: ExperimentConfig, record: dict, manifest: dict[str, bool]) -> None:
    """run.json (provenance), config.yaml (the resolved config) and trainable.json (what trains)."""
    write_run_json(workdir, record)
    with open(os.path.join(workdir, "config.yaml"), "w", encoding="utf-8") as f:
        f.write(dump_yaml(config))
    with open(os.path.join(workdir, "trainable.json"), "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1)


def _evaluation_due(config: ExperimentConfig, step: int, reached: list[int], finished: bool) -> bool:
    every = config.eval.every_steps
    return bool((every and step % every == 0) or (config.eval.at_milestones and reached)
                or (config.eval.at_end and finished))


def _evaluate(evaluator: MinimalPairEvaluator, model, workdir: str, name: str, step: int, words_seen: int,
              logger: Optional[MetricsLogger], chances: dict[str, float]) -> dict[str, float]:
    """Minimal-pair accuracies of the current model: `<workdir>/eval/<name>/`, metrics.jsonl and
    TensorBoard (eval/<task>/<setting>/accuracy). The model is only read."""
    results = evaluator.evaluate(model)
    scalars = evaluator.scalars(results)
    chances.update(evaluator.chances(results))
    if jax.process_index() == 0:
        evaluator.write(results, os.path.join(workdir, "eval", name), extra={"step": step, "words_seen": words_seen})
        if logger is not None:
            logger.log(step, scalars)
        print(json.dumps({"eval": name, "step": step, **scalars}), flush=True)
    return scalars


def _load_step(iterator: Iterator[Microbatch], grad_accum: int, mesh, image_tokens: int
               ) -> tuple[list[Microbatch], list[dict[str, jax.Array]], dict]:
    """(host microbatches, their device arrays, the iterator state just after them) of one
    optimizer step; fewer microbatches at the end of the data, none after it."""
    batches = []
    for _ in range(grad_accum):
        try:
            batches.append(next(iterator))
        except StopIteration:
            break
    data_state = iterator.get_state()
    for batch in batches:
        if isinstance(batch, ImageBatch):
            check_image_mask(batch.image_mask, batch.image_rows, image_tokens)
    return batches, [device_arrays(b, mesh) for b in batches], data_state


def train(config: ExperimentConfig, workdir: Optional[str] = None, *,
          on_step: Optional[Callable[[StepEvent], None]] = None,
          compiler_options: Optional[dict] = None) -> dict[str, Any]:
    """Train (or resume) the run in `workdir` (default `config.train.workdir`); returns a summary.

    Minimal-pair evaluation (config.eval) runs at milestones, every `eval.every_steps`
    and at the end. `on_step` is called after every optimizer step with the state;
    `compiler_options` are XLA options for the jitted functions (TrainStep).
    """
    started = time.monotonic()
    check_config(config)
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

    model = create_model(config.model, mesh, config.train.seed, compiler_options=compiler_options)
    trainer = TrainStep(model, config.optim, total_steps, mesh, seed=config.train.seed,
                        compiler_options=compiler_options)
    params = nnx.split(model, nnx.Param, ...)[1]
    del model
    if config.train.init_from and not Checkpointer.has_checkpoint(workdir):
        params = _params_from_checkpoint(config, params)

    checkpointer = Checkpointer(workdir, config.checkpoint)
    profiler = StepProfiler(config.logging.profile_steps, os.path.join(workdir, "profile",
                                                                       f"process_{jax.process_index()}"))
    logger = None
    try:
        iterator = pipeline.iterator()
        state, step, words_seen, tracker, resumed_from = _start_or_resume(config, workdir, trainer, params,
                                                                         checkpointer, iterator)
        del params
        record = run_record(config, mesh, {
            **data_fingerprint([s.path for s in config.data.sources],
                               {"text": pipeline.summary.text_samples, "image": pipeline.summary.image_samples},
                               sha256=pipeline.summary.files_sha256),
            "pipeline_sha256": pipeline.summary.fingerprint, "words_per_epoch": pipeline.summary.words,
            # the resolved pixel settings, wherever they came from (REFERENCE.md §7.12)
            "image_processing": dataclasses.asdict(pipeline.processing) if pipeline.processing else None})
        record.update(resumed_from_step=resumed_from, total_steps=total_steps, ends_by=end_reason)
        if primary:
            _write_run_files(workdir, config, record, trainer.manifest)
            logger = MetricsLogger(workdir, tensorboard=config.logging.tensorboard,
                                   progress=config.logging.progress, total_steps=total_steps, resume_step=step)

        milestones_on, every = config.checkpoint.milestones, config.checkpoint.every_steps
        evaluator = (MinimalPairEvaluator.from_config(config.eval, pipeline.tokenizer)
                     if config.eval.tasks else None)
        stop_reason, last_saved, last_row, last_eval, start_eval = None, None, None, None, None
        chances: dict[str, float] = {}
        if evaluator is not None and config.eval.at_start and step == 0:
            start_eval = _evaluate(evaluator, trainer.model(state["params"]), workdir, "step_0", 0, 0, logger,
                                   chances)
        last_time = time.monotonic()

        def read_step(done: _Dispatched) -> dict[str, Any]:
            """Wait for a dispatched step, stop on a non-finite loss, log its row."""
            nonlocal last_time
            metrics = host_metrics(done.device_metrics)
            profiler.after_step(done.step)
            try:
                check_finite(metrics, done.step)
            except TrainingError as error:
                _stop_on_non_finite(error, workdir, done.step, metrics, done.batches, checkpointer)
            now = time.monotonic()
            row = _step_row([b.stats for b in done.batches], metrics, done.words_seen, now - last_time,
                            config.model.lm, jax.devices())
            last_time = now
            if logger is not None and done.log:
                logger.log(done.step, row)
            return row

        with _Signals() as signals:
            load = functools.partial(_load_step, iterator, grad_accum, mesh, config.model.image_tokens)
            batches, arrays, data_state = load() if step < total_steps else ([], [], None)
            unread: Optional[_Dispatched] = None
            while batches:
                profiler.before_step(step + 1)
                state, device_metrics = trainer.apply(state, arrays)
                step += 1
                if unread is not None:
                    # The previous step is read only now, with this one queued behind it,
                    # so the device never idles while the host logs.
                    last_row, unread = read_step(unread), None
                # Load and transfer the next step's microbatches while this one runs.
                following = load() if step < total_steps else ([], [], None)
                words_seen += sum(b.stats.words for b in batches)
                reached = tracker.update(words_seen)
                if budget_reached(words_seen, config.train.word_budget):
                    stop_reason = "word_budget"
                if signals.received is not None:
                    stop_reason = f"signal {signal.Signals(signals.received).name}"
                final = stop_reason is not None or not following[0]
                finished = final and signals.received is None  # a preempted run exits quickly
                evaluate = evaluator is not None and _evaluation_due(config, step, reached, finished)
                save = bool((every and step % every == 0) or (milestones_on and reached) or final)
                current = _Dispatched(step, device_metrics, batches, words_seen, log=bool(
                    step % config.train.log_every == 0 or step == 1 or reached or final))
                if save or evaluate or on_step is not None:
                    # This step's state is needed before the next step consumes it: wait for it.
                    last_row = read_step(current)
                    if on_step is not None:
                        on_step(StepEvent(step, last_row, reached, trainer, state))
                    step_eval = None
                    # Evaluation only reads the parameters, so running it before the save changes
                    # nothing in the run; the checkpoint's metadata then carries its accuracies.
                    if evaluate:
                        name = milestone_name(reached[-1]) if reached else f"step_{step}"
                        last_eval = step_eval = _evaluate(evaluator, trainer.model(state["params"]), workdir,
                                                          name, step, words_seen, logger, chances)
                        last_time = time.monotonic()  # evaluation time is not step time
                    if save:
                        meta = {"words_seen": words_seen, "milestones_done": tracker.state()["done"]}
                        if step_eval is not None:
                            meta["eval"] = step_eval
                        checkpointer.save(step, state, meta=meta, data_state=data_state, run_record=record,
                                          milestones=reached if milestones_on else ())
                        last_saved = step
                else:
                    unread = current
                batches, arrays, data_state = ([], [], None) if final else following
    finally:
        profiler.close()
        checkpointer.close()
        if logger is not None:
            logger.close()

    result = {
        "workdir": workdir, "steps": step, "total_steps": total_steps, "stopped_by": stop_reason or end_reason,
        "words_seen": words_seen, "milestones": [milestone_name(m) for m in sorted(tracker.done)],
        "last_checkpoint": last_saved, "resumed_from": resumed_from,
        "final_loss": None if last_row is None else last_row["loss"],
        "eval": last_eval,
        "eval_at_start": start_eval,
        "wall_time_s": round(time.monotonic() - started, 1),
    }
    if primary:
        print(json.dumps({"summary": result}), flush=True)
        print(format_summary(result, chances), flush=True)
    return result


def format_summary(result: dict, chances: dict[str, float]) -> str:
    """The closing lines a person reads: what ran, where it stopped, how well it scores."""
    loss = "n/a" if result["final_loss"] is None else f"{result['final_loss']:.4f}"
    lines = [f"== {result['workdir']}: {result['steps']} steps (stopped by {result['stopped_by']}), "
             f"{result['words_seen']:,} words seen, final loss {loss}, last checkpoint "
             f"{result['last_checkpoint']}, {result['wall_time_s']} s"]
    for key, accuracy in (result["eval"] or {}).items():
        extra = [f"chance {chances[key]:.1f}%"] if key in chances else []
        if result["eval_at_start"] and key in result["eval_at_start"]:
            extra.insert(0, f"untrained {result['eval_at_start'][key]:.1f}%")
        name = key.removeprefix("eval/").removesuffix("/accuracy")
        lines.append(f"   {name}: {accuracy:.1f}% ({', '.join(extra)})")
    return "\n".join(lines)
