"""transformers' own LLaVA in and out: `convert export-hf --what llava`, `convert import-hf --llava DIR`.

A `LlavaForConditionalGeneration` is a vision tower, a two-layer projector
(`linear_1`, activation, `linear_2`) and a Llama decoder; the image fills
`image_seq_length` copies of one image token. jaxllava's tower → identity
resampler → projector → Llama is the same computation when:

- the tower is DINOv2, CLIP or SigLIP; transformers' LLaVA reads
  `hidden_states[vision_feature_layer]`, which is jaxllava's `feature_layer` k
  for every k except -1 on towers with a final LayerNorm: jaxllava's -1 is the
  normed `last_hidden_state`. SigLIP reaches it through the vision config's
  `tie_last_hidden_states: true` (transformers 5); DINOv2 has no such switch
  (its hidden states are the encoder's, before `layernorm`), so a DINOv2 model
  with feature_layer -1 is refused. An imported DINOv2/SigLIP `-1` without the
  switch is the last block's output, i.e. jaxllava's feature_layer = num_layers.
- `vision_feature_select_strategy` "default" drops the first token (the CLS)
  = feature_select "patch"; "full" keeps every token = "cls_patch". SigLIP has
  no CLS, so "default" would drop a patch: its patches export as "full", and an
  import of SigLIP + "default" is refused.
- the projector is mlp2x_gelu (`projector_hidden_act: gelu` is the exact erf
  GELU, as torch nn.GELU) or linear/mlp1x_gelu, written as `linear_1` = the
  layer, activation "linear" (the identity) and `linear_2` = the identity
  matrix; an import with activation "linear" folds the two layers into one
  (exact for that identity).
- the position table: a tower whose input grid differs from its learned grid
  is written with the table already resized (in jaxllava's own
  `pos_interpolation` mode) and `image_size` = the input, so transformers never
  interpolates; the export computes the same features, but its table is the
  resized one (a re-import has pretrained_image_size = image_size).

Refused, naming the part (use `--what lm` for the decoder alone): the perceiver,
token packer and avg_pool resamplers, the `features` vision input,
projector.expand > 1, MLP projectors deeper than two layers, DINOv2 with
feature_layer -1.

Image tokens: jaxllava writes an image as `<im_start> <im_patch>… <im_end>`
(I positions) and overwrites all I; the export's image token is `<im_patch>`
(`image_token_index`), and its LlavaProcessor expands each `<im_patch>` marker
of a prompt to the I copies the model overwrites. The placeholder embeddings are
never seen, so both spellings give the same logits. The processor's image
processor (LlavaImageProcessor: pad to square with the mean colour, bicubic
resize straight to the input size, rescale, normalise) does jaxllava.data.images'
steps.

Checkpoint names: exports use the llava-hf hub layout that transformers 4 and 5
both load (`language_model.model.*`, `language_model.lm_head.weight`,
`vision_tower.*`, `multi_modal_projector.*`); imports also read the
`model.language_model.*` layout of transformers ≥ 4.52 in-memory state dicts.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import os
import tempfile
from typing import Iterator, Optional

import numpy as np
from flax import nnx

from jaxllava.checkpoint import (abstract_model, atomic_output_dir, ensure_new_output, load_checkpoint_params,
                                 model_from_params, read_checkpoint_config, write_params_checkpoint)
from jaxllava.convert.checkpoint_files import CheckpointTensors, read_config, save_sharded_safetensors
from jaxllava.convert.hf import (EMBED, LM_HEAD, ImportSource, buckets_within, classify_unused, config_differences,
                                 grow_vocabulary, save_export_tokenizer, tokenizer_source, write_provenance)
from jaxllava.convert.hf_configs import (HF_MODEL_TYPES, llama_config_from_hf, llama_config_to_hf,
                                         vision_config_from_hf, vision_hf_config)
from jaxllava.convert.weights import hf_tensors, load_entries, load_hf_llama_weights, load_hf_vision_weights
from jaxllava.data.tokenizer import PLACEHOLDER_TOKENS
from jaxllava.errors import ConfigError, ConversionError
from jaxllava.model.config import ModelConfig, ProjectorConfig, ResamplerConfig
from jaxllava.model.hf_keys import hf_entries, hf_entry

LM_PREFIX = "language_model."
VISION_PREFIX = "vision_tower."
PROJECTOR_PREFIX = "multi_modal_projector."
IMAGE_MARKER = PLACEHOLDER_TOKENS[1]  # "<im_patch>": the image token of an export and its processor
# transformers >= 4.52 state-dict prefixes → the hub layout read and written here.
NEW_LAYOUT_PREFIXES = (("model.language_model.", "language_model.model."), ("lm_head.", "language_model.lm_head."),
                       ("model.vision_tower.", VISION_PREFIX), ("model.multi_modal_projector.", PROJECTOR_PREFIX))
# projector_hidden_act → jaxllava projector kind. transformers' "gelu" is the exact erf GELU.
PROJECTOR_ACTIVATIONS = {"gelu": "mlp2x_gelu", "linear": "linear"}
USE_LM = "export the decoder alone with --what lm"


# ----------------------------------------------------------------------------- export


def llava_export_problems(model: ModelConfig) -> list[str]:
    """The parts of `model` that transformers' LlavaForConditionalGeneration cannot hold (empty: exportable)."""
    vision = model.vision
    if vision is None:
        return ["model.vision is not set (a text-only model)"]
    problems = []
    if vision.kind == "features":
        problems.append("vision.kind 'features' (precomputed feature vectors, no tower: transformers' LLaVA "
                        "takes pixels)")
    elif vision.kind == "dinov2" and vision.feature_layer == -1:
        problems.append("vision.feature_layer -1 on the dinov2 tower (its final-LayerNorm output is not among "
                        "the hidden_states LLaVA selects from; a layer k >= 0 or <= -2 maps)")
    if model.resampler.kind != "identity":
        problems.append(f"resampler.kind {model.resampler.kind!r} (transformers' LLaVA has no resampler; only "
                        f"identity maps)")
    if model.projector.depth > 2:
        problems.append(f"projector.kind {model.projector.kind!r} (LlavaMultiModalProjector has two linear layers)")
    if model.projector.expand != 1:
        problems.append(f"projector.expand {model.projector.expand} (LLaVA maps each feature vector to one "
                        f"image token)")
    return problems


def _export_vision_config(vision) -> dict:
    """The tower's config.json: learned grid = input grid (the table is written resized)."""
    hf = vision_hf_config(dataclasses.replace(vision, pretrained_image_size=vision.image_size))
    if vision.kind == "siglip" and vision.feature_layer == -1:
        hf["tie_last_hidden_states"] = True  # hidden_states[-1] = post_layernorm output, as jaxllava's -1
    return hf


def select_strategy(vision) -> str:
    """"default" drops the first token; a tower without CLS keeps all (see module doc)."""
    return "default" if vision.has_cls and vision.feature_select == "patch" else "full"


def llava_hf_config(model: ModelConfig, image_token_id: int) -> dict:
    """config.json of the LlavaForConditionalGeneration `model` becomes."""
    vision = model.vision
    return {
        "architectures": ["LlavaForConditionalGeneration"], "model_type": "llava",
        "text_config": llama_config_to_hf(model.lm), "vision_config": _export_vision_config(vision),
        "image_token_index": image_token_id, "image_seq_length": model.image_tokens,
        "projector_hidden_act": "gelu" if model.projector.depth == 2 else "linear",
        "multimodal_projector_bias": True, "vision_feature_layer": vision.feature_layer,
        "vision_feature_select_strategy": select_strategy(vision),
        "tie_word_embeddings": model.lm.tie_word_embeddings, "torch_dtype": "float32",
    }


def _vision_tensors(tower) -> Iterator[tuple[str, np.ndarray]]:
    """The tower's tensors, its position table replaced by the one for the input grid."""
    entry = hf_entry(tower, ("position_embedding",))
    position_name = VISION_PREFIX + entry.name
    resized = np.ascontiguousarray(entry.layout.to_hf(np.asarray(tower.position_embeddings(), np.float32)))
    for name, array in hf_tensors(tower, prefix=VISION_PREFIX):
        yield name, (resized if name == position_name else array)


def projector_to_hf(projector) -> dict[str, np.ndarray]:
    """`linear_1`/`linear_2` tensors; a one-layer projector gets an identity `linear_2` (activation "linear")."""
    layers = [dict(hf_tensors(layer)) for layer in projector.layers]
    if len(layers) == 1:
        width = layers[0]["weight"].shape[0]
        layers.append({"weight": np.eye(width, dtype=np.float32), "bias": np.zeros(width, np.float32)})
    return {f"{PROJECTOR_PREFIX}linear_{i + 1}.{kind}": layer[kind]
            for i, layer in enumerate(layers) for kind in ("weight", "bias")}


def image_processor_config(config) -> dict:
    """LlavaImageProcessor settings doing jaxllava.data.images' steps (pad, resize straight, normalise)."""
    from jaxllava.data.pipeline import image_processing_for

    processing = image_processing_for(config.data, config.model.vision.image_size)
    side = {"height": processing.size, "width": processing.size}
    return {"image_processor_type": "LlavaImageProcessor", "do_convert_rgb": True,
            "do_pad": processing.aspect == "pad", "do_resize": True, "size": side, "resample": 3,  # PIL bicubic
            "do_center_crop": False, "crop_size": side, "do_rescale": True, "rescale_factor": processing.rescale,
            "do_normalize": True, "image_mean": list(processing.mean), "image_std": list(processing.std)}


def write_processor(config, directory: str) -> None:
    """Tokenizer + image processor + LlavaProcessor settings (processor_config.json for transformers 5,
    preprocessor_config.json for 4.x), so that `AutoProcessor.from_pretrained(directory)` expands each
    `<im_patch>` of a prompt to the model's I image tokens."""
    vision = config.model.vision
    save_export_tokenizer(config, directory)
    image = image_processor_config(config)
    processor = {"processor_class": "LlavaProcessor", "image_processor": image, "image_token": IMAGE_MARKER,
                 "patch_size": vision.patch_size, "vision_feature_select_strategy": select_strategy(vision),
                 "num_additional_image_tokens": int(vision.has_cls)}
    for name, content in (("processor_config.json", processor), ("preprocessor_config.json", image)):
        with open(os.path.join(directory, name), "w", encoding="utf-8") as f:
            json.dump(content, f, indent=2)


def export_llava(checkpoint: str, out: str) -> dict:
    """A transformers `LlavaForConditionalGeneration` directory with its processor (see module doc)."""
    from jaxllava.data.tokenizer import load_tokenizer

    ensure_new_output(out)
    config, _, _ = read_checkpoint_config(checkpoint)  # refuse before reading any parameter
    problems = llava_export_problems(config.model)
    if problems:
        raise ConversionError(f"{checkpoint}: transformers' LlavaForConditionalGeneration has no equivalent for "
                              f"{'; '.join(problems)}; {USE_LM}")
    image_token_id = load_tokenizer(config.data.tokenizer).convert_tokens_to_ids(IMAGE_MARKER)
    config, params, run = load_checkpoint_params(checkpoint)
    model = model_from_params(config.model, params)
    del params
    with atomic_output_dir(out) as tmp:
        tensors = save_sharded_safetensors(itertools.chain(
            hf_tensors(model.lm, prefix=LM_PREFIX), _vision_tensors(model.vision),
            projector_to_hf(model.projector).items()), tmp)
        with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as f:
            json.dump(llava_hf_config(config.model, image_token_id), f, indent=2)
        write_processor(config, tmp)
        write_provenance(tmp, checkpoint, run)
    notes = [f"prompts mark an image with one {IMAGE_MARKER} (the processor expands it to "
             f"{config.model.image_tokens} image tokens)"]
    vision = config.model.vision
    if vision.image_size != vision.pretrained_image_size:
        notes.append(f"vision position table written resized to the {vision.grid}x{vision.grid} input grid "
                     f"({vision.pos_interpolation!r} mode); config image_size {vision.image_size}")
    if vision.kind == "siglip" and vision.feature_layer == -1:
        notes.append("vision_config.tie_last_hidden_states=true selects SigLIP's post-LayerNorm output; "
                     "transformers 4.x ignores it and would read the last block's output instead")
    return {"what": "export-hf llava", "out": os.path.abspath(out), "tensors": len(tensors), "notes": notes}


# ----------------------------------------------------------------------------- import


class LlavaTensors:
    """A LLaVA checkpoint's tensors under the hub layout's names, whichever layout it was saved in."""

    def __init__(self, tensors: CheckpointTensors):
        self.tensors = tensors
        self.directory = tensors.directory
        self._stored: dict[str, str] = {}
        for name in tensors.keys():
            hub = next((new_to_hub + name[len(new):] for new, new_to_hub in NEW_LAYOUT_PREFIXES
                        if name.startswith(new)), name)
            if hub in self._stored:
                raise ConversionError(f"{self.directory}: tensors {self._stored[hub]!r} and {name!r} are the same "
                                      f"parameter in two layouts")
            self._stored[hub] = name

    def keys(self):
        return list(self._stored)

    def __contains__(self, name: str) -> bool:
        return name in self._stored

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self._stored:
            raise ConversionError(f"{self.directory}: tensor {name!r} is missing from the checkpoint")
        return self.tensors[self._stored[name]]


def _full_llava_config(raw: dict, directory: str) -> dict:
    """config.json with every default filled in by transformers (hub configs store only non-defaults)."""
    if raw.get("model_type") != "llava":
        raise ConversionError(f"{directory}/config.json: model_type {raw.get('model_type')!r} is not 'llava' "
                              f"(LlavaForConditionalGeneration); a plain Llama imports with --lm")
    from transformers import LlavaConfig

    try:
        return LlavaConfig.from_dict(raw).to_dict()
    except (TypeError, ValueError, KeyError) as e:
        raise ConversionError(f"{directory}/config.json: transformers cannot read it as a LlavaConfig ({e})") \
            from None


def _feature_layer(layer, kind: str, num_layers: int, tied: bool, where: str) -> int:
    """jaxllava's feature_layer for transformers' `hidden_states[layer]` (see module doc)."""
    if not isinstance(layer, int):
        raise ConversionError(f"{where}: vision_feature_layer {layer!r}: several layers concatenated have no "
                              f"jaxllava equivalent (one layer only)")
    last = layer == -1 or layer == num_layers
    if last and kind != "clip":
        return -1 if tied and kind == "siglip" else num_layers  # the last block's output, before the final norm
    return layer


def _image_processing(directory: str):
    """(ImageProcessing or None, do_center_crop) from the directory's preprocessor or processor config."""
    path = os.path.join(directory, "preprocessor_config.json")
    if not os.path.exists(path):
        nested = os.path.join(directory, "processor_config.json")
        image = read_json(nested).get("image_processor") if os.path.exists(nested) else None
        if not image:
            return None, False
        # transformers 5 nests the image processor in processor_config.json; the reader takes a file
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "preprocessor_config.json")
            with open(path, "w", encoding="utf-8") as f:
                json.dump(image, f)
            return _read_image_processing(path)
    return _read_image_processing(path)


def _read_image_processing(path: str):
    from jaxllava.data.images import ImageProcessing

    raw = read_json(path)
    try:
        processing = ImageProcessing.from_preprocessor_config(path, aspect="pad" if raw.get("do_pad") else "resize")
    except ConfigError as e:
        raise ConversionError(str(e)) from None
    return processing, bool(raw.get("do_center_crop"))


def read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise ConversionError(f"{path}: cannot be read as JSON ({e})") from None


def llava_model_config(hf: dict, image_size: int, directory: str, base: ModelConfig) -> ModelConfig:
    """jaxllava ModelConfig of a (defaults-filled) LlavaConfig dict."""
    where = f"{directory}/config.json"
    vision_dict = hf["vision_config"]
    kind = HF_MODEL_TYPES.get(vision_dict.get("model_type"))
    strategy = hf.get("vision_feature_select_strategy", "default")
    if strategy not in ("default", "full"):
        raise ConversionError(f"{where}: vision_feature_select_strategy {strategy!r} is not 'default' or 'full'")
    if kind == "siglip" and strategy == "default":
        raise ConversionError(f"{where}: vision_feature_select_strategy 'default' on a SigLIP tower drops its "
                              f"first patch (SigLIP has no CLS token); jaxllava keeps every patch")
    activation = hf.get("projector_hidden_act", "gelu")
    if activation not in PROJECTOR_ACTIVATIONS:
        raise ConversionError(f"{where}: projector_hidden_act {activation!r}: supported are "
                              f"{sorted(PROJECTOR_ACTIVATIONS)} ('gelu' is the exact erf GELU)")
    layers = int(vision_dict.get("num_hidden_layers", 0))
    feature_layer = _feature_layer(hf.get("vision_feature_layer", -2), kind, layers,
                                   bool(vision_dict.get("tie_last_hidden_states")), where)
    vision = vision_config_from_hf(vision_dict, image_size=image_size, pos_interpolation="size",
                                   feature_layer=feature_layer,
                                   feature_select="patch" if strategy == "default" or kind == "siglip"
                                   else "cls_patch")
    lm = llama_config_from_hf(hf["text_config"])
    try:
        return dataclasses.replace(base, lm=lm, vision=vision, resampler=ResamplerConfig(kind="identity"),
                                   projector=ProjectorConfig(kind=PROJECTOR_ACTIVATIONS[activation]))
    except ConfigError as e:
        raise ConversionError(f"{where}: {e}") from None


def projector_from_hf(source, kind: str) -> dict[str, np.ndarray]:
    """jaxllava-named (torch-layout) projector tensors; a missing bias is zero, "linear" folds both layers."""
    def layer(i):
        weight = np.asarray(source[f"{PROJECTOR_PREFIX}linear_{i}.weight"], np.float64)
        bias_name = f"{PROJECTOR_PREFIX}linear_{i}.bias"
        bias = np.asarray(source[bias_name], np.float64) if bias_name in source else np.zeros(weight.shape[0])
        return weight, bias

    (w1, b1), (w2, b2) = layer(1), layer(2)
    if kind == "linear":  # no activation between them: one affine map
        return {"weight": w2 @ w1, "bias": w2 @ b1 + b2}
    return {"0.weight": w1, "0.bias": b1, "2.weight": w2, "2.bias": b2}


def _grown_rows(lm_config, vocab_size: int) -> dict[str, tuple[int, int]]:
    if vocab_size <= lm_config.vocab_size:
        return {}
    names = [EMBED] + ([] if lm_config.tie_word_embeddings else [LM_HEAD])
    return {LM_PREFIX + name: (lm_config.vocab_size, vocab_size) for name in names}


def _load_llava(model, source: ImportSource, model_config) -> dict[str, set]:
    """Load every part into the abstract `model`; returns the checkpoint names read per component."""
    load_hf_llama_weights(model.lm, source, prefix=LM_PREFIX)
    read = {"lm": set(source.read)}
    load_hf_vision_weights(model.vision, source, prefix=VISION_PREFIX)
    read["vision"] = set(source.read) - read["lm"]
    projector = projector_from_hf(source, model_config.projector.kind)
    load_entries(hf_entries(model.projector), {k: v.astype(np.float32) for k, v in projector.items()})
    read["projector"] = set(source.read) - read["lm"] - read["vision"]
    return read


def _unused_reason(name: str, tied: bool) -> Optional[str]:
    if tied and name == LM_PREFIX + LM_HEAD:
        return "tied to the input embedding (tie_word_embeddings)"
    if name.startswith(VISION_PREFIX):
        from jaxllava.convert.hf import unused_reason
        return unused_reason(name[len(VISION_PREFIX):])
    return None


def import_llava(config, out: str, llava_dir: str, tokenizer_dir: Optional[str] = None) -> dict:
    """Write a jaxllava checkpoint at `out` from a transformers LLaVA directory; returns the report.

    `config` (ExperimentConfig) gives data and optimisation settings; its model section is
    replaced by the checkpoint's. Images: the directory's preprocessor sets the input size,
    mean/std and padding (data.image); without one the tower's own image_size is used.
    """
    from jaxllava.config import config_to_dict
    from jaxllava.data.tokenizer import load_tokenizer

    ensure_new_output(out)
    hf = _full_llava_config(read_config(llava_dir), llava_dir)
    processing, center_crop = _image_processing(llava_dir)
    image_size = processing.size if processing else int(hf["vision_config"]["image_size"])
    model_config = llava_model_config(hf, image_size, llava_dir, config.model)
    lm_config = model_config.lm
    tokenizer_path = tokenizer_source(tokenizer_dir, llava_dir, config)
    vocab_size, new_tokens = grow_vocabulary(load_tokenizer(tokenizer_path), lm_config.vocab_size, tokenizer_path)
    model_config = dataclasses.replace(model_config, lm=dataclasses.replace(lm_config, vocab_size=vocab_size))
    notes = (config_differences("model.lm", config.model.lm, model_config.lm)
             + config_differences("model.vision", config.model.vision, model_config.vision))
    data = config.data
    if processing:
        data = dataclasses.replace(data, image=dataclasses.replace(
            data.image, aspect=processing.aspect, mean=processing.mean, std=processing.std, preprocessor_config=None))
        if center_crop and processing.aspect == "resize":
            notes.append("the checkpoint's processor resizes the short side and centre-crops; jaxllava squashes "
                         "non-square images to the square (data.image.aspect: resize) or pads them (pad)")
    if hf.get("image_seq_length") not in (None, model_config.image_tokens):
        notes.append(f"config image_seq_length {hf['image_seq_length']} differs from the "
                     f"{model_config.image_tokens} image tokens the tower produces at {image_size} px")
    data, note = buckets_within(data, model_config.lm.max_position_embeddings)
    notes += [note] if note else []
    config = dataclasses.replace(config, model=model_config, data=data)

    model = abstract_model(model_config)
    tensors = LlavaTensors(CheckpointTensors(llava_dir))
    source = ImportSource(tensors, grow_rows=_grown_rows(lm_config, vocab_size))
    read = _load_llava(model, source, model_config)
    tied = lm_config.tie_word_embeddings
    unused = classify_unused(set(tensors.keys()) - set(source.read), llava_dir, lambda n: _unused_reason(n, tied))
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    meta = {"imported_from": {"format": "transformers-llava", "directory": os.path.abspath(llava_dir),
                              "tokenizer": os.path.abspath(tokenizer_path)}}
    if new_tokens:
        meta["model.lm"] = {"vocab_size": {"checkpoint": lm_config.vocab_size, "now": vocab_size},
                            "new_tokens": new_tokens, "new_rows_init": "mean of the existing rows, input and output"}
        notes.append(f"model.lm.vocab_size grown {lm_config.vocab_size} -> {vocab_size} for {new_tokens}")
    report = {"what": "import-hf llava", "directory": os.path.abspath(llava_dir),
              "mapped": {n: {**source.read[n], "component": part} for part, names in read.items()
                         for n in sorted(names)},
              "unused": unused, "model": config_to_dict(model_config), "notes": notes, "meta": meta}
    write_params_checkpoint(out, config, params, tokenizer_path, meta, report=report)
    return report
