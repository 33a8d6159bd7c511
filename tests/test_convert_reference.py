"""convert import-reference / export-hf --what reference on a tiny synthetic checkpoint in the reference's layout.

The checkpoint is built here with transformers modules and the reference's key
names (docs/reference.md#checkpoint-layout): Baby-Llama-style LM (fp32), DINOv2 tower under
model.vision_tower.vision_tower.* (fp16, as the reference saved it),
mlp2x_gelu projector, dead TokenPacker tensors, and a tokenizer with the 8
stage-1 added tokens. The expected logits come from the reference forward
restated in PyTorch (docs/reference.md#image-placeholders).
"""
from __future__ import annotations

import functools

import dataclasses
import json
import os
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from safetensors.numpy import load_file, save_file

import launch
from conftest import WORDS
from jaxllava import checkpoint
from jaxllava.checkpoint import load_checkpoint_params, model_from_params
from jaxllava.convert.reference import PROJECTOR_PREFIX, VISION_PREFIX, import_reference
from jaxllava.errors import ConversionError
from conftest import randomize_torch_model

# stage 1 (docs/reference.md#special-tokens-and-vocabulary-growth), ids from the base vocabulary on, in this order
ADDED = ["<im_start>", "<im_end>", "<im_patch>", "<vid_start>", "<vid_end>", "<vid_patch>", "<slow_vid_start>",
         "<slow_vid_end>"]
SPECIALS = ["<unk>", "<s>", "</s>"]
VOCAB = len(SPECIALS) + len(WORDS) + len(ADDED)
# 2048 positions, as the reference's Baby Llama: the default data.buckets reach 2048 tokens.
LM = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
          rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=2048, tie_word_embeddings=False)
# 64-wide heads, so the importer infers the head count from the shapes as for the real DINOv2-L.
TOWER = dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, patch_size=4, image_size=16, mlp_ratio=2)
IMAGE_SIZE = 12  # 3×3 patches from a 4×4 position grid: interpolated, as 224 px from 518 in the reference
IMAGE_TOKENS = (IMAGE_SIZE // TOWER["patch_size"]) ** 2  # I, image tokens per image
RESAMPLER = {"token_packer.devide_attention.to_q.0.weight": (16, 32), "token_packer.ln_q.weight": (16,),
             "token_packer_slow.attn.in_proj_weight": (48, 16), "token_packer_fast.to_out.weight": (32, 16)}


randomize = functools.partial(randomize_torch_model, unit_positions=True)


def save_reference_tokenizer(directory: str) -> None:
    """Llama-like: <unk>=0, <s>=1, </s>=2, BOS added, pad = <unk> (docs/reference.md#baby-llama), + the added tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {t: i for i, t in enumerate(SPECIALS + list(WORDS))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                                unk_token="<unk>", pad_token="<unk>")
    fast.add_tokens(ADDED, special_tokens=True)
    fast.save_pretrained(directory)


def reference_config(**changes) -> dict:
    """config.json as the reference (transformers 4.40, LlavaConfig) wrote it."""
    config = {**LM, "vocab_size": VOCAB, "hidden_act": "silu", "rope_scaling": None, "attention_bias": False,
              "architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava_llama", "torch_dtype": "float32",
              "mm_vision_tower": "facebook/dinov2-large", "use_mm_proj": True, "mm_projector_type": "mlp2x_gelu",
              "mm_hidden_size": TOWER["hidden_size"], "mm_vision_select_layer": -2,
              "mm_vision_select_feature": "patch", "mm_patch_merge_type": "flat",
              "mm_resampler_type": "fast_slow_resampler", "mm_perceiver_latents": 64,
              "mm_perceiver_latents_fast": 32, "use_downsample_image": False, "image_aspect_ratio": "pad",
              "mm_use_im_start_end": False, "mm_use_im_patch_token": True, "tokenizer_padding_side": "right",
              "use_cache": False}
    config.update(changes)
    return config


def write_reference(directory, tensors: dict, **config_changes) -> str:
    os.makedirs(directory, exist_ok=True)
    save_file(tensors, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(reference_config(**config_changes), f)
    save_reference_tokenizer(str(directory))
    return str(directory)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("reference")
    torch.manual_seed(0)
    lm = randomize(transformers.LlamaForCausalLM(transformers.LlamaConfig(vocab_size=VOCAB, **LM)), 0)
    lm.save_pretrained(str(root / "lm"))
    tower = randomize(transformers.Dinov2Model(transformers.Dinov2Config(**TOWER)), 1)
    tower.save_pretrained(str(root / "tower"))  # legacy key names, as the reference's 4.40 wrote them
    projector = randomize(torch.nn.Sequential(torch.nn.Linear(TOWER["hidden_size"], LM["hidden_size"]), torch.nn.GELU(),
                                              torch.nn.Linear(LM["hidden_size"], LM["hidden_size"])), 2)
    rng = np.random.RandomState(3)
    tensors = dict(load_file(str(root / "lm" / "model.safetensors")))
    tensors.update({VISION_PREFIX + k: v.astype(np.float16)  # the reference cast DINOv2 to fp16
                    for k, v in load_file(str(root / "tower" / "model.safetensors")).items()})
    tensors.update({PROJECTOR_PREFIX + k: v.numpy() for k, v in projector.state_dict().items()})
    tensors.update({"model.vision_resampler." + k: rng.randn(*s).astype(np.float32) for k, s in RESAMPLER.items()})
    return {"dir": write_reference(root / "checkpoint-100", tensors), "tensors": tensors, "root": root}


@pytest.fixture(scope="module")
def imported(reference):
    out = str(reference["root"] / "imported")
    assert launch.main(["convert", "import-reference", "--dir", reference["dir"], "--out", out,
                        "--image-size", str(IMAGE_SIZE)]) == 0
    return out


# ----------------------------------------------------------------------------- the reference forward


def interpolate_like_transformers_4_40(self, embeddings, height, width):
    """DINOv2 position embeddings as the reference's transformers 4.40 resized them
    (docs/reference.md#position-embedding-interpolation):
    bicubic with scale_factor (g + 0.1) / L (learned grid L) rather than a target size."""
    cls, patches = self.position_embeddings[:, :1], self.position_embeddings[:, 1:]
    source = int(patches.shape[1] ** 0.5)
    g = height // self.config.patch_size
    grid = patches.reshape(1, source, source, -1).permute(0, 3, 1, 2)
    grid = torch.nn.functional.interpolate(grid, scale_factor=((g + 0.1) / source, (g + 0.1) / source),
                                           mode="bicubic", align_corners=False)
    return torch.cat([cls, grid.permute(0, 2, 3, 1).reshape(1, -1, grid.shape[1])], dim=1)


def reference_logits(reference, ids: np.ndarray, attention_mask: np.ndarray, pixels: np.ndarray) -> np.ndarray:
    """embed → DINOv2 last_hidden_state[:, 1:] → mlp2x_gelu → overwrite <im_start>..<im_end> → Llama."""
    tensors, root = reference["tensors"], reference["root"]
    tower_dir = root / "reference_tower"
    if not tower_dir.exists():
        os.makedirs(tower_dir)
        save_file({k[len(VISION_PREFIX):]: v.astype(np.float32) for k, v in tensors.items()
                   if k.startswith(VISION_PREFIX)}, str(tower_dir / "model.safetensors"), metadata={"format": "pt"})
        transformers.Dinov2Config(**TOWER).save_pretrained(str(tower_dir))
    tower = transformers.Dinov2Model.from_pretrained(str(tower_dir)).eval()
    tower.embeddings.interpolate_pos_encoding = types.MethodType(interpolate_like_transformers_4_40, tower.embeddings)
    lm = transformers.LlamaForCausalLM(transformers.LlamaConfig(vocab_size=VOCAB, **LM)).eval()
    lm.load_state_dict({k: torch.from_numpy(v) for k, v in tensors.items() if k.startswith(("model.layers", "lm_head",
                        "model.embed_tokens", "model.norm"))})
    projector = torch.nn.Sequential(torch.nn.Linear(TOWER["hidden_size"], LM["hidden_size"]), torch.nn.GELU(),
                                    torch.nn.Linear(LM["hidden_size"], LM["hidden_size"]))
    projector.load_state_dict({k[len(PROJECTOR_PREFIX):]: torch.from_numpy(v) for k, v in tensors.items()
                               if k.startswith(PROJECTOR_PREFIX)})
    im_start, im_end = len(SPECIALS) + len(WORDS), len(SPECIALS) + len(WORDS) + 1
    with torch.no_grad():
        ids_t = torch.from_numpy(ids).long()
        embeds = lm.model.embed_tokens(ids_t)
        features = projector(tower(pixel_values=torch.from_numpy(pixels).permute(0, 3, 1, 2))
                             .last_hidden_state[:, 1:])
        image = 0
        rows = []
        for b in range(len(ids)):
            row = embeds[b]
            for p in torch.where(ids_t[b] == im_start)[0].tolist():
                assert ids[b, p + IMAGE_TOKENS - 1] == im_end
                row = torch.cat([row[:p], features[image], row[p + IMAGE_TOKENS:]])
                image += 1
            rows.append(row)
        mask = torch.from_numpy(attention_mask).long()
        return lm(inputs_embeds=torch.stack(rows), attention_mask=mask).logits.numpy()


def test_reference_checkpoint_imports_and_matches_the_reference_forward_on_an_image_row(reference, imported):
    config, params, _ = load_checkpoint_params(imported)
    base = len(SPECIALS) + len(WORDS)
    im_start, im_end, im_patch = base, base + 1, base + 2
    words = np.random.RandomState(0).randint(3, base, 12)
    length = 1 + IMAGE_TOKENS + 5
    ids = np.zeros((2, length), np.int32)  # pad = <unk> = 0, right padding
    ids[0] = [1, im_start] + [im_patch] * (IMAGE_TOKENS - 2) + [im_end] + list(words[:5])
    ids[1, :8] = [1] + list(words[5:12])
    real = np.zeros_like(ids, bool)
    real[0], real[1, :8] = True, True
    pixels = np.random.RandomState(1).randn(1, IMAGE_SIZE, IMAGE_SIZE, 3).astype(np.float32)
    expected = reference_logits(reference, ids, real.astype(np.int64), pixels)

    image_mask = np.zeros_like(real)
    image_mask[0, 1:1 + IMAGE_TOKENS] = True
    model = model_from_params(dataclasses.replace(config.model, dtype="float32", attention_impl="xla"), params)
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda s, *a: nnx.merge(graphdef, s)(a[0], segment_ids=a[1], positions=a[2], pixels=a[3],
                                                           image_mask=a[4]))
    ours = forward(state, jnp.asarray(ids), jnp.asarray(real.astype(np.int32)),
                   jnp.asarray(np.where(real, np.arange(length)[None], 0)),
                   jnp.asarray(np.concatenate([pixels, np.zeros_like(pixels)])), jnp.asarray(image_mask))
    ours = np.asarray(ours)
    # fp32 throughout. The 4.40 position interpolation (jax scale_and_translate vs torch bicubic) agrees
    # within 5e-6 here; through the tower and decoder that measured 1.04e-5 on the logits, hence 2e-5
    # rather than the LM-only 1e-5.
    np.testing.assert_allclose(ours[real], expected[real], atol=2e-5, rtol=0)
    # the image changes the image row's logits, so the comparison covers the vision path
    assert np.abs(ours[0, -1] - np.asarray(forward(state, jnp.asarray(ids), jnp.asarray(real.astype(np.int32)),
                  jnp.asarray(np.where(real, np.arange(length)[None], 0)),
                  jnp.asarray(np.zeros((2, IMAGE_SIZE, IMAGE_SIZE, 3), np.float32)),
                  jnp.asarray(image_mask)))[0, -1]).max() > 1e-2


def test_report_accounts_for_every_reference_tensor(reference, imported):
    with open(os.path.join(imported, checkpoint.REPORT_JSON)) as f:
        report = json.load(f)
    assert set(report["mapped"]) | set(report["unused"]) == set(reference["tensors"])
    assert not set(report["mapped"]) & set(report["unused"])
    resampler = {k for k in reference["tensors"] if k.startswith("model.vision_resampler.")}
    assert {k for k, why in report["unused"].items() if "multiplied by 0" in why} == resampler
    assert report["unused"][VISION_PREFIX + "embeddings.mask_token"].startswith("DINOv2 pre-training mask token")
    assert report["mapped"][VISION_PREFIX + "layernorm.weight"] == {"shape": [128], "dtype": "float16",
                                                                     "component": "vision"}
    config, _, _ = load_checkpoint_params(imported)
    model = config.model
    assert (model.lm.vocab_size, model.lm.hidden_size, model.lm.num_layers) == (VOCAB, 32, 2)
    assert (model.vision.kind, model.vision.num_heads, model.vision.pretrained_image_size) == ("dinov2", 2, 16)
    assert (model.vision.image_size, model.vision.pos_interpolation, model.vision.feature_layer) == \
        (IMAGE_SIZE, "scale_factor", -1)
    assert (model.resampler.kind, model.projector.kind, model.image_tokens) == ("identity", "mlp2x_gelu", IMAGE_TOKENS)
    tokenizer = transformers.AutoTokenizer.from_pretrained(config.data.tokenizer)
    assert len(tokenizer) == VOCAB and tokenizer.convert_tokens_to_ids(ADDED) == list(range(VOCAB - 8, VOCAB))
    assert checkpoint.read_meta(imported)["reference"]["stage"] == 1


def test_reference_export_round_trips_through_import(reference, imported, tmp_path):
    assert launch.main(["convert", "export-hf", "--checkpoint", imported, "--out", str(tmp_path / "ref"),
                        "--what", "reference"]) == 0
    exported = load_file(str(tmp_path / "ref" / "model.safetensors"))
    original = reference["tensors"]
    assert set(exported) == {k for k in original if not k.startswith("model.vision_resampler.")
                             and not k.endswith("mask_token")}
    for name, array in exported.items():
        np.testing.assert_array_equal(array, original[name].astype(np.float32), err_msg=name)
    with open(tmp_path / "ref" / "config.json") as f:
        hf_config = json.load(f)
    assert hf_config["model_type"] == "llava_llama" and hf_config["mm_vision_tower"] == "facebook/dinov2-large"
    assert (hf_config["mm_projector_type"], hf_config["mm_hidden_size"], hf_config["image_token_num"]) == \
        ("mlp2x_gelu", 128, IMAGE_TOKENS)

    import_reference(str(tmp_path / "ref"), str(tmp_path / "again"))
    first, first_params, _ = load_checkpoint_params(imported)
    second, second_params, _ = load_checkpoint_params(str(tmp_path / "again"))
    assert second.model == first.model
    jax.tree.map(np.testing.assert_array_equal, second_params, first_params)


def test_reference_export_streams_through_the_sharded_writer(imported, tmp_path, monkeypatch):
    from jaxllava.convert import reference as reference_module
    from jaxllava.convert.checkpoint_files import save_sharded_safetensors

    def small_shards(tensors, directory):
        assert not isinstance(tensors, dict)  # a stream, never the whole model at once
        return save_sharded_safetensors(tensors, directory, max_shard_bytes=64 * 1024)

    monkeypatch.setattr(reference_module, "save_sharded_safetensors", small_shards)
    report = reference_module.export_reference(imported, str(tmp_path / "ref"))
    shards = list((tmp_path / "ref").glob("model-*-of-*.safetensors"))
    assert len(shards) > 1 and (tmp_path / "ref" / "model.safetensors.index.json").exists()
    import_reference(str(tmp_path / "ref"), str(tmp_path / "again"))
    _, first_params, _ = load_checkpoint_params(imported)
    _, second_params, _ = load_checkpoint_params(str(tmp_path / "again"))
    jax.tree.map(np.testing.assert_array_equal, second_params, first_params)
    assert report["tensors"] == len(json.loads((tmp_path / "ref" / "model.safetensors.index.json").read_text())
                                    ["weight_map"])


# ----------------------------------------------------------------------------- refusals


def variant(reference, tmp_path, tensors=None, **config_changes) -> str:
    return write_reference(tmp_path / "variant", tensors if tensors is not None else reference["tensors"],
                           **config_changes)


def test_lape_tensors_are_refused_unless_dropped(reference, tmp_path):
    lape = {f"model.{p}_{io}_embeddings.weight": np.zeros((100, 32), np.float32)
            for p in ("spatial_height", "spatial_width", "temporal") for io in ("input", "output")}
    source = variant(reference, tmp_path, {**reference["tensors"], **lape})
    with pytest.raises(ConversionError, match="stage-2 LAPE tensors .*pass --drop-lape"):
        import_reference(source, str(tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out")
    report = import_reference(source, str(tmp_path / "out"), drop_lape=True)
    assert all("LAPE embedding, dropped on request" in report["unused"][k] for k in lape)
    assert checkpoint.read_meta(str(tmp_path / "out"))["reference"]["lape_dropped"] is True


def test_unexpected_and_missing_reference_tensors_are_errors(reference, tmp_path):
    extra = {**reference["tensors"], "model.mm_projector.4.weight": np.zeros((32, 32), np.float32)}
    with pytest.raises(ConversionError, match=r"unexpected tensor\(s\).*'model\.mm_projector\.4\.weight'"):
        import_reference(variant(reference, tmp_path / "a", extra), str(tmp_path / "out"))
    missing = {k: v for k, v in reference["tensors"].items() if k != PROJECTOR_PREFIX + "2.bias"}
    with pytest.raises(ConversionError, match=r"'model\.mm_projector\.2\.bias' \(shape \(32,\)\) is missing"):
        import_reference(variant(reference, tmp_path / "b", missing), str(tmp_path / "out"))
    wrong = {**reference["tensors"], PROJECTOR_PREFIX + "0.weight": np.zeros((32, 64), np.float32)}
    with pytest.raises(ConversionError, match=r"'model\.mm_projector\.0\.weight': checkpoint shape \(32, 64\), "
                                              r"model expects \(32, 128\)"):
        import_reference(variant(reference, tmp_path / "c", wrong), str(tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out")


def test_unknown_projector_type_is_a_conversion_error(reference, tmp_path):
    with pytest.raises(ConversionError, match="mm_projector_type.*'mlp2x_relu'"):
        import_reference(variant(reference, tmp_path, mm_projector_type="mlp2x_relu"), str(tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out")


def test_token_packer_image_tokens_and_small_vocabularies_are_refused(reference, tmp_path):
    with pytest.raises(ConversionError, match="use_downsample_image=true"):
        import_reference(variant(reference, tmp_path / "a", use_downsample_image=True), str(tmp_path / "out"))
    with pytest.raises(ConversionError, match=f"tokenizer has {VOCAB} tokens but config.json vocab_size is 40"):
        import_reference(variant(reference, tmp_path / "b", vocab_size=40), str(tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out")
