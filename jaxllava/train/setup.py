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
import shutil
import time
from typing import Any, Optional, Sequence

import jax
import numpy as np
from flax import nnx

from jaxllava.checkpoint import (CHECKPOINTS_DIR, META, PREPROCESSOR_CONFIG, RUN, TOKENIZER_DIR, AssetsSave,
                                 Checkpointer, complete_steps, load_checkpoint_params, read_checkpoint_config,
                                 read_json_item, read_meta)
from jaxllava.config import ExperimentConfig, config_differences, config_to_dict, dump_yaml
from jaxllava.data.pipeline import DataPipeline
from jaxllava.data.tokenizer import (TokenizerCoverage, check_vocabulary, copy_tokenizer, load_tokenizer,
                                     table_coverage, vocabulary_difference)
from jaxllava.errors import ConfigError, ConversionError, TrainingError
from jaxllava.eval.evaluator import MinimalPairEvaluator
from jaxllava.model.llava import create_model
from jaxllava.model.sharding import batch_shards, make_mesh
from jaxllava.provenance import data_fingerprint, run_record, write_run_json
from jaxllava.train.config import MeshConfig, TrainConfig
from jaxllava.train.metrics import MetricsLogger, StepProfiler
from jaxllava.train.milestones import BABYLM_MILESTONES, MilestoneTracker
from jaxllava.train.optimizer import path_str
from jaxllava.train.step import TrainStep

# Config sections whose change would alter the trajectory of a resumed run, and the
# settings inside them that may change (speed only, same numbers).
RESUME_MUST_MATCH = ("model", "data", "optim", "train.seed", "train.steps", "train.grad_accum", "train.word_budget")
RESUME_MAY_CHANGE = ("data.num_workers", "data.prefetch", "data.check_images", "data.table_cache", "model.remat")


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
    assets: AssetsSave  # copied into every checkpoint: the tokenizer (and preprocessor config)
    total_steps: int
    end_reason: str  # "steps", "data" or "word_budget": what the schedule's horizon is
    state: dict
    step: int
    words_seen: int
    tracker: MilestoneTracker
    resumed_from: Optional[int]
    log_interval: dict  # the metrics interval in progress at the checkpoint (loop.LogInterval)
    warnings: list[str]  # said in the start banner
    coverage: TokenizerCoverage  # <unk> rate and split words of the trained text
    started: float = dataclasses.field(default_factory=time.monotonic)


def finished_run(config: ExperimentConfig, workdir: Optional[str] = None) -> Optional[dict]:
    """The last checkpoint's step, words and metadata when the run in `workdir` already reached its
    planned last step with this config, else None: read from the checkpoint's JSON alone, so a rerun
    of a finished command builds nothing, trains nothing and writes nothing."""
    workdir = os.path.abspath(workdir or config.train.workdir)
    steps = complete_steps(os.path.join(workdir, CHECKPOINTS_DIR))
    if not steps:
        return None
    step_dir = os.path.join(workdir, CHECKPOINTS_DIR, str(steps[-1]))
    try:
        record, meta = read_json_item(step_dir, RUN), read_json_item(step_dir, META)
    except ConversionError:
        return None  # setup reports what is wrong with it
    total = record.get("total_steps")
    if total is None or steps[-1] < total or resume_mismatch(record.get("config", {}), config_to_dict(config)):
        return None
    return {"workdir": workdir, "step": steps[-1], "total_steps": total, "words_seen": meta.get("words_seen"),
            "milestones": meta.get("milestones_done", []), "eval": meta.get("eval")}


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


def plan_steps(step_words: Sequence[int], microbatches: int, grad_accum: int, steps: Optional[int],
               word_budget: Optional[int], words_before: int = 0) -> tuple[int, str]:
    """(optimizer steps the run will take, why it ends): the one place the run's end is decided,
    and the learning-rate schedule's horizon.

    The data plan is fixed before training, so the step at which the word budget is reached is
    known exactly. `step_words`: the words of each optimizer step in training order (at least up
    to the step that reaches the budget, or `steps`); `microbatches`: all the data gives, the
    last step possibly short. `words_before`: words counted before this run's first step
    (train.init_from_words: continue).
    """
    available = -(-microbatches // grad_accum)
    if steps is not None and steps > available:
        raise ConfigError(f"train.steps={steps} needs {steps * grad_accum} microbatches; the data's "
                          f"data.epochs give {microbatches} ({available} steps): raise data.epochs or lower train.steps")
    horizon, reason = (steps, "steps") if steps is not None else (available, "data")
    if word_budget is not None:
        words = words_before + np.cumsum(np.asarray(step_words, np.int64))
        reached = np.flatnonzero(words >= word_budget)  # the first step whose total reaches it
        if len(reached) and reached[0] + 1 <= horizon:
            horizon, reason = int(reached[0]) + 1, "word_budget"
    if horizon < 1:
        raise ConfigError("the data gives no microbatch to train on" if words_before < (word_budget or 1) else
                          f"train.word_budget={word_budget} is already reached by the {words_before:,} words "
                          f"carried over from train.init_from (train.init_from_words: continue)")
    return horizon, reason


def plan_run(pipeline: DataPipeline, train: TrainConfig, words_before: int = 0) -> tuple[int, str]:
    """`plan_steps` for a pipeline: its epochs are planned one at a time, only as far as needed."""
    budget = None if train.word_budget is None else train.word_budget - words_before
    step_words = pipeline.plans.step_words(train.grad_accum, until_steps=train.steps,
                                           until_words=budget if budget is None or budget > 0 else 1)
    return plan_steps(step_words, len(pipeline.plans), train.grad_accum, train.steps, train.word_budget,
                      words_before=words_before)


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


@dataclasses.dataclass
class _Start:
    """Where a run starts: fresh, from `train.init_from`, or resumed from its own checkpoint."""

    state: dict
    step: int
    words_seen: int
    tracker: MilestoneTracker
    resumed_from: Optional[int]
    log_interval: dict


def _init_from(config: ExperimentConfig, params: nnx.State, tokenizer) -> tuple[nnx.State, int]:
    """`params` with their values from `config.train.init_from`, kept in their shardings, and the
    words that checkpoint had seen. Its model must be this config's, and its tokenizer this
    data's (ids that meant other words would silently retrain the embedding)."""
    source = config.train.init_from
    stored, _, _ = read_checkpoint_config(source)
    if stored.model != config.model:
        raise ConfigError(f"train.init_from={source}: its model differs from this config's in "
                          + "; ".join(config_differences(config.model, stored.model, "model"))
                          + " (this config's value first)")
    if not config.train.init_from_other_tokenizer:
        difference = vocabulary_difference(tokenizer, load_tokenizer(stored.data.tokenizer),
                                           names=(f"data.tokenizer={config.data.tokenizer}",
                                                  f"the tokenizer of train.init_from={source}"))
        if difference:
            raise ConfigError(f"train.init_from={source}: the data tokenizer's vocabulary differs from the one the "
                              f"model was trained with: {difference}; use that tokenizer, or set "
                              f"train.init_from_other_tokenizer=true to train with it anyway")
    shardings = nnx.to_pure_dict(jax.tree.map(lambda x: x.sharding, params))
    _, values, _ = load_checkpoint_params(source, shardings=shardings)
    nnx.replace_by_pure_dict(params, values)
    return params, int(read_meta(source).get("words_seen") or 0)


def _start_or_resume(config: ExperimentConfig, workdir: str, trainer: TrainStep, params, init_words: int,
                     checkpointer: Checkpointer, iterator) -> _Start:
    milestone_words = config.checkpoint.milestone_words or BABYLM_MILESTONES
    imported = checkpointer.latest_meta().get("imported_from")
    if imported:
        raise TrainingError(f"{workdir} holds a checkpoint imported from {imported}, not a training run; "
                            f"start a new run from it with --set train.init_from={workdir}")
    restored = checkpointer.restore_latest(trainer.abstract)
    if restored is None:
        tracker = MilestoneTracker(milestone_words, done=[m for m in milestone_words if m <= init_words])
        return _Start(trainer.init_state(params), 0, init_words, tracker, None, {})
    mismatch = resume_mismatch(restored.run.get("config", {}), config_to_dict(config))
    if mismatch:
        raise TrainingError(f"{workdir}: cannot resume step {restored.step}: the config differs from the "
                            f"checkpoint's in {', '.join(mismatch)} (use a new workdir)")
    iterator.set_state(restored.data_state)
    tracker = MilestoneTracker(milestone_words, done=restored.meta["milestones_done"])
    return _Start(restored.state, restored.step, int(restored.meta["words_seen"]), tracker, restored.step,
                  restored.meta.get("log_interval", {}))


def parameter_counts(params: nnx.State, manifest: dict[str, bool]) -> dict[str, dict[str, int]]:
    """{part: {"total": n, "trainable": m}} and "all", from the parameter shapes and what trains."""
    counts: dict[str, dict[str, int]] = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        name = path_str(path)
        size = int(np.prod(leaf.shape))
        for part in (name.split("/")[0], "all"):
            entry = counts.setdefault(part, {"total": 0, "trainable": 0})
            entry["total"] += size
            entry["trainable"] += size if manifest.get(name, False) else 0
    return counts


def _untrained_frozen_parts(config: ExperimentConfig, counts: dict, pretrained: bool) -> list[str]:
    """Warnings for frozen parts that start from a random initialisation: allowed (tests, the bundled
    sample), but a frozen random tower only adds noise, so it is said."""
    if pretrained:
        return []
    return [f"warning: model part {part!r} is frozen (optim.parts.{part}.train: false) but starts from a random "
            f"initialisation: import pretrained weights (launch.py convert import-hf) and start from them with "
            f"train.init_from" for part, entry in counts.items()
            if part != "all" and entry["total"] and not entry["trainable"]]


def _check_rows_split_evenly(config: ExperimentConfig, mesh) -> None:
    """Microbatch rows are split over the mesh's batch axes (data × fsdp). Rows that do not divide
    evenly stay replicated, which one process tolerates (slower) but several processes cannot:
    each would hold rows another needs."""
    if jax.process_count() == 1:
        return
    shards = batch_shards(mesh)
    for name in ("text_rows", "image_rows", "video_rows"):
        rows = getattr(config.data, name)
        if rows % shards:
            raise ConfigError(f"data.{name}={rows} must be a multiple of the {shards} ways the mesh splits rows "
                              f"(mesh.data × mesh.fsdp) when training with {jax.process_count()} processes")


def _provenance(config: ExperimentConfig, mesh, pipeline: DataPipeline, coverage: TokenizerCoverage) -> dict:
    summary = pipeline.summary
    skips = summary.skips
    return run_record(config, mesh, {
        **data_fingerprint([s.path for s in config.data.sources],
                           {"text": summary.text_samples, "image": summary.image_samples,
                            "video": summary.video_samples, "held_out": summary.held_out_samples},
                           sha256=summary.files_sha256),
        "pipeline_sha256": summary.fingerprint, "words_per_epoch": summary.words_per_epoch,
        "ablations": ablations(config),
        "skipped": {"total": skips.total, "by_reason": dict(skips.counts), "examples": skips.examples},
        "tokenizer": coverage.as_dict(),
        # the resolved pixel settings, wherever they came from (README pitfall 12)
        "image_processing": dataclasses.asdict(pipeline.processing) if pipeline.processing else None})


def _copy_assets(config: ExperimentConfig, workdir: str, primary: bool) -> AssetsSave:
    """Copy the tokenizer (and the preprocessor config) into the work directory, where evaluation
    and export read them and every checkpoint takes its own copy from, so a moved run still works."""
    tokenizer = os.path.join(workdir, TOKENIZER_DIR)
    preprocessor = os.path.join(workdir, PREPROCESSOR_CONFIG) if config.data.image.preprocessor_config else None
    if primary:
        if not os.path.isdir(tokenizer):
            copy_tokenizer(config.data.tokenizer, tokenizer, config.model.lm.vocab_size,
                           video=config.model.video is not None)
        if preprocessor and not os.path.exists(preprocessor):
            shutil.copy(config.data.image.preprocessor_config, preprocessor)
    return AssetsSave(tokenizer=tokenizer, preprocessor_config=preprocessor)


def _write_run_files(workdir: str, config: ExperimentConfig, record: dict, manifest: dict[str, bool]) -> None:
    """run.json (provenance), config.yaml (the resolved config) and trainable.json (what trains)."""
    write_run_json(workdir, record)
    with open(os.path.join(workdir, "config.yaml"), "w", encoding="utf-8") as f:
        f.write(dump_yaml(config))
    with open(os.path.join(workdir, "trainable.json"), "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1)


def ablations(config: ExperimentConfig) -> list[str]:
    """The deliberate departures from correct training a run has switched on, by config key."""
    if config.data.text_only_images == "black":
        return [f"data.text_only_images=black: every text-only sample gets a black image and "
                f"{config.model.image_tokens} image placeholder tokens, and counts as an image sample"]
    return []


def banner(run: Run) -> str:
    """What a person reads before the first step: the data it will feed, the model, where the run starts."""
    summary = run.pipeline.summary
    counts = run.record["parameters"]
    parts = ", ".join(f"{part} {c['total']:,} ({c['trainable']:,} trained)" for part, c in counts.items()
                      if part != "all")
    videos = f", {summary.video_samples} video samples" if summary.video_samples else ""
    lines = [f"data: {summary.text_samples} text-only and {summary.image_samples} image samples{videos}"
             + (f" (+{summary.held_out_samples} held out)" if summary.held_out_samples else "")
             + f", {summary.words_per_epoch:,} words per epoch; {run.total_steps} optimizer steps (ends by "
             f"{run.end_reason})",
             f"parameters: {counts['all']['total']:,}, {counts['all']['trainable']:,} trained: {parts}"]
    lines.append(run.coverage.summary_line())
    lines += [f"ablation on: {a}" for a in ablations(run.config)]
    lines += [f"warning: {w}" for w in run.coverage.warnings()]
    if summary.skips.total:
        lines += summary.skips.summary_lines()
    lines += run.warnings
    if run.resumed_from is not None:
        lines.append(f"resuming from step {run.resumed_from} ({run.words_seen:,} words seen) in {run.workdir}")
    elif run.config.train.init_from:
        how = (f"words seen continue from its {run.words_seen:,}" if run.config.train.init_from_words == "continue"
               else "words seen restart at 0")
        lines.append(f"starting a new run in {run.workdir} from {run.config.train.init_from} ({how})")
    else:
        lines.append(f"starting a new run in {run.workdir}")
    return "\n".join(lines)


def setup(config: ExperimentConfig, workdir: Optional[str] = None, *,
          compiler_options: Optional[dict] = None) -> Run:
    """Build everything the step loop needs; `close(run)` releases it."""
    workdir = os.path.abspath(workdir or config.train.workdir)
    maybe_initialize_distributed(config.mesh)
    primary = jax.process_index() == 0
    mesh = make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
    _check_rows_split_evenly(config, mesh)
    if primary:
        print(f"# jaxllava train: workdir {workdir}\n{dump_yaml(config)}", flush=True)

    pipeline = DataPipeline.for_model(config.data, config.model, process_index=jax.process_index(),
                                      process_count=jax.process_count())
    check_vocabulary(pipeline.tokenizer, config.model.lm.vocab_size, f"data.tokenizer={config.data.tokenizer}")
    coverage = table_coverage(pipeline.tokenizer, pipeline.table)

    model = create_model(config.model, mesh, config.train.seed, compiler_options=compiler_options)
    params = nnx.split(model, nnx.Param, ...)[1]
    init_words, pretrained = 0, Checkpointer.has_checkpoint(workdir)
    if config.train.init_from and not pretrained:
        params, words = _init_from(config, params, pipeline.tokenizer)
        init_words, pretrained = (words if config.train.init_from_words == "continue" else 0), True
    total_steps, end_reason = plan_run(pipeline, config.train, words_before=init_words)
    trainer = TrainStep(model, config.optim, total_steps, mesh, seed=config.train.seed,
                        compiler_options=compiler_options)
    del model

    checkpointer = Checkpointer(workdir, config.checkpoint)
    iterator = pipeline.iterator()
    try:
        start = _start_or_resume(config, workdir, trainer, params, init_words, checkpointer, iterator)
        record = _provenance(config, mesh, pipeline, coverage)
        counts = parameter_counts(params, trainer.manifest)
        record.update(resumed_from_step=start.resumed_from, total_steps=total_steps, ends_by=end_reason,
                      parameters=counts)
        logger, assets = None, _copy_assets(config, workdir, primary)
        if primary:
            _write_run_files(workdir, config, record, trainer.manifest)
            # A new run starts a new metrics file; a resumed one keeps the rows up to its checkpoint.
            logger = MetricsLogger(workdir, tensorboard=config.logging.tensorboard,
                                   progress=config.logging.progress, total_steps=total_steps,
                                   keep_through_step=-1 if start.resumed_from is None else start.resumed_from)
        evaluator = (MinimalPairEvaluator.from_config(config.eval, pipeline.tokenizer)
                     if config.eval.tasks else None)
    except BaseException:
        checkpointer.close()
        _close_iterator(iterator)
        raise
    profiler = StepProfiler(config.logging.profile_steps, os.path.join(workdir, "profile",
                                                                       f"process_{jax.process_index()}"))
    warnings = _untrained_frozen_parts(config, counts, pretrained or start.resumed_from is not None)
    return Run(config=config, workdir=workdir, primary=primary, pipeline=pipeline, iterator=iterator,
               trainer=trainer, checkpointer=checkpointer, logger=logger, profiler=profiler, evaluator=evaluator,
               record=record, assets=assets, total_steps=total_steps, end_reason=end_reason, state=start.state,
               step=start.step, words_seen=start.words_seen, tracker=start.tracker,
               resumed_from=start.resumed_from, log_interval=start.log_interval, warnings=warnings,
               coverage=coverage)


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
