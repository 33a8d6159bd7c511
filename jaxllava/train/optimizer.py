"""AdamW with warmup and decay, per-part learning rates, frozen parts and a weight-decay mask.

Parameters are grouped by the top-level key of the parameter state, which is the
LlavaModel attribute that owns them: `lm`, `projector`, `resampler`, `vision` (the
fields of `optim.parts`). Each trainable part gets its own AdamW with its own peak
learning rate; a frozen part (and `lm/lm_head` under `freeze_lm_head`) gets zero
updates and no optimizer state. Weight decay skips norm scales and biases (leaf
names `scale`, `bias`, see model/layers.py), as HF Trainer's no-decay group did.

The schedule follows transformers' `get_{cosine,linear,constant}_schedule_with_warmup`
(the reference's scheduler): at optimizer step k (0-based, the k-th update) the
multiplier is k / warmup during warmup, then decays over the remaining steps;
warmup = ceil(warmup_ratio · total) unless warmup_steps is given. The first
update therefore has learning rate 0 when there is warmup, as in HF.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from jaxllava.errors import ConfigError
from jaxllava.train.config import PARTS, OptimConfig

FROZEN = "frozen"
NO_DECAY_LEAVES = ("scale", "bias")
LM_HEAD = "lm/lm_head"


def path_str(keypath) -> str:
    """'lm/layers/0/kernel' for a pytree key path (nnx.State's trailing `.value` dropped)."""
    parts = []
    for key in keypath:
        if isinstance(key, jax.tree_util.DictKey):
            parts.append(str(key.key))
        elif isinstance(key, jax.tree_util.SequenceKey):
            parts.append(str(key.idx))
        elif isinstance(key, jax.tree_util.GetAttrKey):
            if key.name != "value":
                parts.append(key.name)
        else:
            parts.append(str(key))
    return "/".join(parts)


def warmup_steps(cfg: OptimConfig, total_steps: int) -> int:
    if cfg.warmup_steps is not None:
        return cfg.warmup_steps
    return math.ceil(cfg.warmup_ratio * total_steps)


def lr_multiplier(cfg: OptimConfig, total_steps: int) -> Callable[[Any], jax.Array]:
    """step -> multiplier of the peak learning rate (jit-friendly)."""
    warmup = warmup_steps(cfg, total_steps)
    decay_steps = max(1, total_steps - warmup)
    floor = cfg.min_lr_ratio

    def multiplier(step):
        step = jnp.asarray(step, jnp.float32)
        warm = step / max(1, warmup)
        progress = jnp.clip((step - warmup) / decay_steps, 0.0, 1.0)
        if cfg.schedule == "cosine":
            decayed = 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
        elif cfg.schedule == "linear":
            decayed = 1.0 - progress
        else:
            decayed = jnp.ones_like(progress)
        decayed = floor + (1.0 - floor) * decayed
        return jnp.where(step < warmup, warm, decayed)

    return multiplier


def _part_of(path: str, top: str) -> str:
    if top not in PARTS:
        raise ValueError(f"parameter {path!r} is under {top!r}; optimizer parts are {PARTS}")
    return top


def param_labels(params, cfg: OptimConfig):
    """Same-structure tree of labels: the part name, or 'frozen'."""

    def label(keypath, _):
        path = path_str(keypath)
        part = _part_of(path, path.split("/")[0])
        if not cfg.part_trainable(part):
            return FROZEN
        if cfg.freeze_lm_head and (path == LM_HEAD or path.startswith(LM_HEAD + "/")):
            return FROZEN
        return part

    if cfg.freeze_lm_head and not any(p.startswith(LM_HEAD + "/") for p in trainable_manifest_paths(params)):
        raise ConfigError("optim.freeze_lm_head is set but the model has no lm/lm_head "
                          "(tied word embeddings have no separate head to freeze)")
    return jax.tree_util.tree_map_with_path(label, params)


def trainable_manifest_paths(params) -> list[str]:
    return [path_str(kp) for kp, _ in jax.tree_util.tree_flatten_with_path(params)[0]]


def trainable_mask(params, cfg: OptimConfig):
    """Same-structure tree of bools: True where the parameter is trained."""
    return jax.tree.map(lambda label: label != FROZEN, param_labels(params, cfg))


def trainable_manifest(params, cfg: OptimConfig) -> dict[str, bool]:
    """{'lm/lm_head/kernel': True, 'vision/...': False, ...}: written to the run dir so
    what was trained is on record (the reference's stage 1 silently froze lm_head, README pitfall 5)."""
    labels = param_labels(params, cfg)
    flat = jax.tree_util.tree_flatten_with_path(labels)[0]
    return {path_str(kp): label != FROZEN for kp, label in flat}


def decay_mask(params):
    """Same-structure tree of bools: True where weight decay applies."""
    return jax.tree_util.tree_map_with_path(
        lambda kp, _: path_str(kp).rsplit("/", 1)[-1] not in NO_DECAY_LEAVES, params)


def make_optimizer(cfg: OptimConfig, params, total_steps: int
                   ) -> tuple[optax.GradientTransformation, Callable[[Any], jax.Array]]:
    """(transformation over the whole parameter tree, step -> learning rate of `cfg.lr`).

    Frozen gradients are zeroed before clipping, so the clipped global norm is the
    norm of the trained parameters' gradients.
    """
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    multiplier = lr_multiplier(cfg, total_steps)
    labels = param_labels(params, cfg)
    used = set(jax.tree.leaves(labels))

    def adamw(peak: float):
        return optax.adamw(learning_rate=lambda step: peak * multiplier(step), b1=cfg.b1, b2=cfg.b2,
                           eps=cfg.eps, weight_decay=cfg.weight_decay, mask=decay_mask)

    transforms = {part: adamw(cfg.part_lr(part)) for part in PARTS if part in used}
    transforms[FROZEN] = optax.set_to_zero()
    frozen = jax.tree.map(lambda label: label == FROZEN, labels)
    chain = [optax.masked(optax.set_to_zero(), frozen)]
    if cfg.grad_clip is not None:
        chain.append(optax.clip_by_global_norm(cfg.grad_clip))
    chain.append(optax.multi_transform(transforms, labels))
    return optax.chain(*chain), lambda step: cfg.lr * multiplier(step)
