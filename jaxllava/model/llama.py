"""Llama-family decoder (Flax NNX).

Numerics follow transformers' `LlamaForCausalLM` (docs/reference.md#llama-decoder-numerics):
RMSNorm normalises in float32 then scales; RoPE uses the rotate-half layout
(the first and second halves of each head are the two rotated coordinates;
README pitfall 34), inverse frequencies in float32 as transformers computes
them, optional Llama-3 frequency scaling; SwiGLU MLP; attention scale 1/sqrt(H);
tied or untied output layer. Parameters are float32, computation runs in `dtype`.

Module and attribute names match transformers' (`embed_tokens`, `layers.{i}.self_attn.q_proj`,
...), so the transformers key map (jaxllava.model.hf_keys) needs only the `model.`
scope that transformers puts around everything but `lm_head`.

Axis letters: see jaxllava/__init__.py.
"""
from __future__ import annotations

import math
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxllava.model.attention import KVPair, attention, cached_attention
from jaxllava.model.config import AttentionImpl, LlamaConfig, Remat, RopeScaling
from jaxllava.model.layers import Dense, Embed, RMSNorm
from jaxllava.model.sharding import constrain

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
    def __init__(self, config: LlamaConfig, *, dtype, attention_impl: AttentionImpl, rngs: nnx.Rngs):
        d, h = config.hidden_size, config.resolved_head_dim
        n, k = config.num_heads, config.num_kv_heads
        bias = config.attention_bias
        self.q_proj = Dense(d, n * h, axes=("embed", "heads"), use_bias=bias, dtype=dtype, rngs=rngs)
        self.k_proj = Dense(d, k * h, axes=("embed", "kv_heads"), use_bias=bias, dtype=dtype, rngs=rngs)
        self.v_proj = Dense(d, k * h, axes=("embed", "kv_heads"), use_bias=bias, dtype=dtype, rngs=rngs)
        self.o_proj = Dense(n * h, d, axes=("heads", "embed"), use_bias=bias, dtype=dtype, rngs=rngs)
        self.num_heads, self.num_kv_heads, self.head_dim = n, k, h
        self.attention_impl = attention_impl

    def project_qkv(self, x, *, cos, sin) -> tuple[jax.Array, jax.Array, jax.Array]:
        """(B, T, D) → q (B, T, N, H), k and v (B, T, K, H), with RoPE applied to q and k."""
        b, t, _ = x.shape
        q = self.q_proj(x).reshape(b, t, self.num_heads, self.head_dim)
        k = self.k_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
        q = constrain(apply_rope(q, cos, sin), ("batch", "length", "act_heads", None))
        k = constrain(apply_rope(k, cos, sin), ("batch", "length", "act_kv_heads", None))
        v = constrain(v, ("batch", "length", "act_kv_heads", None))
        return q, k, v

    def project_out(self, out: jax.Array) -> jax.Array:
        """(B, T, N, H) attention output → (B, T, D)."""
        b, t = out.shape[:2]
        return self.o_proj(out.reshape(b, t, self.num_heads * self.head_dim))

    def __call__(self, x, *, cos, sin, segment_ids):
        q, k, v = self.project_qkv(x, cos=cos, sin=sin)
        out = attention(q, k, v, segment_ids=segment_ids, implementation=self.attention_impl)
        return self.project_out(out)

    def with_cache(self, x, *, cos, sin, cache: KVPair, write_index, mask) -> tuple[jax.Array, KVPair]:
        """Attention of T new tokens over a key/value cache (jaxllava.model.decode): their keys and
        values are written at `write_index` first, so each token also sees itself."""
        q, k, v = self.project_qkv(x, cos=cos, sin=sin)
        out, keys, values = cached_attention(q, k, v, cache[0], cache[1], write_index=write_index, mask=mask)
        return self.project_out(out), (keys, values)


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
    def __init__(self, config: LlamaConfig, *, dtype, attention_impl: AttentionImpl, rngs: nnx.Rngs):
        d, eps = config.hidden_size, config.rms_norm_eps
        self.input_layernorm = RMSNorm(d, eps=eps, dtype=dtype)
        self.self_attn = SelfAttention(config, dtype=dtype, attention_impl=attention_impl, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(d, eps=eps, dtype=dtype)
        self.mlp = MLP(config, dtype=dtype, rngs=rngs)

    def __call__(self, x, *, cos, sin, segment_ids):
        x = x + self.self_attn(self.input_layernorm(x), cos=cos, sin=sin, segment_ids=segment_ids)
        x = x + self.mlp(self.post_attention_layernorm(x))
        return constrain(x, ("batch", "length", "act_embed"))

    def with_cache(self, x, *, cos, sin, cache: KVPair, write_index, mask) -> tuple[jax.Array, KVPair]:
        """`__call__` for generation: the same residual blocks, attention over the layer's cache."""
        attended, cache = self.self_attn.with_cache(self.input_layernorm(x), cos=cos, sin=sin, cache=cache,
                                                    write_index=write_index, mask=mask)
        x = x + attended
        x = x + self.mlp(self.post_attention_layernorm(x))
        return constrain(x, ("batch", "length", "act_embed")), cache


def _run_layer(layer: DecoderLayer, x, cos, sin, segment_ids):
    return layer(x, cos=cos, sin=sin, segment_ids=segment_ids)


class Llama(nnx.Module):
    """Decoder-only Llama LM.

    `embed` → `decode` → `logits` are separate so a caller can splice visual
    vectors into the embeddings and compute the vocabulary projection in chunks.
    """

    HF_RENAMES = {"embed_tokens": "model.embed_tokens", "layers": "model.layers", "norm": "model.norm"}

    def __init__(self, config: LlamaConfig, *, dtype=jnp.bfloat16, attention_impl: AttentionImpl = "auto",
                 remat: Remat = "none", rngs: nnx.Rngs):
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

    def decode_with_cache(self, inputs_embeds: jax.Array, *, positions: jax.Array, caches: tuple[KVPair, ...],
                          write_index: jax.Array, mask: jax.Array) -> tuple[jax.Array, tuple[KVPair, ...]]:
        """`decode` for generation (jaxllava.model.decode): T new embeddings (B, T, D) at cache
        columns `write_index` ... + T - 1 → final-normed hidden states (B, T, D) and the layers'
        updated caches. mask (B, 1, T, S): which cache columns each new token attends."""
        cos, sin = rope_cos_sin(positions, rope_inverse_frequencies(self.config))
        x = inputs_embeds.astype(self.dtype)
        updated = []
        for layer, cache in zip(self.layers, caches):
            x, cache = layer.with_cache(x, cos=cos, sin=sin, cache=cache, write_index=write_index, mask=mask)
            updated.append(cache)
        return self.norm(x), tuple(updated)

    def logits(self, hidden: jax.Array) -> jax.Array:
        """(B, T, D) hidden → (B, T, V) float32 logits."""
        out = self.embed_tokens.attend(hidden) if self.lm_head is None else self.lm_head(hidden)
        return constrain(out.astype(jnp.float32), ("batch", "length", "act_vocab"))

    def __call__(self, input_ids: jax.Array, *, segment_ids: jax.Array, positions: jax.Array) -> jax.Array:
        hidden = self.decode(self.embed(input_ids), segment_ids=segment_ids, positions=positions)
        return self.logits(hidden)
