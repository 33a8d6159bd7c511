"""Reading and writing model parameters in jaxllava checkpoints: the one entry point for every consumer.

A jaxllava checkpoint is a work directory written by `train.checkpoint.Checkpointer`:
`checkpoints/<step>/{state,meta,data,run}`. The `state` item holds
`{"params": <pure dict of the LlavaModel's nnx.Param state>, ...}` (training adds
optimizer state and an RNG key); the `run` item is the provenance record whose
`"config"` key is the resolved `ExperimentConfig`, so the model is rebuilt from
the checkpoint alone. The tokenizer lives in `<workdir>/tokenizer/`.

`load_checkpoint_params` (eval, export, train init) accepts a work directory (its
latest complete step), a step directory, or a milestone entry
(`milestones/chck_10M` link, or its `.json` record where links are unavailable).
It reads only the params, never the optimizer state.

`write_params_checkpoint` writes an imported model (step 0, params only) into a
temporary sibling directory and renames it to the target when complete, so an
interrupted conversion never leaves a half-written checkpoint behind.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import tempfile
from typing import Any, Iterator, Optional

import jax
import numpy as np
from flax import nnx

from jaxllava.errors import ConversionError

TOKENIZER_DIR = "tokenizer"
REPORT_JSON = "conversion_report.json"
_CHECKPOINTS, _MILESTONES, _STATE, _RUN = "checkpoints", "milestones", "state", "run"
_ITEMS = ("state", "meta", "data", "run")


# ----------------------------------------------------------------------------- atomic output


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


# ----------------------------------------------------------------------------- locating


@dataclasses.dataclass(frozen=True)
class CheckpointLocation:
    step_dir: str
    workdir: Optional[str]  # None for a step directory copied out of its work directory
    step: int


def _is_complete_step(step_dir: str) -> bool:
    # The rule of Checkpointer.complete_steps, without opening a manager (which would
    # create directories and clean up a concurrent run's in-flight saves).
    return os.path.exists(os.path.join(step_dir, "_CHECKPOINT_METADATA")) and all(
        os.path.isdir(os.path.join(step_dir, item)) for item in _ITEMS)


def _step_of(step_dir: str) -> int:
    name = os.path.basename(step_dir.rstrip(os.sep))
    return int(name) if name.isdigit() else -1


def resolve_checkpoint(path: str) -> CheckpointLocation:
    """Where the step to read lives, for a work directory, a step directory or a milestone entry."""
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
    if os.path.isdir(os.path.join(real, _STATE)):
        if not _is_complete_step(real):
            raise ConversionError(f"{path}: step directory is incomplete (an interrupted save?): it needs "
                                  f"_CHECKPOINT_METADATA and the items {', '.join(_ITEMS)}")
        parent = os.path.dirname(real)
        workdir = os.path.dirname(parent) if os.path.basename(parent) == _CHECKPOINTS else None
        return CheckpointLocation(real, workdir, _step_of(real))
    checkpoints = os.path.join(real, _CHECKPOINTS)
    if os.path.isdir(checkpoints):
        steps = sorted(int(name) for name in os.listdir(checkpoints)
                       if name.isdigit() and _is_complete_step(os.path.join(checkpoints, name)))
        if not steps:
            raise ConversionError(f"{path}: work directory holds no complete checkpoint under {_CHECKPOINTS}/")
        return CheckpointLocation(os.path.join(checkpoints, str(steps[-1])), real, steps[-1])
    raise ConversionError(f"{path}: not a jaxllava checkpoint (no {_CHECKPOINTS}/ and no {_STATE}/ item)")


# ----------------------------------------------------------------------------- reading


def abstract_params(model_config) -> dict:
    """ShapeDtypeStructs of the LlavaModel's parameters (pure dict), without initialising them."""
    from jaxllava.model.llava import LlavaModel

    model = nnx.eval_shape(lambda: LlavaModel(model_config, rngs=nnx.Rngs(0)))
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def _flat(tree: Any) -> dict[str, Any]:
    """'/'-joined string paths → leaves (Orbax metadata has string keys where the model has ints)."""
    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: hasattr(x, "shape"))[0]
    return {"/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path): leaf for path, leaf in leaves}


def _check_stored_params(state_dir: str, expected: dict) -> None:
    """Check the stored params against the model the config describes (one on-disk layout:
    training and imports both store plain arrays, see train/checkpoint.py `unbox`)."""
    import orbax.checkpoint as ocp
    from etils import epath

    metadata = ocp.PyTreeCheckpointHandler().metadata(epath.Path(state_dir))
    stored_tree = getattr(metadata, "tree", metadata)  # a tree-metadata object, or the tree (older Orbax)
    if "params" not in stored_tree:
        raise ConversionError(f"{state_dir}: the state item has no 'params' (keys: {sorted(stored_tree)})")
    stored, wanted = _flat(stored_tree["params"]), _flat(expected)
    missing = sorted(set(wanted) - set(stored))
    unexpected = sorted(set(stored) - set(wanted))
    if missing or unexpected:
        raise ConversionError(f"{state_dir}: params do not match the model its config describes: "
                              f"missing {missing[:8]}{' ...' if len(missing) > 8 else ''}, "
                              f"unexpected {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
    for name, want in wanted.items():
        if tuple(stored[name].shape) != tuple(want.shape):
            raise ConversionError(f"{state_dir}: parameter {name!r} has shape {tuple(stored[name].shape)} in the "
                                  f"checkpoint, the config's model expects {tuple(want.shape)}")


def read_run_record(step_dir: str) -> dict:
    path = os.path.join(step_dir, _RUN, "metadata")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise ConversionError(f"{path}: the checkpoint's run record is missing") from None


def read_meta(path: str) -> dict:
    """The `meta` item (step, words seen, imported_from, ...) of the step `path` resolves to."""
    location = resolve_checkpoint(path)
    with open(os.path.join(location.step_dir, "meta", "metadata"), encoding="utf-8") as f:
        return json.load(f)


def load_checkpoint_params(path: str, *, shardings: Any = None):
    """(ExperimentConfig, params pure dict, run record) of a jaxllava checkpoint.

    `path`: a work directory (latest complete step), a step directory, or a
    milestone entry. Params come back as numpy arrays, or as jax Arrays placed
    with `shardings` (a tree of `jax.sharding.Sharding` matching the params).
    The stored parameter tree is checked against the model the stored config
    describes: a missing, extra or mis-shaped parameter is a ConversionError.
    When the work directory holds `tokenizer/`, `config.data.tokenizer` points there.
    """
    import orbax.checkpoint as ocp

    from jaxllava.config import build_config

    location = resolve_checkpoint(path)
    record = read_run_record(location.step_dir)
    if "config" not in record:
        raise ConversionError(f"{location.step_dir}: the run record has no 'config'; the model cannot be rebuilt")
    config = build_config(record["config"])
    tokenizer = os.path.join(location.workdir or "", TOKENIZER_DIR)
    if location.workdir and os.path.isdir(tokenizer):
        config = dataclasses.replace(config, data=dataclasses.replace(config.data, tokenizer=tokenizer))
    target = abstract_params(config.model)
    state_dir = os.path.join(location.step_dir, _STATE)
    _check_stored_params(state_dir, target)
    if shardings is None:
        restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), target)
    else:
        restore_args = jax.tree.map(lambda x, s: ocp.ArrayRestoreArgs(sharding=s, global_shape=x.shape),
                                    target, shardings)
    restored = ocp.PyTreeCheckpointer().restore(
        state_dir, args=ocp.args.PyTreeRestore(item={"params": target}, restore_args={"params": restore_args},
                                               partial_restore=True))["params"]
    return config, restored, record


def model_from_params(model_config, params: dict):
    """A LlavaModel holding `params` (no random initialisation)."""
    from jaxllava.model.llava import LlavaModel

    model = nnx.eval_shape(lambda: LlavaModel(model_config, rngs=nnx.Rngs(0)))
    state = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(state, params)
    nnx.update(model, state)
    return model


# ----------------------------------------------------------------------------- writing


# Files a transformers tokenizer directory may hold (copied verbatim when nothing is added).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "vocab.json", "merges.txt", "vocab.txt", "spiece.model",
                   "chat_template.jinja")
# tokenizer_config.json keys written by transformers 5 that transformers 4.x (the BabyLM
# pipeline pins 4.51.3) cannot read, or passes on as stray constructor arguments.
_V5_ONLY_KEYS = ("backend", "is_local", "local_files_only")


def copy_tokenizer(source: str, directory: str, vocab_size: int, *, portable: bool = False) -> int:
    """Put the tokenizer of `source` into `directory`; returns its size.

    When `source` already has the image placeholders, its files are copied verbatim
    (a slow SentencePiece model survives); otherwise the placeholders are added as in
    training (`load_tokenizer`) and the tokenizer is saved. A tokenizer with more
    tokens than `vocab_size` is a ConversionError. `portable`: rewrite the
    transformers-5-only fields of tokenizer_config.json so transformers 4.x loads it.
    """
    from transformers import AutoTokenizer

    from jaxllava.data.samples import PLACEHOLDER_TOKENS, load_tokenizer

    tokenizer = load_tokenizer(source)
    if len(tokenizer) > vocab_size:
        raise ConversionError(f"{source}: the tokenizer has {len(tokenizer)} tokens but the model's vocab_size is "
                              f"{vocab_size} (vocabulary sizes disagree: ids from {vocab_size} on would have no "
                              f"embedding row)")
    os.makedirs(directory, exist_ok=True)
    original = AutoTokenizer.from_pretrained(source, local_files_only=True)
    if all(token in original.get_vocab() for token in PLACEHOLDER_TOKENS):
        for name in TOKENIZER_FILES:
            if os.path.exists(os.path.join(source, name)):
                shutil.copy(os.path.join(source, name), directory)
    else:
        tokenizer.save_pretrained(directory)
    if portable:
        _make_tokenizer_config_portable(os.path.join(directory, "tokenizer_config.json"))
    return len(tokenizer)


def _make_tokenizer_config_portable(path: str) -> None:
    if not os.path.exists(path):
        return
    with open(path, encoding="utf-8") as f:
        config = json.load(f)
    if config.get("tokenizer_class") == "TokenizersBackend":  # transformers 5's generic fast tokenizer
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
    extra = config.get("extra_special_tokens")
    if isinstance(extra, list):  # 5.x writes a list; 4.x knows additional_special_tokens (4.x's own key is a dict)
        config["additional_special_tokens"] = list(dict.fromkeys(config.get("additional_special_tokens", []) + extra))
        del config["extra_special_tokens"]
    for key in _V5_ONLY_KEYS:
        config.pop(key, None)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)


def write_params_checkpoint(workdir: str, config, params: dict, tokenizer_dir, meta: dict, *,
                            report: Optional[dict] = None) -> str:
    """Write `params` as step 0 of a new work directory `workdir` (atomically); returns its path.

    `config`: the ExperimentConfig the params belong to; it is stored with
    `data.tokenizer` and `train.workdir` pointing into the new directory.
    `tokenizer_dir`: a tokenizer directory, copied to `<workdir>/tokenizer/`
    (`copy_tokenizer`: image placeholders added as in training when missing); it
    must not have more tokens than `model.lm.vocab_size`. `meta`: JSON-able facts about the
    import (e.g. {"imported_from": ...}). `report`: written as conversion_report.json.
    """
    from jaxllava.train.checkpoint import Checkpointer
    from jaxllava.train.config import CheckpointConfig
    from jaxllava.train.provenance import run_record, write_run_json

    workdir = os.path.abspath(workdir)
    config = dataclasses.replace(
        config, data=dataclasses.replace(config.data, tokenizer=os.path.join(workdir, TOKENIZER_DIR)),
        train=dataclasses.replace(config.train, workdir=workdir))
    with atomic_output_dir(workdir) as tmp:
        copy_tokenizer(tokenizer_dir, os.path.join(tmp, TOKENIZER_DIR), config.model.lm.vocab_size)
        record = run_record(config)
        record["conversion"] = meta
        # One GB in flight: an imported model is saved with about one extra copy at most.
        checkpointer = Checkpointer(tmp, CheckpointConfig(async_save=False, save_concurrent_gb=1))
        checkpointer.save(0, {"params": params}, meta=meta, data_state={}, run_record=record)
        checkpointer.close()
        write_run_json(tmp, record)
        if report is not None:
            with open(os.path.join(tmp, REPORT_JSON), "w", encoding="utf-8") as f:
                json.dump(report, f, indent=2)
                f.write("\n")
    return workdir
