"""Minimal-pair scoring, exactly as the BabyLM pipelines score a causal LM.

Protocol "2025" (default; the 2026 pipeline's `strict/` code is byte-identical),
`babylm/evaluation-pipeline-2025`, `evaluation_pipeline/sentence_zero_shot/`:
  - `dataset.py::process_causal_sentences`: tokens = tokenizer(sentence) with its special
    tokens (add_special_tokens=True, so BOS only if the tokenizer adds one) and char
    offsets; token i is in the phrase mask iff its offset end lies past
    start_char = len(sentence) - len(completion) + offsets[0][0].
    Special tokens have offsets (0, 0), so BOS/EOS are never scored.
  - `get_causal_collate_fn`: inputs = tokens[:-1], targets = tokens[1:],
    mask = phrase_mask[1:] (so token 0 is never scored: without BOS the first word
    piece is only context), right padding.
  - `compute_results.py::compute_causal_results`: score = sum over masked targets of
    log_softmax(logits / T)[target], T = 1 (`--min_temperature 1.0`), no length
    normalisation; logits longer than the inputs keep their last positions.
  - `rank_and_evaluate`: chosen = torch.max(scores, 1).indices, correct iff chosen == 0.
    torch.max (like np.argmax) returns the first maximal index and treats NaN as
    maximal, so ties and a NaN in candidate 0 count as correct.
Protocol "2024" (`babylm/evaluation-pipeline-2024`, EleutherAI lm-eval fork; task YAMLs
`blimp_filtered`, `blimp_supplement`, `ewok_filtered`): request = (context,
" " + choice); empty context => [BOS, else EOS, else pad] + tok(" " + sentence) with no
special tokens, every continuation token scored (`lm_eval/api/model.py::loglikelihood`,
`models/huggingface.py::prefix_token_id`); otherwise `_encode_pair` (trailing context
spaces move to the continuation, continuation = tok(context + cont)[len(tok(context)):]).
Here context = sentence minus its completion (BLiMP: "", EWoK: Context1).

`image_template` ("<image>\\n{text}", the reference's template, docs/reference.md#evaluation) puts a
literal text prefix before every sentence, with no image; the templated string is
tokenised as one text and its completion (still only the sentence's scored part) is
located with the same offset rule. The official pipeline applies a template only when an
image is present, so this setting exists to measure the reference's habit, not to
reproduce official numbers. 2025 protocol only.

One deliberate difference: masked-out positions are dropped with `where`, not
multiplied by 0 as the pipeline does, so a -inf log-prob on a padding position cannot
turn a score into NaN; scores of finite logits are identical.

Model interface: `logits_fn(input_ids, segment_ids, positions) -> logits` (B, T, V),
jittable; int32 (B, T) inputs, segment_ids 1 on real tokens and 0 on (right) padding,
positions 0..T-1. Pass `jax.tree_util.Partial(apply, params)` to keep the parameters
as jit arguments instead of constants baked into every compiled bucket.

Devices: the batches go where the parameters are. Parameters on a mesh (NamedSharding,
e.g. the train state's) get every batch as global arrays whose rows are split over the
mesh's batch axes, the rule training batches follow (model/sharding.py), so evaluation
is data parallel and the model's activation constraints apply as in training. Every
process holds the same host batch and passes its devices' slices, so multi-process
runs work unchanged; the (B,) sums come back replicated, readable on every process.
Parameters without a mesh (numpy, one device) get host batches, on their device.
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxllava.errors import ConfigError, DataError
from jaxllava.eval.minimal_pairs import MinimalPairItem
from jaxllava.model.sharding import activation_sharding, batch_sharding, batch_shards, mesh_of

PROTOCOLS = ("2025", "2024")
DEFAULT_BUCKETS = (32, 64, 128, 256, 512)

LogitsFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True)
class EncodedSet:
    """Token ids and target masks of every candidate, flattened item by item (host numpy)."""

    token_ids: tuple[np.ndarray, ...]  # one int32 (L,) per row, special tokens included
    target_mask: tuple[np.ndarray, ...]  # bool (L,): token t is scored given tokens[:t]; [0] is False
    row_start: np.ndarray  # (items + 1,): rows of item i are row_start[i]:row_start[i + 1], good first
    pad_id: int
    protocol: str
    image_template: str | None

    @property
    def num_rows(self) -> int:
        return len(self.token_ids)


@dataclasses.dataclass(frozen=True)
class Results:
    items: Sequence[MinimalPairItem]
    scores: list[np.ndarray]  # per item, float64 (candidates,)
    chosen: np.ndarray  # int (items,)
    correct: np.ndarray  # bool (items,)
    accuracy: dict[str, dict[str, float]]  # metadata key -> value -> accuracy in %
    counts: dict[str, dict[str, int]]  # metadata key -> value -> items
    average: float  # mean of the per-UID accuracies (the number the pipeline reports)
    ties: int  # items whose best score is shared by >= 2 candidates
    nonfinite: int  # items with a NaN or infinite score
    protocol: str
    image_template: str | None
    compiles: int  # new jit compilations of the scoring function during this evaluation
    # Items whose candidates are the same token ids and target masks (`identical_candidates`):
    # one score for all, so a tie, counted correct like every tie. Counted apart from `ties`
    # because such an item says nothing about the model (docs/evaluation.md#ties).
    identical: int = 0

    @property
    def chance(self) -> float:
        """Expected accuracy (%) of a uniform random choice, macro-averaged over UIDs like `average`."""
        per_uid = collections.defaultdict(list)
        for item in self.items:
            per_uid[item.uid].append(1.0 / len(item.sentences))
        return 100.0 * float(np.mean([np.mean(v) for v in per_uid.values()]))


# ---------------------------------------------------------------------------- host side


def encode_candidates(tokenizer: Any, items: Sequence[MinimalPairItem], *, protocol: str = "2025",
                      image_template: str | None = None) -> EncodedSet:
    """Tokenise every candidate once and mark the tokens that count toward its score."""
    if protocol not in PROTOCOLS:
        raise ConfigError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    if not getattr(tokenizer, "is_fast", False):
        raise ConfigError("scoring needs a fast (Rust) Hugging Face tokenizer: the 2025 rule uses char offsets")
    prefix = _template_prefix(image_template)
    if protocol == "2024" and image_template is not None:
        raise ConfigError("image_template is defined for protocol '2025' only (the 2024 pipeline had none)")

    sentences = [s for item in items for s in item.sentences]
    completions = [c for item in items for c in item.completions]
    item_of_row = [item for item in items for _ in item.sentences]
    if protocol == "2025":
        encoded = _encode_2025(tokenizer, [prefix + s for s in sentences], completions)
    else:
        encoded = _encode_2024(tokenizer, sentences, completions)

    token_ids, target_mask = [], []
    for (ids, mask), item in zip(encoded, item_of_row):
        if len(ids) == 0:  # the pipeline would fail on offsets[0]
            raise DataError("a candidate has no tokens to score", record=item.source, record_id=item.id,
                            field="sentences")
        token_ids.append(np.asarray(ids, np.int32))
        target_mask.append(np.asarray(mask, bool))
    row_start = np.cumsum([0] + [len(item.sentences) for item in items])
    return EncodedSet(tuple(token_ids), tuple(target_mask), row_start, _pad_id(tokenizer), protocol,
                      image_template)


def _template_prefix(image_template: str | None) -> str:
    if image_template is None:
        return ""
    prefix = image_template[: -len("{text}")]
    if not image_template.endswith("{text}") or "{" in prefix or "}" in prefix:
        raise ConfigError(f"image_template must be literal text followed by '{{text}}', got {image_template!r}")
    return prefix


def _encode_2025(tokenizer, texts: list[str], completions: list[str]) -> list[tuple[list[int], list[bool]]]:
    out = tokenizer(texts, add_special_tokens=True, return_offsets_mapping=True)
    rows = []
    for text, completion, ids, offsets in zip(texts, completions, out["input_ids"], out["offset_mapping"]):
        if not ids:
            rows.append(([], []))
            continue
        # dataset.py::process_causal_sentences, text-only path (start_idx = 0).
        start_char = len(text) - len(completion) + offsets[0][0]
        # Position 0 is never a target (get_causal_collate_fn: phrase_mask[:, 1:]).
        rows.append((ids, [t >= 1 and end > start_char for t, (_, end) in enumerate(offsets)]))
    return rows


def _encode_2024(tokenizer, sentences: list[str], completions: list[str]) -> list[tuple[list[int], list[bool]]]:
    prefix_id = _prefix_token_id(tokenizer)
    contexts, continuations = [], []
    for sentence, completion in zip(sentences, completions):
        context = sentence[: len(sentence) - len(completion)]
        if context == "":
            continuation = " " + completion  # target_delimiter " " (task YAML default)
        else:  # lm_eval TemplateLM._encode_pair: trailing context spaces belong to the continuation
            continuation = completion
            n_spaces = len(context) - len(context.rstrip())
            if n_spaces:
                context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
        contexts.append(context)
        continuations.append(continuation)

    def encode(texts):  # huggingface.py::tok_encode: causal LMs get no special tokens
        return tokenizer(texts, add_special_tokens=False)["input_ids"]

    wholes = encode([c + x for c, x in zip(contexts, continuations)])
    context_ids = encode(contexts)
    lone_continuations = encode(continuations)
    rows = []
    for context, whole, ctx, lone in zip(contexts, wholes, context_ids, lone_continuations):
        if context == "":  # model.py::loglikelihood: empty context => [prefix token]
            ctx, cont = [prefix_id], lone
        else:  # the model reads tok(context) then the tail of tok(context + continuation)
            cont = whole[len(ctx):]
        if not cont:  # lm-eval asserts a non-empty continuation
            rows.append(([], []))
            continue
        rows.append((list(ctx) + list(cont), [False] * len(ctx) + [True] * len(cont)))
    return rows


def _prefix_token_id(tokenizer) -> int:
    # evaluation-pipeline-2024 lm_eval/models/huggingface.py::prefix_token_id: BOS, else EOS, else pad.
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        token_id = getattr(tokenizer, name, None)
        if token_id is not None:
            return int(token_id)
    raise ConfigError("protocol '2024' needs a BOS, EOS or pad token in the tokenizer")


def _pad_id(tokenizer) -> int:
    # dataset.py::CompletionRankingDataset: pad, else EOS for causal models. The value never
    # matters for the scores (right padding, segment_ids 0, masked targets).
    for name in ("pad_token_id", "eos_token_id"):
        token_id = getattr(tokenizer, name, None)
        if token_id is not None:
            return int(token_id)
    return 0


pad_id = _pad_id  # public name, for the other task readers (reading.py, aoa.py)


# ---------------------------------------------------------------------------- device side


def module_logits_fn(model: nnx.Module) -> jax.tree_util.Partial:
    """A `logits_fn` for an NNX module called as `model(input_ids, segment_ids=, positions=)`.

    The parameters travel as jit arguments; the graph definition is static and compares
    equal across models of one architecture, so a new checkpoint reuses compiled buckets.
    """
    graphdef, state = nnx.split(model)
    return jax.tree_util.Partial(_apply_module, graphdef, state)


def as_logits_fn(model: Any) -> LogitsFn:
    """A `logits_fn` from an NNX module (parameters moved to the device once, not per batch) or,
    unchanged, from something that already is one (evaluator.py does the same inline)."""
    if not isinstance(model, nnx.Module):
        return model
    # Host (numpy) parameters would be copied to the device on every batch.
    return jax.tree.map(lambda x: jnp.asarray(x) if isinstance(x, np.ndarray) else x, module_logits_fn(model))


def check_vocab(model: Any, max_token_id: int) -> None:
    """ConfigError when an NNX module's vocabulary cannot hold the tokenizer's largest id."""
    config = getattr(model, "config", None)
    vocab_size = getattr(getattr(config, "lm", config), "vocab_size", None)
    if vocab_size is not None and max_token_id >= vocab_size:
        raise ConfigError(f"the tokenizer produces id {max_token_id} but the model has only "
                          f"{vocab_size} embedding rows")


def _apply_module(graphdef, state, input_ids, segment_ids, positions):
    return nnx.merge(graphdef, state)(input_ids, segment_ids=segment_ids, positions=positions)


_trace_count = 0


def compile_count() -> int:
    """How many times the batch scorer has been traced (one per new logits_fn × batch shape × mesh)."""
    return _trace_count


def _sum_target_log_probs(logits_fn, input_ids, segment_ids, positions, targets, mask, *, mesh: Mesh | None):
    global _trace_count
    _trace_count += 1  # runs at trace time only
    with contextlib.nullcontext() if mesh is None else activation_sharding(mesh):
        logits = logits_fn(input_ids, segment_ids, positions).astype(jnp.float32)
    # compute_results.py: a model that prepends positions (e.g. image tokens) keeps the last T.
    logits = logits[:, logits.shape[1] - input_ids.shape[1]:]
    target_logits = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    log_probs = target_logits - jax.nn.logsumexp(logits, axis=-1)  # = log_softmax gathered, T = 1
    return jnp.sum(jnp.where(mask, log_probs, 0.0), axis=-1)


_SCORERS: dict[Mesh | None, Callable] = {}


def _scorer(mesh: Mesh | None) -> Callable:
    """The jitted batch scorer for parameters on `mesh` (None: no mesh). One jit per mesh,
    because the activation constraints and the replicated output are the mesh's."""
    if mesh not in _SCORERS:
        replicated = {} if mesh is None else {"out_shardings": NamedSharding(mesh, P())}
        _SCORERS[mesh] = jax.jit(functools.partial(_sum_target_log_probs, mesh=mesh), **replicated)
    return _SCORERS[mesh]


def on_mesh(host: np.ndarray, mesh: Mesh | None):
    """A host batch array as a global array with rows over the batch axes. Each process
    supplies only its own devices' slices of the (identical) host array."""
    if mesh is None:
        return host
    return jax.make_array_from_callback(host.shape, batch_sharding(mesh, host.shape), lambda index: host[index])


def score_encoded(logits_fn: LogitsFn, encoded: EncodedSet, *, batch_size: int = 64,
                  buckets: Sequence[int] = DEFAULT_BUCKETS) -> np.ndarray:
    """Score of every row (float64, `encoded` row order).

    Rows are sorted by length and batched within length buckets; every batch has shape
    (min(batch_size, rows), bucket), the rows rounded up to a multiple of the mesh's batch
    shards so they split evenly, so one call compiles at most once per bucket used.
    Only the (B,) sums leave the device.
    """
    buckets = sorted(set(int(b) for b in buckets))
    if batch_size < 1 or not buckets or buckets[0] < 1:
        raise ConfigError(f"batch_size and buckets must be positive, got {batch_size}, {buckets}")
    fn = logits_fn if isinstance(logits_fn, jax.tree_util.Partial) else jax.tree_util.Partial(logits_fn)
    lengths = np.array([max(len(ids) - 1, 1) for ids in encoded.token_ids])  # model input length
    if lengths.size and lengths.max() > buckets[-1]:
        row = int(lengths.argmax())
        raise ConfigError(f"a candidate needs {lengths.max()} input positions, more than the largest bucket "
                          f"{buckets[-1]} (row {row}); pass larger buckets")
    bucket_of_row = np.asarray(buckets)[np.searchsorted(buckets, lengths)]
    order = np.argsort(lengths, kind="stable")
    mesh = mesh_of(fn)
    score_batch = _scorer(mesh)
    shards = 1 if mesh is None else batch_shards(mesh)
    rows_per_batch = min(batch_size, max(encoded.num_rows, 1))
    rows_per_batch = -(-rows_per_batch // shards) * shards  # rows split evenly, else they stay replicated

    pending = []  # dispatch every batch before reading any result back
    for bucket in buckets:
        rows = order[bucket_of_row[order] == bucket]
        for start in range(0, len(rows), rows_per_batch):
            chunk = rows[start:start + rows_per_batch]
            arrays = [on_mesh(a, mesh) for a in _pack(encoded, chunk, rows_per_batch, bucket)]
            pending.append((chunk, score_batch(fn, *arrays)))
    scores = np.empty(encoded.num_rows, np.float64)
    for chunk, sums in pending:
        scores[chunk] = np.asarray(sums, np.float64)[: len(chunk)]
    return scores


def _pack(encoded: EncodedSet, rows: np.ndarray, batch: int, length: int):
    input_ids = np.full((batch, length), encoded.pad_id, np.int32)
    targets = np.zeros((batch, length), np.int32)
    mask = np.zeros((batch, length), bool)
    segment_ids = np.zeros((batch, length), np.int32)
    for b, row in enumerate(rows):
        ids, row_mask = encoded.token_ids[row], encoded.target_mask[row]
        n = len(ids) - 1
        input_ids[b, :n] = ids[:-1]
        targets[b, :n] = ids[1:]
        mask[b, :n] = row_mask[1:]
        segment_ids[b, :n] = 1
    positions = np.broadcast_to(np.arange(length, dtype=np.int32), (batch, length))
    return input_ids, segment_ids, positions, targets, mask


# ---------------------------------------------------------------------------- decisions


def choose(scores: np.ndarray) -> int:
    """Index of the chosen candidate: the first maximum, NaN counting as maximal.

    Same as the pipeline's torch.max(...).indices (compute_results.py::rank_and_evaluate):
    a tie between the good candidate and another goes to the good one (counted correct),
    e.g. the 7 BLiMP pairs whose two sentences are identical (docs/evaluation.md#ties).
    """
    return int(np.argmax(scores))


def aggregate(items: Sequence[MinimalPairItem], correct: np.ndarray
              ) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, int]], float]:
    """Per metadata key and value: accuracy (%) and count; and the mean over UIDs (run.py::process_results)."""
    totals: dict[str, collections.Counter] = {}
    rights: dict[str, collections.Counter] = {}
    for item, ok in zip(items, correct):
        for key, value in item.metadata.items():
            totals.setdefault(key, collections.Counter())[value] += 1
            rights.setdefault(key, collections.Counter())[value] += int(ok)
    accuracy = {key: {v: 100.0 * rights[key][v] / n for v, n in counter.items()} for key, counter in totals.items()}
    counts = {key: dict(counter) for key, counter in totals.items()}
    uid_accuracies = list(accuracy.get("UID", {}).values())
    average = sum(uid_accuracies) / len(uid_accuracies) if uid_accuracies else float("nan")
    return accuracy, counts, average


def identical_candidates(encoded: EncodedSet) -> np.ndarray:
    """bool (items,): every candidate of the item has the good one's token ids and target mask,
    e.g. BLiMP's identical sentences, or words that differ only where the tokenizer gives both
    the unknown token."""
    out = np.zeros(len(encoded.row_start) - 1, bool)
    for i, (lo, hi) in enumerate(zip(encoded.row_start[:-1], encoded.row_start[1:])):
        ids, mask = encoded.token_ids[lo], encoded.target_mask[lo]
        out[i] = all(np.array_equal(ids, encoded.token_ids[r]) and np.array_equal(mask, encoded.target_mask[r])
                     for r in range(lo + 1, hi))
    return out


def decide(items: Sequence[MinimalPairItem], encoded: EncodedSet, flat: np.ndarray, *,
           compiles: int = 0) -> Results:
    """Decisions and aggregates from the row scores of `encoded` (what `score_encoded` returns)."""
    scores = [flat[encoded.row_start[i]:encoded.row_start[i + 1]] for i in range(len(items))]
    chosen = np.array([choose(s) for s in scores], int)
    correct = chosen == 0
    accuracy, counts, average = aggregate(items, correct)
    ties = sum(int(np.sum(s == np.max(s)) > 1) for s in scores)
    nonfinite = sum(int(not np.all(np.isfinite(s))) for s in scores)
    return Results(items, scores, chosen, correct, accuracy, counts, average, ties, nonfinite, encoded.protocol,
                   encoded.image_template, compiles, identical=int(identical_candidates(encoded).sum()))
