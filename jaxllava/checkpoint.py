"""Checkpoints: the one module that writes and reads them, for training, evaluation and conversion.

Layout of a work directory:
  checkpoints/<step>/state   {"params": ..., "opt_state": ..., "step", "rng"} (imports: params only)
  checkpoints/<step>/meta    JSON: step, words seen, milestones reached, accuracies, imported_from, ...
  checkpoints/<step>/data    the data iterator's JSON state, one file per JAX process
  checkpoints/<step>/run     JSON: the run's provenance record; its "config" rebuilds the model
  checkpoints/<step>/assets  the tokenizer (and preprocessor_config.json) the run trained with, so a
                             step directory is usable on its own, wherever it is moved
  milestones/chck_10M.json   {milestone, name, words_seen, step, checkpoint}, one per milestone
  milestones/chck_10M        symlink to ../checkpoints/<step>
  tokenizer/                 the tokenizer the run trains with
  diagnostics/step_<n>/      what a failed step left behind (never a checkpoint)

Every read and write goes through Orbax's `CheckpointManager` (`Checkpointer`).
Orbax writes each step into a temporary directory and renames it when complete,
so a crash mid-save leaves no step directory that a reader would pick; a step
counts as complete when it has Orbax's commit metadata and all four items
(`complete_steps`). The last `keep_last` regular checkpoints are kept, and every
milestone checkpoint forever. A step is never saved twice, so a bad state can
never replace a good checkpoint.

Restores target an abstract tree whose leaves carry the shardings wanted now
(`jax.ShapeDtypeStruct(shape, dtype, sharding=...)`), so a checkpoint written on
one mesh restores onto another. Readers of parameters alone (`load_checkpoint_params`:
evaluation, export, `train.init_from`) restore the params subtree only, never the
optimizer state, and check it against the model the stored config describes.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import os
import shutil
import sys
import tempfile
from typing import Any, Iterator, Optional, Sequence

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx

from jaxllava.errors import ConversionError, TrainingError
from jaxllava.train.config import CheckpointConfig

CHECKPOINTS_DIR = "checkpoints"
MILESTONES_DIR = "milestones"
DIAGNOSTICS_DIR = "diagnostics"
TOKENIZER_DIR = "tokenizer"
REPORT_JSON = "conversion_report.json"
STATE, META, DATA, RUN, ASSETS = "state", "meta", "data", "run", "assets"
ITEMS = (STATE, META, DATA, RUN)  # every checkpoint has these; ASSETS when the saver gave them
PREPROCESSOR_CONFIG = "preprocessor_config.json"


# ----------------------------------------------------------------------------- names


def format_words(words: int) -> str:
    """'10M', '1.5M', '1000M', '500k', '750': BabyLM counts in millions, smaller in thousands."""
    if words >= 1_000_000:
        return f"{words / 1_000_000:.3f}".rstrip("0").rstrip(".") + "M"
    if words >= 1000:
        return f"{words / 1000:.3f}".rstrip("0").rstrip(".") + "k"
    return str(words)


def milestone_name(words: int) -> str:
    """BabyLM's revision name for the checkpoint at a word milestone: `chck_10M`."""
    return f"chck_{format_words(words)}"


# ----------------------------------------------------------------------------- the model a checkpoint holds


def abstract_model(model_config) -> nnx.Module:
    """The LlavaModel of `model_config` with shapes only (no parameter is initialised)."""
    from jaxllava.model.llava import LlavaModel

    return nnx.eval_shape(lambda: LlavaModel(model_config, rngs=nnx.Rngs(0)))


def abstract_params(model_config) -> dict:
    """ShapeDtypeStructs of the model's parameters, as a pure dict."""
    return nnx.to_pure_dict(nnx.state(abstract_model(model_config), nnx.Param))


def model_from_params(model_config, params: dict) -> nnx.Module:
    """A LlavaModel holding `params` (a pure dict; no random initialisation)."""
    model = abstract_model(model_config)
    state = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(state, params)
    nnx.update(model, state)
    return model


# ----------------------------------------------------------------------------- Orbax items


class _FilesHandler(ocp.CheckpointHandler):
    """An Orbax item written as plain files: nothing to finalize, no metadata."""

    def metadata(self, directory: epath.Path):
        return None

    def finalize(self, directory: epath.Path):
        pass

    def close(self):
        pass


class ProcessJsonHandler(_FilesHandler):
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


@ocp.args.register_with_handler(ProcessJsonHandler, for_save=True)
@dataclasses.dataclass
class ProcessJsonSave(ocp.args.CheckpointArgs):
    state: dict


@ocp.args.register_with_handler(ProcessJsonHandler, for_restore=True)
@dataclasses.dataclass
class ProcessJsonRestore(ocp.args.CheckpointArgs):
    pass


class AssetsHandler(_FilesHandler):
    """Copies of the files a checkpoint needs besides arrays (tokenizer directory, preprocessor
    config), written by process 0 inside the step, so they commit (or vanish) with it."""

    def save(self, directory: epath.Path, args: "AssetsSave"):
        if jax.process_index() != 0:
            return
        if args.tokenizer:
            shutil.copytree(args.tokenizer, os.path.join(os.fspath(directory), TOKENIZER_DIR))
        if args.preprocessor_config:
            shutil.copy(args.preprocessor_config, os.path.join(os.fspath(directory), PREPROCESSOR_CONFIG))

    def restore(self, directory: epath.Path, args=None):
        return None  # read as files (read_checkpoint_config)


@ocp.args.register_with_handler(AssetsHandler, for_save=True)
@dataclasses.dataclass
class AssetsSave(ocp.args.CheckpointArgs):
    tokenizer: Optional[str] = None
    preprocessor_config: Optional[str] = None


@ocp.args.register_with_handler(AssetsHandler, for_restore=True)
@dataclasses.dataclass
class AssetsRestore(ocp.args.CheckpointArgs):
    pass


@dataclasses.dataclass
class KeepLatestAndMilestones:
    """Orbax preservation policy: the last `keep_last` regular steps plus every milestone step."""

    keep_last: int
    milestone_steps: set = dataclasses.field(default_factory=set)

    def should_preserve(self, checkpoints, *, context=None) -> list[bool]:
        regular = [c.step for c in checkpoints if c.step not in self.milestone_steps]
        recent = set(regular[-self.keep_last:])
        return [c.step in self.milestone_steps or c.step in recent for c in checkpoints]


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


def _restore_args(abstract: Any) -> Any:
    """Orbax restore arguments: each array where its ShapeDtypeStruct's sharding says, or numpy."""
    def one(leaf):
        sharding = getattr(leaf, "sharding", None)
        if sharding is None:
            return ocp.RestoreArgs(restore_type=np.ndarray)
        return ocp.ArrayRestoreArgs(sharding=sharding, global_shape=leaf.shape, dtype=leaf.dtype)

    return jax.tree.map(one, abstract)


def _json_copy(value: dict) -> dict:
    """A snapshot the caller may mutate while an async save is writing (also checks JSON-ability)."""
    try:
        return json.loads(json.dumps(value))
    except (TypeError, ValueError) as e:
        raise TypeError(f"checkpoint metadata must be JSON-serialisable: {e}") from None


def complete_steps(checkpoints_dir: str) -> list[int]:
    """Steps whose directory holds Orbax's commit metadata and every item; a save cut short,
    a hand-made directory or a non-atomic copy is not a checkpoint."""
    if not os.path.isdir(checkpoints_dir):
        return []
    steps = []
    for name in os.listdir(checkpoints_dir):
        root = os.path.join(checkpoints_dir, name)
        if name.isdigit() and os.path.exists(os.path.join(root, "_CHECKPOINT_METADATA")) and all(
                os.path.isdir(os.path.join(root, item)) for item in ITEMS):
            steps.append(int(name))
    return sorted(steps)


def read_json_item(step_dir: str, item: str) -> dict:
    """A JSON item (`meta` or `run`) of a step directory."""
    path = os.path.join(step_dir, item, "metadata")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise ConversionError(f"{path}: the checkpoint's {item} record is missing") from None
    except ValueError as e:
        raise ConversionError(f"{path}: the checkpoint's {item} record is not valid JSON ({e})") from None


# ----------------------------------------------------------------------------- the manager


@dataclasses.dataclass
class Restored:
    step: int
    state: Any  # the restored pytree, laid out like the abstract target
    meta: dict
    data_state: dict
    run: dict


class Checkpointer:
    """Saves and restores a run's checkpoints under `<workdir>/checkpoints`; all processes call it.

    `read_only`: open an existing directory for reading (never creates, deletes or cleans up,
    so it is safe beside a run that is writing). `checkpoints_dir`: the folder holding the step
    directories, when it is not `<workdir>/checkpoints` (a step directory copied elsewhere)."""

    def __init__(self, workdir: str, cfg: CheckpointConfig = CheckpointConfig(), *, read_only: bool = False,
                 checkpoints_dir: Optional[str] = None):
        self.workdir = os.path.abspath(workdir)
        self.directory = checkpoints_dir or os.path.join(self.workdir, CHECKPOINTS_DIR)
        self.milestones_dir = os.path.join(self.workdir, MILESTONES_DIR)
        self.read_only = read_only
        self._policy = KeepLatestAndMilestones(cfg.keep_last)
        options = ocp.CheckpointManagerOptions(
            enable_async_checkpointing=cfg.async_save and not read_only,
            preservation_policy=None if read_only else self._policy,
            cleanup_tmp_directories=not read_only,  # a save cut short leaves a tmp dir; never restored
            create=not read_only,
            read_only=read_only,
        )
        # PyTree items (not Standard) so that the params alone can be restored (partial restore).
        handlers = {STATE: ocp.PyTreeCheckpointHandler(save_concurrent_gb=cfg.save_concurrent_gb),
                    META: ocp.JsonCheckpointHandler(), DATA: ProcessJsonHandler(), RUN: ocp.JsonCheckpointHandler(),
                    ASSETS: AssetsHandler()}
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)
        self._pending_milestones: list[dict] = []
        if read_only:
            return
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
             milestones: Sequence[int] = (), assets: Optional[AssetsSave] = None) -> None:
        """Start saving `state` (async when configured); `milestones` are the word
        milestones this step reached (the checkpoint is then kept forever); `assets` are
        copied into the step (their sources must not change while an async save runs)."""
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
            STATE: ocp.args.PyTreeSave(unbox(state)),
            META: ocp.args.JsonSave(meta),
            DATA: ProcessJsonSave(_json_copy(data_state)),
            RUN: ocp.args.JsonSave(_json_copy(run_record)),
            **({ASSETS: assets} if assets is not None else {}),
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

    # -- reading

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def complete_steps(self) -> list[int]:
        return complete_steps(self.directory)

    def restore(self, step: int, abstract_state: Any) -> Restored:
        """Restore `step` onto `abstract_state` (ShapeDtypeStructs carrying target shardings)."""
        target = unbox(abstract_state)
        args = ocp.args.Composite(**{
            STATE: ocp.args.PyTreeRestore(item=target, restore_args=_restore_args(target)),
            META: ocp.args.JsonRestore(),
            DATA: ProcessJsonRestore(),
            RUN: ocp.args.JsonRestore(),
        })
        restored = self._manager.restore(step, args=args)
        return Restored(step=step, state=rebox(abstract_state, restored[STATE]), meta=dict(restored[META]),
                        data_state=dict(restored[DATA]), run=dict(restored[RUN]))

    def restore_latest(self, abstract_state: Any) -> Optional[Restored]:
        """The latest complete checkpoint that can be read, or None when the run has none.

        A checkpoint whose files are damaged (a truncated file, a disk error) is set aside
        as `<step>.unreadable` with a message, and the previous one is restored instead."""
        for step in reversed(self.complete_steps()):
            try:
                return self.restore(step, abstract_state)
            except TrainingError:
                raise
            except Exception as error:  # noqa: BLE001 - Orbax and TensorStore raise many types for damaged files
                self._set_aside(step, error)
        return None

    def _set_aside(self, step: int, error: Exception) -> None:
        detail = str(error).strip().splitlines()[0][:300] if str(error).strip() else type(error).__name__
        print(f"warning: checkpoint step {step} in {self.directory} cannot be read ({type(error).__name__}: "
              f"{detail}); it is moved to {step}.unreadable and the previous checkpoint is used", file=sys.stderr,
              flush=True)
        if jax.process_index() == 0:
            source = os.path.join(self.directory, str(step))
            target = f"{source}.unreadable"
            suffix = 1
            while os.path.exists(target):
                target, suffix = f"{source}.unreadable{suffix}", suffix + 1
            os.rename(source, target)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"jaxllava_set_aside_{step}")
        self._manager.reload()

    def read_params(self, step: int, target: dict) -> dict:
        """The params subtree of `step`, restored onto `target` (ShapeDtypeStructs, with or
        without shardings: without, the arrays come back as numpy)."""
        args = ocp.args.Composite(**{STATE: ocp.args.PyTreeRestore(
            item={"params": target}, restore_args={"params": _restore_args(target)}, partial_restore=True)})
        return self._manager.restore(step, args=args)[STATE]["params"]

    def stored_params_metadata(self, step: int) -> Any:
        """The tree of the stored params (shapes and dtypes), read without loading any array."""
        metadata = self._manager.item_metadata(step)[STATE]
        tree = getattr(metadata, "tree", metadata)  # a tree-metadata object, or the tree (older Orbax)
        return None if tree is None else tree.get("params")

    def latest_meta(self) -> dict:
        """The meta item of the latest complete checkpoint ({} when there is none)."""
        steps = self.complete_steps()
        return (self._read_meta(steps[-1]) or {}) if steps else {}

    @staticmethod
    def has_checkpoint(workdir: str) -> bool:
        """Whether `workdir` holds any step directory (read-only: opens no manager)."""
        directory = os.path.join(workdir, CHECKPOINTS_DIR)
        return os.path.isdir(directory) and any(name.isdigit() for name in os.listdir(directory))

    def _read_meta(self, step: int) -> Optional[dict]:
        try:
            return read_json_item(os.path.join(self.directory, str(step)), META)
        except ConversionError:
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


# ----------------------------------------------------------------------------- locating a checkpoint


@dataclasses.dataclass(frozen=True)
class CheckpointLocation:
    step_dir: str
    workdir: Optional[str]  # None for a step directory copied out of its work directory
    step: int

    @property
    def checkpoints_dir(self) -> str:
        return os.path.dirname(self.step_dir)


def resolve_checkpoint(path: str) -> CheckpointLocation:
    """Where the step to read lives: `path` is a work directory (its latest complete step), a
    step directory (named by its step number), or a milestone entry (`milestones/chck_10M`,
    the link or its `.json` record where links are unavailable)."""
    if not os.path.exists(path):
        record_path = path + ".json"
        if not os.path.exists(record_path):
            raise ConversionError(f"{path}: no such checkpoint (expected a work directory, a step directory "
                                  f"or a milestones/ entry)")
        with open(record_path, encoding="utf-8") as f:
            record = json.load(f)
        workdir = os.path.dirname(os.path.dirname(os.path.abspath(path)))
        return resolve_checkpoint(os.path.join(workdir, record["checkpoint"]))
    real = os.path.realpath(path)
    if os.path.isdir(os.path.join(real, STATE)):
        name = os.path.basename(real)
        parent = os.path.dirname(real)
        if not name.isdigit() or int(name) not in complete_steps(parent):
            raise ConversionError(f"{path}: not a complete step directory (an interrupted save, or a directory "
                                  f"not named by its step number): it needs _CHECKPOINT_METADATA and the items "
                                  f"{', '.join(ITEMS)}")
        workdir = os.path.dirname(parent) if os.path.basename(parent) == CHECKPOINTS_DIR else None
        return CheckpointLocation(real, workdir, int(name))
    steps = complete_steps(os.path.join(real, CHECKPOINTS_DIR))
    if steps:
        return CheckpointLocation(os.path.join(real, CHECKPOINTS_DIR, str(steps[-1])), real, steps[-1])
    if os.path.isdir(os.path.join(real, CHECKPOINTS_DIR)):
        raise ConversionError(f"{path}: work directory holds no complete checkpoint under {CHECKPOINTS_DIR}/")
    raise ConversionError(f"{path}: not a jaxllava checkpoint (no {CHECKPOINTS_DIR}/ and no {STATE}/ item)")


def read_meta(path: str) -> dict:
    """The `meta` item (step, words seen, imported_from, ...) of the step `path` resolves to."""
    return read_json_item(resolve_checkpoint(path).step_dir, META)


def read_checkpoint_config(path: str):
    """(ExperimentConfig, run record, location) of the step `path` resolves to. The config's
    `data.tokenizer` (and `data.image.preprocessor_config`) point at the checkpoint's own copies
    (`assets/`), else at the work directory's `tokenizer/`."""
    from jaxllava.config import build_config

    location = resolve_checkpoint(path)
    record = read_json_item(location.step_dir, RUN)
    if "config" not in record:
        raise ConversionError(f"{location.step_dir}: the run record has no 'config'; the model cannot be rebuilt")
    config = build_config(record["config"])
    # The copies inside the checkpoint first: the paths in the config are where the files were
    # when training started, relative to a machine and a working directory that may be gone.
    assets = os.path.join(location.step_dir, ASSETS)
    candidates = [os.path.join(assets, TOKENIZER_DIR)]
    if location.workdir:
        candidates.append(os.path.join(location.workdir, TOKENIZER_DIR))
    tokenizer = next((path for path in candidates if os.path.isdir(path)), None)
    if tokenizer is not None:
        config = dataclasses.replace(config, data=dataclasses.replace(config.data, tokenizer=tokenizer))
    preprocessor = os.path.join(assets, PREPROCESSOR_CONFIG)
    if config.data.image.preprocessor_config and os.path.isfile(preprocessor):
        image = dataclasses.replace(config.data.image, preprocessor_config=preprocessor)
        config = dataclasses.replace(config, data=dataclasses.replace(config.data, image=image))
    return config, record, location


def _flat(tree: Any) -> dict[str, Any]:
    """'/'-joined string paths → leaves (Orbax metadata has string keys where the model has ints)."""
    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: hasattr(x, "shape"))[0]
    return {"/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path): leaf for path, leaf in leaves}


def _check_stored_params(where: str, stored_tree: Any, expected: dict) -> None:
    if stored_tree is None:
        raise ConversionError(f"{where}: the state item has no 'params'")
    stored, wanted = _flat(stored_tree), _flat(expected)
    missing = sorted(set(wanted) - set(stored))
    unexpected = sorted(set(stored) - set(wanted))
    if missing or unexpected:
        raise ConversionError(f"{where}: params do not match the model its config describes: "
                              f"missing {missing[:8]}{' ...' if len(missing) > 8 else ''}, "
                              f"unexpected {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
    for name, want in wanted.items():
        if tuple(stored[name].shape) != tuple(want.shape):
            raise ConversionError(f"{where}: parameter {name!r} has shape {tuple(stored[name].shape)} in the "
                                  f"checkpoint, the config's model expects {tuple(want.shape)}")


def load_checkpoint_params(path: str, *, shardings: Any = None):
    """(ExperimentConfig, params pure dict, run record) of the step `path` resolves to.

    Params come back as numpy arrays, or as jax Arrays placed with `shardings` (a tree
    of `jax.sharding.Sharding` matching the params). The stored tree is checked against
    the model the stored config describes: a missing, extra or mis-shaped parameter is a
    ConversionError naming it.
    """
    config, record, location = read_checkpoint_config(path)
    target = abstract_params(config.model)
    if shardings is not None:
        target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), target, shardings)
    checkpointer = Checkpointer(location.workdir or location.checkpoints_dir, read_only=True,
                                checkpoints_dir=location.checkpoints_dir)
    try:
        stored = checkpointer.stored_params_metadata(location.step)
        _check_stored_params(os.path.join(location.step_dir, STATE), stored, target)
        params = checkpointer.read_params(location.step, target)
    finally:
        checkpointer.close()
    return config, params, record


# ----------------------------------------------------------------------------- writing outside training


def ensure_new_output(out: str) -> None:
    """Refuse an existing output path (checked first, before any work, and again when writing)."""
    if os.path.lexists(out):
        raise ConversionError(f"{os.path.abspath(out)}: output already exists; refusing to overwrite it")


@contextlib.contextmanager
def atomic_output_dir(out: str) -> Iterator[str]:
    """Yield a fresh temporary sibling of `out`; rename it to `out` when the block succeeds,
    delete it when the block raises. `out` must not exist (nothing is ever overwritten)."""
    out = os.path.abspath(out)
    ensure_new_output(out)
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.partial-", dir=parent)
    try:
        yield tmp
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_params_checkpoint(workdir: str, config, params: dict, tokenizer_dir: str, meta: dict, *,
                            report: Optional[dict] = None) -> str:
    """Write `params` as step 0 of a new work directory `workdir` (atomically); returns its path.

    `config`: the ExperimentConfig the params belong to; it is stored with `data.tokenizer`
    and `train.workdir` pointing into the new directory. `tokenizer_dir` is copied to
    `<workdir>/tokenizer/` (image placeholders added as in training when missing); it must
    not have more tokens than `model.lm.vocab_size`. `meta`: JSON-able facts about the import
    (e.g. {"imported_from": ...}). `report`: written as conversion_report.json.

    `<workdir>/config.yaml` is a ready starting point, usable as `base:`: the model as imported
    (with every value the checkpoint replaced), the tokenizer copy, and `train.init_from` naming
    this directory.
    """
    from jaxllava.config import dump_yaml
    from jaxllava.data.tokenizer import copy_tokenizer
    from jaxllava.provenance import run_record, write_run_json

    workdir = os.path.abspath(workdir)
    data = dataclasses.replace(config.data, tokenizer=os.path.join(workdir, TOKENIZER_DIR))
    starting_point = dataclasses.replace(config, data=data,
                                         train=dataclasses.replace(config.train, init_from=workdir))
    config = dataclasses.replace(config, data=data, train=dataclasses.replace(config.train, workdir=workdir))
    with atomic_output_dir(workdir) as tmp:
        copy_tokenizer(tokenizer_dir, os.path.join(tmp, TOKENIZER_DIR), config.model.lm.vocab_size)
        record = run_record(config)
        record["conversion"] = meta
        # One GB in flight: an imported model is saved with about one extra copy at most.
        checkpointer = Checkpointer(tmp, CheckpointConfig(async_save=False, save_concurrent_gb=1))
        checkpointer.save(0, {"params": params}, meta=meta, data_state={}, run_record=record,
                          assets=AssetsSave(tokenizer=os.path.join(tmp, TOKENIZER_DIR)))
        checkpointer.close()
        write_run_json(tmp, record)
        with open(os.path.join(tmp, "config.yaml"), "w", encoding="utf-8") as f:
            f.write("# Written by jaxllava's import: use it as `base:` to train from these parameters.\n")
            f.write(dump_yaml(starting_point))
        if report is not None:
            with open(os.path.join(tmp, REPORT_JSON), "w", encoding="utf-8") as f:
                json.dump(report, f, indent=2)
                f.write("\n")
    return workdir
