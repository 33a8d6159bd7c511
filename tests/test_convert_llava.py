"""convert export-hf --what llava / import-hf --llava against transformers' LlavaForConditionalGeneration
(tiny random models, fp32, CPU)."""
from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from safetensors.torch import save_file

import launch
from conftest import make_word_tokenizer, randomize_torch_model, write_png
from jaxllava.checkpoint import abstract_params, load_checkpoint_params, model_from_params, write_params_checkpoint
from jaxllava.config import load_config
from jaxllava.convert.llava_hf import llava_export_problems
from jaxllava.data.images import load_image
from jaxllava.data.pipeline import image_processing_for
from jaxllava.data.tokenizer import load_tokenizer, special_ids
from jaxllava.model.config import ModelConfig, ProjectorConfig, ResamplerConfig, VisionConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_CONFIG = os.path.join(REPO, "configs", "tiny.yaml")
PROMPT = "<im_patch> the dog sees a red circle"
TEXT = "the cat runs on the left ."

# jaxllava models the export covers: every tower, both feature selections, both projector shapes,
# a hidden layer below the last, SigLIP's post-norm last layer, and a resized DINOv2 position table.
EXPORTABLE = {
    "clip_layer-2_mlp": ["model.vision.kind=clip", "model.vision.layer_norm_eps=1e-5",
                         "model.vision.feature_layer=-2"],
    "siglip_last_linear": ["model.vision.kind=siglip", "model.vision.feature_layer=-1",
                           "model.projector.kind=linear"],
    "dinov2_resized_cls": ["model.vision.feature_layer=1", "model.vision.feature_select=cls_patch",
                           "model.vision.pretrained_image_size=40", "model.vision.pos_interpolation=scale_factor"],
}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("llava")
    make_word_tokenizer(str(root / "tokenizer"))
    write_png(str(root / "wide.png"), size=(20, 12), color=(30, 160, 90))
    return root


def random_params(model_config, seed: int) -> dict:
    """Every tensor random and far from an init (norm scales ≠ 1, biases ≠ 0), so a swapped tensor
    shows; drawn with numpy on the abstract model's shapes (no per-layer jit compiles)."""
    rng = np.random.RandomState(seed)

    def draw(path, leaf):
        noise = rng.standard_normal(leaf.shape).astype(np.float32)
        return 1 + 0.2 * noise if path[-1].key == "scale" else 0.15 * noise

    return jax.tree_util.tree_map_with_path(draw, abstract_params(model_config))


def jaxllava_checkpoint(root, name: str, overrides: list[str]) -> str:
    out = str(root / f"ckpt_{name}")
    if not os.path.exists(out):
        config = load_config(TINY_CONFIG, [f"data.tokenizer={root / 'tokenizer'}", *overrides])
        write_params_checkpoint(out, config, random_params(config.model, 3), str(root / "tokenizer"), {})
    return out


def export(checkpoint: str, out: str) -> str:
    assert launch.main(["convert", "export-hf", "--checkpoint", checkpoint, "--out", out, "--what", "llava"]) == 0
    return out


def jax_logits(model, ids: np.ndarray, pixels=None, image_mask=None) -> np.ndarray:
    graphdef, state = nnx.split(model)
    t = ids.shape[1]
    extra = {} if pixels is None else {"pixels": jnp.asarray(pixels), "image_mask": jnp.asarray(image_mask)}
    logits = jax.jit(lambda s, i, e: nnx.merge(graphdef, s)(i, segment_ids=jnp.ones_like(i),
                                                              positions=jnp.arange(t)[None], **e))(
        state, jnp.asarray(ids), extra)
    return np.asarray(logits)


def float32(model_config):
    return dataclasses.replace(model_config, dtype="float32", attention_impl="xla")


def jaxllava_ids(ids: np.ndarray, image_mask: np.ndarray, tokenizer) -> np.ndarray:
    """transformers' ids with the image positions spelled as jaxllava writes them: <im_start> <im_patch>… <im_end>."""
    span = special_ids(tokenizer).image_span(int(image_mask.sum()))
    ours = ids.copy()
    ours[image_mask] = span
    return ours


# ----------------------------------------------------------------------------- export


@pytest.mark.parametrize("case", sorted(EXPORTABLE))
def test_exported_llava_matches_jaxllava_logits_on_image_and_text_rows(root, case):
    checkpoint = jaxllava_checkpoint(root, case, EXPORTABLE[case])
    out = export(checkpoint, str(root / f"export_{case}"))
    config, params, _ = load_checkpoint_params(checkpoint)
    model = model_from_params(float32(config.model), params)
    theirs = transformers.LlavaForConditionalGeneration.from_pretrained(out, dtype=torch.float32).eval()
    processor = transformers.AutoProcessor.from_pretrained(out)
    image_path = str(root / "wide.png")

    batch = processor(images=[image_path], text=[PROMPT], return_tensors="pt")
    ids = batch["input_ids"].numpy()
    image_mask = ids == theirs.config.image_token_index
    assert image_mask.sum() == config.model.image_tokens  # the processor expands the marker to I positions
    pixels = load_image(image_path, image_processing_for(config.data, config.model.vision.image_size))
    np.testing.assert_allclose(batch["pixel_values"].numpy()[0].transpose(1, 2, 0), pixels, atol=1e-5)
    with torch.no_grad():
        expected = theirs(**batch).logits.numpy()
    ours = jax_logits(model, jaxllava_ids(ids, image_mask, load_tokenizer(out)), pixels[None], image_mask)
    np.testing.assert_allclose(ours, expected, atol=1e-4, rtol=0)

    text_ids = processor(text=[TEXT], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        expected = theirs(input_ids=text_ids).logits.numpy()
    np.testing.assert_allclose(jax_logits(model, text_ids.numpy()), expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("case", ["clip_layer-2_mlp", "siglip_last_linear"])
def test_export_then_import_gives_the_original_parameters_and_model(root, case):
    checkpoint = jaxllava_checkpoint(root, case, EXPORTABLE[case])
    out = str(root / f"export_{case}")
    if not os.path.exists(out):
        export(checkpoint, out)
    back = str(root / f"reimported_{case}")
    assert launch.main(["convert", "import-hf", "--llava", out, "--out", back]) == 0
    config, params, _ = load_checkpoint_params(checkpoint)
    config_back, params_back, _ = load_checkpoint_params(back)
    assert config_back.model.vision == config.model.vision
    assert config_back.model.projector == config.model.projector
    assert config_back.model.lm == config.model.lm
    flat, flat_back = nnx.traversals.flatten_mapping(params), nnx.traversals.flatten_mapping(params_back)
    assert sorted(flat_back) == sorted(flat)
    for path, value in flat.items():
        np.testing.assert_array_equal(np.asarray(flat_back[path]), np.asarray(value), err_msg=str(path))
    assert (config_back.data.image.mean, config_back.data.image.aspect) == (config.data.image.mean, "pad")


def tower(**fields) -> VisionConfig:
    base = dict(kind="clip", image_size=32, patch_size=8, hidden_size=16, intermediate_size=32, num_layers=2,
                num_heads=2, pretrained_image_size=32, feature_layer=-2)
    return VisionConfig(**{**base, **fields})


@pytest.mark.parametrize("model_config, part", [
    (ModelConfig(vision=tower(), resampler=ResamplerConfig(kind="perceiver", num_heads=2)),
     "resampler.kind 'perceiver'"),
    (ModelConfig(vision=tower(), resampler=ResamplerConfig(kind="token_packer", num_latents=4, num_heads=2)),
     "resampler.kind 'token_packer'"),
    (ModelConfig(vision=VisionConfig(kind="features", hidden_size=16, tokens=4)), "vision.kind 'features'"),
    (ModelConfig(vision=tower(), projector=ProjectorConfig(expand=2)), "projector.expand 2"),
    (ModelConfig(vision=tower(), projector=ProjectorConfig(kind="mlp3x_gelu")), "projector.kind 'mlp3x_gelu'"),
    (ModelConfig(vision=tower(kind="dinov2", feature_layer=-1)), "vision.feature_layer -1 on the dinov2 tower"),
    (ModelConfig(), "model.vision is not set"),
])
def test_parts_transformers_llava_cannot_hold_are_named(model_config, part):
    problems = llava_export_problems(model_config)
    assert len(problems) == 1 and problems[0].startswith(part), problems


def test_export_refusal_names_the_part_and_offers_the_lm_export(root, capsys):
    checkpoint = jaxllava_checkpoint(root, "avg_pool", ["model.resampler.kind=avg_pool"])
    code = launch.main(["convert", "export-hf", "--checkpoint", checkpoint, "--out", str(root / "refused"),
                        "--what", "llava"])
    error = capsys.readouterr().err
    assert code == 2 and "resampler.kind 'avg_pool'" in error and "--what lm" in error
    assert not os.path.exists(root / "refused")
    for exportable in EXPORTABLE.values():
        config = load_config(TINY_CONFIG, exportable)
        assert llava_export_problems(config.model) == []


# ----------------------------------------------------------------------------- import of a transformers LLaVA


LLAMA = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, rope_theta=30.0, rms_norm_eps=1e-5, max_position_embeddings=64)
CLIP = dict(hidden_size=24, intermediate_size=40, num_hidden_layers=3, num_attention_heads=2, patch_size=8,
            image_size=32, layer_norm_eps=1e-5)


@pytest.fixture(scope="module")
def llava_hf(root):
    """A tiny random llava-hf-style model: CLIP tower, hidden_states[-2], CLS dropped, 2-layer GELU projector."""
    config = transformers.LlavaConfig(
        vision_config=transformers.CLIPVisionConfig(**CLIP),
        text_config=transformers.LlamaConfig(vocab_size=38, **LLAMA), image_token_index=36,
        image_seq_length=16, vision_feature_layer=-2, vision_feature_select_strategy="default",
        projector_hidden_act="gelu")
    model = randomize_torch_model(transformers.LlavaForConditionalGeneration(config), 5)
    directory = str(root / "llava_hf")
    model.save_pretrained(directory)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(root / "tokenizer"))
    image_processor = transformers.LlavaImageProcessorPil(size={"shortest_edge": 32},
                                                          crop_size={"height": 32, "width": 32})
    transformers.LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=8,
                                vision_feature_select_strategy="default", num_additional_image_tokens=1,
                                image_token="<im_patch>").save_pretrained(directory)
    return model, directory


def test_imported_llava_hf_model_matches_transformers_logits(root, llava_hf):
    torch_model, directory = llava_hf
    out = str(root / "imported_llava")
    assert launch.main(["convert", "import-hf", "--llava", directory, "--out", out]) == 0
    config, params, _ = load_checkpoint_params(out)
    vision = config.model.vision
    assert (vision.kind, vision.feature_layer, vision.feature_select, config.model.projector.kind) == \
        ("clip", -2, "patch", "mlp2x_gelu")
    assert config.data.image.mean == tuple(transformers.image_utils.OPENAI_CLIP_MEAN)
    with open(os.path.join(out, "conversion_report.json")) as f:
        report = json.load(f)
    components = {entry["component"] for entry in report["mapped"].values()}
    assert components == {"lm", "vision", "projector"} and len(report["mapped"]) == len(torch_model.state_dict())
    assert any("centre-crops" in note for note in report["notes"])
    model = model_from_params(float32(config.model), params)
    tokenizer = load_tokenizer(out + "/tokenizer")

    rng = np.random.RandomState(0)
    pixels = rng.randn(1, 32, 32, 3).astype(np.float32)
    ids = np.asarray([[1] + [36] * 16 + [4, 5, 6, 7]])
    image_mask = ids == 36
    with torch.no_grad():
        expected = torch_model(input_ids=torch.from_numpy(ids),
                               pixel_values=torch.from_numpy(pixels.transpose(0, 3, 1, 2))).logits.numpy()
    ours = jax_logits(model, jaxllava_ids(ids, image_mask, tokenizer), pixels, image_mask)
    np.testing.assert_allclose(ours, expected, atol=1e-4, rtol=0)
    text = np.asarray([[1, 8, 9, 10, 11, 12]])
    with torch.no_grad():
        expected = torch_model(input_ids=torch.from_numpy(text)).logits.numpy()
    np.testing.assert_allclose(jax_logits(model, text), expected, atol=1e-4, rtol=0)

    # The same model saved under transformers >= 4.52's state-dict names imports to the same parameters.
    newer = root / "llava_hf_new_layout"
    os.makedirs(newer)
    for name in os.listdir(directory):
        if name != "model.safetensors":
            os.symlink(os.path.join(directory, name), newer / name)
    save_file({k: v.contiguous() for k, v in torch_model.state_dict().items()}, str(newer / "model.safetensors"),
              metadata={"format": "pt"})
    assert any(k.startswith("model.language_model.") for k in torch_model.state_dict())
    assert launch.main(["convert", "import-hf", "--llava", str(newer), "--out", str(root / "imported_new")]) == 0
    _, params_new, _ = load_checkpoint_params(str(root / "imported_new"))
    for (path, a), (_, b) in zip(sorted(nnx.traversals.flatten_mapping(params).items()),
                                 sorted(nnx.traversals.flatten_mapping(params_new).items())):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=str(path))


def test_import_refuses_siglip_with_the_default_strategy_that_drops_a_patch(root, llava_hf):
    _, directory = llava_hf
    bad = root / "siglip_default"
    os.makedirs(bad)
    for name in os.listdir(directory):
        if name != "config.json":
            os.symlink(os.path.join(directory, name), bad / name)
    with open(os.path.join(directory, "config.json")) as f:
        hf = json.load(f)
    hf["vision_config"] = dict(CLIP, model_type="siglip_vision_model")
    with open(bad / "config.json", "w") as f:
        json.dump(hf, f)
    from jaxllava.config import ExperimentConfig
    from jaxllava.convert.llava_hf import import_llava
    from jaxllava.errors import ConversionError

    with pytest.raises(ConversionError, match="vision_feature_select_strategy 'default' on a SigLIP tower"):
        import_llava(ExperimentConfig(), str(root / "never"), str(bad))


@pytest.mark.parametrize("activation, bias", [("linear", True), ("gelu", False)])
def test_imported_projector_computes_transformers_projector(activation, bias):
    """"linear" folds linear_1 and linear_2 into one layer; a bias-free projector gets zero biases."""
    from transformers.models.llava.modeling_llava import LlavaMultiModalProjector
    from jaxllava.convert.llava_hf import PROJECTOR_ACTIVATIONS, PROJECTOR_PREFIX, projector_from_hf
    from jaxllava.convert.weights import load_entries
    from jaxllava.model.hf_keys import hf_entries
    from jaxllava.model.projectors import Projector

    config = transformers.LlavaConfig(vision_config=transformers.CLIPVisionConfig(**CLIP),
                                      text_config=transformers.LlamaConfig(vocab_size=38, **LLAMA),
                                      projector_hidden_act=activation, multimodal_projector_bias=bias)
    theirs = randomize_torch_model(LlavaMultiModalProjector(config), 7)
    tensors = {PROJECTOR_PREFIX + k: v.numpy() for k, v in theirs.state_dict().items()}
    kind = PROJECTOR_ACTIVATIONS[activation]
    ours = Projector(ProjectorConfig(kind=kind), CLIP["hidden_size"], LLAMA["hidden_size"], rngs=nnx.Rngs(0))
    load_entries(hf_entries(ours), {k: v.astype(np.float32) for k, v in projector_from_hf(tensors, kind).items()})
    x = np.random.RandomState(1).randn(2, 5, CLIP["hidden_size"]).astype(np.float32)
    with torch.no_grad():
        expected = theirs(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(np.asarray(ours(jnp.asarray(x))), expected, atol=1e-5, rtol=0)
