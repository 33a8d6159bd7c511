"""LAPE (the reference's stage-2 spatial/temporal embeddings): forward and gradient parity with the
reference's code restated in PyTorch, the image path's order, text-only isolation, config checks.

The restatement follows docs/reference.md#stage-2-lape-embeddings: `init_special_embeddings`
(tables, buffers R[i, j] = 2^-|i-j|), `reparam`, and the injection in `encode_images`
(permute, F.interpolate(mode="linear"), broadcast over the grid).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from jaxllava.config import build_config
from jaxllava.errors import ConfigError
from jaxllava.model.config import LapeConfig, LlamaConfig, ModelConfig, ProjectorConfig, ResamplerConfig, VisionConfig
from jaxllava.model.lape import AXES, Lape, linear_resize_matrix, reparam_matrix
from jaxllava.model.llava import LlavaModel

WIDTH = 8
LM = LlamaConfig(vocab_size=40, hidden_size=WIDTH, intermediate_size=16, num_layers=1, num_heads=2, num_kv_heads=2,
                 max_position_embeddings=64)
TOWER = VisionConfig(image_size=16, patch_size=4, hidden_size=12, intermediate_size=16, num_layers=1, num_heads=2,
                     pretrained_image_size=16)  # a 4×4 patch grid
FEATURES = VisionConfig(kind="features", hidden_size=12, tokens=16)  # what TOWER outputs, without the tower


# ----------------------------------------------------------------------------- the reference, restated


def torch_lape_tables(lape: Lape) -> dict[str, np.ndarray]:
    """The six tables in the reference's torch layout ((n, D) for inputs and outputs alike)."""
    tables = {}
    for axis in AXES:
        tables[f"{axis}_input"] = np.asarray(getattr(lape, f"{axis}_input_embeddings").embedding[...])
        tables[f"{axis}_output"] = np.asarray(getattr(lape, f"{axis}_output_embeddings").kernel[...]).T.copy()
    return tables


class TorchLape(torch.nn.Module):
    """`init_special_embeddings` + `reparam` + the injection of `encode_images`, as the reference wrote them."""

    def __init__(self, tables: dict[str, np.ndarray]):
        super().__init__()
        for name, value in tables.items():
            self.register_parameter(name, torch.nn.Parameter(torch.from_numpy(value.copy())))
        for axis in AXES:
            index = torch.arange(tables[f"{axis}_input"].shape[0])
            self.register_buffer(f"{axis}_reparam_mat", 2. ** (-(index[:, None] - index[None]).abs()))

    def injections(self):
        def reparam(weight, mat):
            spread = mat.to(weight.dtype) @ weight
            return weight + spread - spread.detach()

        return {axis: ((reparam(getattr(self, f"{axis}_input"), getattr(self, f"{axis}_reparam_mat"))
                        + reparam(getattr(self, f"{axis}_output"), getattr(self, f"{axis}_reparam_mat"))) / 2
                       ).unsqueeze(1) for axis in AXES}

    def forward(self, feature: torch.Tensor, modality: str) -> torch.Tensor:
        """feature (t, h·w, D): one image (t = 1) or the t frames of one video."""
        inj = self.injections()
        height = inj["spatial_height"].permute(1, 2, 0)
        width = inj["spatial_width"].permute(1, 2, 0)
        t, hw, _ = feature.shape
        h = w = int(hw ** 0.5)
        feature = feature.reshape(t, h, w, -1)
        height = torch.nn.functional.interpolate(height, size=(h,), mode="linear").permute(0, 2, 1).unsqueeze(2)
        width = torch.nn.functional.interpolate(width, size=(w,), mode="linear").permute(0, 2, 1).unsqueeze(1)
        temporal = inj["temporal"]
        if modality == "video":
            temporal = temporal.unsqueeze(1)
        else:
            temporal = temporal[0:1].unsqueeze(1) + temporal.sum() * 0.
        return (feature + height + width + temporal).reshape(t, hw, -1)


def _lape(tokens=100, temporal_tokens=None, seed=0) -> Lape:
    return Lape(LapeConfig(tokens=tokens, temporal_tokens=temporal_tokens), WIDTH, rngs=nnx.Rngs(seed))


# ----------------------------------------------------------------------------- the pieces


@pytest.mark.parametrize("source,target", [(100, 16), (100, 7), (100, 1), (10, 10), (5, 12), (100, 100)])
def test_linear_resize_matrix_equals_torch_linear_interpolation(source, target):
    table = np.random.RandomState(source + target).randn(source, 3).astype(np.float32)
    expected = torch.nn.functional.interpolate(torch.from_numpy(table.T[None].copy()), size=(target,),
                                               mode="linear", align_corners=False)[0].numpy().T
    np.testing.assert_allclose(linear_resize_matrix(source, target) @ table, expected, rtol=0, atol=1e-6)


def test_reparam_matrix_equals_the_reference_buffer_bit_for_bit():
    index = torch.arange(100)
    buffer = (2. ** (-(index[:, None] - index[None]).abs())).numpy()
    assert buffer.dtype == np.float32 and reparam_matrix(100).dtype == np.float32
    np.testing.assert_array_equal(reparam_matrix(100), buffer)
    assert reparam_matrix(100)[0, 99] > 0  # 2^-99 is a normal float32, nothing underflows


# ----------------------------------------------------------------------------- parity, values and gradients


def _jax_value_and_grads(lape: Lape, x: np.ndarray, cotangent: np.ndarray, video: bool):
    graphdef, params = nnx.split(lape)

    def loss(params, x):
        module = nnx.merge(graphdef, params)
        out = module.frames(x) if video else module(x)
        return jnp.sum(out * cotangent), out

    gradients = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))
    (_, out), (grad_params, grad_x) = gradients(params, jnp.asarray(x))
    merged = nnx.merge(graphdef, grad_params)
    return np.asarray(out), torch_lape_tables(merged), np.asarray(grad_x)


def _torch_value_and_grads(lape: Lape, x: np.ndarray, cotangent: np.ndarray, video: bool):
    reference = TorchLape(torch_lape_tables(lape))
    x_t = torch.from_numpy(x.copy()).requires_grad_(True)
    if video:
        out = torch.stack([reference(x_t[b], "video") for b in range(len(x))])
    else:  # the reference encoded each image as a (1, h·w, D) clip
        out = torch.cat([reference(x_t[b:b + 1], "image") for b in range(len(x))])
    (out * torch.from_numpy(cotangent)).sum().backward()
    grads = {name: p.grad.numpy() for name, p in reference.named_parameters()}
    return out.detach().numpy(), grads, x_t.grad.numpy()


@pytest.mark.parametrize("video", [False, True], ids=["image", "video"])
def test_lape_matches_the_reference_forward_and_gradients(video):
    """100-row tables, a 4×4 grid (an image) or 3 frames of a 3×3 grid (a video: the reference's temporal
    tables have one row per frame); gradients of every table and of the features."""
    lape = _lape(temporal_tokens=3 if video else None)
    rng = np.random.RandomState(1)
    shape = (2, 3, 9, WIDTH) if video else (2, 16, WIDTH)
    x, cotangent = rng.randn(*shape).astype(np.float32), rng.randn(*shape).astype(np.float32)
    ours, our_grads, our_grad_x = _jax_value_and_grads(lape, x, cotangent, video)
    theirs, their_grads, their_grad_x = _torch_value_and_grads(lape, x, cotangent, video)
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-5)
    assert np.abs(ours - x).max() > 0.1  # the injection is not negligible at these scales
    for name, grad in their_grads.items():
        assert np.abs(grad).max() > 1e-3, name  # every table gets a gradient (the temporal ones from row 0 or t)
        np.testing.assert_allclose(our_grads[name], grad, rtol=0, atol=1e-5, err_msg=name)
    np.testing.assert_allclose(our_grad_x, their_grad_x, rtol=0, atol=1e-6)


def test_reparametrisation_spreads_each_rows_gradient_to_its_neighbours():
    """Only temporal row 0 reaches an image, yet every temporal row gets a gradient, 2^-t of row 0's share:
    d/dW of (W + R@W - sg(R@W)) is I + Rᵀ."""
    lape = _lape(tokens=10)
    x = np.zeros((1, 4, WIDTH), np.float32)
    cotangent = np.ones_like(x)
    _, grads, _ = _jax_value_and_grads(lape, x, cotangent, video=False)
    row0 = grads["temporal_input"][0]
    np.testing.assert_allclose(row0, 4 * (1 + 1) / 2, rtol=1e-6)  # 4 vectors, (1 + R[0,0]) / 2
    for t in range(1, 10):
        np.testing.assert_allclose(grads["temporal_input"][t], 4 * 2.0 ** -t / 2, rtol=1e-6)


# ----------------------------------------------------------------------------- the model


def _model(**changes) -> LlavaModel:
    config = dict(lm=LM, vision=TOWER, resampler=ResamplerConfig("identity"), lape=LapeConfig(tokens=10),
                  dtype="float32", attention_impl="xla")
    return LlavaModel(ModelConfig(**{**config, **changes}), rngs=nnx.Rngs(0))


def test_with_lape_the_image_path_is_tower_projector_lape_resampler():
    """The reference's stage-2 order: the resampler reads the projected, LAPE-added grid in the LM's width."""
    perceiver = ModelConfig(lm=LM, vision=FEATURES, resampler=ResamplerConfig("perceiver", num_latents=4, num_heads=2),
                            lape=LapeConfig(tokens=10))
    abstract = nnx.eval_shape(lambda: LlavaModel(perceiver, rngs=nnx.Rngs(0)))
    assert abstract.resampler.latents.shape == (4, WIDTH)  # the LM's width, not the features' 12
    model = _model(vision=FEATURES, resampler=ResamplerConfig("avg_pool", pool_stride=2))
    assert model.config.image_tokens == 4
    tower = jnp.asarray(np.random.RandomState(0).randn(2, 16, 12).astype(np.float32))

    @jax.jit
    def paths(state):
        m = nnx.merge(graphdef, state)
        return (m.encode_features(tower), m.resampler(m.lape(m.projector(tower))),
                m.resampler(m.projector(tower)))

    graphdef, state = nnx.split(model)
    encoded, expected, without = map(np.asarray, paths(state))
    np.testing.assert_allclose(encoded, expected, rtol=0, atol=1e-6)
    assert np.abs(expected - without).max() > 1e-3  # LAPE reaches the resampler's output


def reads_params(model: LlavaModel, parts, arrays) -> bool:
    """Whether the forward's jaxpr reads any parameter of the named parts (arrays: input_ids,
    segment_ids, positions and any visual inputs, by the model's keyword names)."""
    selected = lambda path, node: isinstance(node, nnx.Param) and path[0] in parts
    graphdef, chosen, rest = nnx.split(model, selected, ...)
    visual = {k: v for k, v in arrays.items() if k not in ("input_ids", "segment_ids", "positions")}
    closed = jax.make_jaxpr(lambda p: nnx.merge(graphdef, p, rest)(
        arrays["input_ids"], segment_ids=arrays["segment_ids"], positions=arrays["positions"], **visual))(chosen)
    inputs = {id(v) for v in closed.jaxpr.invars}
    assert len(inputs) == len(jax.tree.leaves(chosen)) > 0
    read = [v for eqn in closed.jaxpr.eqns for v in eqn.invars] + list(closed.jaxpr.outvars)
    return any(id(v) in inputs for v in read)


def _batch():
    rng = np.random.RandomState(2)
    ids = rng.randint(3, 40, (2, 24)).astype(np.int32)
    mask = np.zeros((2, 24), bool)
    mask[0, 2:18] = True  # row 0 holds the 16 placeholders of its image; row 1 is text
    return {"input_ids": jnp.asarray(ids), "segment_ids": jnp.ones((2, 24), jnp.int32),
            "positions": jnp.asarray(np.tile(np.arange(24, dtype=np.int32), (2, 1))),
            "pixels": jnp.asarray(rng.randn(2, 16, 16, 3).astype(np.float32)), "image_mask": jnp.asarray(mask)}


def test_text_only_call_with_lape_reads_no_vision_or_lape_parameter():
    """README pitfall 1 with LAPE on: a text-only call traces no tower, projector, resampler or LAPE op."""
    model = _model()
    batch = _batch()
    text = {k: batch[k] for k in ("input_ids", "segment_ids", "positions")}
    vision_parts = ("vision", "resampler", "projector", "lape")
    assert not reads_params(model, vision_parts, text)
    assert reads_params(model, ("lape",), batch)  # the check sees LAPE when an image is there


def test_lape_changes_only_the_image_placeholders():
    model = _model(vision=FEATURES)
    batch = _batch()
    features = jnp.asarray(np.random.RandomState(3).randn(2, 16, 12).astype(np.float32))
    tokens = np.asarray(model.lm.embed(batch["input_ids"]))
    merged = np.asarray(model.embed_inputs(batch["input_ids"], image_mask=batch["image_mask"], features=features))
    np.testing.assert_array_equal(merged[1], tokens[1])  # the text row
    text_positions = ~np.asarray(batch["image_mask"][0])
    np.testing.assert_array_equal(merged[0, text_positions], tokens[0, text_positions])
    projected = model.projector(features[:1])
    np.testing.assert_allclose(merged[0, 2:18], np.asarray(model.lape(projected))[0], rtol=0, atol=1e-6)
    assert np.abs(merged[0, 2:18] - np.asarray(projected)[0]).max() > 0.1


def test_lape_parameters_start_from_their_own_stream():
    """Adding LAPE leaves every other part's initial values as they were (its own part stream)."""
    with_lape, without = _model(), _model(lape=None)
    flat = lambda m: {p: np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(m, nnx.Param))}
    a, b = flat(with_lape), flat(without)
    assert {p for p in a if p[0] == "lape"} and set(b) == {p for p in a if p[0] != "lape"}
    for path, value in b.items():
        np.testing.assert_array_equal(a[path], value, err_msg=str(path))


# ----------------------------------------------------------------------------- config


def test_a_text_only_model_ignores_lape_like_its_resampler_and_projector():
    model = LlavaModel(ModelConfig(lm=LM, vision=None, lape=LapeConfig()), rngs=nnx.Rngs(0))
    assert model.lape is None and {p[0] for p, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))} == {"lm"}
    assert model.config.image_tokens == 0


def test_lape_is_off_by_default_and_set_from_yaml():
    assert ModelConfig().lape is None
    config = build_config({"model": {"lape": {"tokens": 100}, "vision": {"kind": "features", "tokens": 16,
                                                                         "hidden_size": 12}}})
    assert config.model.lape == LapeConfig(tokens=100) and config.model.lape.temporal_count == 100


@pytest.mark.parametrize("changes,field", [
    (dict(vision=VisionConfig(**{**TOWER.__dict__, "feature_select": "cls_patch"})), "vision.feature_select"),
    (dict(vision=VisionConfig(kind="features", hidden_size=12, tokens=15)), "vision.tokens"),
    (dict(projector=ProjectorConfig(expand=2)), "projector.expand"),
    (dict(resampler=ResamplerConfig("perceiver", num_heads=3)), "resampler.num_heads"),
    (dict(lape=dict(tokens=0)), "tokens"),
], ids=["cls", "non-square-features", "expand", "heads", "no-rows"])
def test_lape_configs_that_cannot_work_are_refused_naming_the_field(changes, field):
    raw = {**dict(lm=LM, vision=TOWER, lape=LapeConfig()), **{k: v for k, v in changes.items() if k != "lape"}}
    with pytest.raises(ConfigError, match=f"'{field}'"):
        if "lape" in changes:
            LapeConfig(**changes["lape"])
        ModelConfig(**raw)
