"""The train step: token-weighted loss over accumulated microbatches, frozen parts, sharding, compiles."""
from __future__ import annotations

import dataclasses
import functools
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxllava.data.batch import IGNORE, BatchStats, ImageBatch, TextBatch, VideoBatch
from jaxllava.errors import TrainingError
from jaxllava.model.config import LlamaConfig, ModelConfig, VideoConfig, VisionConfig
from jaxllava.model.llava import create_model
from jaxllava.model.sharding import make_mesh
from jaxllava.train.config import OptimConfig
from jaxllava.train.optimizer import path_str
from jaxllava.train.step import (TrainStep, _accumulate, _zero_accumulator, check_finite, cross_entropy_sum,
                                 device_batch, host_metrics)

VOCAB = 48
MODEL = ModelConfig(
    lm=LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=4,
                   num_kv_heads=2, max_position_embeddings=64),
    vision=VisionConfig(kind="dinov2", image_size=16, patch_size=8, hidden_size=16, intermediate_size=32,
                        num_layers=1, num_heads=2, pretrained_image_size=16),
    dtype="float32", attention_impl="xla")
N = MODEL.image_tokens  # 4 placeholders per image
FAST_COMPILE = {"xla_backend_optimization_level": 0}  # halves CPU compile time; numerics unchanged


def text_batch(seed: int, rows: int = 4, length: int = 16, fill: float = 1.0) -> TextBatch:
    """Random tokens; `fill` < 1 leaves a padded tail so microbatches differ in target counts."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(4, VOCAB, (rows, length)).astype(np.int32)
    used = max(2, int(length * fill))
    segment_ids = np.zeros((rows, length), np.int32)
    segment_ids[:, :used] = 1
    targets = np.full((rows, length), IGNORE, np.int32)
    targets[:, :used - 1] = ids[:, 1:used]
    positions = np.where(segment_ids > 0, np.arange(length, dtype=np.int32), 0).astype(np.int32)
    stats = BatchStats("text", rows, length, rows, 0, int((targets != IGNORE).sum()), 0,
                       int((segment_ids == 0).sum()))
    return TextBatch(ids, targets, segment_ids, positions, stats)


def image_batch(seed: int, rows: int = 2, length: int = 16) -> ImageBatch:
    base = text_batch(seed, rows, length)
    image_mask = np.zeros((rows, length), bool)
    image_mask[:, 1:1 + N] = True
    targets = base.targets.copy()
    targets[:, :1 + N] = IGNORE  # nothing predicted from or onto the placeholders
    pixels = np.random.default_rng(seed + 100).normal(size=(rows, 16, 16, 3)).astype(np.float32)
    stats = BatchStats("image", rows, length, rows, 0, int((targets != IGNORE).sum()), rows * N, 0)
    return ImageBatch(base.input_ids, targets, base.segment_ids, base.positions, pixels, image_mask,
                      np.ones((rows,), bool), stats)


VIDEO_MODEL = dataclasses.replace(MODEL, video=VideoConfig(frames=2, fast_tokens=1, slow_frames=1))
VIDEO_TOKENS = sum(VIDEO_MODEL.video_spans)  # fast 2 · 1 + slow 1 · 4


def video_batch(seed: int, rows: int = 2, length: int = 16) -> VideoBatch:
    base = text_batch(seed, rows, length)
    video_mask = np.zeros((rows, length), bool)
    video_mask[:, 1:1 + VIDEO_TOKENS] = True
    targets = base.targets.copy()
    targets[:, :VIDEO_TOKENS] = IGNORE  # nothing predicted onto the placeholders
    frames = np.random.default_rng(seed + 200).normal(size=(rows, 2, 16, 16, 3)).astype(np.float32)
    stats = BatchStats("video", rows, length, rows, 0, int((targets != IGNORE).sum()), 0, 0,
                       video_tokens=rows * VIDEO_TOKENS)
    return VideoBatch(base.input_ids, targets, base.segment_ids, base.positions, frames, video_mask,
                      np.ones((rows,), bool), stats)


_TRAINERS: dict = {}


def make_trainer(optim: OptimConfig = OptimConfig(lr=1e-2, warmup_steps=0), total_steps: int = 50, mesh=None,
                 model_config: ModelConfig = MODEL):
    """(trainer, fresh state); trainers are shared between tests so each compiles once."""
    mesh = mesh or make_mesh(devices=jax.devices()[:1])
    key = (optim, total_steps, model_config, tuple(mesh.devices.shape))
    if key not in _TRAINERS:
        model = create_model(model_config, mesh, seed=0, compiler_options=FAST_COMPILE)
        trainer = TrainStep(model, optim, total_steps, mesh, loss_chunk=8, compiler_options=FAST_COMPILE)
        _TRAINERS[key] = trainer, nnx.split(model, nnx.Param, ...)[1]
    trainer, params = _TRAINERS[key]
    return trainer, trainer.init_state(jax.tree.map(jnp.copy, params))


def flat(tree) -> dict[str, np.ndarray]:
    return {path_str(kp): np.asarray(v) for kp, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def reference_token_mean(trainer: TrainStep, params, batches) -> float:
    """Σ CE / Σ target tokens over all microbatches, from full logits (no chunking)."""
    forward = jax.jit(lambda p, ids, kwargs: trainer.model(p)(ids, **kwargs))
    total, count = 0.0, 0
    for b in batches:
        kwargs = {"segment_ids": b.segment_ids, "positions": b.positions}
        if isinstance(b, ImageBatch):
            kwargs.update(pixels=b.pixels, image_mask=b.image_mask)
        if isinstance(b, VideoBatch):
            kwargs.update(frames=b.frames, video_mask=b.video_mask)
        logits = np.asarray(forward(params, b.input_ids, kwargs), np.float64)
        logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
            - logits.max(-1, keepdims=True)
        valid = b.targets != IGNORE
        picked = np.take_along_axis(logp, np.where(valid, b.targets, 0)[..., None], -1)[..., 0]
        total += -picked[valid].sum()
        count += int(valid.sum())
    return total / count


def test_loss_is_the_mean_over_all_target_tokens_of_the_step():
    trainer, state = make_trainer()
    batches = [text_batch(0, fill=1.0), text_batch(1, fill=0.25), image_batch(2)]
    counts = [int((b.targets != IGNORE).sum()) for b in batches]
    assert len(set(counts)) == 3  # a mean of per-microbatch means would differ (README pitfall 24)
    expected = reference_token_mean(trainer, state["params"], batches)
    _, metrics = trainer(state, batches)
    assert float(metrics["loss"]) == pytest.approx(expected, rel=1e-5)
    assert int(metrics["target_tokens"]) == sum(counts)


def test_text_and_image_losses_are_kept_apart_and_the_held_out_loss_updates_nothing():
    trainer, state = make_trainer()
    texts, images = [text_batch(0), text_batch(1, fill=0.25)], [image_batch(2)]
    before = flat(state["params"])
    ce, tokens = map(float, trainer.loss_sums(state, device_batch(images[0], trainer.mesh)))
    assert flat(state["params"]).keys() == before.keys()
    assert ce / tokens == pytest.approx(reference_token_mean(trainer, state["params"], images), rel=1e-5)
    expected = {"text": reference_token_mean(trainer, state["params"], texts), "image": ce / tokens}
    _, metrics = trainer(state, texts + images)  # donates the state: the references come first
    for modality, batches in (("text", texts), ("image", images)):
        count = sum(int((b.targets != IGNORE).sum()) for b in batches)
        assert int(metrics[f"{modality}_target_tokens"]) == count
        assert float(metrics[f"{modality}_ce"]) / count == pytest.approx(expected[modality], rel=1e-5)
    assert float(metrics["image_ce"]) == pytest.approx(ce, rel=1e-6)


def mean_gradients(trainer, state, batches):
    """(gradient of the trainable params averaged over the step's target tokens, loss): what the
    optimizer update receives, computed with the step's own jitted accumulation."""
    spec = trainer.spec.for_gradients()
    accum = trainer._zeros(state["params"], spec=spec)
    for batch in batches:
        accum = trainer._accumulate(state["params"], trainer.rest, accum, device_batch(batch, trainer.mesh), spec=spec)
    tokens = float(sum(accum["tokens"].values()))
    return jax.tree.map(lambda g: g / tokens, accum["grads"]), float(sum(accum["ce"].values())) / tokens


def test_accumulating_microbatches_equals_one_large_batch():
    whole = text_batch(5, rows=8, fill=0.6)
    halves = [TextBatch(*(getattr(whole, f)[sl] for f in ("input_ids", "targets", "segment_ids", "positions")),
                        whole.stats) for sl in (slice(0, 4), slice(4, 8))]
    trainer, state = make_trainer()
    grads_whole, loss_whole = mean_gradients(trainer, state, [whole])
    grads_parts, loss_parts = mean_gradients(trainer, state, halves)
    assert float(loss_parts) == pytest.approx(float(loss_whole), rel=1e-6)
    a, b = flat(grads_whole), flat(grads_parts)
    assert set(a) == set(b) and len(a) > 5
    for path in a:
        np.testing.assert_allclose(b[path], a[path], rtol=1e-5, atol=1e-8, err_msg=path)


def test_microbatch_without_targets_adds_nothing_instead_of_nan():
    empty = text_batch(3)
    empty = TextBatch(empty.input_ids, np.full_like(empty.targets, IGNORE), empty.segment_ids, empty.positions,
                      empty.stats)
    trainer, state = make_trainer()
    expected = reference_token_mean(trainer, state["params"], [text_batch(4)])
    _, metrics = trainer(state, [empty, text_batch(4)])
    assert float(metrics["loss"]) == pytest.approx(expected, rel=1e-5)


def test_overfits_one_mixed_step():
    trainer, state = make_trainer()
    batches = [text_batch(0), image_batch(1)]
    losses = []
    for _ in range(25):
        state, metrics = trainer(state, batches)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < 0.25 * losses[0], losses


def test_vision_tower_is_frozen_by_default():
    trainer, state = make_trainer()
    before = flat(state["params"])
    trainable, frozen = trainer.spec.split(state["params"])
    assert "vision" not in trainable and "vision" in frozen  # never differentiated
    state, _ = trainer(state, [text_batch(0), image_batch(1)])
    after = flat(state["params"])
    for path in before:
        assert np.array_equal(before[path], after[path]) == path.startswith("vision/"), path


def _count_dot_generals(jaxpr) -> int:
    """dot_general equations in a jaxpr and every sub-jaxpr (jit, remat, scan bodies)."""
    count = 0
    for eqn in jaxpr.eqns:
        count += eqn.primitive.name == "dot_general"
        for param in eqn.params.values():
            for sub in param if isinstance(param, (list, tuple)) else (param,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    count += _count_dot_generals(inner)
    return count


def test_a_frozen_tower_runs_forward_only_and_a_trained_one_backward_too():
    """Freezing is one switch (optim.parts.vision.train): frozen parameters are not differentiated,
    so the step has no backward matmul in the tower, with no stop_gradient in the model."""
    batch = device_batch(image_batch(1), make_mesh(devices=jax.devices()[:1]))

    def step_matmuls(optim):
        trainer, state = make_trainer(optim)
        spec = trainer.spec.for_gradients()
        accum = _zero_accumulator(state["params"], spec=spec)
        step = functools.partial(_accumulate, spec=spec)
        jaxpr = jax.make_jaxpr(step)(state["params"], trainer.rest, accum, batch).jaxpr
        return _count_dot_generals(jaxpr), trainer.model(state["params"])

    frozen, model = step_matmuls(OptimConfig(lr=1e-2, warmup_steps=0))
    trained, _ = step_matmuls(OptimConfig(lr=1e-2, warmup_steps=0).with_part("vision", train=True))
    graphdef, tower_params = nnx.split(model.vision)

    def tower_sum(params):
        return nnx.merge(graphdef, params)(batch.pixels).sum()

    forward = _count_dot_generals(jax.make_jaxpr(tower_sum)(tower_params).jaxpr)
    backward = _count_dot_generals(jax.make_jaxpr(jax.grad(tower_sum))(tower_params).jaxpr) - forward
    assert forward > 0 and backward > 0
    # Training the tower adds its whole backward, plus one matmul: the projector's first
    # layer sending the gradient into the tower's output. Any tower backward left in the
    # frozen step would make the difference smaller.
    assert trained - frozen == backward + 1


def test_trainable_parts_and_per_part_rates_follow_the_config():
    optim = OptimConfig(lr=1e-2, warmup_steps=0, freeze_lm_head=True).with_part("projector", lr=0.0) \
        .with_part("vision", train=True)
    trainer, state = make_trainer(optim)
    trainable, frozen = trainer.spec.split(state["params"])
    assert set(trainable.keys()) == {"lm", "projector", "vision"} and "lm_head" in frozen["lm"]
    before = flat(state["params"])
    state, _ = trainer(state, [image_batch(1)])
    after = flat(state["params"])
    for path in before:
        unchanged = np.array_equal(before[path], after[path])
        assert unchanged == path.startswith(("projector/", "lm/lm_head/")), path  # lr 0 and frozen head


def test_chunked_cross_entropy_equals_unchunked_in_value_and_gradient():
    rng = np.random.default_rng(0)
    hidden = jnp.asarray(rng.normal(size=(2, 12, 8)), jnp.float32)
    weight = jnp.asarray(rng.normal(size=(8, 20)), jnp.float32)
    targets = jnp.asarray(np.where(rng.random((2, 12)) < 0.3, IGNORE, rng.integers(0, 20, (2, 12))), jnp.int32)

    @functools.partial(jax.jit, static_argnums=1)
    def loss(w, chunk):
        return cross_entropy_sum(lambda h: h @ w, hidden, targets, chunk)

    (ce_full, n_full), (ce_chunk, n_chunk) = loss(weight, 12), loss(weight, 4)
    assert int(n_full) == int(n_chunk) == int((targets != IGNORE).sum())
    np.testing.assert_allclose(float(ce_chunk), float(ce_full), rtol=1e-6)
    g_full = jax.jit(jax.grad(lambda w: loss(w, 12)[0]))(weight)
    g_chunk = jax.jit(jax.grad(lambda w: loss(w, 4)[0]))(weight)
    np.testing.assert_allclose(g_chunk, g_full, rtol=1e-5, atol=1e-6)


def test_non_finite_loss_is_a_training_error_naming_the_step():
    trainer, state = make_trainer()
    assert "lm/norm/scale" in flat(state["params"])
    poisoned = jax.tree_util.tree_map_with_path(
        lambda kp, x: x * np.nan if path_str(kp) == "lm/norm/scale" else x, state["params"])
    _, metrics = trainer({**state, "params": poisoned}, [text_batch(0)])
    with pytest.raises(TrainingError, match="step 7: non-finite .*loss=nan"):
        check_finite(host_metrics(metrics), 7)


def test_compiles_once_per_modality_and_bucket_then_never_again():
    trainer, state = make_trainer()
    state, _ = trainer(state, [text_batch(0)])  # the update is compiled
    start = trainer.compile_count()
    # shapes no other test uses: text@12, image@24 (3 rows each)
    mixes = [[text_batch(0, rows=3, length=12), image_batch(1, rows=3, length=24)],
             [text_batch(2, rows=3, length=12)],
             [image_batch(3, rows=3, length=24), text_batch(4, rows=3, length=12)]]
    for batches in mixes:
        state, _ = trainer(state, batches)
    assert trainer.compile_count() == start + 2
    for batches in mixes * 2:
        state, _ = trainer(state, batches)
    assert trainer.compile_count() == start + 2


def test_a_video_step_trains_the_video_loss_apart_and_compiles_once_per_shape():
    trainer, state = make_trainer(model_config=VIDEO_MODEL)
    batches = [text_batch(0), video_batch(1), image_batch(2)]
    expected = reference_token_mean(trainer, state["params"], batches)
    tower = flat(state["params"]["vision"])
    state, metrics = trainer(state, batches)
    metrics = host_metrics(metrics)
    np.testing.assert_allclose(metrics["loss"], expected, rtol=1e-5)
    assert metrics["video_target_tokens"] == int((batches[1].targets != IGNORE).sum()) > 0
    for name in ("text", "image"):
        assert metrics[f"{name}_target_tokens"] == int((batches[0 if name == "text" else 2].targets != IGNORE).sum())
    after = flat(state["params"]["vision"])
    assert all(np.array_equal(after[k], tower[k]) for k in tower)  # the frozen tower, frames and all
    start = trainer.compile_count()
    for seed in range(3):
        state, _ = trainer(state, [video_batch(seed), text_batch(seed)])
    assert trainer.compile_count() == start


SHARDED_SCRIPT = textwrap.dedent("""
    import jax, numpy as np
    from tests.test_train_step import make_trainer, text_batch, image_batch, flat
    from jaxllava.model.sharding import make_mesh
    assert jax.device_count() == 8
    batches = [text_batch(0, rows=8, length=8), image_batch(1, rows=4, length=8),
               text_batch(2, rows=8, length=8, fill=0.5)]
    results = []
    for mesh in (make_mesh(devices=jax.devices()[:1]), make_mesh(data=2, fsdp=2, tensor=2)):
        trainer, state = make_trainer(mesh=mesh)
        losses = []
        for _ in range(3):
            state, metrics = trainer(state, batches)
            losses.append(float(metrics["loss"]))
        results.append((losses, flat(state["params"]), state))
    (l1, p1, _), (l8, p8, s8) = results
    np.testing.assert_allclose(l8, l1, rtol=2e-5)
    for path in p1:
        np.testing.assert_allclose(p8[path], p1[path], rtol=1e-4, atol=1e-4, err_msg=path)  # lr 1e-2: no sign flips
    kernel = s8["params"]["lm"]["layers"][0]["mlp"]["up_proj"]["kernel"].get_value()
    assert len(kernel.sharding.device_set) == 8, kernel.sharding
    assert kernel.addressable_shards[0].data.shape == (kernel.shape[0] // 2, kernel.shape[1] // 2)
    print("SHARDED_OK", l1)
""")


def test_eight_device_sharded_step_equals_one_device():
    # data=2, fsdp=2, tensor=2: rows split 4 ways, kernels split over fsdp and tensor
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run([sys.executable, "-c", SHARDED_SCRIPT], env=env, cwd=root, capture_output=True,
                            text=True, timeout=600)
    assert "SHARDED_OK" in result.stdout, result.stderr[-4000:]


def test_create_model_equals_eager_init_and_compiles_once_for_every_seed():
    """The seed is an argument of the jitted initialiser: a second seed reuses the compile, and
    the values are exactly LlavaModel(config, rngs=nnx.Rngs(seed))'s."""
    from jaxllava.model import llava

    config = dataclasses.replace(MODEL, lm=dataclasses.replace(MODEL.lm, vocab_size=VOCAB + 7))  # no other test's
    mesh = make_mesh(devices=jax.devices()[:1])
    for seed in (3, 4):
        created = nnx.state(create_model(config, mesh, seed=seed, compiler_options=FAST_COMPILE))
        eager = nnx.state(llava.LlavaModel(config, rngs=nnx.Rngs(seed)))
        for (path, a), (_, b) in zip(nnx.to_flat_state(created), nnx.to_flat_state(eager)):
            np.testing.assert_allclose(np.asarray(a[...]), np.asarray(b[...]), rtol=0, atol=1e-6, err_msg=str(path))
    initialisers = [fn for key, (_, fn) in llava._INITIALISERS.items() if key[0] == config]
    assert len(initialisers) == 1 and initialisers[0]._cache_size() == 1
