"""Everything before the first step of a run: data, model, train state (fresh or resumed), run files.

`setup(config, workdir)` returns a `Run`: the pipeline and its iterator, the train step,
the state to continue from, the checkpointer, the metrics logger and the evaluator, and
the provenance record every checkpoint carries. Resuming requires the settings that shape
the trajectory to be unchanged (`RESUME_MUST_MATCH`); a work directory written by
`convert import-*` is never resumed (it is a starting point for `train.init_from`).

Multi-host: every process runs this; `jax.distributed.initialize` is called when
`mesh.distributed` is true (or left null and a coordinator is named in the environment);
each process loads only its rows of each microbatch; files other than checkpoints are
written by process 0 (docs/multihost.md).
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Optional, Sequence

import jax
import numpy as np
from flax import nnx

from jaxllava.checkpoint import Checkpointer, load_checkpoint_params, read_checkpoint_config
from jaxllava.config import ExperimentConfig, config_to_dict, dump_yaml
from jaxllava.data.batch import BatchStats
from jaxllava.data.pipeline import DataPipeline
from jaxllava.data.tokenizer import check_vocabulary
from jaxllava.errors import ConfigError, TrainingError
from jaxllava.eval.evaluator import MinimalPairEvaluator
from jaxllava.model.config import ModelConfig
from jaxllava.model.llava import LlavaModel
from jaxllava.model.sharding import batch_shards, make_mesh, tree_shardings
from jaxllava.provenance import data_fingerprint, run_record, write_run_json
from jaxllava.train.config import MeshConfig
from jaxllava.train.metrics import MetricsLogger, StepProfiler
from jaxllava.train.milestones import BABYLM_MILESTONES, MilestoneTracker
from jaxllava.train.step import TrainStep

# Config sections whose change would alter the trajectory of a resumed run, and the
# settings inside them that may change (speed only, same numbers).
RESUME_MUST_MATCH = ("model", "data", "optim", "train.seed", "train.steps", "train.grad_accum", "train.word_budget")
RESUME_MAY_CHANGE = ("data.num_workers", "data.prefetch", "model.remat")


@dataclasses.dataclass
class Run:
    """A run in progress: what the step loop reads and advances."""

    config: ExperimentConfig
    workdir: str
    primary: bool  # process 0 writes the files other than checkpoints
    pipeline: DataPipeline
    iterator: Any  # the pipeline's checkpointable iterator, positioned where the run continues
    trainer: TrainStep
    checkpointer: Checkpointer
    logger: Optional[MetricsLogger]
    profiler: StepProfiler
    evaluator: Optional[MinimalPairEvaluator]
    record: dict  # provenance, stored in every checkpoint
    total_steps: int
    end_reason: str  # "steps", "data" or "word_budget": what the schedule's horizon is
    state: dict
    step: int
    words_seen: int
    tracker: MilestoneTracker
    resumed_from: Optional[int]
    started: float = dataclasses.field(default_factory=time.monotonic)


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
    """(optimizer steps the run will take, why it ends): the one place the run's end is decided,
    and the learning-rate schedule's horizon.

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
        reach = int(np.searchsorted(words, word_budget, side="left")) + 1  # first step whose total reaches it
        if reach <= horizon:
            horizon, reason = reach, "word_budget"
    if horizon < 1:
        raise ConfigError("the data gives no microbatch to train on")
    return horizon, reason


def resume_mismatch(saved: dict, current: dict) -> list[str]:
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


def _params_from_checkpoint(config: ExperimentConfig, params: nnx.State) -> nnx.State:
    """`params` with their values from `config.train.init_from`, kept in their shardings."""
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
    mismatch = resume_mismatch(restored.run.get("config", {}), config_to_dict(config))
    if mismatch:
        raise TrainingError(f"{workdir}: cannot resume step {restored.step}: the config differs from the "
                            f"checkpoint's in {', '.join(mismatch)} (use a new workdir)")
    iterator.set_state(restored.data_state)
    tracker = MilestoneTracker(milestone_words, done=restored.meta["milestones_done"])
    return restored.state, restored.step, int(restored.meta["words_seen"]), tracker, restored.step


def _check_rows_split_evenly(config: ExperimentConfig, mesh) -> None:
    """Microbatch rows are split over the mesh's batch axes (data × fsdp). Rows that do not divide
    evenly stay replicated, which one process tolerates (slower) but several processes cannot:
    each would hold rows another needs."""
    shards = batch_shards(mesh)
    if jax.process_count() == 1:
        return
    for name in ("text_rows", "image_rows"):
        rows = getattr(config.data, name)
        if rows % shards:
            raise ConfigError(f"data.{name}={rows} must be a multiple of the {shards} ways the mesh splits rows "
                              f"(mesh.data × mesh.fsdp) when training with {jax.process_count()} processes")


def _provenance(config: ExperimentConfig, mesh, pipeline: DataPipeline) -> dict:
    summary = pipeline.summary
    skips = summary.skips
    return run_record(config, mesh, {
        **data_fingerprint([s.path for s in config.data.sources],
                           {"text": summary.text_samples, "image": summary.image_samples},
                           sha256=summary.files_sha256),
        "pipeline_sha256": summary.fingerprint, "words_per_epoch": summary.words,
        "skipped": {"total": skips.total, "by_reason": dict(skips.counts), "examples": skips.examples},
        # the resolved pixel settings, wherever they came from (README pitfall 12)
        "image_processing": dataclasses.asdict(pipeline.processing) if pipeline.processing else None})


def _write_run_files(workdir: str, config: ExperimentConfig, record: dict, manifest: dict[str, bool]) -> None:
    """run.json (provenance), config.yaml (the resolved config) and trainable.json (what trains)."""
    write_run_json(workdir, record)
    with open(os.path.join(workdir, "config.yaml"), "w", encoding="utf-8") as f:
        f.write(dump_yaml(config))
    with open(os.path.join(workdir, "trainable.json"), "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1)


def banner(run: Run) -> str:
    """What a person reads before the first step: the data it will feed, and where the run starts."""
    summary = run.pipeline.summary
    lines = [f"data: {summary.text_samples} text-only and {summary.image_samples} image samples, "
             f"{summary.words:,} words per epoch; {run.total_steps} optimizer steps (ends by {run.end_reason})"]
    if summary.skips.total:
        lines += summary.skips.summary_lines()
    if run.resumed_from is None:
        lines.append(f"starting a new run in {run.workdir}")
    else:
        lines.append(f"resuming from step {run.resumed_from} ({run.words_seen:,} words seen) in {run.workdir}")
    return "\n".join(lines)


def setup(config: ExperimentConfig, workdir: Optional[str] = None, *,
          compiler_options: Optional[dict] = None) -> Run:
    """Build everything the step loop needs; the caller closes `run.checkpointer`, `run.logger`,
    `run.profiler` and `run.iterator` when done (see loop.py)."""
    workdir = os.path.abspath(workdir or config.train.workdir)
    maybe_initialize_distributed(config.mesh)
    primary = jax.process_index() == 0
    mesh = make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
    _check_rows_split_evenly(config, mesh)
    if primary:
        print(f"# jaxllava train: workdir {workdir}\n{dump_yaml(config)}", flush=True)

    vision = config.model.vision
    pipeline = DataPipeline(config.data, image_tokens=config.model.image_tokens,
                            image_size=vision.image_size if vision else None,
                            process_index=jax.process_index(), process_count=jax.process_count())
    check_vocabulary(pipeline.tokenizer, config.model.lm.vocab_size, f"data.tokenizer={config.data.tokenizer}")
    total_steps, end_reason = plan_steps(list(pipeline.stats()), config.train.grad_accum, config.train.steps,
                                         config.train.word_budget)

    model = create_model(config.model, mesh, config.train.seed, compiler_options=compiler_options)
    trainer = TrainStep(model, config.optim, total_steps, mesh, seed=config.train.seed,
                        compiler_options=compiler_options)
    params = nnx.split(model, nnx.Param, ...)[1]
    del model
    if config.train.init_from and not Checkpointer.has_checkpoint(workdir):
        params = _params_from_checkpoint(config, params)

    checkpointer = Checkpointer(workdir, config.checkpoint)
    iterator = pipeline.iterator()
    try:
        state, step, words_seen, tracker, resumed_from = _start_or_resume(config, workdir, trainer, params,
                                                                         checkpointer, iterator)
        record = _provenance(config, mesh, pipeline)
        record.update(resumed_from_step=resumed_from, total_steps=total_steps, ends_by=end_reason)
        logger = None
        if primary:
            _write_run_files(workdir, config, record, trainer.manifest)
            # A new run starts a new metrics file; a resumed one keeps the rows up to its checkpoint.
            logger = MetricsLogger(workdir, tensorboard=config.logging.tensorboard,
                                   progress=config.logging.progress, total_steps=total_steps,
                                   keep_through_step=-1 if resumed_from is None else resumed_from)
        evaluator = (MinimalPairEvaluator.from_config(config.eval, pipeline.tokenizer)
                     if config.eval.tasks else None)
    except BaseException:
        checkpointer.close()
        _close_iterator(iterator)
        raise
    profiler = StepProfiler(config.logging.profile_steps, os.path.join(workdir, "profile",
                                                                       f"process_{jax.process_index()}"))
    return Run(config=config, workdir=workdir, primary=primary, pipeline=pipeline, iterator=iterator,
               trainer=trainer, checkpointer=checkpointer, logger=logger, profiler=profiler, evaluator=evaluator,
               record=record, total_steps=total_steps, end_reason=end_reason, state=state, step=step,
               words_seen=words_seen, tracker=tracker, resumed_from=resumed_from)


def _close_iterator(iterator) -> None:
    close = getattr(iterator, "close", None)
    if close is not None:
        close()


def close(run: Run) -> None:
    """Finish the writes in flight and release the workers, files and profiler of a run."""
    try:
        run.profiler.close()
        run.checkpointer.close()
    finally:
        if run.logger is not None:
            run.logger.close()
        _close_iterator(run.iterator)
