"""Orbax checkpoints of a run: train state, metadata, data-iterator state and provenance.

Layout of a work directory:
  checkpoints/<step>/state   params, optimizer state, RNG key (any pytree of arrays)
  checkpoints/<step>/meta    JSON: step, words seen, milestones done, ... (from the loop)
  checkpoints/<step>/data    the data iterator's JSON state, one file per JAX process
  checkpoints/<step>/run     JSON: the run's provenance record (run.json)
  milestones/chck_10M.json   {milestone, name, words_seen, step, checkpoint}, one per milestone
  milestones/chck_10M        symlink to ../checkpoints/<step>
  diagnostics/step_<n>/      what a failed step left behind (never a checkpoint)

Orbax writes each step into a temporary directory and renames it when complete,
so a crash mid-save leaves no step directory that `restore_latest` would pick.
The last `keep_last` regular checkpoints are kept, and every milestone
checkpoint is kept forever. A step is never saved twice: an existing step is an
error, so a bad state can never replace a good checkpoint.

Restore always targets an abstract state whose leaves carry the shardings wanted
now (`jax.ShapeDtypeStruct(shape, dtype, sharding=...)`), so a checkpoint written
on one mesh restores onto another (JAX_NOTES.md, Orbax pitfalls: orbax#648, #1110).
"""
from __future__ import annotations

import copy
import dataclasses
import json
import os
from typing import Any, Optional, Sequence

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx

from jaxllava.errors import TrainingError
from jaxllava.train.config import CheckpointConfig
from jaxllava.train.milestones import milestone_name

CHECKPOINTS_DIR = "checkpoints"
MILESTONES_DIR = "milestones"
DIAGNOSTICS_DIR = "diagnostics"
STATE, META, DATA, RUN = "state", "meta", "data", "run"


# ----------------------------------------------------------------------------- per-process JSON item


class ProcessJsonHandler(ocp.CheckpointHandler):
    """One JSON file per JAX process: each process's data iterator reads its own share."""

    def save(self, directory: epath.Path, args: "ProcessJsonSave"):
        index, count = jax.process_index(), jax.process_count()
        (directory / f"process_{index}-of-{count}.json").write_text(json.dumps(args.state))

    def restore(self, directory: epath.Path, args: "ProcessJsonRestore" = None) -> dict:
        index, count = jax.process_index(), jax.process_count()
        path = directory / f"process_{index}-of-{count}.json"
        if not path.exists():
            saved = sorted(p.name for p in directory.iterdir())
            raise TrainingError(f"{directory}: no data-iterator state for process {index} of {count} "
                                f"(the checkpoint holds {saved}); resume with the process count it was saved with")
        return json.loads(path.read_text())

    def metadata(self, directory: epath.Path):
        return None

    def finalize(self, directory: epath.Path):
        pass

    def close(self):
        pass


@ocp.args.register_with_handler(ProcessJsonHandler, for_save=True)
@dataclasses.dataclass
class ProcessJsonSave(ocp.args.CheckpointArgs):
    state: dict


@ocp.args.register_with_handler(ProcessJsonHandler, for_restore=True)
@dataclasses.dataclass
class ProcessJsonRestore(ocp.args.CheckpointArgs):
    pass


# ----------------------------------------------------------------------------- retention


@dataclasses.dataclass
class KeepLatestAndMilestones:
    """Orbax preservation policy: the last `keep_last` regular steps plus every milestone step."""

    keep_last: int
    milestone_steps: set = dataclasses.field(default_factory=set)

    def should_preserve(self, checkpoints, *, context=None) -> list[bool]:
        regular = [c.step for c in checkpoints if c.step not in self.milestone_steps]
        recent = set(regular[-self.keep_last:])
        return [c.step in self.milestone_steps or c.step in recent for c in checkpoints]


# ----------------------------------------------------------------------------- one on-disk layout


def _is_variable(x) -> bool:
    return isinstance(x, nnx.Variable)


def unbox(tree: Any) -> Any:
    """nnx Variables → their arrays, so a checkpoint stores `params/lm/norm/scale`, never a
    `.../value` level: one on-disk layout for training and imported checkpoints alike."""
    return jax.tree.map(lambda x: x.get_value() if _is_variable(x) else x, tree, is_leaf=_is_variable)


def rebox(template: Any, arrays: Any) -> Any:
    """Put restored arrays back into the Variables of `template` (the abstract train state)."""
    return jax.tree.map(lambda x, value: x.replace(value) if _is_variable(x) else value, template, arrays,
                        is_leaf=_is_variable)


# ----------------------------------------------------------------------------- manager


@dataclasses.dataclass
class Restored:
    step: int
    state: Any  # the restored pytree, laid out like the abstract target
    meta: dict
    data_state: dict
    run: dict


def _json_copy(value: dict) -> dict:
    """A snapshot the caller may mutate while an async save is writing (also checks JSON-ability)."""
    try:
        return json.loads(json.dumps(value))
    except (TypeError, ValueError) as e:
        raise TypeError(f"checkpoint metadata must be JSON-serialisable: {e}") from None


class Checkpointer:
    """Saves and restores a run's checkpoints under `<workdir>/checkpoints`; all processes call it."""

    def __init__(self, workdir: str, cfg: CheckpointConfig = CheckpointConfig()):
        self.workdir = os.path.abspath(workdir)
        self.directory = os.path.join(self.workdir, CHECKPOINTS_DIR)
        self.milestones_dir = os.path.join(self.workdir, MILESTONES_DIR)
        self._policy = KeepLatestAndMilestones(cfg.keep_last)
        options = ocp.CheckpointManagerOptions(
            enable_async_checkpointing=cfg.async_save,
            preservation_policy=self._policy,
            cleanup_tmp_directories=True,  # a save cut short leaves a tmp dir; never restored
            create=True,
        )
        handlers = {STATE: ocp.StandardCheckpointHandler(save_concurrent_gb=cfg.save_concurrent_gb),
                    META: ocp.JsonCheckpointHandler(), DATA: ProcessJsonHandler(), RUN: ocp.JsonCheckpointHandler()}
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)
        self._pending_milestones: list[dict] = []
        # Milestone steps come from the checkpoints' own metadata, so retention and
        # the milestones/ index survive a crash between a save and its index entry.
        for step in self._manager.all_steps():
            meta = self._read_meta(step)
            if meta and meta.get("milestones"):
                self._policy.milestone_steps.add(step)
                self._pending_milestones.extend(self._milestone_records(step, meta))
        self._write_milestone_index()

    # -- saving

    def save(self, step: int, state: Any, *, meta: dict, data_state: dict, run_record: dict,
             milestones: Sequence[int] = ()) -> None:
        """Start saving `state` (async when configured); `milestones` are the word
        milestones this step reached (the checkpoint is then kept forever)."""
        self._manager.wait_until_finished()
        self._write_milestone_index()
        if step in self._manager.all_steps():
            raise TrainingError(f"{self.directory}: a checkpoint for step {step} already exists; "
                                "refusing to overwrite it")
        meta = _json_copy({**meta, "step": int(step), "milestones": [int(m) for m in milestones]})
        if milestones:
            self._policy.milestone_steps.add(step)
            self._pending_milestones.extend(self._milestone_records(step, meta))
        args = ocp.args.Composite(**{
            STATE: ocp.args.StandardSave(unbox(state)),
            META: ocp.args.JsonSave(meta),
            DATA: ProcessJsonSave(_json_copy(data_state)),
            RUN: ocp.args.JsonSave(_json_copy(run_record)),
        })
        self._manager.save(step, args=args, force=True)

    def _milestone_records(self, step: int, meta: dict) -> list[dict]:
        return [{"milestone": m, "name": milestone_name(m), "words_seen": meta.get("words_seen"),
                 "step": step, "checkpoint": os.path.join(CHECKPOINTS_DIR, str(step))}
                for m in meta["milestones"]]

    def _write_milestone_index(self) -> None:
        """Write index entries of milestone checkpoints that are complete on disk."""
        if not self._pending_milestones:
            return
        complete = set(self._manager.all_steps())
        waiting = []
        for record in self._pending_milestones:
            if record["step"] not in complete:
                waiting.append(record)
                continue
            if jax.process_index() == 0:
                _write_milestone_files(self.milestones_dir, record)
        self._pending_milestones = waiting

    def wait(self) -> None:
        """Block until the async save in flight is on disk."""
        self._manager.wait_until_finished()
        self._write_milestone_index()

    def close(self) -> None:
        self.wait()
        self._manager.close()

    # -- restoring

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def restore(self, step: int, abstract_state: Any) -> Restored:
        """Restore `step` onto `abstract_state` (ShapeDtypeStructs carrying target shardings)."""
        args = ocp.args.Composite(**{
            STATE: ocp.args.StandardRestore(unbox(abstract_state)),
            META: ocp.args.JsonRestore(),
            DATA: ProcessJsonRestore(),
            RUN: ocp.args.JsonRestore(),
        })
        restored = self._manager.restore(step, args=args)
        return Restored(step=step, state=rebox(abstract_state, restored[STATE]), meta=dict(restored[META]),
                        data_state=dict(restored[DATA]), run=dict(restored[RUN]))

    def complete_steps(self) -> list[int]:
        """Steps whose directory holds Orbax's commit metadata and every item (a directory
        someone made by hand, or one from a non-atomic copy, is not a checkpoint)."""
        def complete(step: int) -> bool:
            root = os.path.join(self.directory, str(step))
            return os.path.exists(os.path.join(root, "_CHECKPOINT_METADATA")) and all(
                os.path.isdir(os.path.join(root, item)) for item in (STATE, META, DATA, RUN))

        return [step for step in self.all_steps() if complete(step)]

    @staticmethod
    def has_checkpoint(workdir: str) -> bool:
        """Whether `workdir` holds any step directory (read-only: opens no manager)."""
        directory = os.path.join(workdir, CHECKPOINTS_DIR)
        return os.path.isdir(directory) and any(name.isdigit() for name in os.listdir(directory))

    def latest_meta(self) -> dict:
        """The meta item of the latest complete checkpoint ({} when there is none)."""
        steps = self.complete_steps()
        return (self._read_meta(steps[-1]) or {}) if steps else {}

    def restore_latest(self, abstract_state: Any) -> Optional[Restored]:
        """The latest complete checkpoint, or None when the run has none."""
        steps = self.complete_steps()
        return self.restore(steps[-1], abstract_state) if steps else None

    def _read_meta(self, step: int) -> Optional[dict]:
        path = os.path.join(self.directory, str(step), META, "metadata")
        try:
            with open(path, encoding="utf-8") as f:
                return json.load(f)
        except (OSError, ValueError):
            return None


def _write_milestone_files(milestones_dir: str, record: dict) -> None:
    os.makedirs(milestones_dir, exist_ok=True)
    path = os.path.join(milestones_dir, record["name"] + ".json")
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(record, f, indent=2)
    os.replace(path + ".tmp", path)
    link = os.path.join(milestones_dir, record["name"])
    target = os.path.join(os.pardir, record["checkpoint"])
    if os.path.islink(link) and os.readlink(link) == target:
        return
    try:
        if os.path.lexists(link):
            os.remove(link)
        os.symlink(target, link)
    except OSError:
        pass  # filesystems without symlinks: the .json entry is the index


def abstract_like(tree: Any, shardings: Any = None) -> Any:
    """ShapeDtypeStructs of `tree`'s arrays, with `shardings` (a matching tree) or each array's own."""
    if shardings is None:
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def write_diagnostics(workdir: str, step: int, info: dict, arrays: Optional[dict[str, np.ndarray]] = None) -> str:
    """Save what a failed step saw (message, metrics, the offending batch) outside the checkpoints.
    With several processes each writes its own rows under `process_<i>`."""
    directory = os.path.join(workdir, DIAGNOSTICS_DIR, f"step_{step}")
    if jax.process_count() > 1:
        directory = os.path.join(directory, f"process_{jax.process_index()}")
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "info.json"), "w", encoding="utf-8") as f:
        json.dump(copy.deepcopy(info), f, indent=2, default=str)
    if arrays:
        np.savez_compressed(os.path.join(directory, "arrays.npz"), **arrays)
    return directory

