"""Vision towers against transformers' Dinov2Model / CLIPVisionModel / SiglipVisionModel (tiny random, fp32)."""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import save_file
from transformers import (CLIPVisionConfig, CLIPVisionModel, Dinov2Config, Dinov2Model, SiglipVisionConfig,
                          SiglipVisionModel)

from jaxllava.convert.checkpoint_files import CheckpointTensors
from jaxllava.convert.hf_configs import vision_config_from_hf, vision_hf_config
from jaxllava.convert.weights import hf_state_dict, load_hf_vision_weights
from jaxllava.errors import ConversionError
from jaxllava.model.config import ModelConfig, ResamplerConfig, VisionConfig
from jaxllava.model.layers import LayerNorm
from jaxllava.model.vision import VisionTower
from conftest import randomize_torch_model

ATOL = 1e-5
TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4)


randomize = functools.partial(randomize_torch_model, unit_positions=True)


def save(model, directory) -> str:
    model.save_pretrained(str(directory))
    return str(directory)


def pixels(image_size: int, batch: int = 2, seed: int = 0) -> np.ndarray:
    return np.random.RandomState(seed).randn(batch, image_size, image_size, 3).astype(np.float32)


def torch_outputs(model, x: np.ndarray, **kwargs):
    with torch.no_grad():
        return model(pixel_values=torch.from_numpy(x).permute(0, 3, 1, 2), output_hidden_states=True, **kwargs)


def abstract_tower(config) -> VisionTower:
    """Parameters as shapes only (no random init): the loader fills every one of them."""
    return nnx.eval_shape(lambda: VisionTower(config, rngs=nnx.Rngs(0)))


def load_tower(directory: str, image_size: int, **options) -> VisionTower:
    with open(os.path.join(directory, "config.json")) as f:
        config = vision_config_from_hf(json.load(f), image_size=image_size, **options)
    tower = abstract_tower(config)
    load_hf_vision_weights(tower, CheckpointTensors(directory))
    return tower


@functools.partial(jax.jit, static_argnums=(0, 1))
def _jitted(graphdef, methods, state, *args):
    tower = nnx.merge(graphdef, state)
    return tuple(getattr(tower, method)(*args) for method in methods)


def run(tower: VisionTower, *args, method: str = "__call__", also: tuple[str, ...] = ()):
    """The jitted split → merge call of `method` (and the `also` methods, returned as a tuple after it),
    compiled once per tower config and method set: eager mode would compile every op separately."""
    graphdef, state = nnx.split(tower)
    results = _jitted(graphdef, (method,) + also, state, *(jnp.asarray(a) for a in args))
    return results if also else results[0]


def max_diff(jax_out, torch_out) -> float:
    return float(np.abs(np.asarray(jax_out) - torch_out.numpy()).max())


def assert_hidden_states_match(ours, theirs) -> None:
    """Unnormalised hidden states grow with depth (DINOv2's reach ~10 here), and float32
    rounding grows with them: the bound is ATOL relative to their largest magnitude."""
    assert len(ours) == len(theirs)
    for k, (a, b) in enumerate(zip(ours, theirs)):
        bound = ATOL * max(1.0, float(b.abs().max()))
        assert max_diff(a, b) <= bound, (k, max_diff(a, b), bound)


@pytest.fixture(scope="module")
def dinov2_dir(tmp_path_factory):
    # The reference geometry: positions learned at 518 px (37×37), used at 224 px (16×16).
    config = Dinov2Config(image_size=518, patch_size=14, mlp_ratio=2, **TINY)
    return save(randomize(Dinov2Model(config), 1), tmp_path_factory.mktemp("dinov2"))


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    config = CLIPVisionConfig(image_size=56, patch_size=14, intermediate_size=48, **TINY)
    return save(randomize(CLIPVisionModel(config), 2), tmp_path_factory.mktemp("clip"))


@pytest.fixture(scope="module")
def siglip_dir(tmp_path_factory):
    # 60 px with 14 px patches: the strided conv ignores the last 4 pixel rows/columns.
    config = SiglipVisionConfig(image_size=60, patch_size=14, intermediate_size=48, **TINY)
    return save(randomize(SiglipVisionModel(config), 3), tmp_path_factory.mktemp("siglip"))


def interpolate_like_transformers_4_40(embeddings_module):
    """The reference's pinned transformers (4.40) resized DINOv2 positions with scale_factor=(g + 0.1) / L
    (input grid g, learned grid L)."""

    def interpolate(embeddings, height, width):
        table = embeddings_module.position_embeddings
        num_positions = table.shape[1] - 1
        if embeddings.shape[1] - 1 == num_positions and height == width:
            return table
        side = int(math.sqrt(num_positions))
        patch_size = embeddings_module.config.patch_size
        grid = table[:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
        scale = ((height // patch_size + 0.1) / side, (width // patch_size + 0.1) / side)
        grid = torch.nn.functional.interpolate(grid.float(), scale_factor=scale, mode="bicubic",
                                               align_corners=False)
        return torch.cat([table[:, :1], grid.permute(0, 2, 3, 1).reshape(1, -1, table.shape[-1])], dim=1)

    return interpolate


def test_dinov2_size_mode_matches_transformers_5_at_224_px(dinov2_dir):
    model = Dinov2Model.from_pretrained(dinov2_dir).eval()
    x = pixels(224)
    expected = torch_outputs(model, x)
    tower = load_tower(dinov2_dir, 224, pos_interpolation="size", feature_select="cls_patch")
    out, hidden = run(tower, x, also=("hidden_states",))  # hidden: embeddings + 2 blocks, before the final norm
    assert out.shape == (2, 257, 32)
    assert max_diff(out, expected.last_hidden_state) <= ATOL  # normalised: an absolute bound
    assert len(hidden) == 3
    assert_hidden_states_match(hidden, expected.hidden_states)


def test_dinov2_scale_factor_mode_matches_reference_transformers_4_40(dinov2_dir):
    model = Dinov2Model.from_pretrained(dinov2_dir).eval()
    model.embeddings.interpolate_pos_encoding = interpolate_like_transformers_4_40(model.embeddings)
    x = pixels(224)
    expected = torch_outputs(model, x).last_hidden_state[:, 1:]
    scale_factor = run(load_tower(dinov2_dir, 224, pos_interpolation="scale_factor"), x)
    size = run(load_tower(dinov2_dir, 224, pos_interpolation="size"), x)
    assert scale_factor.shape == (2, 256, 32)
    assert max_diff(scale_factor, expected) <= ATOL
    # The two modes are different models: a checkpoint must record which one it was trained with.
    assert float(jnp.abs(scale_factor - size).max()) > 0.05


def test_dinov2_position_resize_differs_between_modes_and_is_skipped_at_the_pretrained_grid(dinov2_dir):
    size = run(load_tower(dinov2_dir, 224, pos_interpolation="size"), method="position_embeddings")
    scale_factor = run(load_tower(dinov2_dir, 224, pos_interpolation="scale_factor"), method="position_embeddings")
    assert size.shape == scale_factor.shape == (1 + 16 * 16, 32)
    assert float(jnp.abs(size - scale_factor).max()) > 0.1
    native = load_tower(dinov2_dir, 518, pos_interpolation="scale_factor")
    np.testing.assert_array_equal(np.asarray(run(native, method="position_embeddings")),
                                  np.asarray(native.position_embedding[...]))


def test_feature_layer_selects_hidden_states_and_runs_no_later_block(clip_dir):
    model = CLIPVisionModel.from_pretrained(clip_dir).eval()
    x = pixels(56)
    hidden = torch_outputs(model, x).hidden_states  # CLIP: [0] is after pre_layrnorm; [2] == last_hidden_state
    assert max_diff(run(load_tower(clip_dir, 56, feature_layer=0, feature_select="cls_patch"), x), hidden[0]) <= ATOL
    second_last = load_tower(clip_dir, 56, feature_layer=-2)  # LLaVA's mm_vision_select_layer: hidden_states[1]
    assert max_diff(run(second_last, x), hidden[-2][:, 1:]) <= ATOL
    # Blocks after the selected one are not traced at all: one block fewer of matmuls than the full tower.
    def matmuls(tower):
        return str(jax.make_jaxpr(tower)(jnp.asarray(x))).count("dot_general")  # nested jaxprs included

    per_block = 6 + 2  # q, k, v, out, fc1, fc2 + the two attention einsums
    assert matmuls(load_tower(clip_dir, 56)) - matmuls(second_last) == per_block


def test_clip_hidden_states_match_transformers(clip_dir):
    model = CLIPVisionModel.from_pretrained(clip_dir).eval()
    x = pixels(56)
    expected = torch_outputs(model, x)
    out, hidden = run(load_tower(clip_dir, 56), x, also=("hidden_states",))
    assert len(hidden) == 3
    assert_hidden_states_match(hidden, expected.hidden_states)
    # -1 is transformers' last_hidden_state, which CLIP does not normalise (post_layernorm is for the pooled CLS).
    assert max_diff(out, expected.last_hidden_state[:, 1:]) <= ATOL


def test_siglip_hidden_states_and_normed_final_output_match_transformers(siglip_dir):
    model = SiglipVisionModel.from_pretrained(siglip_dir).eval()
    x = pixels(60)
    expected = torch_outputs(model, x)
    tower = load_tower(siglip_dir, 60)
    out, hidden = run(tower, x, also=("hidden_states",))
    assert out.shape == (2, 16, 32)  # no CLS; 60 px / 14 px patches = 4×4, the last 4 px ignored
    assert max_diff(out, expected.last_hidden_state) <= ATOL
    assert len(hidden) == 3
    assert_hidden_states_match(hidden, expected.hidden_states)


def test_siglip_attention_pooling_head_is_left_unused(siglip_dir):
    with open(os.path.join(siglip_dir, "config.json")) as f:
        tower = abstract_tower(vision_config_from_hf(json.load(f), image_size=60))
    unused = load_hf_vision_weights(tower, CheckpointTensors(siglip_dir))
    assert unused and all(name.startswith("head.") for name in unused)


@pytest.mark.parametrize("select", ["patch", "cls_patch"])
def test_output_token_count_follows_feature_select_and_model_image_tokens(dinov2_dir, clip_dir, siglip_dir, select):
    for directory, size, cls in [(dinov2_dir, 56, True), (clip_dir, 56, True), (siglip_dir, 60, False)]:
        tower = load_tower(directory, size, feature_select=select)
        out = jax.eval_shape(tower, jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32))
        grid = tower.config.grid
        assert out.shape[1] == grid * grid + int(select == "cls_patch" and cls) == tower.config.output_tokens
        assert out.shape[1] == ModelConfig(vision=tower.config, resampler=ResamplerConfig("identity")).image_tokens


def test_every_parameter_carries_logical_axes_and_is_in_the_weight_map(dinov2_dir, clip_dir, siglip_dir):
    for directory, size in [(dinov2_dir, 56), (clip_dir, 56), (siglip_dir, 60)]:
        tower = load_tower(directory, size)
        params = jax.tree.leaves(nnx.state(tower, nnx.Param), is_leaf=lambda v: isinstance(v, nnx.Variable))
        assert len(params) == len(hf_state_dict(tower))
        for variable in params:
            assert isinstance(variable[...], jax.Array)  # loaded, not left abstract
            axes = variable.get_metadata().get("axes")
            assert axes is not None and len(axes) == variable.ndim


def test_bfloat16_tower_tracks_float32(clip_dir):
    x = pixels(56, batch=1)
    fp32 = run(load_tower(clip_dir, 56), x)
    with open(os.path.join(clip_dir, "config.json")) as f:
        config = vision_config_from_hf(json.load(f), image_size=56)
    bf16 = nnx.eval_shape(lambda: VisionTower(config, dtype=jnp.bfloat16, rngs=nnx.Rngs(0)))
    load_hf_vision_weights(bf16, CheckpointTensors(clip_dir))
    out = run(bf16, x)
    assert out.dtype == jnp.bfloat16
    assert float(jnp.abs(out.astype(jnp.float32) - fp32).max()) < 0.1 * float(jnp.abs(fp32).max())


def test_missing_tensor_is_named(clip_dir):
    tower = load_tower(clip_dir, 56)
    tensors = hf_state_dict(tower)
    del tensors["vision_model.encoder.layers.1.mlp.fc2.weight"]
    with pytest.raises(ConversionError, match=r"vision_model\.encoder\.layers\.1\.mlp\.fc2\.weight.*missing"):
        load_hf_vision_weights(tower, tensors)


def test_wrong_shape_names_tensor_and_both_shapes(clip_dir):
    tower = load_tower(clip_dir, 56)
    tensors = hf_state_dict(tower)
    tensors["vision_model.encoder.layers.0.self_attn.q_proj.weight"] = np.zeros((32, 31), np.float32)
    with pytest.raises(ConversionError, match=r"q_proj\.weight.*\(32, 31\).*\(32, 32\)"):
        load_hf_vision_weights(tower, tensors)


def test_state_dict_round_trip_is_bit_exact_for_every_kind(dinov2_dir, clip_dir, siglip_dir):
    prefix = "model.vision_tower.vision_tower."
    for directory, size in [(dinov2_dir, 224), (clip_dir, 56), (siglip_dir, 60)]:
        tower = load_tower(directory, size)
        exported = hf_state_dict(tower, prefix=prefix)
        fresh = abstract_tower(tower.config)
        assert load_hf_vision_weights(fresh, exported, prefix=prefix) == []
        again = hf_state_dict(fresh, prefix=prefix)
        assert exported.keys() == again.keys()
        for name in exported:
            np.testing.assert_array_equal(exported[name], again[name])


@pytest.mark.parametrize("kind", ["dinov2", "clip", "siglip"])
def test_export_loads_in_transformers_with_the_same_output(kind, dinov2_dir, clip_dir, siglip_dir, tmp_path):
    # the same tower configs as the parity tests above, so the jitted forward is reused
    directory, size, select, model_class = {"dinov2": (dinov2_dir, 224, "cls_patch", Dinov2Model),
                                            "clip": (clip_dir, 56, "patch", CLIPVisionModel),
                                            "siglip": (siglip_dir, 60, "patch", SiglipVisionModel)}[kind]
    tower = load_tower(directory, size, feature_select=select)
    save_file(hf_state_dict(tower), str(tmp_path / "model.safetensors"))
    with open(tmp_path / "config.json", "w") as f:
        json.dump(vision_hf_config(tower.config), f)
    model, info = model_class.from_pretrained(str(tmp_path), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    x = pixels(size)
    expected = torch_outputs(model.eval(), x).last_hidden_state
    assert max_diff(run(tower, x, also=("hidden_states",))[0], expected[:, 1:] if select == "patch" and kind == "clip"
                    else expected) <= ATOL


def test_unsupported_checkpoints_are_rejected(dinov2_dir):
    with open(os.path.join(dinov2_dir, "config.json")) as f:
        dinov2 = json.load(f)
    with pytest.raises(ConversionError, match="use_swiglu_ffn"):
        vision_config_from_hf(dict(dinov2, use_swiglu_ffn=True), image_size=224)
    with pytest.raises(ConversionError, match="hidden_act"):
        vision_config_from_hf(dict(dinov2, hidden_act="quick_gelu"), image_size=224)
    with pytest.raises(ConversionError, match="model_type"):
        vision_config_from_hf(dict(dinov2, model_type="vit"), image_size=224)


def test_wrong_pixel_shape_is_rejected(clip_dir):
    tower = load_tower(clip_dir, 56)
    with pytest.raises(ValueError, match=r"\(B, 56, 56, 3\)"):
        jax.eval_shape(tower, jax.ShapeDtypeStruct((1, 3, 56, 56), jnp.float32))


def test_layer_norm_eps_comes_from_the_config():
    # A large eps against a tiny one: the final norm must equal a float64 LayerNorm with the
    # configured eps, and every LayerNorm of the tower must carry it.
    def numpy_layer_norm(x, scale, bias, eps):
        x = np.asarray(x, np.float64)
        mean = x.mean(-1, keepdims=True)
        var = ((x - mean) ** 2).mean(-1, keepdims=True)
        return (x - mean) / np.sqrt(var + eps) * np.asarray(scale) + np.asarray(bias)

    base = VisionConfig(kind="dinov2", image_size=28, patch_size=14, hidden_size=8, intermediate_size=16,
                        num_layers=1, num_heads=2, pretrained_image_size=28, feature_select="cls_patch")
    x = pixels(28, batch=1)
    outputs = {}
    for eps in (1e-6, 0.5):
        tower = VisionTower(dataclasses.replace(base, layer_norm_eps=eps), rngs=nnx.Rngs(0))
        norms = [node for _, node in nnx.iter_graph(tower) if isinstance(node, LayerNorm)]
        assert len(norms) == 3 and all(norm.eps == eps for norm in norms)
        out, hidden = run(tower, x, also=("hidden_states",))
        final = tower.final_norm
        expected = numpy_layer_norm(hidden[-1], final.scale[...], final.bias[...], eps)
        np.testing.assert_allclose(np.asarray(out), expected, rtol=0, atol=1e-5)
        outputs[eps] = np.asarray(out)
    assert np.abs(outputs[1e-6] - outputs[0.5]).max() > 0.1
