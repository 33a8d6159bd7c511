"""transformers checkpoints in and out: `convert import-hf` and `convert export-hf --what lm`.

Import streams tensor by tensor: the model is built abstract (shapes only,
`nnx.eval_shape`), each checkpoint tensor is read, checked (floating dtype,
shape) and placed into its parameter, so peak host memory stays near one copy
of the model (figures: benchmarks/convert_memory.py). Only the parts no
checkpoint provides (the projector, a resampler with weights) get a fresh
random initialisation, from `train.seed`, and the report says so.

Vocabulary growth: when the tokenizer (with the image placeholders `<im_start>`,
`<im_patch>`, `<im_end>` added as in training) has more tokens than the LM's
embedding, the new input AND output rows are set to the mean of the existing
rows, as the reference's stage 1 did (`initialize_embedings`,
docs/reference.md#special-tokens-and-vocabulary-growth).
Only tokens the tokenizer lists as added may grow the vocabulary; a base
vocabulary larger than the embedding means the tokenizer belongs to another model.

Every checkpoint tensor ends up mapped, or unused for a stated reason (RoPE
buffers, DINOv2's pre-training mask token, ...); anything else is an error.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Iterable, Optional

import jax
import ml_dtypes
import numpy as np
from flax import nnx

from jaxllava.checkpoint import (abstract_model, atomic_output_dir, ensure_new_output, load_checkpoint_params,
                                 model_from_params, write_params_checkpoint)
from jaxllava.data.tokenizer import copy_tokenizer
from jaxllava.errors import ConversionError
from jaxllava.convert.checkpoint_files import CheckpointTensors, read_config, save_sharded_safetensors
from jaxllava.convert.hf_configs import llama_config_from_hf, llama_config_to_hf, vision_config_from_hf
from jaxllava.convert.weights import hf_tensors, load_hf_llama_weights, load_hf_vision_weights

EMBED, LM_HEAD = "model.embed_tokens.weight", "lm_head.weight"
FLOAT_DTYPES = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64), np.dtype(ml_dtypes.bfloat16))

# Checkpoint tensors that are no model parameter, and why (regex on the name → reason).
KNOWN_UNUSED = (
    (r"(^|\.)rotary_emb\.inv_freq$", "RoPE buffer of older transformers checkpoints; recomputed from rope_theta"),
    (r"(^|\.)embeddings\.mask_token$", "DINOv2 pre-training mask token; never used for features"),
    (r"^(vision_model\.)?head\.", "SigLIP attention-pooling head; LLaVA-style features never read it"),
    (r"^text_model\.", "text tower of a two-tower CLIP/SigLIP checkpoint"),
    (r"^(text|visual)_projection\.", "projection head of a two-tower checkpoint; features are read before it"),
    (r"^logit_(scale|bias)$", "contrastive temperature/bias of a two-tower checkpoint"),
    (r"(^|\.)embeddings\.position_ids$", "position-id buffer of older CLIP/SigLIP checkpoints; recomputed"),
)


class ImportSource:
    """A CheckpointTensors seen by the loaders: dtype-checked, records what was read, and
    optionally grows vocabulary rows (mean of the existing rows) of the named tensors."""

    def __init__(self, tensors: CheckpointTensors, *, grow_rows: Optional[dict[str, tuple[int, int]]] = None):
        self.tensors = tensors
        self.directory = tensors.directory
        self.grow_rows = grow_rows or {}  # name → (rows in the checkpoint, rows wanted)
        self.read: dict[str, dict] = {}

    def keys(self):
        return self.tensors.keys()

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def __getitem__(self, name: str) -> np.ndarray:
        array = self.tensors[name]
        if array.dtype not in FLOAT_DTYPES:
            raise ConversionError(f"{self.directory}: tensor {name!r} (shape {tuple(array.shape)}) has dtype "
                                  f"{array.dtype}; a weight must be float16, bfloat16, float32 or float64")
        self.read[name] = {"shape": list(array.shape), "dtype": str(array.dtype)}
        if name in self.grow_rows and array.shape[0] == self.grow_rows[name][0]:
            array = grow_rows_with_mean(array, self.grow_rows[name][1])
        return array


def grow_rows_with_mean(array: np.ndarray, rows: int) -> np.ndarray:
    """(V, D) → (rows, D): new rows = mean of the existing ones (computed in float64), as the
    reference's stage-1 `initialize_embedings` (docs/reference.md#special-tokens-and-vocabulary-growth)."""
    mean = array.astype(np.float64).mean(axis=0).astype(np.float32)
    grown = np.empty((rows, array.shape[1]), np.float32)
    grown[: array.shape[0]] = array
    grown[array.shape[0]:] = mean
    return grown


def unused_reason(name: str) -> Optional[str]:
    for pattern, reason in KNOWN_UNUSED:
        if re.search(pattern, name):
            return reason
    return None


def classify_unused(names: Iterable[str], source: str, extra_reasons=None) -> dict[str, str]:
    """name → reason for every leftover tensor; an unexplained one is a ConversionError."""
    reasons, unexpected = {}, []
    for name in sorted(names):
        reason = (extra_reasons(name) if extra_reasons else None) or unused_reason(name)
        if reason is None:
            unexpected.append(name)
        else:
            reasons[name] = reason
    if unexpected:
        shown = ", ".join(repr(n) for n in unexpected[:10]) + (" ..." if len(unexpected) > 10 else "")
        raise ConversionError(f"{source}: {len(unexpected)} unexpected tensor(s) that the model the config "
                              f"describes has no parameter for: {shown}")
    return reasons


def config_differences(section: str, configured, actual) -> list[str]:
    """Notes on the fields where the checkpoint's architecture replaces the configured one."""
    if configured is None:
        return []
    notes = []
    for field in dataclasses.fields(actual):
        before, after = getattr(configured, field.name), getattr(actual, field.name)
        if before != after:
            notes.append(f"{section}.{field.name}: config {before!r} replaced by the checkpoint's {after!r}")
    return notes


def buckets_within(data, max_positions: int):
    """(data config, note or None): the sequence buckets cut to the checkpoint's position range,
    so that a default config (buckets up to 2048) imports a short-context LM."""
    kept = tuple(b for b in data.buckets if b <= max_positions)
    if kept == tuple(data.buckets):
        return data, None
    kept = kept or (max_positions,)
    return dataclasses.replace(data, buckets=kept), (f"data.buckets {list(data.buckets)} cut to {list(kept)}: the "
                                                     f"LM has {max_positions} positions")


def grow_vocabulary(tokenizer, vocab_size: int, source: str) -> tuple[int, list[str]]:
    """The vocabulary size the model needs for `tokenizer`, and the tokens that grow it."""
    size = len(tokenizer)
    if size <= vocab_size:
        return vocab_size, []
    added = {int(i): str(t) for i, t in tokenizer.added_tokens_decoder.items()}
    foreign = [i for i in range(vocab_size, size) if i not in added]
    if foreign:
        raise ConversionError(f"{source}: the tokenizer has {size} tokens but the LM's embedding has "
                              f"{vocab_size} rows, and ids {foreign[:5]}{' ...' if len(foreign) > 5 else ''} "
                              f"are base-vocabulary tokens, not added ones: the tokenizer does not belong to "
                              f"this LM (vocabulary sizes disagree)")
    return size, [added[i] for i in range(vocab_size, size)]


def fresh_parts(model_config, seed: int, names: Iterable[str]) -> dict:
    """Random initial Param states of the named LlavaModel parts, from `seed`. jit drops the
    initialisation of every other part (its outputs are unused), so no full model is materialised."""
    from jaxllava.model.llava import LlavaModel

    names = tuple(names)

    @jax.jit
    def init():
        model = LlavaModel(model_config, rngs=nnx.Rngs(seed))
        return {name: nnx.state(getattr(model, name), nnx.Param) for name in names}

    return init()


def tokenizer_source(tokenizer_dir: Optional[str], lm_dir: str, config) -> str:
    if tokenizer_dir:
        return tokenizer_dir
    if any(os.path.exists(os.path.join(lm_dir, f)) for f in ("tokenizer.json", "tokenizer.model",
                                                              "tokenizer_config.json")):
        return lm_dir
    if config.data.tokenizer:
        return config.data.tokenizer
    raise ConversionError(f"{lm_dir}: no tokenizer files there; pass --tokenizer DIR or set data.tokenizer")


def _import_lm(model, tensors: CheckpointTensors, lm_config, vocab_size: int, lm_dir: str) -> dict:
    """Load the LM into `model`, growing the embedding (and an untied head) to `vocab_size`
    with the mean of the existing rows. Returns the report's lm entry."""
    grow = {}
    if vocab_size > lm_config.vocab_size:
        grow = {EMBED: (lm_config.vocab_size, vocab_size)}
        if not lm_config.tie_word_embeddings:
            grow[LM_HEAD] = (lm_config.vocab_size, vocab_size)
    source = ImportSource(tensors, grow_rows=grow)
    unused = load_hf_llama_weights(model.lm, source)
    tied = (lambda n: "tied to model.embed_tokens.weight (tie_word_embeddings)"
            if n == LM_HEAD and lm_config.tie_word_embeddings else None)
    return {"directory": os.path.abspath(lm_dir), "mapped": source.read,
            "unused": classify_unused(unused, lm_dir, tied)}


def _import_vision(model, model_config, vision_dir: str, seed: int) -> dict:
    """Load the tower into `model`; initialise the parts no checkpoint provides (projector, a
    resampler with weights) from `seed`. Returns the report's vision and initialised entries."""
    vision_source = ImportSource(CheckpointTensors(vision_dir))
    vision_unused = load_hf_vision_weights(model.vision, vision_source)
    initialised = []
    for name, state in fresh_parts(model_config, seed, ("projector", "resampler")
                                     + (("lape",) if model_config.lape is not None else ())).items():
        if jax.tree.leaves(state):
            nnx.update(getattr(model, name), state)
            initialised.append(name)
    return {"vision": {"directory": os.path.abspath(vision_dir), "mapped": vision_source.read,
                       "unused": classify_unused(vision_unused, vision_dir)},
            "initialised": {name: f"random (train.seed={seed}): no checkpoint provides it" for name in initialised}}


def import_hf(config, out: str, lm_dir: str, vision_dir: Optional[str] = None,
              tokenizer_dir: Optional[str] = None) -> dict:
    """Write a jaxllava checkpoint at `out` from transformers directories; returns the report.

    `config` (ExperimentConfig) gives everything a checkpoint does not: data,
    optimisation, the vision input size and feature selection, resampler and
    projector kinds. The LM and tower architectures come from the checkpoints'
    config.json; where they differ from `config`, the report notes it.
    """
    from jaxllava.data.tokenizer import load_tokenizer

    ensure_new_output(out)
    if config.model.vision is not None and config.model.vision.kind == "features":
        # Without this, --vision would silently swap the features input for a tower.
        raise ConversionError("model.vision.kind is features: the model has no vision tower, and import-hf "
                              "does not build a features model yet (its fresh resampler and projector)")
    if config.model.vision is not None and not vision_dir:
        raise ConversionError(f"the config has a model.vision section ({config.model.vision.kind}) but no "
                              f"--vision directory was given: a tower is never left at a random init")
    if vision_dir and config.model.vision is None:
        raise ConversionError(f"--vision {vision_dir} given but the config has no model.vision section "
                              f"(it sets the input image_size and the feature selection)")
    lm_tensors = CheckpointTensors(lm_dir)
    lm_config = llama_config_from_hf(read_config(lm_dir))
    tokenizer_path = tokenizer_source(tokenizer_dir, lm_dir, config)
    tokenizer = load_tokenizer(tokenizer_path)
    vocab_size, new_tokens = grow_vocabulary(tokenizer, lm_config.vocab_size, tokenizer_path)
    notes = config_differences("model.lm", config.model.lm, dataclasses.replace(lm_config, vocab_size=vocab_size))
    grown_lm_config = dataclasses.replace(lm_config, vocab_size=vocab_size)

    vision_config = None
    if vision_dir:
        v = config.model.vision
        vision_config = vision_config_from_hf(read_config(vision_dir), image_size=v.image_size,
                                              pos_interpolation=v.pos_interpolation, feature_layer=v.feature_layer,
                                              feature_select=v.feature_select)
        notes += config_differences("model.vision", v, vision_config)
    model_config = dataclasses.replace(config.model, lm=grown_lm_config, vision=vision_config)
    data, note = buckets_within(config.data, grown_lm_config.max_position_embeddings)
    notes += [note] if note else []
    config = dataclasses.replace(config, model=model_config, data=data)

    model = abstract_model(model_config)
    report = {"what": "import-hf", "lm": _import_lm(model, lm_tensors, lm_config, vocab_size, lm_dir)}
    if vision_dir:
        report.update(_import_vision(model, model_config, vision_dir, config.train.seed))
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))

    meta = {"imported_from": {"format": "transformers", "lm": os.path.abspath(lm_dir),
                              "vision": os.path.abspath(vision_dir) if vision_dir else None,
                              "tokenizer": os.path.abspath(tokenizer_path)}}
    if new_tokens:
        meta["model.lm"] = {"vocab_size": {"checkpoint": lm_config.vocab_size, "now": vocab_size},
                            "new_tokens": new_tokens,
                            "new_rows_init": "mean of the existing rows, input and output, as the reference's stage 1"}
        notes.append(f"model.lm.vocab_size grown {lm_config.vocab_size} -> {vocab_size} for {new_tokens}; "
                     f"new embedding and output rows = mean of the existing rows")
    report["notes"] = notes
    report["meta"] = meta
    write_params_checkpoint(out, config, params, tokenizer_path, meta, report=report)
    return report


# ----------------------------------------------------------------------------- export


def save_export_tokenizer(config, directory: str) -> None:
    """The checkpoint's tokenizer, loadable by transformers 4.x (the BabyLM pipeline) and 5.x."""
    copy_tokenizer(config.data.tokenizer, directory, config.model.lm.vocab_size, portable=True)


def write_provenance(directory: str, checkpoint: str, run: dict) -> None:
    with open(os.path.join(directory, "jaxllava_provenance.json"), "w", encoding="utf-8") as f:
        json.dump({"exported_from": os.path.abspath(checkpoint), "run": run}, f, indent=2)


def export_lm(checkpoint: str, out: str) -> dict:
    """A transformers `LlamaForCausalLM` directory (config.json, model.safetensors, tokenizer)
    that `AutoModelForCausalLM.from_pretrained(out)` and the BabyLM pipeline load."""
    ensure_new_output(out)
    config, params, run = load_checkpoint_params(checkpoint)
    model = model_from_params(config.model, params)
    del params
    with atomic_output_dir(out) as tmp:
        # Streamed shard by shard: the export holds one shard beside the model, not a second copy.
        tensors = save_sharded_safetensors(hf_tensors(model.lm), tmp)
        with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as f:
            json.dump(llama_config_to_hf(config.model.lm), f, indent=2)
        save_export_tokenizer(config, tmp)
        write_provenance(tmp, checkpoint, run)
    notes = [] if config.model.vision is None else [
        "the vision tower and projector are not part of an LM export (use --what reference)"]
    return {"what": "export-hf lm", "out": os.path.abspath(out), "tensors": len(tensors), "notes": notes}
