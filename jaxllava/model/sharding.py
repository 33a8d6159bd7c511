"""Logical axis names and the one rule table that maps them onto the device mesh.

Every parameter carries its logical axes as Variable metadata (`nnx.Param(value,
axes=("embed", "mlp"))`); activations are constrained with `constrain(x, axes)`.
A single table (`DEFAULT_RULES`) maps logical names to mesh axes, so data, FSDP
and tensor parallelism are chosen by the mesh shape in the config alone.

Mesh axes: "data" (pure data parallel), "fsdp" (data parallel + parameter
sharding), "tensor" (Megatron-style tensor parallel).

Logical names
  parameters:  vocab, embed, mlp, heads, kv_heads, head_dim,
               vision_embed, vision_mlp, vision_heads, latents
  activations: batch, length, act_embed, act_heads, act_kv_heads, act_mlp, act_vocab
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator, Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxllava.errors import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")

Rules = Mapping[str, "str | tuple[str, ...] | None"]

DEFAULT_RULES: dict[str, str | tuple[str, ...] | None] = {
    # parameters
    "vocab": "tensor",
    "embed": "fsdp",
    "mlp": "tensor",
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "vision_embed": "fsdp",
    "vision_mlp": "tensor",
    "vision_heads": "tensor",
    "latents": None,
    # activations
    "batch": ("data", "fsdp"),
    "length": None,
    "act_embed": None,
    "act_heads": "tensor",
    "act_kv_heads": "tensor",
    "act_mlp": "tensor",
    "act_vocab": "tensor",
}


def make_mesh(data: int = 1, fsdp: int = 1, tensor: int = 1, devices=None) -> Mesh:
    """A (data, fsdp, tensor) mesh; -1 in one axis takes the remaining devices.

    Axis types are set to Auto rather than left to JAX's default, which may be
    Explicit: under Explicit axes, tensor-parallel matmuls need `out_sharding=`
    everywhere.
    """
    devices = list(jax.devices() if devices is None else devices)
    shape = [data, fsdp, tensor]
    if shape.count(-1) > 1:
        raise ConfigError(f"mesh: at most one axis may be -1, got {dict(zip(MESH_AXES, shape))}")
    if -1 in shape:
        known = int(np.prod([s for s in shape if s != -1]))
        shape[shape.index(-1)] = len(devices) // known
    if int(np.prod(shape)) != len(devices):
        raise ConfigError(f"mesh {dict(zip(MESH_AXES, shape))} needs {int(np.prod(shape))} devices, but "
                          f"{len(devices)} {'is' if len(devices) == 1 else 'are'} present; set the mesh.* axes so "
                          f"their product is the device count (-1 in one axis takes the rest)")
    device_array = np.asarray(devices).reshape(shape)
    axis_types = (jax.sharding.AxisType.Auto,) * 3
    return Mesh(device_array, MESH_AXES, axis_types=axis_types)


def partition_spec(axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
                   rules: Rules = DEFAULT_RULES) -> P:
    """PartitionSpec for an array with these logical axes.

    A dimension that the mapped mesh axes do not divide stays replicated (e.g. 4
    kv heads on tensor=8), and a mesh axis is used at most once per array.
    """
    if len(axes) != len(shape):
        raise ValueError(f"logical axes {tuple(axes)} do not match shape {tuple(shape)}")
    used: set[str] = set()
    spec = []
    for name, size in zip(axes, shape):
        mesh_axes = rules.get(name) if name is not None else None
        if mesh_axes is None:
            spec.append(None)
            continue
        mesh_axes = (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)
        mesh_axes = tuple(a for a in mesh_axes if a not in used and mesh.shape[a] > 1)
        ways = int(np.prod([mesh.shape[a] for a in mesh_axes])) if mesh_axes else 1
        if not mesh_axes or size % ways:
            spec.append(None)
            continue
        used.update(mesh_axes)
        spec.append(mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
    # Canonical short form: P('fsdp', None) and P('fsdp') are one layout, but jit's
    # cache tells them apart and its outputs use the short form, so an input in the
    # long form would recompile every step after the first.
    while spec and spec[-1] is None:
        spec.pop()
    return P(*spec)


def batch_sharding(mesh: Mesh, shape: Sequence[int], rules: Rules = DEFAULT_RULES) -> NamedSharding:
    """Rows over the mesh axes of the logical "batch" axis, everything else replicated."""
    axes = ("batch",) + (None,) * (len(shape) - 1)
    return NamedSharding(mesh, partition_spec(axes, shape, mesh, rules))


def batch_shards(mesh: Mesh, rules: Rules = DEFAULT_RULES) -> int:
    """Ways `batch_sharding` splits rows when they divide evenly (otherwise they stay replicated)."""
    axes = rules.get("batch") or ()
    axes = (axes,) if isinstance(axes, str) else tuple(axes)
    return int(np.prod([mesh.shape[a] for a in axes]))


def mesh_of(tree) -> Mesh | None:
    """The mesh that a tree's arrays are laid out on; None when none has a NamedSharding
    (numpy, or arrays on a single device)."""
    meshes = {leaf.sharding.mesh for leaf in jax.tree.leaves(tree)
              if isinstance(leaf, jax.Array) and isinstance(leaf.sharding, NamedSharding)}
    if len(meshes) > 1:
        raise ValueError(f"the arrays lie on {len(meshes)} different meshes; one computation needs one")
    return meshes.pop() if meshes else None


def variable_axes(variable: nnx.Variable) -> tuple[str | None, ...]:
    axes = variable.get_metadata().get("axes")
    if axes is None:
        return (None,) * len(variable.shape)
    return tuple(axes)


def tree_shardings(tree, mesh: Mesh, rules: Rules = DEFAULT_RULES):
    """NamedShardings for a tree of arrays / nnx Variables: Variables by their logical
    axes (so AdamW's mu and nu follow their parameters), anything else replicated."""

    def sharding(leaf):
        if isinstance(leaf, nnx.Variable):
            shape = getattr(leaf.get_value(), "shape", None)
            if shape is None:  # an optax MaskedNode: a part this transform does not touch
                return leaf
            return leaf.replace(NamedSharding(mesh, partition_spec(variable_axes(leaf), shape, mesh, rules)))
        return NamedSharding(mesh, P())

    return jax.tree.map(sharding, tree, is_leaf=lambda x: isinstance(x, nnx.Variable))


_ACTIVATION_SHARDING: contextvars.ContextVar = contextvars.ContextVar("activation_sharding", default=None)


@contextlib.contextmanager
def activation_sharding(mesh: Mesh, rules: Rules = DEFAULT_RULES) -> Iterator[None]:
    """While tracing inside this context, `constrain` pins activations to the mesh."""
    token = _ACTIVATION_SHARDING.set((mesh, rules))
    try:
        yield
    finally:
        _ACTIVATION_SHARDING.reset(token)


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    """Sharding constraint by logical axes; a no-op outside `activation_sharding`."""
    context = _ACTIVATION_SHARDING.get()
    if context is None:
        return x
    mesh, rules = context
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, partition_spec(axes, x.shape, mesh, rules)))
