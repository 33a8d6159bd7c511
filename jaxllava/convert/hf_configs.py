"""transformers config.json ↔ jaxllava model configs (Llama decoder, vision towers).

Architectures the model does not implement are refused field by field
(`ConversionError`) rather than loaded approximately.
"""
from __future__ import annotations

from typing import Mapping

from jaxllava.errors import ConversionError
from jaxllava.model.config import LlamaConfig, RopeScaling, VisionConfig
from jaxllava.model.vision import KIND_ACTIVATION

# transformers `model_type` values of a vision tower's config.json.
HF_MODEL_TYPES = {"dinov2": "dinov2", "clip_vision_model": "clip", "clip": "clip",
                  "siglip_vision_model": "siglip", "siglip": "siglip"}

# transformers' LlamaConfig defaults, used when a config.json omits a field
# (note rms_norm_eps: 1e-6 in transformers, 1e-5 in the Llama-2 release).
_HF_DEFAULTS = {"rms_norm_eps": 1e-6, "rope_theta": 10000.0, "max_position_embeddings": 2048,
                "tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False}
SUPPORTED_MODEL_TYPES = ("llama", "llava_llama")


def llama_config_from_hf(config: Mapping) -> LlamaConfig:
    """LlamaConfig from a transformers config.json dict (4.x `rope_theta`/`rope_scaling`
    or 5.x `rope_parameters`)."""
    model_type = config.get("model_type", "llama")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConversionError(f"config.json model_type {model_type!r} is not a Llama decoder "
                              f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
    if config.get("hidden_act", "silu") != "silu":
        raise ConversionError(f"config.json hidden_act {config['hidden_act']!r}: only 'silu' is supported")
    rope = dict(config.get("rope_parameters") or {})
    rope.update(config.get("rope_scaling") or {})
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type == "default":
        scaling = None
    elif rope_type == "llama3":
        scaling = RopeScaling(factor=float(rope["factor"]), low_freq_factor=float(rope["low_freq_factor"]),
                              high_freq_factor=float(rope["high_freq_factor"]),
                              original_max_position_embeddings=int(rope["original_max_position_embeddings"]))
    else:
        raise ConversionError(f"config.json rope type {rope_type!r}: only 'default' and 'llama3' are supported")
    get = lambda key: config.get(key, _HF_DEFAULTS.get(key))  # noqa: E731
    heads = int(config["num_attention_heads"])
    head_dim = config.get("head_dim")
    if head_dim is not None and int(head_dim) == int(config["hidden_size"]) // heads:
        head_dim = None
    return LlamaConfig(
        vocab_size=int(config["vocab_size"]),
        hidden_size=int(config["hidden_size"]),
        intermediate_size=int(config["intermediate_size"]),
        num_layers=int(config["num_hidden_layers"]),
        num_heads=heads,
        num_kv_heads=int(config.get("num_key_value_heads") or heads),
        head_dim=None if head_dim is None else int(head_dim),
        rms_norm_eps=float(get("rms_norm_eps")),
        rope_theta=float(rope.get("rope_theta", get("rope_theta"))),
        rope_scaling=scaling,
        max_position_embeddings=int(get("max_position_embeddings")),
        tie_word_embeddings=bool(get("tie_word_embeddings")),
        attention_bias=bool(get("attention_bias")),
        mlp_bias=bool(get("mlp_bias")),
    )


def llama_config_to_hf(cfg: LlamaConfig) -> dict:
    """A transformers `LlamaForCausalLM` config.json dict for `cfg` (read by transformers 4.x and 5.x)."""
    rope_scaling = None
    if cfg.rope_scaling is not None:
        s = cfg.rope_scaling
        rope_scaling = {"rope_type": "llama3", "factor": s.factor, "low_freq_factor": s.low_freq_factor,
                        "high_freq_factor": s.high_freq_factor,
                        "original_max_position_embeddings": s.original_max_position_embeddings}
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.resolved_head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": rope_scaling,
        "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "attention_bias": cfg.attention_bias,
        "mlp_bias": cfg.mlp_bias,
        "torch_dtype": "float32",
    }


def vision_config_from_hf(config_dict: Mapping, *, image_size: int, pos_interpolation: str = "size",
                          feature_layer: int = -1, feature_select: str = "patch") -> VisionConfig:
    """VisionConfig from a transformers config.json dict (Dinov2Model, CLIP(Vision)Model, Siglip(Vision)Model).

    `image_size` is the input the tower will see (the config's own image_size is
    the grid the position embeddings were trained on). Architectures this tower
    does not implement are rejected by field rather than loaded approximately.
    """
    model_type = config_dict.get("model_type")
    if model_type in ("clip", "siglip"):  # a full two-tower config: take its vision half
        config_dict = config_dict.get("vision_config") or {}
    kind = HF_MODEL_TYPES.get(model_type)
    if kind is None:
        raise ConversionError(f"config.json: model_type {model_type!r} is not a supported vision tower "
                              f"(supported: {sorted(HF_MODEL_TYPES)})")
    defaults = {"dinov2": dict(hidden_act="gelu", layer_norm_eps=1e-6, patch_size=14, image_size=224),
                "clip": dict(hidden_act="quick_gelu", layer_norm_eps=1e-5, patch_size=32, image_size=224),
                "siglip": dict(hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6, patch_size=16,
                               image_size=224)}[kind]

    def field(name, default=None):
        value = config_dict.get(name, defaults.get(name, default))
        if value is None:
            raise ConversionError(f"config.json: field {name!r} is missing")
        return value

    if field("hidden_act") != KIND_ACTIVATION[kind]:
        raise ConversionError(f"config.json: field 'hidden_act' is {field('hidden_act')!r}; the {kind} tower "
                              f"implements {KIND_ACTIVATION[kind]!r}")
    if field("num_channels", 3) != 3:
        raise ConversionError(f"config.json: field 'num_channels' is {field('num_channels')}; only RGB (3)")
    hidden = int(field("hidden_size"))
    if kind == "dinov2":
        for name, supported in (("use_swiglu_ffn", False), ("qkv_bias", True)):
            if config_dict.get(name, supported) != supported:
                raise ConversionError(f"config.json: field {name!r} = {config_dict[name]!r} is not supported "
                                      f"(only {supported!r})")
        intermediate = int(hidden * field("mlp_ratio", 4))
    else:
        intermediate = int(field("intermediate_size"))
    return VisionConfig(
        kind=kind, image_size=image_size, patch_size=int(field("patch_size")), hidden_size=hidden,
        intermediate_size=intermediate, num_layers=int(field("num_hidden_layers")),
        num_heads=int(field("num_attention_heads")), layer_norm_eps=float(field("layer_norm_eps")),
        pretrained_image_size=int(field("image_size")), pos_interpolation=pos_interpolation,
        feature_layer=feature_layer, feature_select=feature_select)


def vision_hf_config(config: VisionConfig) -> dict:
    """The transformers config.json dict of a tower-only model (inverse of vision_config_from_hf)."""
    common = dict(hidden_size=config.hidden_size, num_hidden_layers=config.num_layers,
                  num_attention_heads=config.num_heads, num_channels=3, patch_size=config.patch_size,
                  image_size=config.pretrained_image_size, layer_norm_eps=config.layer_norm_eps,
                  hidden_act=KIND_ACTIVATION[config.kind])
    if config.kind == "dinov2":
        if config.intermediate_size % config.hidden_size:
            raise ConversionError(f"DINOv2 export needs intermediate_size ({config.intermediate_size}) to be a "
                                  f"multiple of hidden_size ({config.hidden_size}): transformers derives it "
                                  f"from mlp_ratio")
        return dict(common, model_type="dinov2", architectures=["Dinov2Model"], qkv_bias=True,
                    mlp_ratio=config.intermediate_size // config.hidden_size, layerscale_value=1.0,
                    use_swiglu_ffn=False, use_mask_token=False)
    if config.kind == "clip":
        return dict(common, model_type="clip_vision_model", architectures=["CLIPVisionModel"],
                    intermediate_size=config.intermediate_size)
    return dict(common, model_type="siglip_vision_model", architectures=["SiglipVisionModel"],
                intermediate_size=config.intermediate_size, vision_use_head=False)
