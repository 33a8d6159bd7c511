"""Parameter path ↔ transformers tensor name, derived from each module's declared renames.

One style for every module (as levanter's `_state_dict_key_map`): a module lists
only the attributes whose transformers name differs from its own, and everything
else is derived while walking the module's `nnx.Param` paths:

    class Block(nnx.Module):
        HF_RENAMES = {"norm1": "layer_norm1",                 # an attribute
                      "attention.out": "self_attn.out_proj",  # a dotted attribute path
                      "layers.1": "2",                        # a list index
                      "layer_scale": "layer_scale.lambda1"}   # a parameter: its full name

(or a method `hf_renames(self)` when the names depend on the config, as the
vision tower's do on its kind).

Naming rules, applied from the root module down:
  - At each module on the way, the longest dotted prefix of the remaining path
    (list indices included, e.g. "layers.0") found in the module's renames is
    replaced by its value; "" flattens the prefix away (LLaVA's `linear` projector
    is `mm_projector.weight`, not `mm_projector.0.weight`). The walk then continues
    at the module that prefix leads to, which may declare renames of its own.
  - A path part no rename covers keeps its name; a parameter's own name is mapped
    by `LEAF_NAMES` (Flax's kernel/scale/embedding are torch's `weight`).

Array layouts: a `kernel` is a Dense kernel, stored (in, out) here and (out, in)
by torch's nn.Linear, so it is transposed (`LINEAR`); every other parameter is
stored as is (`SAME`). A module overrides this for the few tensors stored
differently (a conv patch embedding, leading singleton axes) with `hf_layouts`
(or `HF_LAYOUTS`): parameter path relative to that module → `Layout`.

Only declarations and the walk live here; moving arrays between the two layouts
(with its strict `ConversionError`s) is `jaxllava.convert.weights`.
"""
from __future__ import annotations

from typing import Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

LEAF_NAMES = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}


class Layout(NamedTuple):
    """How one parameter is stored in a transformers checkpoint: a pair of inverse array maps."""

    to_model: Callable
    to_hf: Callable

    def hf_shape(self, model_shape: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(jax.eval_shape(self.to_hf, jax.ShapeDtypeStruct(model_shape, jnp.float32)).shape)


SAME = Layout(lambda a: a, lambda a: a)
LINEAR = Layout(lambda w: w.T, lambda k: k.T)


class Entry(NamedTuple):
    name: str  # transformers name, without the caller's prefix
    param: nnx.Variable
    layout: Layout


def _declared(module, method: str, attribute: str) -> Mapping:
    declared = getattr(module, method, None)
    if declared is not None:
        return declared()
    return getattr(module, attribute, None) or {}


def renames(module) -> Mapping[str, str]:
    """The module's declared renames: attribute path → transformers name ("" = flatten)."""
    return _declared(module, "hf_renames", "HF_RENAMES")


def layouts(module) -> Mapping[str, Layout]:
    """The module's declared layout overrides: parameter path relative to the module → Layout."""
    return _declared(module, "hf_layouts", "HF_LAYOUTS")


def _child(node, part):
    return node[part] if isinstance(part, int) else getattr(node, part)


def _dotted(parts) -> str:
    return ".".join(map(str, parts))


def hf_entry(root: nnx.Module, path: tuple) -> Entry:
    """The transformers name, parameter and layout of the parameter at `path` under `root`."""
    names: list[str] = []
    layout = None
    node, rest = root, tuple(path)
    while rest:
        if layout is None:  # the outermost module that declares a layout for this parameter decides
            layout = layouts(node).get(_dotted(rest))
        declared = renames(node)
        length = next((n for n in range(len(rest), 0, -1) if _dotted(rest[:n]) in declared), 0)
        if length:
            names.append(declared[_dotted(rest[:length])])
        else:
            length = 1
            names.append(LEAF_NAMES.get(rest[0], rest[0]) if len(rest) == 1 else str(rest[0]))
        for part in rest[:length]:
            node = _child(node, part)
        rest = rest[length:]
    if layout is None:
        layout = LINEAR if path[-1] == "kernel" else SAME
    return Entry(".".join(n for n in names if n), node, layout)


def hf_entries(root: nnx.Module) -> list[Entry]:
    """One `Entry` per `nnx.Param` of `root` (an abstract `nnx.eval_shape` model works too)."""
    paths = [tuple(path) for path, _ in nnx.to_flat_state(nnx.state(root, nnx.Param))]
    return [hf_entry(root, path) for path in paths]
