"""`launch.py compare-models`: two checkpoints on the same text, layer by layer.

    python launch.py compare-models --checkpoint A --checkpoint B --text FILE [--task NAME=PATH ...]
        [--max-tokens 8192] [--out DIR]

The text file's non-empty lines are the samples, each `[BOS] + tokens` as scoring encodes a
sentence (text only: no image is involved). Both models must share the tokenizer and the number
of decoder layers. Per layer (the embeddings, each decoder layer's output, the final norm):
- cosine: the mean over tokens of the cosine similarity of the two models' hidden states
  (only when both have the same width);
- CKA: linear centred kernel alignment (Kornblith et al., 2019) of the two token × width matrices,
  on the first --max-tokens tokens; 1 for states equal up to rotation and scale.
Over the whole text: the mean KL(A ‖ B) of the next-token distributions at every token.
With --task (BLiMP-format minimal pairs): each model's accuracy per UID and the difference B − A.
Prints the tables and writes `compare.json` and `layers.png` into --out.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxllava.errors import ConfigError, DataError
from jaxllava.model.llama import rope_cos_sin, rope_inverse_frequencies

BUCKET = 64  # rows are padded to a multiple of this: few shapes, one compile each


def read_text_lines(path: str, tokenizer) -> list[np.ndarray]:
    if not os.path.isfile(path):
        raise DataError("no such text file", file=path, field="--text")
    with open(path, encoding="utf-8") as f:
        lines = [line.strip() for line in f if line.strip()]
    if not lines:
        raise DataError("the text file has no non-empty line to compare the models on", file=path, field="--text")
    bos = tokenizer.bos_token_id
    encoded = tokenizer(lines, add_special_tokens=False)["input_ids"]
    return [np.asarray(([bos] if bos is not None else []) + ids, np.int32) for ids in encoded]


def _states(graphdef, state, input_ids, segment_ids, positions):
    """Every layer's hidden states (L + 2, B, T, D) float32 and the next-token log-probs (B, T, V)."""
    lm = nnx.merge(graphdef, state).lm
    cos, sin = rope_cos_sin(positions, rope_inverse_frequencies(lm.config))
    x = lm.embed(input_ids)
    states = [x]
    for layer in lm.layers:
        x = layer(x, cos=cos, sin=sin, segment_ids=segment_ids)
        states.append(x)
    final = lm.norm(x)
    states.append(final)
    return jnp.stack([s.astype(jnp.float32) for s in states]), jax.nn.log_softmax(lm.logits(final), axis=-1)


_STATES = jax.jit(_states, static_argnums=0)


def linear_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Linear CKA of (N, Dx) and (N, Dy) representations of the same N tokens."""
    x = x - x.mean(axis=0)
    y = y - y.mean(axis=0)
    cross = np.linalg.norm(x.T @ y) ** 2
    return float(cross / (np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y)))


@dataclasses.dataclass
class _Totals:
    cosine_sum: np.ndarray  # (layers,)
    tokens: int = 0
    kl_sum: float = 0.0
    kept_a: list = dataclasses.field(default_factory=list)  # per batch (layers, n, D) for CKA
    kept_b: list = dataclasses.field(default_factory=list)
    kept: int = 0


def compare_hidden(model_a, model_b, samples: Sequence[np.ndarray], *, pad_id: int, batch_size: int = 16,
                   max_tokens: int = 8192) -> dict[str, Any]:
    """Per-layer cosine and CKA, and the mean KL(A ‖ B) of next-token distributions, over `samples`."""
    layers = len(model_a.lm.layers)
    if len(model_b.lm.layers) != layers:
        raise ConfigError(f"the models have {layers} and {len(model_b.lm.layers)} decoder layers: a layer-by-layer "
                          f"comparison needs the same depth")
    same_width = model_a.lm.config.hidden_size == model_b.lm.config.hidden_size
    split_a, split_b = nnx.split(model_a), nnx.split(model_b)
    totals = _Totals(cosine_sum=np.zeros(layers + 2))
    length = -(-max(len(s) for s in samples) // BUCKET) * BUCKET
    for start in range(0, len(samples), batch_size):
        rows = samples[start:start + batch_size]
        ids = np.full((batch_size, length), pad_id, np.int32)
        valid = np.zeros((batch_size, length), bool)
        for r, sample in enumerate(rows):
            ids[r, :len(sample)], valid[r, :len(sample)] = sample, True
        positions = np.where(valid, np.arange(length)[None], 0).astype(np.int32)
        states_a, logp_a = _STATES(split_a[0], split_a[1], ids, valid.astype(np.int32), positions)
        states_b, logp_b = _STATES(split_b[0], split_b[1], ids, valid.astype(np.int32), positions)
        _accumulate(totals, np.asarray(states_a)[:, valid], np.asarray(states_b)[:, valid],
                    np.asarray(logp_a)[valid], np.asarray(logp_b)[valid], same_width, max_tokens)
    keep_a, keep_b = np.concatenate(totals.kept_a, axis=1), np.concatenate(totals.kept_b, axis=1)
    names = ["embeddings", *(f"layer {k}" for k in range(1, layers + 1)), "final norm"]
    return {"tokens": totals.tokens, "cka_tokens": totals.kept, "kl_a_b": totals.kl_sum / totals.tokens,
            "layers": [{"layer": name, "cosine": float(c / totals.tokens) if same_width else None,
                        "cka": linear_cka(keep_a[k], keep_b[k])}
                       for k, (name, c) in enumerate(zip(names, totals.cosine_sum))]}


def _accumulate(totals: _Totals, a: np.ndarray, b: np.ndarray, logp_a: np.ndarray, logp_b: np.ndarray,
                same_width: bool, max_tokens: int) -> None:
    """a, b: (layers, n, D) states of the batch's n real tokens; logp: (n, V)."""
    if same_width:
        norms = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
        totals.cosine_sum += np.sum(np.sum(a * b, axis=-1) / np.maximum(norms, 1e-12), axis=-1)
    totals.kl_sum += float(np.sum(np.exp(logp_a) * (logp_a - logp_b)))
    totals.tokens += a.shape[1]
    take = min(a.shape[1], max_tokens - totals.kept)
    if take > 0:
        totals.kept_a.append(a[:, :take])
        totals.kept_b.append(b[:, :take])
        totals.kept += take


def compare_tasks(model_a, model_b, tokenizer, tasks: dict[str, str]) -> dict[str, dict[str, dict[str, float]]]:
    """{task: {UID: {"a": %, "b": %, "b_minus_a": points}}} on BLiMP-format minimal pairs, bare text."""
    from jaxllava.eval.evaluator import TEXT, MinimalPairEvaluator

    evaluator = MinimalPairEvaluator(tasks, tokenizer)
    first, second = evaluator.evaluate(model_a), evaluator.evaluate(model_b)
    table = {}
    for task in tasks:
        acc_a, acc_b = first[task][TEXT].accuracy["UID"], second[task][TEXT].accuracy["UID"]
        table[task] = {uid: {"a": acc_a[uid], "b": acc_b[uid], "b_minus_a": acc_b[uid] - acc_a[uid]}
                       for uid in acc_a}
    return table


def format_report(report: dict) -> str:
    lines = [(f"{report['tokens']} tokens compared ({report['cka_tokens']} for CKA); "
              f"mean KL(A || B) of next-token distributions: {report['kl_a_b']:.4f} nats"),
             f"{'layer':<12} {'cosine':>8} {'CKA':>8}"]
    for row in report["layers"]:
        cosine = "-" if row["cosine"] is None else f"{row['cosine']:.4f}"
        lines.append(f"{row['layer']:<12} {cosine:>8} {row['cka']:>8.4f}")
    for task, uids in report.get("tasks", {}).items():
        lines.append(f"\n{task}: accuracy per UID (%)\n{'UID':<40} {'A':>6} {'B':>6} {'B - A':>7}")
        for uid, row in uids.items():
            lines.append(f"{uid:<40} {row['a']:>6.1f} {row['b']:>6.1f} {row['b_minus_a']:>+7.1f}")
    return "\n".join(lines)


def plot_layers(report: dict, path: str, labels: tuple[str, str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [row["layer"] for row in report["layers"]]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.plot(names, [row["cka"] for row in report["layers"]], "o-", label="linear CKA")
    if report["layers"][0]["cosine"] is not None:
        ax.plot(names, [row["cosine"] for row in report["layers"]], "s--", label="mean cosine")
    ax.set(title=f"{labels[0]} vs {labels[1]} (KL {report['kl_a_b']:.3f} nats)", ylabel="similarity",
           ylim=(min(0.0, *(r["cka"] for r in report["layers"])), 1.05))
    ax.tick_params(axis="x", rotation=30)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_compare(args) -> int:
    from jaxllava.checkpoint import load_checkpoint_params, model_from_params
    from jaxllava.data.tokenizer import load_tokenizer
    from jaxllava.eval.cli import parse_tasks
    from jaxllava.eval.scoring import pad_id

    if len(args.checkpoint) != 2:
        raise ConfigError(f"give exactly two --checkpoint, got {len(args.checkpoint)}")
    models, tokenizers = [], []
    for checkpoint in args.checkpoint:
        config, params, _ = load_checkpoint_params(checkpoint)
        models.append(model_from_params(dataclasses.replace(config.model, dtype="float32"), params))
        tokenizers.append(load_tokenizer(config.data.tokenizer))
    if tokenizers[0].get_vocab() != tokenizers[1].get_vocab():
        raise ConfigError("the two checkpoints have different tokenizers: their hidden states are not on the "
                          "same tokens")
    samples = read_text_lines(args.text, tokenizers[0])
    report = compare_hidden(*models, samples, pad_id=pad_id(tokenizers[0]), max_tokens=args.max_tokens)
    if args.task:
        report["tasks"] = compare_tasks(*models, tokenizers[0], parse_tasks(args.task))
    report["checkpoints"] = [os.path.abspath(c) for c in args.checkpoint]
    print(format_report(report))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "compare.json"), "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)
    plot_layers(report, os.path.join(args.out, "layers.png"), ("A", "B"))
    print(f"wrote compare.json and layers.png under {args.out}")
    return 0
