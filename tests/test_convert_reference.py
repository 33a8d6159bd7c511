"""convert import-reference / export-hf --what reference on a tiny synthetic checkpoint in the reference's layout.

The checkpoint is built here with transformers modules and the reference's key
names (docs/reference.md#checkpoint-layout): Baby-Llama-style LM (fp32), DINOv2 tower under
model.vision_tower.vision_tower.* (fp16, as the reference saved it),
mlp2x_gelu projector, dead TokenPacker tensors, and a tokenizer with the 8
stage-1 added tokens. A stage-2 variant adds the 306 stage-2 tokens (vocabulary rows
N(0, 0.02), as resize_token_embeddings), the six LAPE tables (100 rows) and their three
reparametrisation buffers. The expected logits come from the reference forward
restated in PyTorch (docs/reference.md#image-placeholders; LAPE: tests/test_lape.py).
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
from test_lape import TorchLape

# stage 1 (docs/reference.md#special-tokens-and-vocabulary-growth), ids from the base vocabulary on, in this order
ADDED = ["<im_start>", "<im_end>", "<im_patch>", "<vid_start>", "<vid_end>", "<vid_patch>", "<slow_vid_start>",
         "<slow_vid_end>"]
SPECIALS = ["<unk>", "<s>", "</s>"]
VOCAB = len(SPECIALS) + len(WORDS) + len(ADDED)
# stage 2 adds these after the stage-1 tokens (docs/reference.md#special-tokens-and-vocabulary-growth)
LOCATION = ["<TEMP-INPUT>", "<TEMP-OUTPUT>", "<HEIGHT-INPUT>", "<HEIGHT-OUTPUT>", "<WIDTH-INPUT>", "<WIDTH-OUTPUT>"]
STAGE2_ADDED = ADDED + LOCATION + [f"<{axis}-{i:03d}>" for axis in ("TEMP", "HEIGHT", "WIDTH") for i in range(100)]
STAGE2_VOCAB = VOCAB - len(ADDED) + len(STAGE2_ADDED)
LAPE_AXES = ("temporal", "spatial_height", "spatial_width")
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


def save_reference_tokenizer(directory: str, added=ADDED) -> None:
    """Llama-like: <unk>=0, <s>=1, </s>=2, BOS added, pad = <unk> (docs/reference.md#baby-llama), + the added tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {t: i for i, t in enumerate(SPECIALS + list(WORDS))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                                unk_token="<unk>", pad_token="<unk>")
    fast.add_tokens(added, special_tokens=True)
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


def write_reference(directory, tensors: dict, *, added=ADDED, **config_changes) -> str:
    os.makedirs(directory, exist_ok=True)
    save_file(tensors, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(reference_config(**config_changes), f)
    save_reference_tokenizer(str(directory), added)
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


def stage2_tensors(stage1: dict) -> dict:
    """Stage 1 grown to stage 2: 306 new vocabulary rows in embed_tokens and lm_head (N(0, 0.02), as the
    reference's resize_token_embeddings), the six LAPE tables (torch's Embedding / Linear init) and the
    three `*_reparam_mat` buffers as `init_special_embeddings` registered them."""
    rng = np.random.RandomState(4)
    tensors = dict(stage1)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        new_rows = (0.02 * rng.randn(STAGE2_VOCAB - VOCAB, LM["hidden_size"])).astype(np.float32)
        tensors[name] = np.concatenate([stage1[name], new_rows])
    bound = 1 / np.sqrt(LM["hidden_size"])
    for axis in LAPE_AXES:
        tensors[f"model.{axis}_input_embeddings.weight"] = rng.randn(100, LM["hidden_size"]).astype(np.float32)
        tensors[f"model.{axis}_output_embeddings.weight"] = rng.uniform(-bound, bound, (100, LM["hidden_size"])
                                                                        ).astype(np.float32)
        index = torch.arange(100)
        tensors[f"model.{axis}_reparam_mat"] = (2. ** (-(index[:, None] - index[None]).abs())).numpy()
    return tensors


@pytest.fixture(scope="module")
def stage2(reference):
    root = reference["root"]
    tensors = stage2_tensors(reference["tensors"])
    directory = write_reference(root / "checkpoint-200-stage2", tensors, added=STAGE2_ADDED,
                                vocab_size=STAGE2_VOCAB, num_temporal_tokens=100, num_spatial_tokens=100)
    out = str(root / "imported-stage2")
    assert launch.main(["convert", "import-reference", "--dir", directory, "--out", out,
                        "--image-size", str(IMAGE_SIZE)]) == 0
    return {"dir": directory, "tensors": tensors, "root": root, "imported": out}


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


def reference_logits(reference, ids: np.ndarray, attention_mask: np.ndarray, pixels: np.ndarray, *,
                     lape: bool = True) -> np.ndarray:
    """embed → DINOv2 last_hidden_state[:, 1:] → mlp2x_gelu [→ LAPE add, when the checkpoint has it and `lape`]
    → overwrite <im_start>..<im_end> → Llama."""
    tensors, root = reference["tensors"], reference["root"]
    tower_dir = root / "reference_tower"
    if not tower_dir.exists():
        os.makedirs(tower_dir)
        save_file({k[len(VISION_PREFIX):]: v.astype(np.float32) for k, v in tensors.items()
                   if k.startswith(VISION_PREFIX)}, str(tower_dir / "model.safetensors"), metadata={"format": "pt"})
        transformers.Dinov2Config(**TOWER).save_pretrained(str(tower_dir))
    tower = transformers.Dinov2Model.from_pretrained(str(tower_dir)).eval()
    tower.embeddings.interpolate_pos_encoding = types.MethodType(interpolate_like_transformers_4_40, tower.embeddings)
    vocab = tensors["model.embed_tokens.weight"].shape[0]
    lm = transformers.LlamaForCausalLM(transformers.LlamaConfig(vocab_size=vocab, **LM)).eval()
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
        if lape and "model.temporal_input_embeddings.weight" in tensors:  # stage 2: per image, as encode_images
            injection = TorchLape({f"{axis}_{io}": tensors[f"model.{axis}_{io}_embeddings.weight"]
                                   for axis in LAPE_AXES for io in ("input", "output")})
            features = torch.cat([injection(features[i:i + 1], "image") for i in range(len(features))])
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


def image_row_batch(extra_words=()):
    """Row 0: BOS, one image's <im_start> <im_patch>… <im_end> span, 5 words; row 1: text only (right padded)."""
    base = len(SPECIALS) + len(WORDS)
    im_start, im_end, im_patch = base, base + 1, base + 2
    words = list(np.random.RandomState(0).randint(3, base, 12))
    words[6:6 + len(extra_words)] = extra_words
    length = 1 + IMAGE_TOKENS + 5
    ids = np.zeros((2, length), np.int32)  # pad = <unk> = 0, right padding
    ids[0] = [1, im_start] + [im_patch] * (IMAGE_TOKENS - 2) + [im_end] + words[:5]
    ids[1, :8] = [1] + words[5:12]
    real = np.zeros_like(ids, bool)
    real[0], real[1, :8] = True, True
    image_mask = np.zeros_like(real)
    image_mask[0, 1:1 + IMAGE_TOKENS] = True
    pixels = np.random.RandomState(1).randn(1, IMAGE_SIZE, IMAGE_SIZE, 3).astype(np.float32)
    return {"ids": ids, "real": real, "image_mask": image_mask, "pixels": pixels}


def our_logits(imported: str, batch: dict, pixels: np.ndarray) -> np.ndarray:
    """The imported checkpoint's float32 logits; `pixels` (2, H, W, 3), one per row (row 1's is never read)."""
    config, params, _ = load_checkpoint_params(imported)
    model = model_from_params(dataclasses.replace(config.model, dtype="float32", attention_impl="xla"), params)
    graphdef, state = nnx.split(model)
    ids, real = batch["ids"], batch["real"]
    forward = jax.jit(lambda s, *a: nnx.merge(graphdef, s)(a[0], segment_ids=a[1], positions=a[2], pixels=a[3],
                                                           image_mask=a[4]))
    return np.asarray(forward(state, jnp.asarray(ids), jnp.asarray(real.astype(np.int32)),
                              jnp.asarray(np.where(real, np.arange(ids.shape[1])[None], 0)), jnp.asarray(pixels),
                              jnp.asarray(batch["image_mask"])))


def test_reference_checkpoint_imports_and_matches_the_reference_forward_on_an_image_row(reference, imported):
    batch = image_row_batch()
    real, pixels = batch["real"], batch["pixels"]
    expected = reference_logits(reference, batch["ids"], real.astype(np.int64), pixels)
    ours = our_logits(imported, batch, np.concatenate([pixels, np.zeros_like(pixels)]))
    # fp32 throughout. The 4.40 position interpolation (jax scale_and_translate vs torch bicubic) agrees
    # within 5e-6 here; through the tower and decoder that measured 1.04e-5 on the logits, hence 2e-5
    # rather than the LM-only 1e-5.
    np.testing.assert_allclose(ours[real], expected[real], atol=2e-5, rtol=0)
    # the image changes the image row's logits, so the comparison covers the vision path
    black = our_logits(imported, batch, np.zeros((2, IMAGE_SIZE, IMAGE_SIZE, 3), np.float32))
    assert np.abs(ours[0, -1] - black[0, -1]).max() > 1e-2


def test_stage2_checkpoint_imports_whole_and_matches_the_reference_forward_with_lape(stage2):
    """README pitfall 19: the LAPE terms reach the image row as in the reference's stage 2; the text row,
    holding two of the stage-2 location tokens as ordinary vocabulary items, is what the LM alone gives."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(stage2["dir"])
    location = tokenizer.convert_tokens_to_ids(["<TEMP-INPUT>", "<WIDTH-OUTPUT>"])
    assert all(VOCAB <= i < STAGE2_VOCAB for i in location)
    batch = image_row_batch(extra_words=location)
    real, pixels = batch["real"], batch["pixels"]
    expected = reference_logits(stage2, batch["ids"], real.astype(np.int64), pixels)
    ours = our_logits(stage2["imported"], batch, np.concatenate([pixels, np.zeros_like(pixels)]))
    np.testing.assert_allclose(ours[real], expected[real], atol=2e-5, rtol=0)  # tolerance: see the stage-1 test
    without = reference_logits(stage2, batch["ids"], real.astype(np.int64), pixels, lape=False)
    assert np.abs(ours[0][real[0]] - without[0][real[0]]).max() > 1e-2  # LAPE is on the image path
    np.testing.assert_allclose(without[1][real[1]], expected[1][real[1]], atol=1e-6, rtol=0)

    config, params, _ = load_checkpoint_params(stage2["imported"])
    assert config.model.lape is not None and (config.model.lape.tokens, config.model.lape.temporal_count) == (100, 100)
    for axis in LAPE_AXES:
        np.testing.assert_array_equal(params["lape"][f"{axis}_input_embeddings"]["embedding"],
                                      stage2["tensors"][f"model.{axis}_input_embeddings.weight"])
    meta = checkpoint.read_meta(stage2["imported"])["reference"]
    assert (meta["stage"], meta["lape_dropped"], meta["tokenizer_size"]) == (2, False, STAGE2_VOCAB)
    with open(os.path.join(stage2["imported"], checkpoint.REPORT_JSON)) as f:
        report = json.load(f)
    lape = {k for k in stage2["tensors"] if k.startswith(tuple(f"model.{a}_" for a in LAPE_AXES))}
    assert len(lape) == 9 and {k for k, v in report["mapped"].items() if v["component"] == "lape"} == lape
    assert set(report["mapped"]) | set(report["unused"]) == set(stage2["tensors"])


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
    tensors = tensors if tensors is not None else reference["tensors"]
    stage2 = "model.temporal_input_embeddings.weight" in reference["tensors"]
    if stage2:
        config_changes = {"vocab_size": STAGE2_VOCAB, **config_changes}
    return write_reference(tmp_path / "variant", tensors, added=STAGE2_ADDED if stage2 else ADDED,
                           **config_changes)


def test_drop_lape_imports_a_stage2_checkpoint_as_stage_1(stage2, tmp_path):
    report = import_reference(stage2["dir"], str(tmp_path / "out"), drop_lape=True)
    lape = [k for k in stage2["tensors"] if k.startswith(tuple(f"model.{a}_" for a in LAPE_AXES))]
    assert len(lape) == 9 and all("LAPE embedding, dropped on request" in report["unused"][k] for k in lape)
    config, params, _ = load_checkpoint_params(str(tmp_path / "out"))
    assert config.model.lape is None and "lape" not in params
    assert checkpoint.read_meta(str(tmp_path / "out"))["reference"]["lape_dropped"] is True


def test_stage2_export_round_trips_bit_identically(stage2, tmp_path):
    assert launch.main(["convert", "export-hf", "--checkpoint", stage2["imported"], "--out", str(tmp_path / "ref"),
                        "--what", "reference"]) == 0
    exported = load_file(str(tmp_path / "ref" / "model.safetensors"))
    original = stage2["tensors"]
    assert set(exported) == {k for k in original if not k.startswith("model.vision_resampler.")
                             and not k.endswith("mask_token")}
    for name, array in exported.items():
        assert array.dtype == np.float32, name
        np.testing.assert_array_equal(array, original[name].astype(np.float32), err_msg=name)
    with open(tmp_path / "ref" / "config.json") as f:
        hf_config = json.load(f)
    assert (hf_config["num_temporal_tokens"], hf_config["num_spatial_tokens"]) == (100, 100)
    import_reference(str(tmp_path / "ref"), str(tmp_path / "again"))
    first, first_params, _ = load_checkpoint_params(stage2["imported"])
    second, second_params, _ = load_checkpoint_params(str(tmp_path / "again"))
    assert second.model == first.model
    jax.tree.map(np.testing.assert_array_equal, second_params, first_params)


def test_stage2_buffers_and_tables_are_checked(stage2, tmp_path):
    tensors = stage2["tensors"]
    changed = {**tensors, "model.temporal_reparam_mat": tensors["model.temporal_reparam_mat"] * 1.5}
    with pytest.raises(ConversionError, match=r"'model\.temporal_reparam_mat' .*not the reference's fixed"):
        import_reference(variant(stage2, tmp_path / "a", changed), str(tmp_path / "out"))
    partial = {k: v for k, v in tensors.items() if k != "model.spatial_width_input_embeddings.weight"}
    with pytest.raises(ConversionError, match=r"'model\.spatial_width_input_embeddings\.weight' is missing"):
        import_reference(variant(stage2, tmp_path / "b", partial), str(tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out")
    no_buffers = {k: v for k, v in tensors.items() if not k.endswith("_reparam_mat")}
    report = import_reference(variant(stage2, tmp_path / "c", no_buffers), str(tmp_path / "out"))
    assert sum("is 2^-|i-j| by construction" in note for note in report["notes"]) == 3


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
