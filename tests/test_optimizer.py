"""The optimizer: HF-equal schedules, frozen parts, per-part learning rates, decay mask, clipping."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxllava.errors import ConfigError
from jaxllava.model.layers import Dense, Embed, LayerNorm, RMSNorm
from jaxllava.train.config import PARTS, FrozenPartConfig, OptimConfig, PartConfig, PartsConfig
from jaxllava.train.optimizer import make_optimizer, path_str, trainable_manifest, trainable_mask


class ToyLM(nnx.Module):
    def __init__(self, rngs: nnx.Rngs, tied: bool = False):
        self.embed = Embed(11, 4, rngs=rngs)
        self.layer = Dense(4, 4, axes=("embed", "mlp"), rngs=rngs)
        self.norm = RMSNorm(4, eps=1e-5)
        self.lm_head = None if tied else Dense(4, 11, axes=("embed", "vocab"), use_bias=False, rngs=rngs)


class ToyLlava(nnx.Module):
    """The four top-level parts of LlavaModel, each with a kernel, and norms/biases."""

    def __init__(self, rngs: nnx.Rngs, tied: bool = False):
        self.vision = Dense(3, 5, axes=(None, "vision_embed"), rngs=rngs)
        self.resampler = LayerNorm(5, eps=1e-5)
        self.projector = Dense(5, 4, axes=("vision_embed", "embed"), rngs=rngs)
        self.lm = ToyLM(rngs, tied)


def toy_params(tied: bool = False):
    return nnx.split(ToyLlava(nnx.Rngs(0), tied), nnx.Param, ...)[1]


def leaves_by_path(tree) -> dict[str, np.ndarray]:
    return {path_str(kp): np.asarray(v) for kp, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def run_steps(cfg: OptimConfig, steps: int, grads_fn=None, total_steps: int = 20):
    """Apply `steps` updates with gradient `grads_fn(params)` (default: all ones)."""
    params = toy_params()
    tx, _ = make_optimizer(cfg, params, total_steps)
    opt_state = tx.init(params)
    grads_fn = grads_fn or (lambda p: jax.tree.map(jnp.ones_like, p))
    start = params

    @jax.jit
    def step(params, opt_state):
        updates, opt_state = tx.update(grads_fn(params), opt_state, params)
        return jax.tree.map(lambda p, u: p + u, params, updates), opt_state

    for _ in range(steps):
        params, opt_state = step(params, opt_state)
    return leaves_by_path(start), leaves_by_path(params), opt_state


def hf_learning_rates(kind: str, peak: float, warmup: int, total: int, min_lr_rate: float = 0.0) -> list[float]:
    """Learning rates used by each optimizer step under transformers' scheduler (the oracle)."""
    import torch
    from transformers import optimization

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=peak)
    if kind == "cosine" and min_lr_rate:
        sched = optimization.get_cosine_with_min_lr_schedule_with_warmup(opt, warmup, total, min_lr_rate=min_lr_rate)
    elif kind == "cosine":
        sched = optimization.get_cosine_schedule_with_warmup(opt, warmup, total)
    elif kind == "linear":
        sched = optimization.get_linear_schedule_with_warmup(opt, warmup, total)
    else:
        sched = optimization.get_constant_schedule_with_warmup(opt, warmup)
    rates = []
    for _ in range(total):
        rates.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return rates


@pytest.mark.parametrize("kind, warmup_ratio, min_lr_ratio", [
    ("cosine", 0.1, 0.0), ("cosine", 0.25, 0.1), ("linear", 0.1, 0.0), ("constant", 0.3, 0.0)])
def test_schedule_equals_transformers_scheduler_at_every_step(kind, warmup_ratio, min_lr_ratio):
    total = 37
    cfg = OptimConfig(lr=3e-3, schedule=kind, warmup_ratio=warmup_ratio, min_lr_ratio=min_lr_ratio)
    _, schedule = make_optimizer(cfg, toy_params(), total)
    # HF Trainer: warmup = ceil(ratio * max_steps) (docs/reference.md#the-babylm-training-run)
    expected = hf_learning_rates(kind, 3e-3, int(np.ceil(warmup_ratio * total)), total, min_lr_ratio)
    ours = np.asarray(schedule(np.arange(total)))
    np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-9)


def test_explicit_warmup_steps_take_precedence_over_ratio():
    _, schedule = make_optimizer(OptimConfig(lr=1.0, warmup_steps=4, warmup_ratio=0.5), toy_params(), 100)
    np.testing.assert_allclose(schedule(np.arange(5)), [0.0, 0.25, 0.5, 0.75, 1.0], rtol=1e-6)


def test_applied_update_follows_the_schedule():
    # Adam with a constant gradient and tiny eps moves each weight by exactly lr per step,
    # so the applied step sizes trace the learning-rate curve.
    cfg = OptimConfig(lr=1e-2, warmup_steps=3, schedule="linear", grad_clip=None, eps=1e-12)
    total = 8
    params = toy_params()
    tx, schedule = make_optimizer(cfg, params, total)
    opt_state = tx.init(params)
    grads = jax.tree.map(jnp.ones_like, params)
    applied = []
    update = jax.jit(tx.update)
    for _ in range(total):
        updates, opt_state = update(grads, opt_state, params)
        applied.append(-float(leaves_by_path(updates)["lm/layer/kernel"][0, 0]))
    np.testing.assert_allclose(applied, schedule(np.arange(total)), rtol=1e-5, atol=1e-9)


def test_vision_is_frozen_by_default_and_has_no_optimizer_state():
    before, after, opt_state = run_steps(OptimConfig(warmup_steps=0), 3)
    for path in before:
        changed = not np.array_equal(before[path], after[path])
        assert changed == (not path.startswith("vision/")), path
    state_shapes = [x.shape for x in jax.tree.leaves(opt_state) if hasattr(x, "shape") and x.ndim]
    vision_sizes = {before["vision/kernel"].shape, before["vision/bias"].shape}
    # mu and nu exist for every trained leaf, none for the vision tower's (3, 5) kernel
    assert (3, 5) in vision_sizes and (3, 5) not in state_shapes
    assert state_shapes.count((5, 4)) == 2  # the projector kernel: mu and nu


def test_every_part_can_be_frozen():
    cfg = OptimConfig(warmup_steps=0, parts=PartsConfig(lm=PartConfig(train=False), projector=PartConfig(train=False),
                                                       resampler=PartConfig(train=True),
                                                       vision=FrozenPartConfig(train=True)))
    before, after, _ = run_steps(cfg, 2)
    for path in before:
        changed = not np.array_equal(before[path], after[path])
        assert changed == (path.split("/")[0] in ("resampler", "vision")), path


def test_freeze_lm_head_freezes_only_the_head():
    cfg = OptimConfig(warmup_steps=0, freeze_lm_head=True)
    before, after, _ = run_steps(cfg, 2)
    np.testing.assert_array_equal(before["lm/lm_head/kernel"], after["lm/lm_head/kernel"])
    assert not np.array_equal(before["lm/layer/kernel"], after["lm/layer/kernel"])
    assert not np.array_equal(before["lm/embed/embedding"], after["lm/embed/embedding"])


def test_freeze_lm_head_on_a_tied_model_is_a_config_error():
    with pytest.raises(ConfigError, match="no lm/lm_head"):
        make_optimizer(OptimConfig(freeze_lm_head=True), toy_params(tied=True), 10)


def test_manifest_lists_every_parameter_with_its_trainability():
    cfg = OptimConfig(freeze_lm_head=True)
    manifest = trainable_manifest(toy_params(), cfg)
    assert set(manifest) == set(leaves_by_path(toy_params()))
    assert manifest["lm/lm_head/kernel"] is False and manifest["vision/kernel"] is False
    assert manifest["lm/layer/kernel"] is True and manifest["projector/bias"] is True
    mask = leaves_by_path(trainable_mask(toy_params(), cfg))
    assert {p: bool(v) for p, v in mask.items()} == manifest


def test_per_part_learning_rates_scale_each_parts_update():
    cfg = OptimConfig(lr=1e-2, warmup_steps=0, schedule="constant", grad_clip=None, eps=1e-12) \
        .with_part("projector", lr=0.0).with_part("resampler", lr=3e-2)
    before, after, _ = run_steps(cfg, 1)
    step = {path: before[path] - after[path] for path in before}
    np.testing.assert_array_equal(step["projector/kernel"], 0.0)
    np.testing.assert_allclose(step["lm/layer/kernel"], 1e-2, rtol=1e-5)
    np.testing.assert_allclose(step["resampler/scale"], 3e-2, rtol=1e-5)


def test_weight_decay_skips_norm_scales_and_biases():
    cfg = OptimConfig(lr=0.1, weight_decay=0.5, warmup_steps=0, schedule="constant")
    before, after, _ = run_steps(cfg, 1, grads_fn=lambda p: jax.tree.map(jnp.zeros_like, p))
    # zero gradient: only decoupled decay moves a weight, by lr * wd * w
    np.testing.assert_allclose(after["lm/layer/kernel"], before["lm/layer/kernel"] * (1 - 0.1 * 0.5), rtol=1e-6)
    np.testing.assert_allclose(after["lm/embed/embedding"], before["lm/embed/embedding"] * 0.95, rtol=1e-6)
    for path in ("lm/norm/scale", "lm/layer/bias", "resampler/scale", "resampler/bias", "projector/bias"):
        np.testing.assert_array_equal(after[path], before[path], err_msg=path)


def test_clipping_uses_the_norm_of_trained_gradients_only():
    # eps ≫ |g| makes Adam's step linear in the gradient, so clipping is visible.
    cfg = OptimConfig(lr=1.0, warmup_steps=0, schedule="constant", eps=1e6, grad_clip=1.0)
    params = toy_params()
    trained = leaves_by_path(trainable_mask(params, cfg))

    def grads(vision_value: float, scale: float):
        return jax.tree_util.tree_map_with_path(
            lambda kp, p: jnp.full_like(p, vision_value if not trained[path_str(kp)] else scale), params)

    def first_update(g):
        tx, _ = make_optimizer(cfg, params, 10)
        return leaves_by_path(jax.jit(tx.update)(g, tx.init(params), params)[0])

    count = sum(v.size for p, v in leaves_by_path(params).items() if trained[p])
    big = first_update(grads(vision_value=1e4, scale=1.0))  # trained norm sqrt(count) > 1: clipped
    manual = first_update(grads(vision_value=0.0, scale=1.0 / np.sqrt(count)))  # already norm 1
    for path in big:
        np.testing.assert_allclose(big[path], manual[path], rtol=1e-5, err_msg=path)
    assert np.abs(big["lm/layer/kernel"]).max() > 0


def test_each_part_has_its_own_lr_falling_back_to_lr_and_only_the_tower_starts_frozen():
    cfg = OptimConfig(lr=0.1).with_part("lm", lr=0.2)
    assert [cfg.part_lr(p) for p in PARTS] == [0.2, 0.1, 0.1, 0.1, 0.1]
    assert [cfg.part_trainable(p) for p in PARTS] == [True, True, True, False, True]
    # Changing one setting of the tower keeps its frozen default, in code as in YAML.
    assert not cfg.with_part("vision", lr=1e-3).part_trainable("vision")
    assert cfg.with_part("vision", train=True).part_trainable("vision")


def test_the_parts_are_the_fields_of_optim_parts():
    assert PARTS == tuple(f.name for f in dataclasses.fields(PartsConfig)) == ("lm", "projector", "resampler",
                                                                               "vision", "lape")
    with pytest.raises(ValueError, match="unknown model part 'decoder'; the parts are lm, projector"):
        OptimConfig().part_lr("decoder")


def test_trainability_keeps_which_parts_train_and_nothing_else():
    a = OptimConfig(lr=0.1, schedule="linear", warmup_steps=3).with_part("lm", lr=0.5).with_part("vision", train=True)
    b = OptimConfig(lr=0.2, weight_decay=0.1).with_part("vision", train=True, lr=1.0)
    assert a.trainability() == b.trainability() and hash(a.trainability()) == hash(b.trainability())
    assert a.trainability() == a.trainability().trainability()
    assert a.trainability() != OptimConfig().trainability()  # the tower trains in one only
    assert OptimConfig(freeze_lm_head=True).trainability() != OptimConfig().trainability()
    assert OptimConfig().with_part("projector", train=False).trainability() != OptimConfig().trainability()
    params = toy_params()
    assert trainable_manifest(params, a.trainability()) == trainable_manifest(params, a)


def test_parameter_outside_the_known_parts_is_rejected():
    params = {"lm": {"w": jnp.ones(2)}, "decoder_extra": {"w": jnp.ones(2)}}
    with pytest.raises(ValueError, match="'decoder_extra/w' is under 'decoder_extra'"):
        make_optimizer(OptimConfig(), params, 10)

