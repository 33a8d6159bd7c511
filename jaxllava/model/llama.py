"""Llama-family decoder (Flax NNX) and its transformers checkpoint mapping.

Numerics follow transformers' `LlamaForCausalLM` (REFERENCE.md §6 item 1):
RMSNorm normalises in float32 then scales; RoPE uses the rotate-half layout
(the first and second halves of each head are the two rotated coordinates;
REFERENCE.md §7 item 34), inverse frequencies in float32 as transformers computes
them, optional Llama-3 frequency scaling; SwiGLU MLP; attention scale 1/sqrt(H);
tied or untied output layer. Parameters are float32, computation runs in `dtype`.

Module and attribute names match transformers' (`embed_tokens`, `layers.{i}.self_attn.q_proj`,
...), so `HF_GLOBAL_KEYS` / `HF_LAYER_KEYS` below are the one key map between the
two layouts, used by both the importer and the exporter. Linear kernels are
stored (in, out); torch stores (out, in).

Axis letters: B batch, T length, D model width, N heads, K kv heads, H head dim,
F MLP width, V vocabulary.
"""
from __future__ import annotations

import math
from typing import Literal, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxllava.errors import ConversionError
from jaxllava.model.attention import Implementation, attention
from jaxllava.model.config import LlamaConfig, RopeScaling
from jaxllava.model.hf_weights import LINEAR, SAME, Entry, entries_state_dict, load_entries, unused_keys
from jaxllava.model.layers import Dense, Embed, RMSNorm
from jaxllava.model.sharding import constrain

Remat = Literal["none", "full", "save_dots"]

# "full" keeps only each layer's inputs; "save_dots" also keeps the outputs of
# matmuls without batch dimensions (the projections), recomputing attention and
# elementwise work in the backward pass.
REMAT_POLICIES = {
    "full": None,
    "save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


# --- rotary position embedding ---------------------------------------------------------------

def rope_inverse_frequencies(config: LlamaConfig) -> np.ndarray:
    """(H/2,) float32 inverse frequencies, computed in float32 like transformers."""
    head_dim = config.resolved_head_dim
    exponents = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
    inv_freq = (np.float32(1.0) / np.power(np.float32(config.rope_theta), exponents)).astype(np.float32)
    if config.rope_scaling is not None:
        inv_freq = _llama3_scaled(inv_freq, config.rope_scaling)
    return inv_freq


def _llama3_scaled(inv_freq: np.ndarray, scaling: RopeScaling) -> np.ndarray:
    """Llama-3.1 scaling: long wavelengths divided by `factor`, short kept, smooth in between
    (transformers `_compute_llama3_parameters`)."""
    old_context = np.float32(scaling.original_max_position_embeddings)
    low_freq_wavelen = old_context / np.float32(scaling.low_freq_factor)
    high_freq_wavelen = old_context / np.float32(scaling.high_freq_factor)
    factor = np.float32(scaling.factor)
    wavelen = np.float32(2 * math.pi) / inv_freq
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - np.float32(scaling.low_freq_factor)) / np.float32(
        scaling.high_freq_factor - scaling.low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return np.where(is_medium, smoothed, scaled).astype(np.float32)


def rope_cos_sin(positions: jax.Array, inv_freq: np.ndarray) -> tuple[jax.Array, jax.Array]:
    """cos, sin of shape (B, T, 1, H) in float32 for positions (B, T)."""
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)  # (B, T, H/2)
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate-half RoPE on (B, T, heads, H); rotation in float32, result in x's dtype."""
    x32 = x.astype(jnp.float32)
    first, second = jnp.split(x32, 2, axis=-1)
    rotated = jnp.concatenate([-second, first], axis=-1)
    return (x32 * cos + rotated * sin).astype(x.dtype)


# --- modules -----------------------------------------------------------------------------------

class SelfAttention(nnx.Module):
    def __init__(self, config: LlamaConfig, *, dtype, attention_impl: Implementation, rngs: nnx.Rngs):
        d, h = config.hidden_size, config.resolved_head_dim
        n, k = config.num_heads, config.num_kv_heads
        if n % k:
            raise ValueError(f"num_heads ({n}) must be a multiple of num_kv_heads ({k})")
        bias = config.attention_bias
        self.q_proj = Dense(d, n * h, axes=("embed", "heads"), use_bias=bias, dtype=dtype, rngs=rngs)
        self.k_proj = Dense(d, k * h, axes=("embed", "kv_heads"), use_bias=bias, dtype=dtype, rngs=rngs)
        self.v_proj = Dense(d, k * h, axes=("embed", "kv_heads"), use_bias=bias, dtype=dtype, rngs=rngs)
        self.o_proj = Dense(n * h, d, axes=("heads", "embed"), use_bias=bias, dtype=dtype, rngs=rngs)
        self.num_heads, self.num_kv_heads, self.head_dim = n, k, h
        self.attention_impl = attention_impl

    def __call__(self, x, *, cos, sin, segment_ids):
        b, t, _ = x.shape
        q = self.q_proj(x).reshape(b, t, self.num_heads, self.head_dim)
        k = self.k_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
        q = constrain(apply_rope(q, cos, sin), ("batch", "length", "act_heads", None))
        k = constrain(apply_rope(k, cos, sin), ("batch", "length", "act_kv_heads", None))
        v = constrain(v, ("batch", "length", "act_kv_heads", None))
        out = attention(q, k, v, segment_ids=segment_ids, implementation=self.attention_impl)
        return self.o_proj(out.reshape(b, t, self.num_heads * self.head_dim))


class MLP(nnx.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: LlamaConfig, *, dtype, rngs: nnx.Rngs):
        d, f, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = Dense(d, f, axes=("embed", "mlp"), use_bias=bias, dtype=dtype, rngs=rngs)
        self.up_proj = Dense(d, f, axes=("embed", "mlp"), use_bias=bias, dtype=dtype, rngs=rngs)
        self.down_proj = Dense(f, d, axes=("mlp", "embed"), use_bias=bias, dtype=dtype, rngs=rngs)

    def __call__(self, x):
        hidden = jax.nn.silu(self.gate_proj(x)) * self.up_proj(x)
        return self.down_proj(constrain(hidden, ("batch", "length", "act_mlp")))


class DecoderLayer(nnx.Module):
    def __init__(self, config: LlamaConfig, *, dtype, attention_impl: Implementation, rngs: nnx.Rngs):
        d, eps = config.hidden_size, config.rms_norm_eps
        self.input_layernorm = RMSNorm(d, eps=eps, dtype=dtype)
        self.self_attn = SelfAttention(config, dtype=dtype, attention_impl=attention_impl, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(d, eps=eps, dtype=dtype)
        self.mlp = MLP(config, dtype=dtype, rngs=rngs)

    def __call__(self, x, *, cos, sin, segment_ids):
        x = x + self.self_attn(self.input_layernorm(x), cos=cos, sin=sin, segment_ids=segment_ids)
        x = x + self.mlp(self.post_attention_layernorm(x))
        return constrain(x, ("batch", "length", "act_embed"))


def _run_layer(layer: DecoderLayer, x, cos, sin, segment_ids):
    return layer(x, cos=cos, sin=sin, segment_ids=segment_ids)


class Llama(nnx.Module):
    """Decoder-only Llama LM.

    `embed` → `decode` → `logits` are separate so a caller can splice visual
    vectors into the embeddings and compute the vocabulary projection in chunks.
    """

    def __init__(self, config: LlamaConfig, *, dtype=jnp.bfloat16, attention_impl: Implementation = "auto",
                 remat: Remat = "none", rngs: nnx.Rngs):
        if remat not in ("none", *REMAT_POLICIES):
            raise ValueError(f"remat must be 'none', 'full' or 'save_dots', got {remat!r}")
        self.config = config
        self.dtype = dtype
        self.remat = remat
        self.embed_tokens = Embed(config.vocab_size, config.hidden_size, axes=("vocab", "embed"),
                                  dtype=dtype, rngs=rngs)
        self.layers = nnx.List([DecoderLayer(config, dtype=dtype, attention_impl=attention_impl, rngs=rngs)
                                for _ in range(config.num_layers)])
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, dtype=dtype)
        self.lm_head = (None if config.tie_word_embeddings else
                        Dense(config.hidden_size, config.vocab_size, axes=("embed", "vocab"),
                              use_bias=False, dtype=dtype, rngs=rngs))

    def embed(self, input_ids: jax.Array) -> jax.Array:
        """(B, T) ids → (B, T, D) embeddings in the compute dtype."""
        return constrain(self.embed_tokens(input_ids), ("batch", "length", "act_embed"))

    def decode(self, inputs_embeds: jax.Array, *, segment_ids: jax.Array, positions: jax.Array) -> jax.Array:
        """(B, T, D) embeddings → final-normed hidden states (B, T, D).

        segment_ids (B, T): 1, 2, ... per packed sample, 0 on padding; positions
        (B, T): position within the segment (restarts at 0 for each sample).
        """
        cos, sin = rope_cos_sin(positions, rope_inverse_frequencies(self.config))
        run = _run_layer if self.remat == "none" else nnx.remat(_run_layer, policy=REMAT_POLICIES[self.remat])
        x = inputs_embeds.astype(self.dtype)
        for layer in self.layers:
            x = run(layer, x, cos, sin, segment_ids)
        return self.norm(x)

    def logits(self, hidden: jax.Array) -> jax.Array:
        """(B, T, D) hidden → (B, T, V) float32 logits."""
        out = self.embed_tokens.attend(hidden) if self.lm_head is None else self.lm_head(hidden)
        return constrain(out.astype(jnp.float32), ("batch", "length", "act_vocab"))

    def __call__(self, input_ids: jax.Array, *, segment_ids: jax.Array, positions: jax.Array) -> jax.Array:
        hidden = self.decode(self.embed(input_ids), segment_ids=segment_ids, positions=positions)
        return self.logits(hidden)


# --- transformers checkpoint mapping ---------------------------------------------------------

# jaxllava parameter path → transformers name (LlamaForCausalLM layout). Paths and
# names differ only in the leaf (kernel/scale/embedding → weight) and the "model."
# scope, but the table is written out so it can be read and grepped.
HF_GLOBAL_KEYS = {
    "embed_tokens/embedding": "model.embed_tokens.weight",
    "norm/scale": "model.norm.weight",
    "lm_head/kernel": "lm_head.weight",
}
HF_LAYER_KEYS = {  # under layers/{i} ↔ model.layers.{i}.
    "input_layernorm/scale": "input_layernorm.weight",
    "post_attention_layernorm/scale": "post_attention_layernorm.weight",
    **{f"self_attn/{p}/{leaf}": f"self_attn.{p}.{hf_leaf}"
       for p in ("q_proj", "k_proj", "v_proj", "o_proj") for leaf, hf_leaf in (("kernel", "weight"), ("bias", "bias"))},
    **{f"mlp/{p}/{leaf}": f"mlp.{p}.{hf_leaf}"
       for p in ("gate_proj", "up_proj", "down_proj") for leaf, hf_leaf in (("kernel", "weight"), ("bias", "bias"))},
}


def hf_name(path: tuple, prefix: str = "") -> str:
    """transformers tensor name of the parameter at `path` (e.g. ('layers', 0, 'mlp', 'up_proj', 'kernel'))."""
    if path[0] == "layers":
        return f"{prefix}model.layers.{path[1]}.{HF_LAYER_KEYS['/'.join(map(str, path[2:]))]}"
    return prefix + HF_GLOBAL_KEYS["/".join(map(str, path))]


def llama_weight_map(model: Llama) -> list[Entry]:
    """(transformers name, parameter, layout) for every parameter of `model`: the one key map."""
    entries = []
    for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        path = tuple(path)
        node = model
        for part in path[:-1]:
            node = node[part] if isinstance(part, int) else getattr(node, part)
        entries.append((hf_name(path), getattr(node, path[-1]), LINEAR if path[-1] == "kernel" else SAME))
    return entries


def load_hf_llama_weights(model: Llama, tensors, *, prefix: str = "") -> list[str]:
    """Copy a transformers Llama state dict into `model` in place; strict (see `load_entries`).

    `tensors`: a `CheckpointTensors` or a name → array mapping. `prefix` is put
    before every transformers name (e.g. for a Llama nested in a larger model).
    Returns the checkpoint names that were not used, sorted.
    """
    used = load_entries(llama_weight_map(model), tensors, prefix=prefix)
    return unused_keys(tensors, used)


def llama_hf_state_dict(model: Llama, *, prefix: str = "") -> dict[str, np.ndarray]:
    """transformers-layout state dict (numpy, torch (out, in) Linear weights) of `model`."""
    return entries_state_dict(llama_weight_map(model), prefix=prefix)


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
