"""Moving parameters between the model and transformers tensors, by the modules' declared key maps.

`jaxllava.model.hf_keys` derives each parameter's transformers name and layout;
this module is the only code that moves arrays between the two layouts, in both
directions, so import and export cannot disagree. `tensors` is anything with
`keys()`, `in` and `[name]`: a `CheckpointTensors`, a dict of numpy arrays, or
the import's dtype-checking wrapper.
"""
from __future__ import annotations

from typing import Iterable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from jaxllava.errors import ConversionError
from jaxllava.model.hf_keys import Entry, hf_entries
from jaxllava.model.vision import CLIP_SCOPE

PROJECTOR_PREFIX = "model.mm_projector."


def source_name(tensors) -> str:
    return getattr(tensors, "directory", "checkpoint")


def load_entries(entries: Iterable[Entry], tensors, *, prefix: str = "") -> set[str]:
    """Copy checkpoint tensors into parameters; strict. Returns the checkpoint names consumed.

    Every entry must be present with its shape, else `ConversionError` naming the
    tensor and both shapes: nothing is ever left at its random init (README
    pitfall 30). A parameter that already has a sharding keeps it; the model may be
    abstract (`nnx.eval_shape`) to skip random initialisation.
    """
    source = source_name(tensors)
    used = set()
    for name, param, layout in entries:
        full = prefix + name
        expected = layout.hf_shape(tuple(param.shape))
        if full not in tensors:
            raise ConversionError(f"{source}: tensor {full!r} (shape {expected}) is missing from the checkpoint")
        array = np.asarray(tensors[full])
        if tuple(array.shape) != expected:
            raise ConversionError(f"{source}: tensor {full!r}: checkpoint shape {tuple(array.shape)}, "
                                  f"model expects {expected}")
        value = np.ascontiguousarray(layout.to_model(array)).astype(param.dtype)
        sharding = getattr(param.get_value(), "sharding", None)  # an abstract (eval_shape) model has none
        param.set_value(jax.device_put(value, sharding) if sharding is not None else jnp.asarray(value))
        used.add(full)
    return used


def unused_keys(tensors, used: set[str], prefix: str = "") -> list[str]:
    return sorted(k for k in tensors.keys() if k.startswith(prefix) and k not in used)


def iter_hf_tensors(entries: Iterable[Entry], *, prefix: str = "") -> Iterator[tuple[str, np.ndarray]]:
    """(transformers name, numpy array) per entry, one at a time (for streaming exports)."""
    for name, param, layout in entries:
        # contiguous: safetensors writes a transposed view's memory, not its logical order
        yield prefix + name, np.ascontiguousarray(layout.to_hf(np.asarray(jax.device_get(param.get_value()))))


def hf_tensors(module, *, prefix: str = "") -> Iterator[tuple[str, np.ndarray]]:
    """The module's parameters as transformers tensors, streamed one at a time."""
    return iter_hf_tensors(hf_entries(module), prefix=prefix)


def hf_state_dict(module, *, prefix: str = "") -> dict[str, np.ndarray]:
    """transformers-layout numpy arrays of every parameter of `module` (torch (out, in) Linear weights)."""
    return dict(hf_tensors(module, prefix=prefix))


def load_hf_llama_weights(model, tensors, *, prefix: str = "") -> list[str]:
    """Copy a transformers Llama state dict into `model` in place; strict (see `load_entries`).

    `prefix` is put before every transformers name (e.g. for a Llama nested in a
    larger model). Returns every checkpoint name that was not used, sorted.
    """
    used = load_entries(hf_entries(model), tensors, prefix=prefix)
    return unused_keys(tensors, used)


def load_hf_vision_weights(tower, tensors, *, prefix: str = "") -> list[str]:
    """Load a transformers vision checkpoint; strict. Returns the unused names under `prefix`
    (DINOv2 mask_token, SigLIP head.*, or anything unexpected) for the caller to check.

    transformers < 5, two-tower CLIPModel/SiglipModel checkpoints and LLaVA's
    `vision_tower.vision_tower.*` nest CLIP/SigLIP under `vision_model.` (the names
    the key map declares); transformers 5's CLIPVisionModel.save_pretrained does
    not. Both are read.
    """
    entries = hf_entries(tower)
    nested = prefix + CLIP_SCOPE
    if (tower.config.kind != "dinov2"
            and not any(k.startswith(nested) for k in tensors.keys())):
        entries = [Entry(e.name.removeprefix(CLIP_SCOPE), e.param, e.layout) for e in entries]
    used = load_entries(entries, tensors, prefix=prefix)
    return unused_keys(tensors, used, prefix)


def load_projector_weights(projector, tensors, *, prefix: str = PROJECTOR_PREFIX) -> list[str]:
    """Strict load (see `load_entries`); returns the unused names under `prefix`."""
    used = load_entries(hf_entries(projector), tensors, prefix=prefix)
    return unused_keys(tensors, used, prefix)
