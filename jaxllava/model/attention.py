"""Causal, segment-aware self-attention over `jax.nn.dot_product_attention`.

Axis letters: see jaxllava/__init__.py.

Packed rows hold several samples; `segment_ids` (B, T) numbers them 1, 2, ...
and marks padding with 0 (jaxllava/data/batch.py). A query attends a key only
when both are in the same segment and the key is not later than the query.
Padding positions form their own segment 0 and attend each other: the causal
diagonal keeps at least one key per query, so no softmax row is empty (no NaN),
and the outputs at padding positions are never read by a loss.

GQA needs no repeat of the kv heads: `jax.nn.dot_product_attention` accepts K < N
key/value heads when N % K == 0 (it groups the queries, G = N // K).

Backends ("implementation"):
  xla    the reference einsum/softmax path; any dtype, any shape.
  cudnn  cuDNN flash attention. The public `jax.nn.dot_product_attention`
         has no segment-id argument for cuDNN:
         `query_seq_lengths`/`key_value_seq_lengths` only describe right
         padding, and the packed layout (`q_offsets`/`kv_offsets`, Hopper only)
         exists only in the private `jax._src.cudnn.fused_attention_stablehlo`.
         A boolean `mask` IS honoured: cuDNN turns it into an additive
         (B, 1, T, S) bias (computing its gradient too), so segments stay
         separate at the cost of materialising that bias. Relying on causal
         masking alone would silently attend across packed samples (the bug in
         AI-Hypercomputer/maxtext#4476), so the mask is always passed.
         cuDNN needs bf16/fp16 inputs, head dim a multiple of 8 and <= 128
         (<= 256 on Hopper), and even T and S when a bias is trained
         (`check_is_flash_attention` in jax/_src/cudnn/fused_attention_stablehlo.py).
  auto   cudnn on a GPU when the call meets those conditions, xla otherwise.

Generation (jaxllava.model.decode) attends over a static-shape key/value cache
instead: `cached_attention` writes the new tokens' keys and values into the
cache and attends the whole cache under an explicit mask (left padding and
causality), always with the xla backend: a decode step has one query per row,
which cuDNN's flash kernel neither accepts for every shape nor speeds up.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxllava.model.config import AttentionImpl

# One layer's cache: (keys, values), each (B, S, K, H) with S the cache length.
KVPair = tuple[jax.Array, jax.Array]


def _gpu_compute_capability() -> tuple[int, ...] | None:
    if jax.default_backend() != "gpu":
        return None
    capability = getattr(jax.devices()[0], "compute_capability", None)
    if capability is None:
        return None
    return tuple(int(part) for part in str(capability).split("."))


def cudnn_supports(q: jax.Array, k: jax.Array) -> bool:
    """Whether cuDNN flash attention accepts this causal + segment-mask call here."""
    capability = _gpu_compute_capability()
    if capability is None or capability < (8, 0):  # flash attention needs Ampere or newer
        return False
    _, t, _, h = q.shape
    s = k.shape[1]
    max_head_dim = 256 if capability >= (9, 0) else 128
    return (q.dtype in (jnp.bfloat16, jnp.float16) and h % 8 == 0 and h <= max_head_dim
            and t % 2 == 0 and s % 2 == 0)


def resolve_implementation(implementation: AttentionImpl, q: jax.Array, k: jax.Array) -> str:
    if implementation == "auto":
        return "cudnn" if cudnn_supports(q, k) else "xla"
    return implementation


def segment_mask(segment_ids: jax.Array) -> jax.Array:
    """(B, 1, T, S) bool: query and key share a segment (causality is added separately)."""
    return (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None, :, :]


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, segment_ids: jax.Array,
              implementation: AttentionImpl = "auto") -> jax.Array:
    """Causal self-attention within segments.

    q: (B, T, N, H); k, v: (B, S, K, H) with S == T and N % K == 0;
    segment_ids: (B, T) int, 0 = padding. Returns (B, T, N, H) in q's dtype.
    """
    if k.shape[1] != q.shape[1] or segment_ids.shape != q.shape[:2]:
        raise ValueError(f"self-attention needs q {q.shape[:2]}, k {k.shape[:2]} and "
                         f"segment_ids {segment_ids.shape} to share (B, T)")
    return jax.nn.dot_product_attention(
        q, k, v, mask=segment_mask(segment_ids), is_causal=True,
        implementation=resolve_implementation(implementation, q, k))


def cached_attention(q: jax.Array, k: jax.Array, v: jax.Array, keys: jax.Array, values: jax.Array, *,
                     write_index: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Attention of T new tokens over a cache of S columns.

    q: (B, T, N, H); k, v: (B, T, K, H), written into keys, values (B, S, K, H) at columns
    write_index ... write_index + T - 1 (a scalar shared by all rows: generation pads on the
    left, so every row's next token lands in the same column); mask: (B, 1, T, S) bool, the
    columns each new token may attend (it must include the token's own column).
    Returns (out (B, T, N, H), keys, values).
    """
    start = (0, write_index, 0, 0)
    keys = jax.lax.dynamic_update_slice(keys, k.astype(keys.dtype), start)
    values = jax.lax.dynamic_update_slice(values, v.astype(values.dtype), start)
    out = jax.nn.dot_product_attention(q, keys.astype(q.dtype), values.astype(q.dtype), mask=mask,
                                       implementation="xla")
    return out, keys, values
