"""Generation: a static-shape key/value cache, one jitted prefill and one jitted decode step.

    batch = left_padded(prompts, pad_id=..., length=prompt_bucket(longest))
    generated = Generator(model, eos_id=...).generate(batch, max_new_tokens=32)

Prefill runs the whole prompt through `LlavaModel.embed_inputs` (the image splice
training uses: the I placeholder embeddings of an image row are overwritten by its I
visual vectors) and `Llama.decode_with_cache`, which is `Llama.decode` with each
layer's keys and values written into a cache of S columns. Each decode step embeds the
last chosen token and attends it over the cache. Shapes depend only on (rows B, prompt
bucket T, cache length S, image or text), so the step compiles once per generation and
never per token; `TRACES` counts the compilations (tests/test_generate.py).

Left padding, not right padding: a row of n prompt tokens sits in the last n of the T
columns, so every row's next token goes into the same cache column (one
`dynamic_update_slice` for the batch, no per-row scatter) and the next-token logits
are always the last column's. The cost is per-row bookkeeping, `pad` (B,): a token in
column c has position c - pad (positions start at 0 with the first real token, as in
training), and attends only columns pad ... c. Pad columns attend only themselves, so
no softmax row is empty; their outputs are never read.

Sampling: greedy (argmax) when the temperature is 0; otherwise logits / temperature,
then nucleus (top-p) filtering as transformers' `TopPLogitsWarper` does (the smallest
set of most likely tokens whose probability reaches top_p), then a categorical draw
with the key `fold_in(PRNGKey(seed), step)`: the same seed gives the same tokens.

Axis letters: see jaxllava/__init__.py (S: cache length).
"""
from __future__ import annotations

import collections
import dataclasses
import functools
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxllava.model.attention import KVPair

MIN_PROMPT_BUCKET = 16


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How the next token is chosen (hashable: a jit static argument)."""

    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0  # nucleus mass kept; 1: the whole distribution
    seed: int = 0

    def __post_init__(self):
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0 (0 is greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    layers: tuple[KVPair, ...]  # per layer (keys, values), each (B, S, K, H)
    pad: jax.Array  # (B,) int32: left-padding columns of each row
    length: jax.Array  # () int32: columns written so far, the next write column


@dataclasses.dataclass(frozen=True)
class PromptBatch:
    """Left-padded prompts (host arrays). An image batch has pixels and image_mask; a text batch neither."""

    input_ids: np.ndarray  # (B, T) int32, the pad id left of each prompt
    pad: np.ndarray  # (B,) int32
    pixels: Optional[np.ndarray] = None  # (B, side, side, 3) float32
    image_mask: Optional[np.ndarray] = None  # (B, T) bool: the I placeholder columns of each row

    @property
    def lengths(self) -> np.ndarray:
        return self.input_ids.shape[1] - self.pad


@dataclasses.dataclass(frozen=True)
class Generated:
    tokens: np.ndarray  # (B, steps) int32; after a row's EOS, whatever it went on choosing
    lengths: np.ndarray  # (B,) tokens up to and including the first EOS (all steps when none)
    logits: Optional[np.ndarray] = None  # (B, steps, V) float32, the logits each token was chosen from

    def row(self, b: int) -> list[int]:
        return self.tokens[b, :self.lengths[b]].tolist()


def prompt_bucket(longest: int) -> int:
    """The padded prompt length: the next power of two, at least MIN_PROMPT_BUCKET (few compilations)."""
    return max(MIN_PROMPT_BUCKET, 1 << max(longest - 1, 0).bit_length())


def left_padded(prompts: Sequence[Sequence[int]], *, pad_id: int, length: int,
                image_starts: Optional[Sequence[int]] = None, image_tokens: int = 0,
                pixels: Optional[np.ndarray] = None) -> PromptBatch:
    """Prompts (ids) right-aligned in `length` columns. For an image batch, `image_starts[b]` is the
    index of row b's image span in its prompt and `pixels` its image."""
    if (image_starts is None) != (pixels is None):
        raise ValueError("an image batch needs both image_starts and pixels")
    ids = np.full((len(prompts), length), pad_id, np.int32)
    pad = np.zeros(len(prompts), np.int32)
    for b, prompt in enumerate(prompts):
        if not 0 < len(prompt) <= length:
            raise ValueError(f"prompt {b} has {len(prompt)} tokens; the padded length is {length}")
        pad[b] = length - len(prompt)
        ids[b, pad[b]:] = prompt
    if image_starts is None:
        return PromptBatch(ids, pad)
    mask = np.zeros(ids.shape, bool)
    for b, start in enumerate(image_starts):
        mask[b, pad[b] + start:pad[b] + start + image_tokens] = True
    return PromptBatch(ids, pad, np.asarray(pixels, np.float32), mask)


# --- the pure functions the Generator jits -------------------------------------------------------

def empty_cache(model, rows: int, cache_len: int, pad: jax.Array) -> KVCache:
    config = model.lm.config
    shape = (rows, cache_len, config.num_kv_heads, config.resolved_head_dim)
    layers = tuple((jnp.zeros(shape, model.lm.dtype), jnp.zeros(shape, model.lm.dtype))
                   for _ in range(config.num_layers))
    return KVCache(layers, pad.astype(jnp.int32), jnp.zeros((), jnp.int32))


def cache_mask(pad: jax.Array, start: jax.Array, new_tokens: int, cache_len: int) -> jax.Array:
    """(B, 1, T, S) bool: new token t (column start + t) attends columns pad ... start + t; a
    pad column attends only itself."""
    query = start + jnp.arange(new_tokens)[:, None]  # (T, 1)
    key = jnp.arange(cache_len)[None, :]  # (1, S)
    real = key[None] >= pad[:, None, None]  # (B, 1, S)
    return ((key <= query)[None] & (real | (key == query)[None]))[:, None]


def forward_with_cache(model, embeds: jax.Array, cache: KVCache) -> tuple[jax.Array, KVCache]:
    """T new embeddings (B, T, D) appended to the cache → last column's logits (B, V) float32."""
    t, cache_len = embeds.shape[1], cache.layers[0][0].shape[1]
    columns = cache.length + jnp.arange(t)[None, :]
    positions = jnp.maximum(columns - cache.pad[:, None], 0)
    mask = cache_mask(cache.pad, cache.length, t, cache_len)
    hidden, layers = model.lm.decode_with_cache(embeds, positions=positions, caches=cache.layers,
                                                write_index=cache.length, mask=mask)
    logits = model.lm.logits(hidden[:, -1:])[:, 0]
    return logits, KVCache(layers, cache.pad, cache.length + t)


def top_p_filter(logits: jax.Array, top_p: float) -> jax.Array:
    """Logits (B, V) with every token outside the nucleus at -inf: a token stays when the
    probability of the tokens more likely than it is below top_p (transformers' TopPLogitsWarper)."""
    ordered = jnp.sort(logits, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(ordered, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    kept = jnp.sum(mass_before < top_p, axis=-1, keepdims=True)  # >= 1: the first has mass 0 before it
    cutoff = jnp.take_along_axis(ordered, kept - 1, axis=-1)
    return jnp.where(logits >= cutoff, logits, -jnp.inf)


def choose_tokens(logits: jax.Array, sampling: Sampling, step: jax.Array, seed: jax.Array) -> jax.Array:
    """(B, V) logits → (B,) int32 next tokens. `seed` is traced (not `sampling.seed`), so a new
    seed compiles nothing."""
    if sampling.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    scaled = logits / sampling.temperature
    if sampling.top_p < 1:
        scaled = top_p_filter(scaled, sampling.top_p)
    key = jax.random.fold_in(jax.random.PRNGKey(seed), step)
    return jax.random.categorical(key, scaled, axis=-1).astype(jnp.int32)


# --- the generation loop -------------------------------------------------------------------------

# Compilations by function name: the tracing side effect runs only while jax compiles, so a
# test reads how often prefill and the decode step were compiled.
TRACES: collections.Counter = collections.Counter()


@functools.lru_cache(maxsize=8)
def _jitted(graphdef) -> tuple:
    """The jitted prefill and decode step of one model structure, shared by every Generator of it
    (a new Generator for the same model, or for other weights of that shape, compiles nothing)."""

    def prefill(state, input_ids, pad, pixels, image_mask, seed, *, cache_len: int, sampling: Sampling):
        TRACES["prefill"] += 1
        model = nnx.merge(graphdef, state)
        cache = empty_cache(model, input_ids.shape[0], cache_len, pad)
        logits, cache = forward_with_cache(model, model.embed_inputs(input_ids, pixels, image_mask), cache)
        return choose_tokens(logits, sampling, jnp.int32(0), seed), logits, cache

    def decode_step(state, tokens, cache, step, seed, *, sampling: Sampling):
        TRACES["decode_step"] += 1
        model = nnx.merge(graphdef, state)
        logits, cache = forward_with_cache(model, model.embed_inputs(tokens[:, None]), cache)
        return choose_tokens(logits, sampling, step, seed), logits, cache

    return (jax.jit(prefill, static_argnames=("cache_len", "sampling")),
            jax.jit(decode_step, static_argnames=("sampling",), donate_argnames=("cache",)))


class Generator:
    """Prefill and decode steps for one model; they compile once per (B, T, S, image or text) and
    sampling, never per token (`TRACES`)."""

    def __init__(self, model, *, eos_id: Optional[int]):
        graphdef, self.state = nnx.split(model)
        self.config = model.config
        self.eos_id = eos_id
        self._prefill, self._step = _jitted(graphdef)

    def generate(self, batch: PromptBatch, max_new_tokens: int, sampling: Sampling = Sampling(), *,
                 cache_len: Optional[int] = None, keep_logits: bool = False, check_every: int = 8) -> Generated:
        """Up to `max_new_tokens` tokens per row; stops early once every row has chosen EOS (checked
        every `check_every` steps, so the host waits on the device only that often)."""
        rows, width = batch.input_ids.shape
        cache_len = width + max_new_tokens if cache_len is None else cache_len
        self._check_room(batch, max_new_tokens, cache_len)
        seed, sampling = jnp.int32(sampling.seed), dataclasses.replace(sampling, seed=0)  # the seed is traced
        token, logits, cache = self._prefill(self.state, batch.input_ids, batch.pad, batch.pixels, batch.image_mask,
                                             seed, cache_len=cache_len, sampling=sampling)
        tokens, all_logits = [token], [logits] if keep_logits else None
        done = np.zeros(rows, bool)
        for step in range(1, max_new_tokens):
            if step % check_every == 0:
                done |= self._seen_eos(tokens[-check_every:])
                if done.all():
                    break
            token, logits, cache = self._step(self.state, token, cache, jnp.int32(step), seed, sampling=sampling)
            tokens.append(token)
            if keep_logits:
                all_logits.append(logits)
        out = np.stack([np.asarray(t) for t in tokens], axis=1)
        return Generated(out, self._lengths(out),
                         np.stack([np.asarray(x) for x in all_logits], axis=1) if keep_logits else None)

    def _check_room(self, batch: PromptBatch, max_new_tokens: int, cache_len: int) -> None:
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        width = batch.input_ids.shape[1]
        if width + max_new_tokens - 1 > cache_len:
            raise ValueError(f"the cache has {cache_len} columns: too few for a {width}-column prompt and "
                             f"{max_new_tokens} new tokens")
        longest = int(batch.lengths.max())
        limit = self.config.lm.max_position_embeddings
        if longest + max_new_tokens > limit:
            raise ValueError(f"a prompt of {longest} tokens and {max_new_tokens} new tokens exceed the model's "
                             f"max_position_embeddings {limit}")

    def _seen_eos(self, recent: list) -> np.ndarray:
        if self.eos_id is None:
            return np.zeros(np.asarray(recent[0]).shape, bool)
        return np.any(np.stack([np.asarray(t) for t in recent], axis=1) == self.eos_id, axis=1)

    def _lengths(self, tokens: np.ndarray) -> np.ndarray:
        steps = tokens.shape[1]
        if self.eos_id is None:
            return np.full(tokens.shape[0], steps, np.int64)
        is_eos = tokens == self.eos_id
        return np.where(is_eos.any(axis=1), is_eos.argmax(axis=1) + 1, steps)
