"""The PyTorch reference's checkpoints in and out (`LlavaLlamaForCausalLM`,
docs/reference.md#checkpoint-layout).

Layout of a reference checkpoint directory (HF Trainer `checkpoint-*` or the final
output_dir): config.json (`model_type: llava_llama` + `mm_*` fields),
model.safetensors with

  model.embed_tokens / model.layers.* / model.norm / lm_head   Baby Llama (fp32)
  model.vision_tower.vision_tower.*                             transformers Dinov2Model (fp16)
  model.mm_projector.{0,2}.{weight,bias}                        mlp2x_gelu
  model.vision_resampler.*                                      TokenPacker (fast_slow_resampler)
  model.{spatial_height,spatial_width,temporal}_*               stage-2 LAPE embeddings

and the tokenizer with its added tokens (8 in stage 1, 314 in stage 2; the
vocabulary is kept as is, docs/reference.md#special-tokens-and-vocabulary-growth).

What becomes of each part:
- The DINOv2 tower's config is not in the checkpoint (the reference fetched it
  from the hub by name). It is read from `--vision-config DIR` when given, else
  from a `vision_tower_config` entry (written by our export), else inferred from
  the tensor shapes with DINOv2's 64-wide heads; the report says which.
  Features: always last_hidden_state (the reference ignored
  mm_vision_select_layer, README pitfall 11), position embeddings interpolated
  like transformers 4.40 ("scale_factor"), input 224 px (the processor override,
  not saved: README pitfall 12).
- The TokenPacker's output was multiplied by 0 in every recorded run except gen
  16 (`use_downsample_image=False`, docs/reference.md#resamplers): it becomes the
  identity resampler and its tensors are reported unused.
  `use_downsample_image=True` is refused.
- LAPE (stage 2) added position terms to image features
  (docs/reference.md#stage-2-lape-embeddings): the six tables become `model.lape`
  (jaxllava/model/lape.py), sized from their shapes; the three `*_reparam_mat`
  buffers are fixed (2^-|i-j|), so they are checked against that formula rather
  than stored, and the export writes them back. `drop_lape` imports without them
  (stage-1 behaviour: text-only rows, e.g. BLiMP, are unaffected, image rows lose
  the position terms). The stage-2 tokens (`<TEMP-INPUT>`, `<HEIGHT-OUTPUT>`, ...)
  are ordinary vocabulary items, kept as the tokenizer has them.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import re
from typing import Optional

import numpy as np

from flax import nnx

from jaxllava.checkpoint import (abstract_model, atomic_output_dir, ensure_new_output, load_checkpoint_params,
                                 model_from_params, read_meta, write_params_checkpoint)
from jaxllava.convert.checkpoint_files import CheckpointTensors, read_config, save_sharded_safetensors
from jaxllava.convert.hf import ImportSource, buckets_within, classify_unused, save_export_tokenizer, write_provenance
from jaxllava.convert.hf_configs import llama_config_from_hf, llama_config_to_hf, vision_config_from_hf, \
    vision_hf_config
from jaxllava.convert.weights import (PROJECTOR_PREFIX, hf_tensors, load_entries, load_hf_llama_weights,
                                      load_hf_vision_weights, load_projector_weights)
from jaxllava.errors import ConfigError, ConversionError
from jaxllava.model.config import LapeConfig, ModelConfig, ProjectorConfig, ResamplerConfig
from jaxllava.model.hf_keys import hf_entries
from jaxllava.model.lape import AXES as LAPE_AXES, reparam_matrix

VISION_PREFIX = "model.vision_tower.vision_tower."
RESAMPLER_PREFIX = "model.vision_resampler."
LAPE = re.compile(r"^model\.(spatial_height|spatial_width|temporal)_")
LAPE_PREFIX = "model."  # the reference kept the tables and buffers on its LlavaLlamaModel
DINOV2_HEAD_DIM = 64  # every released DINOv2 (small/base/large/giant) uses 64-wide heads
DINOV2_NAMES = {(384, 12): "facebook/dinov2-small", (768, 12): "facebook/dinov2-base",
                (1024, 24): "facebook/dinov2-large", (1536, 40): "facebook/dinov2-giant"}
REFERENCE_IMAGE_SIZE = 224  # DINO_PROCESSOR_RESOLUTION, never saved in the checkpoint (README pitfall 12)
JAXLLAVA_KEY = "jaxllava"  # our own config.json entry: what the reference never saved


def infer_dinov2_config(tensors, prefix: str = VISION_PREFIX) -> dict:
    """A transformers Dinov2Config dict from the tower's tensor shapes (heads: width / 64)."""
    def shape(name):
        if prefix + name not in tensors:
            raise ConversionError(f"{tensors.directory}: tensor {prefix + name!r} is missing from the checkpoint")
        return tuple(tensors[prefix + name].shape)

    hidden, _, patch, _ = shape("embeddings.patch_embeddings.projection.weight")
    positions = shape("embeddings.position_embeddings")[1] - 1
    grid = math.isqrt(positions)
    layer = re.compile(re.escape(prefix) + r"encoder\.layer\.(\d+)\.")
    layers = {int(m.group(1)) for m in map(layer.match, tensors.keys()) if m}
    mlp = shape("encoder.layer.0.mlp.fc1.weight")[0]
    if hidden % DINOV2_HEAD_DIM or grid * grid != positions or mlp % hidden:
        raise ConversionError(f"{tensors.directory}: cannot infer the DINOv2 tower's config from its shapes "
                              f"(width {hidden}, {positions} positions, MLP {mlp}); pass --vision-config DIR "
                              f"with the tower's config.json")
    return {"model_type": "dinov2", "hidden_size": hidden, "num_hidden_layers": len(layers),
            "num_attention_heads": hidden // DINOV2_HEAD_DIM, "patch_size": patch, "image_size": grid * patch,
            "mlp_ratio": mlp // hidden, "layer_norm_eps": 1e-6, "hidden_act": "gelu", "qkv_bias": True,
            "use_swiglu_ffn": False}


def _vision_tower_config(hf_config: dict, tensors, vision_config_dir: Optional[str]) -> tuple[dict, str]:
    if vision_config_dir:
        return read_config(vision_config_dir), f"read from {os.path.abspath(vision_config_dir)}/config.json"
    if "vision_tower_config" in hf_config:
        return hf_config["vision_tower_config"], "read from config.json 'vision_tower_config'"
    return infer_dinov2_config(tensors), (f"inferred from the tensor shapes (num_attention_heads = width / "
                                          f"{DINOV2_HEAD_DIM}, layer_norm_eps 1e-6); pass --vision-config "
                                          f"to use the tower's own config.json")


def reference_model_config(hf_config: dict, tensors, *, vision_config_dir: Optional[str] = None,
                           image_size: Optional[int] = None, base: ModelConfig = ModelConfig(),
                           lape: Optional[LapeConfig] = None) -> tuple[ModelConfig, list[str]]:
    """jaxllava ModelConfig of a reference checkpoint, with notes on what was assumed."""
    notes = []
    saved = hf_config.get(JAXLLAVA_KEY) or {}
    lm = llama_config_from_hf(hf_config)
    tower = hf_config.get("mm_vision_tower") or hf_config.get("vision_tower")
    if not tower:
        raise ConversionError("config.json: no 'mm_vision_tower': not a multimodal reference checkpoint "
                              "(a text-only Llama imports with `convert import-hf`)")
    if "dinov2" not in str(tower).lower():
        raise ConversionError(f"config.json: mm_vision_tower {tower!r}: only the reference's DINOv2 tower is "
                              f"supported (its other towers select features differently)")
    tower_dict, origin = _vision_tower_config(hf_config, tensors, vision_config_dir)
    notes.append(f"vision tower config {origin}")
    size = image_size or saved.get("image_size") or REFERENCE_IMAGE_SIZE
    feature_select = hf_config.get("mm_vision_select_feature", "patch")
    if feature_select not in ("patch", "cls_patch"):
        raise ConversionError(f"config.json: mm_vision_select_feature {feature_select!r} is not 'patch' or "
                              f"'cls_patch'")
    vision = vision_config_from_hf(tower_dict, image_size=size,
                                   pos_interpolation=saved.get("pos_interpolation", "scale_factor"),
                                   feature_layer=-1, feature_select=feature_select)
    notes.append(f"vision input {size} px (the reference's 224-px processor override is not saved in its "
                 f"checkpoint); features = last_hidden_state ({vision.feature_select}); mm_vision_select_layer "
                 f"{hf_config.get('mm_vision_select_layer')} ignored as the reference ignored it; position "
                 f"embeddings interpolated in {vision.pos_interpolation!r} mode")
    if hf_config.get("mm_hidden_size", vision.hidden_size) != vision.hidden_size:
        raise ConversionError(f"config.json: mm_hidden_size {hf_config['mm_hidden_size']} disagrees with the "
                              f"vision tower's width {vision.hidden_size}")
    if hf_config.get("use_downsample_image"):
        raise ConversionError("config.json: use_downsample_image=true (gen 16): the image tokens came from the "
                              "reference's TokenPacker, which jaxllava does not reproduce")
    try:
        projector = ProjectorConfig(kind=hf_config.get("mm_projector_type", "linear"))
    except ConfigError as e:
        raise ConversionError(f"config.json: mm_projector_type: {e}") from None
    model = dataclasses.replace(base, lm=lm, vision=vision, resampler=ResamplerConfig(kind="identity"),
                                projector=projector, lape=lape)
    return model, notes


def _reference_unused_reason(name: str, drop_lape: bool) -> Optional[str]:
    if name.startswith(RESAMPLER_PREFIX):
        return ("reference resampler (TokenPacker): its output was multiplied by 0 (use_downsample_image=false, "
                "docs/reference.md#resamplers), so the identity resampler reproduces the model exactly")
    if LAPE.match(name) and drop_lape:
        return ("stage-2 LAPE embedding, dropped on request (--drop-lape): text-only rows are unaffected, image "
                "rows lose the additive position terms the reference gave them "
                "(docs/reference.md#stage-2-lape-embeddings)")
    return None


def reference_lape_config(tensors) -> LapeConfig:
    """`model.lape` of a stage-2 checkpoint, from its tables' shapes. (config.json's num_temporal_tokens and
    num_spatial_tokens are swapped by the reference's `init_special_embeddings` and sized nothing.)"""
    def rows(axis: str) -> int:
        name = f"{LAPE_PREFIX}{axis}_input_embeddings.weight"
        if name not in tensors:
            raise ConversionError(f"{tensors.directory}: tensor {name!r} is missing: a stage-2 checkpoint holds "
                                  f"the input and output tables of all three LAPE axes")
        return int(tensors[name].shape[0])

    height, width, temporal = rows("spatial_height"), rows("spatial_width"), rows("temporal")
    if height != width:
        raise ConversionError(f"{tensors.directory}: the LAPE height table has {height} rows and the width table "
                              f"{width}; model.lape.tokens sizes both (the reference's spatial_token_num)")
    return LapeConfig(tokens=height, temporal_tokens=None if temporal == height else temporal)


def lape_buffers(lape: LapeConfig) -> dict[str, np.ndarray]:
    """The reference's three `*_reparam_mat` buffers, R[i, j] = 2^-|i-j| (never trained)."""
    return {f"{LAPE_PREFIX}{axis}_reparam_mat": reparam_matrix(lape.temporal_count if axis == "temporal"
                                                               else lape.tokens)
            for axis in LAPE_AXES}


def check_lape_buffers(source: ImportSource, lape: LapeConfig) -> list[str]:
    """Each buffer the checkpoint holds must equal the formula (in its dtype); returns notes on absent ones."""
    notes = []
    for name, expected in lape_buffers(lape).items():
        if name not in source:
            notes.append(f"{name} is not in the checkpoint: it is 2^-|i-j| by construction, as the reference "
                         f"rebuilt it")
            continue
        array = np.asarray(source[name])
        if array.shape != expected.shape or not np.array_equal(array, expected.astype(array.dtype)):
            raise ConversionError(f"{source.directory}: tensor {name!r} (shape {tuple(array.shape)}) is not the "
                                  f"reference's fixed {expected.shape} matrix 2^-|i-j|; jaxllava computes it, so "
                                  f"a checkpoint with other values cannot be reproduced")
    return notes


def _load_reference_weights(model, source: ImportSource) -> dict[str, set[str]]:
    """Fill the abstract model from the checkpoint; component → checkpoint names read."""
    read: dict[str, set[str]] = {}
    parts = [("lm", lambda: load_hf_llama_weights(model.lm, source)),
             ("vision", lambda: load_hf_vision_weights(model.vision, source, prefix=VISION_PREFIX)),
             ("projector", lambda: load_projector_weights(model.projector, source, prefix=PROJECTOR_PREFIX))]
    if model.lape is not None:
        parts.append(("lape", lambda: load_entries(hf_entries(model.lape), source, prefix=LAPE_PREFIX)))
    for component, load in parts:
        before = set(source.read)
        load()
        read[component] = set(source.read) - before
    return read


def import_reference(ref_dir: str, out: str, *, config=None, vision_config_dir: Optional[str] = None,
                     image_size: Optional[int] = None, drop_lape: bool = False) -> dict:
    """Write a jaxllava checkpoint at `out` from a reference checkpoint directory; returns the report.

    `config`: an ExperimentConfig for everything the checkpoint does not say (data,
    optimisation; default: the schema defaults); its model section is replaced.
    A stage-2 checkpoint imports whole, LAPE included, unless `drop_lape`.
    """
    from jaxllava.config import ExperimentConfig, config_to_dict
    from jaxllava.data.tokenizer import load_tokenizer

    ensure_new_output(out)
    config = config or ExperimentConfig()
    hf_config = read_config(ref_dir)
    tensors = CheckpointTensors(ref_dir)
    stage2 = any(LAPE.match(k) for k in tensors.keys())
    lape = reference_lape_config(tensors) if stage2 and not drop_lape else None
    model_config, notes = reference_model_config(hf_config, tensors, vision_config_dir=vision_config_dir,
                                                 image_size=image_size, base=config.model, lape=lape)
    tokenizer = load_tokenizer(ref_dir)
    if len(tokenizer) > model_config.lm.vocab_size:
        raise ConversionError(f"{ref_dir}: the tokenizer has {len(tokenizer)} tokens but config.json vocab_size "
                              f"is {model_config.lm.vocab_size} (vocabulary sizes disagree)")
    config = dataclasses.replace(config, model=model_config, data=_reference_data_config(config, hf_config,
                                                                                          model_config, notes))
    model = abstract_model(model_config)
    source = ImportSource(tensors)
    read = _load_reference_weights(model, source)
    if lape is not None:
        before = set(source.read)
        notes += check_lape_buffers(source, lape)
        read["lape"] |= set(source.read) - before
    unused = classify_unused(set(tensors.keys()) - set(source.read), ref_dir,
                             lambda n: _reference_unused_reason(n, drop_lape))
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    mapped = {n: {**source.read[n], "component": component} for component, names in read.items()
              for n in sorted(names)}
    meta = {"imported_from": {"format": "reference", "directory": os.path.abspath(ref_dir)},
            "reference": {"mm_vision_tower": hf_config.get("mm_vision_tower"), "stage": 2 if stage2 else 1,
                          "vocab_size": model_config.lm.vocab_size, "tokenizer_size": len(tokenizer),
                          "lape_dropped": stage2 and drop_lape}}
    report = {"what": "import-reference", "directory": os.path.abspath(ref_dir), "mapped": mapped,
              "unused": unused, "missing": [], "model": config_to_dict(model_config), "notes": notes,
              "meta": meta}
    write_params_checkpoint(out, config, params, ref_dir, meta, report=report)
    return report


def _reference_data_config(config, hf_config: dict, model_config: ModelConfig, notes: list[str]):
    """The data section: the reference's image aspect handling, buckets within the LM's positions."""
    aspect = hf_config.get("image_aspect_ratio", "pad")
    if aspect != "pad":
        notes.append(f"image_aspect_ratio {aspect!r}: images will be resized to a square without padding")
    data = dataclasses.replace(config.data, image=dataclasses.replace(
        config.data.image, aspect="pad" if aspect == "pad" else "resize"))
    data, note = buckets_within(data, model_config.lm.max_position_embeddings)
    notes += [note] if note else []
    return data


def reference_hf_config(config, mm_vision_tower: Optional[str]) -> dict:
    """config.json of a `LlavaLlamaForCausalLM` (docs/reference.md#checkpoint-layout) for the model `config` describes."""
    model = config.model
    vision = model.vision
    name = mm_vision_tower or DINOV2_NAMES.get((vision.hidden_size, vision.num_layers),
                                               f"dinov2-custom-{vision.hidden_size}x{vision.num_layers}")
    hf = llama_config_to_hf(model.lm)
    hf.update({
        "architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava_llama", "use_cache": True,
        "mm_vision_tower": name, "vision_tower_pretrained": None, "use_mm_proj": True,
        "mm_projector_type": model.projector.kind, "mm_hidden_size": vision.hidden_size,
        "mm_vision_select_layer": -1, "mm_vision_select_feature": vision.feature_select,
        "mm_patch_merge_type": "flat", "mm_resampler_type": None, "use_downsample_image": False,
        "mm_use_im_start_end": False, "mm_use_im_patch_token": True,
        "image_aspect_ratio": "pad" if config.data.image.aspect == "pad" else "square",
        "tokenizer_padding_side": "right", "tokenizer_model_max_length": model.lm.max_position_embeddings,
        # What the reference never saved (README pitfalls 12, 29), for our own importer:
        "image_token_num": model.image_tokens,
        "vision_tower_config": vision_hf_config(vision),
        JAXLLAVA_KEY: {"image_size": vision.image_size, "pos_interpolation": vision.pos_interpolation},
    })
    if model.lape is not None:
        # Their presence makes the reference build its LAPE modules on load. It wrote them swapped
        # (num_temporal_tokens = its spatial count and the reverse, docs/reference.md#stage-2-lape-embeddings);
        # kept so, as the reference reads them.
        hf.update({"num_temporal_tokens": model.lape.tokens, "num_spatial_tokens": model.lape.temporal_count})
    return hf


def export_reference(checkpoint: str, out: str) -> dict:
    """The full model in the reference's layout: LlavaLlamaForCausalLM names, mm_* config fields, and with
    `model.lape` the stage-2 tables and buffers."""
    ensure_new_output(out)
    config, params, run = load_checkpoint_params(checkpoint)
    model_config = config.model
    vision = model_config.vision
    if vision is None:
        raise ConversionError(f"{checkpoint}: a text-only checkpoint has no reference layout; use --what lm")
    problems = []
    if vision.kind == "features":
        problems.append("vision.kind 'features' (the model has no vision tower, and the reference layout "
                        "holds its DINOv2 tower)")
    elif vision.kind != "dinov2":
        problems.append(f"vision.kind {vision.kind!r} (the reference layout here covers its DINOv2 tower)")
    if vision.feature_layer != -1:
        problems.append(f"vision.feature_layer {vision.feature_layer} (the reference always used "
                        f"last_hidden_state)")
    if model_config.resampler.kind != "identity":
        problems.append(f"resampler.kind {model_config.resampler.kind!r} (the reference's resampler "
                        f"differs; only the identity maps exactly)")
    if model_config.projector.expand != 1:
        problems.append(f"projector.expand {model_config.projector.expand} (the reference's projector maps "
                        f"each vector to one token)")
    if problems:
        raise ConversionError(f"{checkpoint}: cannot be written in the reference's layout: {'; '.join(problems)}")
    notes = []
    if vision.pos_interpolation != "scale_factor":
        notes.append(f"vision.pos_interpolation is {vision.pos_interpolation!r}: the reference (transformers "
                     f"4.40) interpolates in 'scale_factor' mode and would compute different image features")
    reference_meta = read_meta(checkpoint).get("reference") or {}
    model = model_from_params(model_config, params)
    del params
    with atomic_output_dir(out) as tmp:
        # Streamed shard by shard, as export_lm: one shard beside the model, not a second copy.
        lape = (() if model.lape is None else itertools.chain(
            hf_tensors(model.lape, prefix=LAPE_PREFIX), lape_buffers(model_config.lape).items()))
        tensors = save_sharded_safetensors(itertools.chain(
            hf_tensors(model.lm), hf_tensors(model.vision, prefix=VISION_PREFIX),
            hf_tensors(model.projector, prefix=PROJECTOR_PREFIX), lape), tmp)
        with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as f:
            json.dump(reference_hf_config(config, reference_meta.get("mm_vision_tower")), f, indent=2)
        save_export_tokenizer(config, tmp)
        write_provenance(tmp, checkpoint, run)
    return {"what": "export-hf reference", "out": os.path.abspath(out), "tensors": len(tensors), "notes": notes}
