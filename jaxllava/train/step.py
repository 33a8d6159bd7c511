"""One optimizer step: gradients accumulated over microbatches of both modalities, then one update.

    for each microbatch (TextBatch or ImageBatch, any bucket length):
        accum += grad of  Σ token cross-entropy   (and Σ CE, Σ target tokens)
    update with grads = accum / Σ target tokens;  loss = Σ CE / Σ target tokens

so the loss is the mean over every target token of the step, whatever the
packing, the modality mix or the number of microbatches. The reference averaged
per-microbatch means (REFERENCE.md §1.12, §7 pitfall 24): a microbatch with few
targets weighed as much as a full one, and one with none gave NaN; here it
adds zero.

Functional NNX pattern (flax examples/gemma train.py): the model is split once
into graph, trainable params, frozen params and other state; the jitted
functions merge them back, and only the trainable params are differentiated, so
a frozen vision tower is never differentiated through. Parameters are float32;
the model computes in its configured dtype (bf16 by default). Shardings come
from the parameters' logical axes (model/sharding.py); microbatch rows are
split over the (data, fsdp) mesh axes. The vocabulary projection and its
cross-entropy run in sequence chunks under `jax.checkpoint`, so full (B, T, V)
logits are never alive at once.

Each jitted function compiles once per input shape: per (modality, bucket
length) for accumulation, once for the update.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxllava.data.batch import IGNORE, Microbatch
from jaxllava.errors import TrainingError
from jaxllava.model.sharding import DEFAULT_RULES, Rules, activation_sharding, partition_spec, variable_axes
from jaxllava.train.config import OptimConfig
from jaxllava.train.optimizer import make_optimizer, trainable_manifest

BATCH_AXES = ("data", "fsdp")


# ----------------------------------------------------------------------------- loss


def cross_entropy_sum(logits_fn: Callable[[jax.Array], jax.Array], hidden: jax.Array, targets: jax.Array,
                      chunk: int) -> tuple[jax.Array, jax.Array]:
    """(Σ CE over target tokens, number of target tokens) of hidden (B, T, D) against targets (B, T).

    The projection to the vocabulary (`logits_fn`: (B, C, D) -> (B, C, V) float32)
    runs on sequence chunks of length C; each chunk is rematerialised in the
    backward pass, so peak memory holds one chunk's logits, not T's.
    """
    length = hidden.shape[1]
    chunk = math.gcd(length, chunk)

    def chunk_loss(h, t):
        logits = logits_fn(h).astype(jnp.float32)
        valid = t != IGNORE
        picked = jnp.take_along_axis(logits, jnp.where(valid, t, 0)[..., None], axis=-1)[..., 0]
        ce = jax.nn.logsumexp(logits, axis=-1) - picked
        return jnp.sum(jnp.where(valid, ce, 0.0)), jnp.sum(valid).astype(jnp.int32)

    if chunk == length:
        return chunk_loss(hidden, targets)
    pieces = length // chunk
    hs = jnp.moveaxis(hidden.reshape(hidden.shape[0], pieces, chunk, -1), 1, 0)
    ts = jnp.moveaxis(targets.reshape(targets.shape[0], pieces, chunk), 1, 0)

    def body(carry, xs):
        ce, n = jax.checkpoint(chunk_loss)(*xs)
        return (carry[0] + ce, carry[1] + n), None

    (ce, n), _ = jax.lax.scan(body, (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32)), (hs, ts))
    return ce, n


def microbatch_loss(model: nnx.Module, arrays: dict[str, jax.Array], chunk: int) -> tuple[jax.Array, jax.Array]:
    """(Σ CE, target tokens) of one microbatch on a LlavaModel. `pixels` and
    `image_mask` exist only in an ImageBatch, so a text microbatch never reaches
    the vision tower."""
    hidden = model.hidden(arrays["input_ids"], segment_ids=arrays["segment_ids"], positions=arrays["positions"],
                          pixels=arrays.get("pixels"), image_mask=arrays.get("image_mask"))
    return cross_entropy_sum(model.lm.logits, hidden, arrays["targets"], chunk)


# ----------------------------------------------------------------------------- shardings


def tree_shardings(tree: Any, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> Any:
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


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    axes = tuple(a for a in BATCH_AXES if mesh.shape[a] > 1)
    first = None if not axes else (axes[0] if len(axes) == 1 else axes)
    return NamedSharding(mesh, P(first, *([None] * (ndim - 1))))


DEVICE_FIELDS = ("input_ids", "targets", "segment_ids", "positions", "pixels", "image_mask")


def device_arrays(batch: Microbatch, mesh: Mesh) -> dict[str, jax.Array]:
    """This process's rows of a microbatch as global arrays sharded over the batch axes
    (each process passes only its rows: jax.make_array_from_process_local_data).
    `image_rows` stays on the host: `check_image_mask` uses it there."""
    return {name: jax.make_array_from_process_local_data(batch_sharding(mesh, value.ndim), value)
            for name, value in batch.arrays().items() if name in DEVICE_FIELDS}


# ----------------------------------------------------------------------------- the step


class TrainStep:
    """Owns the jitted accumulate / update functions and the layout of the train state.

    The train state is a dict {"params": nnx.State of every Param (trainable and
    frozen), "opt_state": optax state, "step": int32, "rng": uint32 key data}: the
    tree that is checkpointed.
    """

    def __init__(self, model: nnx.Module, optim: OptimConfig, total_steps: int, mesh: Mesh, *,
                 rules: Rules = DEFAULT_RULES, loss_chunk: int = 512, seed: int = 0):
        self.mesh, self.rules, self.loss_chunk, self.seed = mesh, rules, loss_chunk, seed
        self.graphdef, params, self.rest = nnx.split(model, nnx.Param, ...)
        self.manifest = trainable_manifest(params, optim)
        self.tx, self.schedule = make_optimizer(optim, params, total_steps)
        self._param_shapes = jax.eval_shape(lambda p: p, params)

        self.abstract = self.abstract_state()
        self.state_shardings = jax.tree.map(lambda x: x.sharding, self.abstract)
        replicated = NamedSharding(mesh, P())
        trainable, _ = self.split_params(self._param_shapes)
        self.accum_shardings = {"grads": tree_shardings(trainable, mesh, rules), "ce": replicated,
                                "tokens": replicated}
        self._init = jax.jit(self._fresh_state, out_shardings=self.state_shardings)
        self._zeros = jax.jit(self._zeros_impl, out_shardings=self.accum_shardings)
        self._accumulate: dict[tuple, Callable] = {}  # one jitted function per modality (batch layout)
        self._update = jax.jit(self._update_impl, in_shardings=(self.state_shardings, self.accum_shardings),
                               out_shardings=(self.state_shardings, replicated), donate_argnums=(0,))

    # -- state layout

    def _is_trainable(self, path, _) -> bool:
        return self.manifest.get("/".join(map(str, path)), False)

    def split_params(self, params: nnx.State) -> tuple[nnx.State, nnx.State]:
        """(trainable, frozen) parts of the parameter state."""
        return nnx.split_state(params, self._is_trainable, ...)

    def _fresh_state(self, params):
        return {"params": params, "opt_state": self.tx.init(params), "step": jnp.zeros((), jnp.int32),
                "rng": jax.random.key_data(jax.random.key(self.seed))}

    def init_state(self, params: nnx.State) -> dict:
        """The train state for fresh parameters, placed on the mesh."""
        return self._init(params)

    def abstract_state(self) -> dict:
        """ShapeDtypeStructs of the train state carrying their target shardings (for restore)."""
        shapes = jax.eval_shape(self._fresh_state, self._param_shapes)
        shardings = tree_shardings(shapes, self.mesh, self.rules)
        return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)

    def model(self, params: nnx.State) -> nnx.Module:
        """A module view of `params` (for evaluation or export)."""
        return nnx.merge(self.graphdef, params, self.rest)

    # -- jitted pieces

    def _zeros_impl(self, trainable):
        return {"grads": jax.tree.map(jnp.zeros_like, trainable), "ce": jnp.zeros((), jnp.float32),
                "tokens": jnp.zeros((), jnp.int32)}

    def _accumulate_impl(self, params, accum, arrays):
        trainable, frozen = self.split_params(params)

        def loss(trainable):
            model = nnx.merge(self.graphdef, trainable, frozen, self.rest)
            ce, tokens = microbatch_loss(model, arrays, self.loss_chunk)
            return ce, (ce, tokens)

        grads, (ce, tokens) = jax.grad(loss, has_aux=True)(trainable)
        return {"grads": jax.tree.map(jnp.add, accum["grads"], grads), "ce": accum["ce"] + ce,
                "tokens": accum["tokens"] + tokens}

    def _update_impl(self, state, accum):
        params = state["params"]
        trainable, frozen = self.split_params(params)
        tokens = jnp.maximum(accum["tokens"], 1).astype(jnp.float32)
        grads = jax.tree.map(lambda g: g / tokens, accum["grads"])
        # The optimizer sees the whole tree (frozen parts get zero updates and hold
        # no state); only the trainable part is written back.
        full_grads = nnx.merge_state(grads, jax.tree.map(jnp.zeros_like, frozen))
        updates, opt_state = self.tx.update(full_grads, state["opt_state"], params)
        trainable_updates, _ = self.split_params(updates)
        new_params = nnx.merge_state(optax.apply_updates(trainable, trainable_updates), frozen)
        metrics = {"loss": accum["ce"] / tokens, "grad_norm": global_norm(grads),
                   "lr": self.schedule(state["step"]), "target_tokens": accum["tokens"]}
        return {"params": new_params, "opt_state": opt_state, "step": state["step"] + 1,
                "rng": state["rng"]}, metrics

    def _accumulate_fn(self, arrays: dict[str, jax.Array]) -> Callable:
        layout = tuple(sorted((name, value.ndim) for name, value in arrays.items()))
        if layout not in self._accumulate:
            batch_shardings = {name: batch_sharding(self.mesh, ndim) for name, ndim in layout}
            self._accumulate[layout] = jax.jit(
                self._accumulate_impl, donate_argnums=(1,), out_shardings=self.accum_shardings,
                in_shardings=(self.state_shardings["params"], self.accum_shardings, batch_shardings))
        return self._accumulate[layout]

    # -- public

    def __call__(self, state: dict, microbatches: Sequence[Microbatch]) -> tuple[dict, dict]:
        """One optimizer step over `microbatches` (host numpy batches of this process)."""
        return self.apply(state, [device_arrays(mb, self.mesh) for mb in microbatches])

    def apply(self, state: dict, arrays: Sequence[dict[str, jax.Array]]) -> tuple[dict, dict]:
        """Like __call__, with the microbatches already on the devices (see `device_arrays`)."""
        if not arrays:
            raise ValueError("an optimizer step needs at least one microbatch")
        trainable, _ = self.split_params(state["params"])
        with activation_sharding(self.mesh, self.rules):
            accum = self._zeros(trainable)
            for batch in arrays:
                accum = self._accumulate_fn(batch)(state["params"], accum, batch)
            return self._update(state, accum)

    def compile_count(self) -> int:
        """Compiled variants so far: one per (modality, bucket length), plus the update."""
        return sum(f._cache_size() for f in (*self._accumulate.values(), self._update))


def global_norm(tree) -> jax.Array:
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))


def check_finite(metrics: dict[str, Any], step: int) -> None:
    """Raise TrainingError naming the step if the loss or gradient norm is not finite."""
    bad = {k: float(v) for k, v in metrics.items() if k in ("loss", "grad_norm") and not np.isfinite(float(v))}
    if bad:
        raise TrainingError(f"step {step}: non-finite {', '.join(f'{k}={v}' for k, v in bad.items())}; "
                            "training stopped (the last checkpoint is untouched)")

