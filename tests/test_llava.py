"""LLaVA composition: the reference's image path restated in PyTorch, text-only isolation, mask checks."""
from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from jaxllava.model.config import LlamaConfig, ModelConfig, ProjectorConfig, ResamplerConfig, VisionConfig
from jaxllava.convert.checkpoint_files import CheckpointTensors, read_config
from jaxllava.convert.hf_configs import llama_config_from_hf, vision_config_from_hf
from jaxllava.convert.weights import load_hf_llama_weights, load_hf_vision_weights, load_projector_weights
from jaxllava.model.llava import LlavaModel, merge_image_features
from conftest import randomize_torch_model

VOCAB, LM_WIDTH, IMAGE_SIZE, PATCH = 89, 48, 32, 8  # 4×4 grid → N = 16 image tokens
N = (IMAGE_SIZE // PATCH) ** 2
TINY_LM = LlamaConfig(vocab_size=VOCAB, hidden_size=LM_WIDTH, intermediate_size=64, num_layers=2, num_heads=4,
                      num_kv_heads=2, max_position_embeddings=64)


_randomize = randomize_torch_model


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The reference composition in PyTorch: Dinov2Model → mlp2x_gelu → LlamaForCausalLM, saved to disk."""
    lm_dir, vision_dir = tmp_path_factory.mktemp("lm"), tmp_path_factory.mktemp("dinov2")
    lm = _randomize(transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=LM_WIDTH, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=100.0, max_position_embeddings=64)), 0)
    lm.save_pretrained(str(lm_dir))
    dino = _randomize(transformers.Dinov2Model(transformers.Dinov2Config(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, mlp_ratio=2, image_size=IMAGE_SIZE,
        patch_size=PATCH)), 1)
    dino.save_pretrained(str(vision_dir))
    # docs/reference.md#projector: Sequential(Linear(vision, lm), GELU() [exact erf], Linear(lm, lm))
    projector = _randomize(torch.nn.Sequential(torch.nn.Linear(32, LM_WIDTH), torch.nn.GELU(),
                                               torch.nn.Linear(LM_WIDTH, LM_WIDTH)), 2)
    return dict(lm=lm, dino=dino, projector=projector, lm_dir=str(lm_dir), vision_dir=str(vision_dir))


def _torch_logits(ref, ids, attention_mask, pixels, image_mask, image_rows) -> np.ndarray:
    """docs/reference.md#image-placeholders: embed the ids, overwrite each image row's placeholder span with its
    projected patch features (DINOv2 last_hidden_state without CLS), run the LM on the embeddings."""
    with torch.no_grad():
        features = ref["dino"](pixel_values=torch.from_numpy(pixels).permute(0, 3, 1, 2)).last_hidden_state[:, 1:]
        visual = ref["projector"](features)
        embeds = ref["lm"].model.embed_tokens(torch.from_numpy(ids.astype(np.int64))).clone()
        for b in np.flatnonzero(image_rows):
            embeds[b, torch.from_numpy(image_mask[b])] = visual[b]
        return ref["lm"](inputs_embeds=embeds, attention_mask=torch.from_numpy(attention_mask.astype(np.int64))
                         ).logits.numpy()


def _jax_model(ref) -> LlavaModel:
    vision = vision_config_from_hf(read_config(ref["vision_dir"]), image_size=IMAGE_SIZE)
    config = ModelConfig(lm=llama_config_from_hf(read_config(ref["lm_dir"])), vision=vision,
                         resampler=ResamplerConfig(kind="identity"), projector=ProjectorConfig(kind="mlp2x_gelu"),
                         dtype="float32", attention_impl="xla")
    assert config.image_tokens == N
    model = LlavaModel(config, rngs=nnx.Rngs(0))
    assert load_hf_llama_weights(model.lm, CheckpointTensors(ref["lm_dir"])) == []
    assert load_hf_vision_weights(model.vision, CheckpointTensors(ref["vision_dir"])) == [
        "embeddings.mask_token"]
    torch_projector = {k: v.numpy() for k, v in ref["projector"].state_dict().items()}  # 0.weight, 2.bias, ...
    assert load_projector_weights(model.projector, torch_projector, prefix="") == []
    return model


def _image_microbatch(seed=0):
    """Three rows of 40: an image at the start, an image after a text prefix, and an empty
    filler row (no image: the last microbatch of an epoch) holding text only."""
    rng = np.random.RandomState(seed)
    rows, seq_len = 3, 40
    ids = rng.randint(3, VOCAB, (rows, seq_len)).astype(np.int32)
    lengths = np.array([40, 33, 21])
    real = np.arange(seq_len)[None, :] < lengths[:, None]
    ids = np.where(real, ids, 0)
    image_mask = np.zeros((rows, seq_len), bool)
    image_mask[0, 1:1 + N] = True
    image_mask[1, 7:7 + N] = True
    image_rows = np.array([True, True, False])
    pixels = rng.randn(rows, IMAGE_SIZE, IMAGE_SIZE, 3).astype(np.float32)
    pixels[2] = 0.0
    segment_ids = real.astype(np.int32)
    positions = np.where(real, np.arange(seq_len)[None, :], 0).astype(np.int32)
    return dict(input_ids=ids, segment_ids=segment_ids, positions=positions, pixels=pixels, image_mask=image_mask,
                image_rows=image_rows, real=real)


@jax.jit
def _forward(graphdef, state, arrays):
    model = nnx.merge(graphdef, state)
    return model(arrays["input_ids"], segment_ids=arrays["segment_ids"], positions=arrays["positions"],
                 pixels=arrays.get("pixels"), image_mask=arrays.get("image_mask"))


def _device(batch, names):
    return {k: jnp.asarray(batch[k]) for k in names}


TEXT_FIELDS = ("input_ids", "segment_ids", "positions")
IMAGE_FIELDS = TEXT_FIELDS + ("pixels", "image_mask")


def test_image_microbatch_logits_match_the_torch_reference(reference):
    model = _jax_model(reference)
    batch = _image_microbatch()
    ours = np.asarray(_forward(*nnx.split(model), _device(batch, IMAGE_FIELDS)))
    ref = _torch_logits(reference, batch["input_ids"], batch["real"], batch["pixels"], batch["image_mask"],
                        batch["image_rows"])
    real = batch["real"]
    assert np.abs(ref[real]).max() > 1.0
    np.testing.assert_allclose(ours[real], ref[real], rtol=0, atol=1e-5)
    # the images matter: the same ids without the splice give different logits on image rows
    text_only = np.asarray(_forward(*nnx.split(model), _device(batch, TEXT_FIELDS)))
    assert np.abs(text_only[:2][real[:2]] - ours[:2][real[:2]]).max() > 1e-2
    np.testing.assert_allclose(text_only[2][real[2]], ours[2][real[2]], rtol=0, atol=1e-6)


def _uses_vision_params(model: LlavaModel, batch, names) -> bool:
    """Whether the forward's jaxpr reads any vision/resampler/projector parameter."""
    is_vision = lambda path, node: isinstance(node, nnx.Param) and path[0] in ("vision", "resampler", "projector")
    graphdef, vision_params, rest = nnx.split(model, is_vision, ...)
    arrays = _device(batch, names)
    closed = jax.make_jaxpr(lambda vp: nnx.merge(graphdef, vp, rest)(
        arrays["input_ids"], segment_ids=arrays["segment_ids"], positions=arrays["positions"],
        pixels=arrays.get("pixels"), image_mask=arrays.get("image_mask"), features=arrays.get("features")))(
        vision_params)
    inputs = {id(v) for v in closed.jaxpr.invars}  # by identity: literals are unhashable
    assert len(inputs) == len(jax.tree.leaves(vision_params)) > 0
    read = [v for eqn in closed.jaxpr.eqns for v in eqn.invars] + list(closed.jaxpr.outvars)
    return any(id(v) in inputs for v in read)


def test_text_only_call_never_reads_vision_parameters(reference):
    model = _jax_model(reference)
    batch = _image_microbatch()
    assert not _uses_vision_params(model, batch, TEXT_FIELDS)
    assert _uses_vision_params(model, batch, IMAGE_FIELDS)  # the check can see them when they are used


def test_text_only_model_has_no_vision_parameters_and_runs():
    model = LlavaModel(ModelConfig(lm=TINY_LM, vision=None, dtype="float32"), rngs=nnx.Rngs(0))
    assert model.vision is None and model.resampler is None and model.projector is None
    paths = [path for path, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))]
    assert paths and all(path[0] == "lm" for path in paths)
    assert model.config.image_tokens == 0
    batch = _image_microbatch()
    batch["input_ids"] = batch["input_ids"] % VOCAB
    logits = _forward(*nnx.split(model), _device(batch, TEXT_FIELDS))
    assert logits.shape == (3, 40, VOCAB) and logits.dtype == jnp.float32
    assert np.isfinite(np.asarray(logits)).all()
    with pytest.raises(ValueError, match="text-only model"):
        model.embed_inputs(jnp.asarray(batch["input_ids"]), jnp.asarray(batch["pixels"]),
                           jnp.asarray(batch["image_mask"]))


def test_merge_writes_the_kth_vector_to_the_kth_placeholder():
    embeds = jnp.zeros((2, 6, 1))
    features = jnp.asarray([[[1.0], [2.0], [3.0]], [[4.0], [5.0], [6.0]]])
    mask = jnp.asarray([[False, True, True, True, False, False], [False] * 6])
    merged = merge_image_features(embeds, features, mask)
    np.testing.assert_array_equal(merged[..., 0], [[0, 1, 2, 3, 0, 0], [0, 0, 0, 0, 0, 0]])


# ----------------------------------------------------------------------------- features input

FEATURE_WIDTH = 32
TOWER = VisionConfig(kind="dinov2", image_size=IMAGE_SIZE, patch_size=PATCH, hidden_size=FEATURE_WIDTH,
                     intermediate_size=64, num_layers=2, num_heads=4, pretrained_image_size=IMAGE_SIZE)
FEATURES = VisionConfig(kind="features", hidden_size=FEATURE_WIDTH, tokens=N)  # what TOWER outputs per image


def _params(model) -> dict:
    return {path: np.asarray(v[...]) for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


@pytest.mark.parametrize("resampler", [ResamplerConfig("perceiver", num_latents=4, num_heads=4),
                                       ResamplerConfig("token_packer", num_latents=4, num_heads=4)],
                         ids=lambda r: r.kind)
def test_each_part_starts_from_the_same_values_whatever_other_parts_exist(resampler):
    """A model reading cached features (no tower) must start where the tower model with the same seed
    starts, so that the two runs train alike; a text-only model shares the LM's initial values too."""
    def build(vision):
        return _params(LlavaModel(ModelConfig(lm=TINY_LM, vision=vision, resampler=resampler, dtype="float32"),
                                  rngs=nnx.Rngs(7)))

    tower, features, text = build(TOWER), build(FEATURES), build(None)
    assert {p[0] for p in tower} == {"lm", "vision", "resampler", "projector"}
    assert {p[0] for p in features} == {"lm", "resampler", "projector"}  # no vision parameter at all
    assert {p[0] for p in text} == {"lm"}
    assert features.keys() == {p for p in tower if p[0] != "vision"}
    for path, value in features.items():
        np.testing.assert_array_equal(value, tower[path], err_msg=str(path))
    for path, value in text.items():
        np.testing.assert_array_equal(value, tower[path], err_msg=str(path))
    # each part's stream follows the seed (norm scales and biases start constant, so "any")
    other = _params(LlavaModel(ModelConfig(lm=TINY_LM, vision=FEATURES, resampler=resampler, dtype="float32"),
                               rngs=nnx.Rngs(8)))
    for part in ("lm", "resampler", "projector"):
        changed = [not np.array_equal(v, other[p]) for p, v in features.items() if p[0] == part]
        assert any(changed), part


def _features_model(**projector) -> LlavaModel:
    config = ModelConfig(lm=TINY_LM, vision=FEATURES, resampler=ResamplerConfig("identity"),
                         projector=ProjectorConfig("mlp2x_gelu", **projector), dtype="float32", attention_impl="xla")
    return LlavaModel(config, rngs=nnx.Rngs(0))


def _feature_microbatch():
    batch = _image_microbatch()
    batch["features"] = np.random.RandomState(3).randn(3, N, FEATURE_WIDTH).astype(np.float32)
    return batch


FEATURE_FIELDS = TEXT_FIELDS + ("features", "image_mask")


def test_text_only_call_of_a_features_model_never_reads_resampler_or_projector():
    model = _features_model()
    batch = _feature_microbatch()
    assert model.vision is None
    assert not _uses_vision_params(model, batch, TEXT_FIELDS)
    assert _uses_vision_params(model, batch, FEATURE_FIELDS)
    with_features = np.asarray(_forward_features(*nnx.split(model), _device(batch, FEATURE_FIELDS)))
    text_only = np.asarray(_forward(*nnx.split(model), _device(batch, TEXT_FIELDS)))
    real = batch["real"]
    assert np.abs(text_only[:2][real[:2]] - with_features[:2][real[:2]]).max() > 1e-2  # the features matter


@jax.jit
def _forward_features(graphdef, state, arrays):
    return nnx.merge(graphdef, state)(arrays["input_ids"], segment_ids=arrays["segment_ids"],
                                      positions=arrays["positions"], features=arrays["features"],
                                      image_mask=arrays["image_mask"])


def test_wrong_visual_input_is_a_value_error_naming_it():
    features_model, batch = _features_model(), _feature_microbatch()
    tower_model = LlavaModel(ModelConfig(lm=TINY_LM, vision=TOWER, dtype="float32"), rngs=nnx.Rngs(0))
    text_model = LlavaModel(ModelConfig(lm=TINY_LM, vision=None, dtype="float32"), rngs=nnx.Rngs(0))
    ids, mask = jnp.asarray(batch["input_ids"]), jnp.asarray(batch["image_mask"])
    pixels, features = jnp.asarray(batch["pixels"]), jnp.asarray(batch["features"])
    with pytest.raises(ValueError, match="pixels given to a model without a vision tower"):
        features_model.embed_inputs(ids, pixels, mask)
    with pytest.raises(ValueError, match="features given to a model with a dinov2 vision tower"):
        tower_model.embed_inputs(ids, image_mask=mask, features=features)
    with pytest.raises(ValueError, match="features given to a text-only model"):
        text_model.embed_inputs(ids, image_mask=mask, features=features)
    with pytest.raises(ValueError, match="both pixels and features"):
        tower_model.embed_inputs(ids, pixels, mask, features=features)
    with pytest.raises(ValueError, match="features given without image_mask"):
        features_model.embed_inputs(ids, features=features)
    with pytest.raises(ValueError, match=r"features of shape \(3, 16, 31\).*\(B, 16, 32\)"):
        features_model.embed_inputs(ids, image_mask=mask, features=features[..., :31])


def test_expand_multiplies_the_image_tokens_and_the_projected_vectors():
    model = _features_model(expand=4)
    assert model.config.image_tokens == 4 * N
    features = jnp.asarray(_feature_microbatch()["features"])
    out = model.encode_features(features)
    assert out.shape == (3, 4 * N, LM_WIDTH)
    # each input vector owns k consecutive tokens: changing vector 5 changes tokens 20..23 only
    changed = np.abs(np.asarray(model.encode_features(features.at[:, 5].add(1.0)) - out)).max(axis=(0, 2)) > 0
    np.testing.assert_array_equal(np.flatnonzero(changed), np.arange(20, 24))
