"""`model.vision.kind: features`: training from precomputed vision features (BabyLM ships DINOv2
states, not images), with no tower; `projector.expand`, which turns one vector into k image tokens."""
from __future__ import annotations

import dataclasses
import pathlib
import types

import jax
import numpy as np
import pytest
from flax import nnx

from jaxllava.config import load_config
from jaxllava.convert import hf as hf_module
from jaxllava.convert import reference as reference_module
from jaxllava.data.batch import IGNORE, BatchStats, FeatureBatch, TextBatch
from jaxllava.errors import ConfigError, ConversionError
from jaxllava.model.config import LlamaConfig, ModelConfig, ProjectorConfig, ResamplerConfig, VisionConfig
from jaxllava.model.llava import LlavaModel
from jaxllava.model.sharding import make_mesh
from jaxllava.train.config import OptimConfig
from jaxllava.train.optimizer import path_str
from jaxllava.model.llava import create_model
from jaxllava.train.step import TrainStep, device_batch

TINY = str(pathlib.Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml")
VOCAB, WIDTH = 48, 16  # WIDTH: the feature width E, and the tower's
LM = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=4, num_kv_heads=2,
                 max_position_embeddings=64)
FAST_COMPILE = {"xla_backend_optimization_level": 0}  # halves CPU compile time; numerics unchanged
ROWS, LENGTH = 2, 24

# (resampler, grid side g of the P = g² features, projector.expand) → I
CASES = {
    "identity-expand1": (ResamplerConfig("identity"), 2, 1),  # I = 4
    "identity-expand4": (ResamplerConfig("identity"), 2, 4),  # I = 16
    "avg_pool-expand1": (ResamplerConfig("avg_pool", pool_stride=2), 4, 1),  # I = 4
    "avg_pool-expand4": (ResamplerConfig("avg_pool", pool_stride=2), 2, 4),  # I = 1 · 4
}


def model_configs(case: str) -> tuple[ModelConfig, ModelConfig]:
    """(features model, the tower model whose frozen output it replaces): same LM, resampler, projector."""
    resampler, side, expand = CASES[case]
    tower = VisionConfig(kind="dinov2", image_size=8 * side, patch_size=8, hidden_size=WIDTH, intermediate_size=32,
                         num_layers=1, num_heads=2, pretrained_image_size=8 * side)
    features = VisionConfig(kind="features", hidden_size=WIDTH, tokens=side * side)
    base = ModelConfig(lm=LM, vision=features, resampler=resampler, projector=ProjectorConfig("mlp2x_gelu", expand),
                       dtype="float32", attention_impl="xla")
    return base, dataclasses.replace(base, vision=tower)


def rows(seed: int, image_tokens: int) -> dict:
    """Random ids in two rows of LENGTH; row 0 holds its image span at 1, row 1 at 3; no targets on
    or before the span."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(4, VOCAB, (ROWS, LENGTH)).astype(np.int32)
    segment_ids = np.ones((ROWS, LENGTH), np.int32)
    positions = np.broadcast_to(np.arange(LENGTH, dtype=np.int32), (ROWS, LENGTH)).copy()
    image_mask = np.zeros((ROWS, LENGTH), bool)
    targets = np.full((ROWS, LENGTH), IGNORE, np.int32)
    for r, start in enumerate((1, 3)):
        image_mask[r, start:start + image_tokens] = True
        end = start + image_tokens
        targets[r, end:LENGTH - 1] = ids[r, end + 1:]
    return dict(input_ids=ids, targets=targets, segment_ids=segment_ids, positions=positions, image_mask=image_mask)


def stats(modality: str, arrays: dict, image_tokens: int) -> BatchStats:
    return BatchStats(modality, ROWS, LENGTH, ROWS, 0, int((arrays["targets"] != IGNORE).sum()),
                      image_tokens * ROWS if modality == "image" else 0, 0)


def feature_batch(config: ModelConfig, seed: int) -> FeatureBatch:
    arrays = rows(seed, config.image_tokens)
    features = np.random.default_rng(seed + 50).normal(
        size=(ROWS, config.vision.tokens, config.vision.hidden_size)).astype(np.float32)
    return FeatureBatch(**arrays, features=features, image_rows=np.ones((ROWS,), bool),
                        stats=stats("image", arrays, config.image_tokens))


def text_batch(seed: int) -> TextBatch:
    arrays = rows(seed, 0)
    del arrays["image_mask"]
    return TextBatch(**arrays, stats=stats("text", arrays, 0))


def trainer_for(config: ModelConfig) -> tuple[TrainStep, dict]:
    mesh = make_mesh(devices=jax.devices()[:1])
    model = create_model(config, mesh, seed=0, compiler_options=FAST_COMPILE)
    trainer = TrainStep(model, OptimConfig(lr=1e-2, warmup_steps=0), 50, mesh, loss_chunk=8,
                        compiler_options=FAST_COMPILE)
    return trainer, trainer.init_state(nnx.split(model, nnx.Param, ...)[1])


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def reference_token_mean(trainer: TrainStep, params, batches) -> float:
    """Σ CE / Σ target tokens over the microbatches, from full float64 log-softmax of the logits."""
    forward = jax.jit(lambda p, ids, kwargs: trainer.model(p)(ids, **kwargs))
    total, count = 0.0, 0
    for b in batches:
        kwargs = {"segment_ids": b.segment_ids, "positions": b.positions}
        if isinstance(b, FeatureBatch):
            kwargs.update(features=b.features, image_mask=b.image_mask)
        logp = log_softmax(np.asarray(forward(params, b.input_ids, kwargs), np.float64))
        valid = b.targets != IGNORE
        total -= np.take_along_axis(logp, np.where(valid, b.targets, 0)[..., None], -1)[..., 0][valid].sum()
        count += int(valid.sum())
    return total / count


@pytest.mark.parametrize("case", CASES)
def test_a_train_step_on_feature_batches_matches_full_logits_and_trains_the_projector(case):
    config, _ = model_configs(case)
    trainer, state = trainer_for(config)
    assert {path_str(kp).split("/")[0] for kp, _ in jax.tree_util.tree_flatten_with_path(state["params"])[0]} == \
        {"lm", "projector"}  # no vision parameter at all
    images, texts = [feature_batch(config, 1), feature_batch(config, 2)], [text_batch(3)]
    expected = {"image": reference_token_mean(trainer, state["params"], images),
                "all": reference_token_mean(trainer, state["params"], images + texts)}

    spec = trainer.spec.for_gradients()
    accum = trainer._zeros(state["params"], spec=spec)
    for batch in images:
        accum = trainer._accumulate(state["params"], trainer.rest, accum, device_batch(batch, trainer.mesh),
                                    spec=spec)
    grads = {path_str(kp): np.asarray(g) for kp, g in jax.tree_util.tree_flatten_with_path(accum["grads"])[0]}
    projector = [g for path, g in grads.items() if path.startswith("projector/")]
    assert len(projector) == 4 and all(np.abs(g).max() > 0 for g in projector)
    assert float(accum["ce"]["image"]) / int(accum["tokens"]["image"]) == pytest.approx(expected["image"], rel=1e-5)

    before = {path_str(kp): np.asarray(v) for kp, v in jax.tree_util.tree_flatten_with_path(state["params"])[0]}
    state, metrics = trainer(state, images + texts)
    assert float(metrics["loss"]) == pytest.approx(expected["all"], rel=1e-5)
    assert int(metrics["image_target_tokens"]) == sum(int((b.targets != IGNORE).sum()) for b in images)
    after = {path_str(kp): np.asarray(v) for kp, v in jax.tree_util.tree_flatten_with_path(state["params"])[0]}
    assert all(not np.array_equal(before[p], after[p]) for p in before if p.startswith("projector/") and "kernel" in p)


@jax.jit
def _logits(graphdef, state, arrays):
    model = nnx.merge(graphdef, state)
    visual = {k: arrays[k] for k in ("pixels", "features") if k in arrays}
    return model(arrays["input_ids"], segment_ids=arrays["segment_ids"], positions=arrays["positions"],
                 image_mask=arrays["image_mask"], **visual)


@pytest.mark.parametrize("case", CASES)
def test_features_equal_to_a_frozen_towers_output_give_the_tower_models_logits(case):
    """Training from a feature cache is training from pixels with a frozen tower: the features go
    through the same resampler and projector and the same splice."""
    features_config, tower_config = model_configs(case)
    tower_model = LlavaModel(tower_config, rngs=nnx.Rngs(1))
    features_model = LlavaModel(features_config, rngs=nnx.Rngs(2))  # another seed: the copy makes them equal
    for part in ("lm", "resampler", "projector"):
        nnx.update(getattr(features_model, part), nnx.state(getattr(tower_model, part), nnx.Param))
    arrays = rows(4, tower_config.image_tokens)
    side = tower_config.vision.image_size
    pixels = np.random.default_rng(5).normal(size=(ROWS, side, side, 3)).astype(np.float32)
    features = np.asarray(jax.jit(lambda s, p: nnx.merge(nnx.graphdef(tower_model.vision), s)(p))(
        nnx.state(tower_model.vision), pixels))
    assert features.shape == (ROWS, features_config.vision.tokens, WIDTH)
    from_pixels = np.asarray(_logits(*nnx.split(tower_model), dict(arrays, pixels=pixels)))
    from_features = np.asarray(_logits(*nnx.split(features_model), dict(arrays, features=features)))
    np.testing.assert_allclose(from_features, from_pixels, rtol=0, atol=1e-5)
    # the visual input matters: other features give other logits after the span
    other = np.asarray(_logits(*nnx.split(features_model), dict(arrays, features=features[::-1].copy())))
    assert np.abs(other - from_features).max() > 1e-3


# ----------------------------------------------------------------------------- config


def test_features_need_only_tokens_and_hidden_size():
    vision = VisionConfig(kind="features", hidden_size=100, tokens=3)  # 16 heads do not divide 100: ignored here
    assert vision.output_tokens == 3 and not vision.has_cls
    with pytest.raises(ConfigError, match="'tokens'"):
        VisionConfig(kind="features", hidden_size=768, tokens=0)
    with pytest.raises(ConfigError, match="num_heads"):  # a tower still checks its fields
        VisionConfig(kind="dinov2", hidden_size=100)


def test_image_tokens_are_the_resampler_output_times_expand():
    features = VisionConfig(kind="features", hidden_size=32, tokens=16)
    tower = VisionConfig(kind="dinov2", image_size=32, patch_size=8, hidden_size=32, num_heads=4)  # 4×4 grid
    for vision in (features, tower):
        for resampler, count in ((ResamplerConfig("identity"), 16), (ResamplerConfig("avg_pool", pool_stride=2), 4),
                                 (ResamplerConfig("perceiver", num_latents=3, num_heads=4), 3),
                                 (ResamplerConfig("token_packer", num_latents=4, num_heads=4), 4)):
            for expand in (1, 4):
                config = ModelConfig(vision=vision, resampler=resampler, projector=ProjectorConfig(expand=expand))
                assert config.image_tokens == count * expand, (vision.kind, resampler.kind, expand)


@pytest.mark.parametrize("resampler", [ResamplerConfig("avg_pool", pool_stride=2),
                                       ResamplerConfig("token_packer", num_latents=4, num_heads=4)],
                         ids=lambda r: r.kind)
def test_a_grid_resampler_on_features_that_are_no_square_grid_is_refused(resampler):
    features = VisionConfig(kind="features", hidden_size=32, tokens=6)
    with pytest.raises(ConfigError, match=r"'vision.tokens'.*square number.*got 6"):
        ModelConfig(vision=features, resampler=resampler)
    assert ModelConfig(vision=dataclasses.replace(features, tokens=16), resampler=resampler).image_tokens == 4
    for any_count in (ResamplerConfig("identity"), ResamplerConfig("perceiver", num_latents=4, num_heads=4)):
        assert ModelConfig(vision=features, resampler=any_count).image_tokens == (6 if any_count.kind == "identity"
                                                                                  else 4)


def test_a_features_section_loads_from_yaml_with_its_errors_named():
    """BabyLM's (N, 768) features are one vector per caption; expand gives it several image tokens."""
    one_vector = "model.vision={kind: features, hidden_size: 768, tokens: 1}"
    config = load_config(TINY, [one_vector, "model.projector.expand=4"])
    assert config.model.image_tokens == 4 and config.model.vision.kind == "features"
    with pytest.raises(ConfigError, match=r"'model.vision.tokens': must be >= 1"):
        load_config(TINY, ["model.vision={kind: features, hidden_size: 768, tokens: 0}"])
    with pytest.raises(ConfigError, match=r"'model.projector.expand': must be >= 1"):
        load_config(TINY, [one_vector, "model.projector.expand=0"])


# ----------------------------------------------------------------------------- conversion


def _fake_checkpoint(monkeypatch, model: ModelConfig):
    """export_reference's checks need only the checkpoint's config."""
    monkeypatch.setattr(reference_module, "load_checkpoint_params",
                        lambda checkpoint: (types.SimpleNamespace(model=model), {}, {}))


def test_reference_export_refuses_a_features_model_and_expand(monkeypatch, tmp_path):
    features, tower = model_configs("identity-expand4")
    _fake_checkpoint(monkeypatch, features)
    with pytest.raises(ConversionError, match=r"vision.kind 'features' \(the model has no vision tower.*"
                                              r"projector.expand 4"):
        reference_module.export_reference("ckpt", str(tmp_path / "a"))
    _fake_checkpoint(monkeypatch, tower)
    with pytest.raises(ConversionError, match=r"cannot be written in the reference's layout: projector.expand 4"):
        reference_module.export_reference("ckpt", str(tmp_path / "b"))


def test_import_hf_refuses_a_features_model_instead_of_swapping_in_a_tower(tmp_path):
    features, _ = model_configs("identity-expand1")
    config = types.SimpleNamespace(model=features)
    for vision_dir in (None, str(tmp_path / "dinov2")):
        with pytest.raises(ConversionError, match="model.vision.kind is features"):
            hf_module.import_hf(config, str(tmp_path / "out"), str(tmp_path / "lm"), vision_dir)
