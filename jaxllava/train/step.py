"""One optimizer step: gradients accumulated over microbatches of both modalities, then one update.

    for each microbatch (TextBatch, ImageBatch or VideoBatch, any bucket length):
        accum += grad of  Σ token cross-entropy   (and Σ CE, Σ target tokens)
    update with grads = accum / Σ target tokens;  loss = Σ CE / Σ target tokens

so the loss is the mean over every target token of the step, whatever the
packing, the modality mix or the number of microbatches. The reference averaged
per-microbatch means (README pitfall 24; docs/reference.md#loss): a microbatch with few
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

The jitted functions are shared by every TrainStep with an equal `StepSpec`
and compile once per input shape: per (modality, bucket length) for
accumulation, once for the update.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh

from jaxllava.data.batch import IGNORE, MODALITIES, FeatureBatch, ImageBatch, Microbatch, VideoBatch
from jaxllava.errors import TrainingError
from jaxllava.model.sharding import DEFAULT_RULES, Rules, activation_sharding, batch_sharding, tree_shardings
from jaxllava.train.config import OptimConfig
from jaxllava.train.optimizer import make_optimizer, trainable_manifest

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


def microbatch_loss(model: nnx.Module, batch: Microbatch, chunk: int) -> tuple[jax.Array, jax.Array]:
    """(Σ CE, target tokens) of one microbatch on a LlavaModel. Only an ImageBatch has
    pixels, only a FeatureBatch features and only a VideoBatch frames, so a text microbatch
    never reaches the vision tower, resampler or projector."""
    if isinstance(batch, ImageBatch):
        images = {"pixels": batch.pixels, "image_mask": batch.image_mask}
    elif isinstance(batch, FeatureBatch):
        images = {"features": batch.features, "image_mask": batch.image_mask}
    elif isinstance(batch, VideoBatch):
        images = {"frames": batch.frames, "video_mask": batch.video_mask}
    else:
        images = {}
    hidden = model.hidden(batch.input_ids, segment_ids=batch.segment_ids, positions=batch.positions, **images)
    return cross_entropy_sum(model.lm.logits, hidden, batch.targets, chunk)


# ----------------------------------------------------------------------------- shardings


def device_batch(batch: Microbatch, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> Microbatch:
    """This process's rows of a microbatch as the same batch type holding global arrays,
    sharded over the batch axes (each process passes only its rows:
    jax.make_array_from_process_local_data)."""
    def place(value: np.ndarray) -> jax.Array:
        global_shape = (value.shape[0] * jax.process_count(), *value.shape[1:])
        return jax.make_array_from_process_local_data(batch_sharding(mesh, global_shape, rules), value,
                                                      global_shape)

    return jax.tree.map(place, dataclasses.replace(batch, stats=None))


# ----------------------------------------------------------------------------- the step
#
# The jitted functions are module-level and take everything that shapes the
# computation as one hashable static `StepSpec`, so two TrainSteps with equal specs
# (a resumed run, a second run in the same process, tests) share compiled code.


@dataclasses.dataclass(frozen=True)
class StepSpec:
    graphdef: Any  # nnx GraphDef of the model (hashable)
    optim: OptimConfig
    total_steps: int
    mesh: Mesh
    rules: tuple  # DEFAULT_RULES-style mapping as sorted items (hashable)
    loss_chunk: int
    seed: int

    @property
    def rules_dict(self) -> dict:
        return dict(self.rules)

    def optimizer(self, params):
        return make_optimizer(self.optim, params, self.total_steps)

    def split(self, params: nnx.State) -> tuple[nnx.State, nnx.State]:
        """(trainable, frozen) parts of a parameter state (or of a tree shaped like it)."""
        manifest = trainable_manifest(params, self.optim)
        return nnx.split_state(params, lambda path, _: manifest.get("/".join(map(str, path)), False), ...)

    def for_gradients(self) -> "StepSpec":
        """The spec with only what gradients depend on (which parts train), so a change of
        learning rate, schedule or horizon does not recompile the accumulation."""
        return dataclasses.replace(self, optim=self.optim.trainability(), total_steps=1, seed=0)

    def constrain(self, tree):
        """Pin a tree of arrays / Variables to its shardings (tree_shardings)."""
        return jax.lax.with_sharding_constraint(tree, tree_shardings(tree, self.mesh, self.rules_dict))


def _fresh_state(params, *, spec: StepSpec):
    tx, _ = spec.optimizer(params)
    state = {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32),
             "rng": jax.random.key_data(jax.random.key(spec.seed))}
    return spec.constrain(state)


def _zero_accumulator(params, *, spec: StepSpec):
    trainable, _ = spec.split(params)
    return spec.constrain({"grads": jax.tree.map(jnp.zeros_like, trainable),
                           "ce": {m: jnp.zeros((), jnp.float32) for m in MODALITIES},
                           "tokens": {m: jnp.zeros((), jnp.int32) for m in MODALITIES}})


def _accumulate(params, rest, accum, batch, *, spec: StepSpec):
    """Add one microbatch's gradient and its Σ CE and target count, kept per modality (the batch
    type says which, at trace time) so the text and image losses can be logged apart."""
    trainable, frozen = spec.split(params)

    def loss(trainable):
        model = nnx.merge(spec.graphdef, trainable, frozen, rest)
        ce, tokens = microbatch_loss(model, batch, spec.loss_chunk)
        return ce, (ce, tokens)

    with activation_sharding(spec.mesh, spec.rules_dict):
        grads, (ce, tokens) = jax.grad(loss, has_aux=True)(trainable)
    ce_sums, token_sums = dict(accum["ce"]), dict(accum["tokens"])
    ce_sums[batch.modality] += ce
    token_sums[batch.modality] += tokens
    return spec.constrain({"grads": jax.tree.map(jnp.add, accum["grads"], grads), "ce": ce_sums,
                           "tokens": token_sums})


def _loss_sums(params, rest, batch, *, spec: StepSpec):
    """(Σ CE, target tokens) of one microbatch, forward only: the held-out loss."""
    with activation_sharding(spec.mesh, spec.rules_dict):
        return microbatch_loss(nnx.merge(spec.graphdef, params, rest), batch, spec.loss_chunk)


def _update(state, accum, *, spec: StepSpec):
    params = state["params"]
    tx, schedule = spec.optimizer(params)
    trainable, frozen = spec.split(params)
    tokens = jnp.maximum(sum(accum["tokens"].values()), 1).astype(jnp.float32)
    grads = jax.tree.map(lambda g: g / tokens, accum["grads"])
    # The optimizer sees the whole tree (frozen parts get zero updates and hold no
    # state); only the trainable part is written back, the frozen one passes through.
    full_grads = nnx.merge_state(grads, jax.tree.map(jnp.zeros_like, frozen))
    updates, opt_state = tx.update(full_grads, state["opt_state"], params)
    trainable_updates, _ = spec.split(updates)
    new_params = nnx.merge_state(optax.apply_updates(trainable, trainable_updates), frozen)
    metrics = {"loss": sum(accum["ce"].values()) / tokens, "grad_norm": global_norm(grads),
               "lr": schedule(state["step"]), "target_tokens": sum(accum["tokens"].values()),
               **{f"{m}_ce": accum["ce"][m] for m in MODALITIES},
               **{f"{m}_target_tokens": accum["tokens"][m] for m in MODALITIES}}
    new_state = {"params": new_params, "opt_state": opt_state, "step": state["step"] + 1, "rng": state["rng"]}
    return spec.constrain(new_state), metrics


_JITTED: dict[tuple, Callable] = {}


def _jitted(fn: Callable, compiler_options: Optional[dict], **jit_kwargs) -> Callable:
    """One jit object per (function, compiler options), shared by every TrainStep."""
    key = (fn.__name__, tuple(sorted((compiler_options or {}).items())))
    if key not in _JITTED:
        _JITTED[key] = jax.jit(fn, static_argnames=("spec",), compiler_options=compiler_options, **jit_kwargs)
    return _JITTED[key]


class TrainStep:
    """The train step of one model and optimizer config on one mesh.

    The train state is a dict {"params": nnx.State of every Param (trainable and
    frozen), "opt_state": optax state, "step": int32, "rng": uint32 key data}: the
    tree that is checkpointed. Parameters live in the shardings of their logical
    axes; accumulators follow them; microbatch rows are split over the batch axes.
    """

    def __init__(self, model: nnx.Module, optim: OptimConfig, total_steps: int, mesh: Mesh, *,
                 rules: Rules = DEFAULT_RULES, loss_chunk: int = 512, seed: int = 0,
                 compiler_options: Optional[dict[str, Any]] = None):
        """`compiler_options`: XLA options for the jitted functions, e.g.
        {"xla_backend_optimization_level": 0} halves CPU compile time for tiny models."""
        graphdef, params, self.rest = nnx.split(model, nnx.Param, ...)
        self.spec = StepSpec(graphdef, optim, total_steps, mesh, tuple(sorted(rules.items())), loss_chunk, seed)
        self.mesh, self.rules = mesh, rules
        self.manifest = trainable_manifest(params, optim)
        _, self.schedule = make_optimizer(optim, params, total_steps)
        self._param_shapes = jax.eval_shape(lambda p: p, params)
        self.abstract = self.abstract_state()
        self._init = _jitted(_fresh_state, compiler_options)
        self._zeros = _jitted(_zero_accumulator, compiler_options)
        self._accumulate = _jitted(_accumulate, compiler_options, donate_argnums=(2,))
        self._update = _jitted(_update, compiler_options, donate_argnums=(0,))
        self._loss_sums = _jitted(_loss_sums, compiler_options)

    def init_state(self, params: nnx.State) -> dict:
        """The train state for fresh parameters, placed on the mesh."""
        return self._init(params, spec=self.spec)

    def abstract_state(self) -> dict:
        """ShapeDtypeStructs of the train state carrying their target shardings (for restore)."""
        shapes = jax.eval_shape(functools.partial(_fresh_state, spec=self.spec), self._param_shapes)
        shardings = tree_shardings(shapes, self.mesh, self.rules)
        return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)

    def model(self, params: nnx.State) -> nnx.Module:
        """A module view of `params` (for evaluation or export)."""
        return nnx.merge(self.spec.graphdef, params, self.rest)

    def __call__(self, state: dict, microbatches: Sequence[Microbatch]) -> tuple[dict, dict]:
        """One optimizer step over `microbatches` (host batches of this process)."""
        return self.apply(state, [device_batch(mb, self.mesh, self.rules) for mb in microbatches])

    def apply(self, state: dict, batches: Sequence[Microbatch]) -> tuple[dict, dict]:
        """Like __call__, with the microbatches already on the devices (see `device_batch`)."""
        if not batches:
            raise ValueError("an optimizer step needs at least one microbatch")
        spec = self.spec.for_gradients()
        accum = self._zeros(state["params"], spec=spec)
        for batch in batches:
            accum = self._accumulate(state["params"], self.rest, accum, batch, spec=spec)
        return self._update(state, accum, spec=self.spec)

    def loss_sums(self, state: dict, batch: Microbatch) -> tuple[jax.Array, jax.Array]:
        """(Σ CE, target tokens) of one device microbatch under the current parameters, no update."""
        return self._loss_sums(state["params"], self.rest, batch, spec=self.spec.for_gradients())

    @staticmethod
    def compile_count() -> int:
        """Compiled variants of the accumulate and update functions in this process: one per
        (spec, modality, bucket length) for accumulation, one per spec for the update."""
        return sum(_JITTED[key]._cache_size() for key in _JITTED if key[0] in ("_accumulate", "_update"))


def global_norm(tree) -> jax.Array:
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))


def host_metrics(metrics: dict[str, jax.Array]) -> dict[str, float]:
    """Replicated scalar metrics as Python floats; reads this process's copy, so it also
    works when the array spans several processes (not fully addressable)."""
    return {name: float(np.asarray(value.addressable_data(0))) for name, value in metrics.items()}


def check_finite(metrics: dict[str, float], step: int) -> None:
    """Raise TrainingError naming the step if the loss or gradient norm is not finite."""
    bad = {k: v for k, v in metrics.items() if k in ("loss", "grad_norm") and not np.isfinite(v)}
    if bad:
        raise TrainingError(f"step {step}: non-finite {', '.join(f'{k}={v}' for k, v in bad.items())}; "
                            "training stopped (the last checkpoint is untouched)")
