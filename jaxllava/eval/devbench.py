"""DevBench (TROG, Visual Vocabulary, THINGS) in process, batched, the tower once per image.

Follows the BabyLM 2025 pipeline's `evaluation_pipeline/devbench/` (`eval.py`, `data_handling.py`,
`comparison/{trog,viz_vocab,things,stats_helper}.py`, `download_data.sh`), laid out as it is under
`evaluation_data/full_eval/devbench/` (never fetched here; the user points at that folder):

  assets/<task>/manifest.csv   one row per trial, columns image1..imageK and text1 (paths relative
                               to assets/<task>/); tasks gram-trog, lex-viz_vocab (4 images, 1 text)
                               and sem-things (1 image per row)
  evals/gram-trog/human.csv     trial, text1, image1..image4: children's choice proportions
  evals/lex-viz_vocab/human.csv text1, age_bin, trial, image1..image4
  evals/sem-things/spose_similarity.mat   `spose_sim`, the human (n, n) similarity matrix

Image–text score (TROG, Visual Vocabulary). The pipeline's class for the BabyLM generative
baselines (`model_classes/babylm_models.py::BabyLMEvalModel.get_all_sim_scores`, GIT/Flamingo)
scores a pair as −(mean token loss) of "The caption for this image is: {text}." given the image,
i.e. the MEAN log-likelihood per token of that prompt. That is the score used here: the prompt's
2025-rule targets (scoring.encode_candidates with the whole prompt as completion: every token
after position 0, special tokens never) after BOS + the image span (image_scoring), summed and
divided by their count. (The pipeline's `model_classes/llava.py` instead reads Yes/No logits of an
instruction prompt, for instruction-tuned LLaVA chat models; it yields two numbers per pair, which
its own trog/viz_vocab comparison cannot read, so it does not apply to a BabyLM-trained model.)
Accuracy = share of trials where image1 scores strictly above the three others (`trog.py`;
ties are wrong).

Human similarity (`stats_helper.py::get_opt_kl`): the model's scores of a trial become a softmax
with inverse temperature β (`softmax_images`: exp(β(x − max)) with the max over the whole table,
which cancels in each row); KL(human ‖ model) per trial with both clipped to [1e-10, 1]
(`kl_divergence`), averaged over the trials present in both tables (`get_mean_kl_img`: joined by
`trial` number, model trial t = manifest row t); β is fitted on [0.025, 40] to minimise the mean
KL, and the figure is exp(−KL) (the pipeline README). Visual Vocabulary fits one β per `age_bin`
(`viz_vocab.py::compare_vv`); its headline here is the mean of exp(−KL) over the age bins. The
pipeline minimises with nlopt's GN_DIRECT_L (200 evaluations, ftol_abs 1e-4); here a 1-D grid of
801 points plus bounded Brent refinement, which reaches the same minimum at least as closely.
Note the trial join is by number, as in the pipeline: the shipped TROG manifest lacks human trials
59 and 60, so its trials 59..76 are compared with the human row of the next-but-one sentence;
`text_mismatches` counts such joined trials so a reader can see it.

THINGS (`things.py`, `stats_helper.py::rsa`): cosine similarities between image embeddings,
then Spearman between the lower triangles (k = −1) of the model's and the human matrix. The image
embedding follows `babylm_models.py::get_all_image_feats`: the mean over every position of the
decoder's last (final-normed) hidden state for the image with the dummy text " " — here the
row BOS + image span (+ whatever the tokenizer makes of " ").

Outputs: `write_devbench` writes our summary and per-task predictions, and `write_pipeline_files`
the files `eval.py` writes under results/<model>/<revision>/zero_shot/devbench/ (no backend
level); `collate_preds.py` reads lex-viz_vocab.npy (trials, 4, 1), gram-trog.npy (trials, 4, 1)
and sem-things_pairwise_sims.npy (n, n).
"""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import functools
import json
import os
import re
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import scipy.io
import scipy.optimize
import scipy.stats
from flax import nnx

from jaxllava.data.images import ImageProcessing, load_image
from jaxllava.data.tokenizer import special_ids
from jaxllava.errors import ConfigError, DataError
from jaxllava.eval import image_scoring
from jaxllava.eval.minimal_pairs import MinimalPairItem
from jaxllava.eval.scoring import on_mesh, encode_candidates
from jaxllava.model.llava import merge_image_features
from jaxllava.model.sharding import activation_sharding

TROG, VISUAL_VOCAB, THINGS = "gram-trog", "lex-viz_vocab", "sem-things"
TASKS = (VISUAL_VOCAB, TROG, THINGS)  # eval.py's order
PROMPT = "The caption for this image is: {text}."  # babylm_models.py
BETA_BOUNDS = (0.025, 40.0)  # stats_helper.py::get_opt_kl
THINGS_HUMAN = "spose_similarity.mat"
THINGS_KEY = "spose_sim"
IMAGES_PER_GROUP = 256  # pixels held on the host at once


# ---------------------------------------------------------------------------- files


@dataclasses.dataclass(frozen=True)
class Manifest:
    path: str
    images: list[tuple[str, ...]]  # per trial, absolute image paths, image1 first
    texts: list[str]  # per trial, text1
    lines: list[int]  # per trial, its (last) line in the file


def read_manifest(path: str, *, images_per_row: int) -> Manifest:
    """A devbench manifest (`data_handling.py::DevBenchDataset`): columns image1..imageK, text1."""
    folder = os.path.dirname(path)
    with open(path, encoding="utf-8-sig", newline="") as f:  # sem-things.csv starts with a BOM
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        columns = [f"image{i}" for i in range(1, images_per_row + 1)]
        found = sorted(c for c in header if re.match("image[0-9]", c))
        for column in [*columns, "text1"]:
            if column not in header:
                raise DataError(f"no column {column!r} (columns: {header})", file=path, record="line 1", field=column)
        if found != sorted(columns):
            raise DataError(f"expected columns {columns}, found {found}", file=path, record="line 1", field="image")
        manifest = Manifest(path, [], [], [])
        for row in reader:
            where = f"line {reader.line_num}"
            for column in [*columns, "text1"]:
                if not (row.get(column) or "").strip():
                    raise DataError("empty cell", file=path, record=where, field=column)
            for column in columns:
                if not os.path.isfile(os.path.join(folder, row[column])):
                    raise DataError(f"no image file {os.path.join(folder, row[column])}", file=path,
                                    record=where, field=column, reason="missing_image")
            manifest.images.append(tuple(os.path.join(folder, row[c]) for c in columns))
            manifest.texts.append(row["text1"])
            manifest.lines.append(reader.line_num)
    if not manifest.texts:
        raise DataError("no trials", file=path)
    return manifest


@dataclasses.dataclass(frozen=True)
class HumanChoices:
    path: str
    trials: np.ndarray  # int (rows,)
    probs: np.ndarray  # float64 (rows, 4): image1..image4
    texts: list[str]
    groups: list[str]  # age_bin per row ("all" without that column)


def read_human_choices(path: str) -> HumanChoices:
    """`evals/<task>/human.csv`: trial, image1..image4 (+ text1, age_bin). An empty probability is 0
    (`get_mean_kl_img`: fillna(0))."""
    columns = ["trial", "image1", "image2", "image3", "image4"]
    trials, probs, texts, groups, seen = [], [], [], [], set()
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f)
        for column in columns:
            if column not in (reader.fieldnames or []):
                raise DataError(f"no column {column!r} (columns: {reader.fieldnames})", file=path,
                                record="line 1", field=column)
        for row in reader:
            where = f"line {reader.line_num}"
            trial = _number(row, "trial", path, where, int)
            group = row.get("age_bin") or "all"
            if (group, trial) in seen:
                raise DataError(f"trial {trial} appears twice" + ("" if group == "all" else f" in age_bin {group}"),
                                file=path, record=where, field="trial")
            seen.add((group, trial))
            trials.append(trial)
            probs.append([_number(row, c, path, where, float) if (row[c] or "").strip() else 0.0 for c in columns[1:]])
            texts.append(row.get("text1") or "")
            groups.append(group)
    if not trials:
        raise DataError("no trials", file=path)
    return HumanChoices(path, np.asarray(trials), np.asarray(probs, np.float64), texts, groups)


def _number(row: dict, column: str, path: str, where: str, kind):
    try:
        return kind(row[column])
    except (TypeError, ValueError):
        raise DataError(f"not a number: {row[column]!r}", file=path, record=where, field=column) from None


def read_things_human(path: str, size: int) -> np.ndarray:
    """The (size, size) human similarity matrix (`things.py`: loadmat(...)["spose_sim"])."""
    try:
        matrix = scipy.io.loadmat(path)[THINGS_KEY]
    except KeyError:
        raise DataError(f"no variable {THINGS_KEY!r}", file=path, field=THINGS_KEY) from None
    if matrix.shape != (size, size):
        raise DataError(f"shape {matrix.shape}, the manifest has {size} images", file=path, field=THINGS_KEY)
    return np.asarray(matrix, np.float64)


# ---------------------------------------------------------------------------- statistics


def softmax_images(scores: np.ndarray, beta: float) -> np.ndarray:
    """stats_helper.py::softmax_images: the max is the whole table's (np.max of a frame)."""
    weights = np.exp(beta * (scores - np.max(scores)))
    return weights / weights.sum(axis=1, keepdims=True)


def kl_divergence(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Per row KL(p ‖ q), both clipped to [1e-10, 1] (stats_helper.py::kl_divergence)."""
    p, q = np.clip(p, 1e-10, 1.0), np.clip(q, 1e-10, 1.0)
    return np.sum(p * np.log(p / q), axis=-1)


def join_trials(human_trials: np.ndarray, model_rows: int) -> tuple[np.ndarray, np.ndarray]:
    """(human row, model row) of every trial in both tables; model trial t is row t − 1 (trog.py)."""
    keep = (human_trials >= 1) & (human_trials <= model_rows)
    return np.flatnonzero(keep), human_trials[keep] - 1


def mean_kl(human_probs: np.ndarray, model_scores: np.ndarray, model_rows: np.ndarray, beta: float) -> float:
    """stats_helper.py::get_mean_kl_img after softmax_images over the whole model table."""
    return float(np.mean(kl_divergence(human_probs, softmax_images(model_scores, beta)[model_rows])))


def fit_temperature(human_probs: np.ndarray, model_scores: np.ndarray, model_rows: np.ndarray) -> tuple[float, float]:
    """(minimal mean KL, β) over β in BETA_BOUNDS: a grid, then bounded Brent around its best point."""
    objective = functools.partial(mean_kl, human_probs, model_scores, model_rows)
    grid = np.linspace(*BETA_BOUNDS, 801)
    values = np.array([objective(b) for b in grid])
    best = int(np.nanargmin(values))
    lo, hi = grid[max(best - 1, 0)], grid[min(best + 1, len(grid) - 1)]
    refined = scipy.optimize.minimize_scalar(objective, bounds=(lo, hi), method="bounded",
                                             options={"xatol": 1e-7})
    if refined.fun < values[best]:
        return float(refined.fun), float(refined.x)
    return float(values[best]), float(grid[best])


def rsa(human: np.ndarray, model: np.ndarray) -> float:
    """Spearman between the strict lower triangles (stats_helper.py::rsa)."""
    lower = np.tril_indices_from(human, k=-1)
    return float(scipy.stats.spearmanr(human[lower], model[lower]).statistic)


def cosine_similarity(x: np.ndarray) -> np.ndarray:
    """sklearn.metrics.pairwise.cosine_similarity(x) (things.py): zero rows stay zero."""
    x = np.asarray(x, np.float64)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    unit = x / np.where(norms == 0, 1.0, norms)
    return unit @ unit.T


# ---------------------------------------------------------------------------- results


@dataclasses.dataclass(frozen=True)
class HumanFit:
    kl: float
    beta: float
    trials: int  # trials in both tables
    text_mismatches: int  # of those, trials whose human text1 differs from the manifest's

    @property
    def human_similarity(self) -> float:
        return float(np.exp(-self.kl))


@dataclasses.dataclass(frozen=True)
class ChoiceResult:
    """TROG or Visual Vocabulary."""
    task: str
    texts: list[str]
    scores: np.ndarray  # float32 (trials, 4): mean log-likelihood per token, image1 first
    correct: np.ndarray  # bool (trials,)
    fits: dict[str, HumanFit]  # per age_bin ("all" for TROG)

    @property
    def accuracy(self) -> float:
        return float(self.correct.mean())

    @property
    def human_similarity(self) -> float:
        return float(np.mean([fit.human_similarity for fit in self.fits.values()]))


@dataclasses.dataclass(frozen=True)
class ThingsResult:
    texts: list[str]
    embeddings: np.ndarray  # float32 (n, D)
    similarities: np.ndarray  # float64 (n, n) cosine
    rsa: float


@dataclasses.dataclass(frozen=True)
class DevbenchResults:
    tasks: dict[str, ChoiceResult | ThingsResult]
    skipped: dict[str, str]  # task -> why

    def headline(self) -> dict[str, float]:
        """Percentages, as the pipeline README's DevBench tables (RSA × 100 too)."""
        out = {}
        for name, result in self.tasks.items():
            if isinstance(result, ThingsResult):
                out[f"devbench/{name}/rsa"] = 100 * result.rsa
            else:
                out[f"devbench/{name}/accuracy"] = 100 * result.accuracy
                out[f"devbench/{name}/human_similarity"] = 100 * result.human_similarity
        return out


# ---------------------------------------------------------------------------- model side


def _check_model(model: Any) -> None:
    vision = model.config.vision
    if vision is None:
        raise ConfigError("DevBench needs a model with a vision input (model.vision is not configured)")
    if vision.kind == "features":
        raise ConfigError("DevBench reads image files; a model without a vision tower (model.vision.kind: "
                          "features) cannot encode them")


def _loader(keys: Sequence[str], processing: ImageProcessing):
    def load(lo: int, hi: int) -> np.ndarray:
        return np.stack([load_image(path, processing, record=f"image {path}") for path in keys[lo:hi]])
    return load


def image_text_scores(model: Any, tokenizer: Any, manifest: Manifest, processing: ImageProcessing, *,
                      batch_size: int = 64, image_batch_size: int = 32) -> np.ndarray:
    """(trials, images) mean log-likelihood per token of PROMPT(text) given each image (module doc)."""
    name = os.path.basename(os.path.dirname(manifest.path))
    items = [MinimalPairItem(f"{name}_{i}", name, (PROMPT.format(text=text),) * len(images),
                             (PROMPT.format(text=text),) * len(images), {"UID": name}, f"{manifest.path}:{line}")
             for i, (text, images, line) in enumerate(zip(manifest.texts, manifest.images, manifest.lines))]
    text = encode_candidates(tokenizer, items)  # same prompt on every row of a trial; rows differ by image
    key_of_row = [path for images in manifest.images for path in images]
    candidates = image_scoring.splice_image_spans(tokenizer, text, key_of_row, model.config.image_tokens)
    sums = image_scoring.score_with_images(model, candidates, _loader(candidates.image_keys, processing),
                                           batch_size=batch_size, image_batch_size=image_batch_size,
                                           images_per_group=IMAGES_PER_GROUP)
    counts = np.array([mask.sum() for mask in text.target_mask])
    if (counts == 0).any():
        raise DataError("the prompt has no token to score", file=manifest.path, field="text1")
    return (sums / counts).reshape(len(items), -1)


def _mean_hidden(graphdef, state, input_ids, visual, image_mask, *, mesh):
    lm = nnx.merge(graphdef, state).lm
    positions = jnp.broadcast_to(jnp.arange(input_ids.shape[1], dtype=jnp.int32), input_ids.shape)
    with contextlib.nullcontext() if mesh is None else activation_sharding(mesh):
        embeds = merge_image_features(lm.embed(input_ids), visual, image_mask)
        hidden = lm.decode(embeds, segment_ids=jnp.ones_like(input_ids), positions=positions)
    return hidden.astype(jnp.float32).mean(axis=1)  # every row has the same length: no padding


@functools.lru_cache(maxsize=None)
def _jitted_mean_hidden(mesh):
    return jax.jit(functools.partial(_mean_hidden, mesh=mesh), static_argnums=0)


def image_embeddings(model: Any, tokenizer: Any, image_paths: Sequence[str], processing: ImageProcessing, *,
                     batch_size: int = 64, image_batch_size: int = 32) -> np.ndarray:
    """(n, D) mean final hidden state over BOS + image span + tokenizer(" ") (module doc), each image
    through the tower once."""
    ids = special_ids(tokenizer)
    text = list(tokenizer(" ", add_special_tokens=True)["input_ids"])
    at = 1 if ids.bos is not None and text[:1] == [ids.bos] else 0
    span = ids.image_span(model.config.image_tokens)
    row = np.asarray(text[:at] + span + text[at:], np.int32)
    image_mask_row = np.zeros(len(row), bool)
    image_mask_row[at:at + len(span)] = True  # the I visual vectors overwrite the whole span (image_scoring._pack)
    graphdef, state, mesh = image_scoring.split_model(model)
    run = _jitted_mean_hidden(mesh)
    step = image_scoring.rows_per_batch(batch_size, len(image_paths), mesh)
    load = _loader(list(image_paths), processing)
    out = []
    for lo in range(0, len(image_paths), IMAGES_PER_GROUP):
        hi = min(lo + IMAGES_PER_GROUP, len(image_paths))
        visual = image_scoring.encode_images(model, load(lo, hi), batch_size=image_batch_size)
        for first in range(0, hi - lo, step):
            rows = min(step, hi - lo - first)
            chunk = visual[first:first + rows]
            if rows < step:
                chunk = jnp.concatenate([chunk, jnp.zeros((step - rows, *chunk.shape[1:]), chunk.dtype)])
            batch = [np.broadcast_to(row, (step, len(row))).copy(),
                     np.broadcast_to(image_mask_row, (step, len(row))).copy()]
            out.append(np.asarray(run(graphdef, state, on_mesh(batch[0], mesh), chunk,
                                      on_mesh(batch[1], mesh)))[:rows])
    return np.concatenate(out).astype(np.float32)


# ---------------------------------------------------------------------------- tasks


def _choice_task(model, tokenizer, root: str, task: str, processing, batch_size: int) -> ChoiceResult:
    manifest = read_manifest(os.path.join(root, "assets", task, "manifest.csv"), images_per_row=4)
    human = read_human_choices(os.path.join(root, "evals", task, "human.csv"))
    scores = image_text_scores(model, tokenizer, manifest, processing, batch_size=batch_size).astype(np.float32)
    correct = np.all(scores[:, :1] > scores[:, 1:], axis=1)  # trog.py: image1 strictly above the others
    fits = {}
    for group in dict.fromkeys(human.groups):  # age bins in file order
        rows = np.flatnonzero(np.asarray(human.groups) == group)
        human_rows, model_rows = join_trials(human.trials[rows], len(scores))
        if len(human_rows) == 0:
            raise DataError(f"no trial number in common with the manifest's 1..{len(scores)}", file=human.path,
                            field="trial")
        kl, beta = fit_temperature(human.probs[rows][human_rows], scores.astype(np.float64), model_rows)
        mismatches = sum(human.texts[rows[h]] not in ("", manifest.texts[m]) for h, m in zip(human_rows, model_rows))
        fits[group] = HumanFit(kl, beta, len(human_rows), int(mismatches))
    return ChoiceResult(task, manifest.texts, scores, correct, fits)


def _things_task(model, tokenizer, root: str, processing, batch_size: int) -> ThingsResult:
    manifest = read_manifest(os.path.join(root, "assets", THINGS, "manifest.csv"), images_per_row=1)
    human = read_things_human(os.path.join(root, "evals", THINGS, THINGS_HUMAN), len(manifest.texts))
    embeddings = image_embeddings(model, tokenizer, [images[0] for images in manifest.images], processing,
                                  batch_size=batch_size)
    similarities = cosine_similarity(embeddings)
    return ThingsResult(manifest.texts, embeddings, similarities, rsa(human, similarities))


def _missing(root: str, task: str) -> Optional[str]:
    human = THINGS_HUMAN if task == THINGS else "human.csv"
    for path in (os.path.join(root, "assets", task, "manifest.csv"), os.path.join(root, "evals", task, human)):
        if not os.path.isfile(path):
            return f"no {path}"
    return None


def evaluate_devbench(model: Any, tokenizer: Any, devbench_dir: str, image_processing: ImageProcessing,
                      batch_size: int = 64) -> DevbenchResults:
    """Every DevBench task whose files are under `devbench_dir` (the pipeline's
    evaluation_data/full_eval/devbench); the others are listed in `skipped`."""
    if not os.path.isdir(devbench_dir):
        raise ConfigError(f"DevBench directory not found: {devbench_dir}")
    if image_processing is None:
        raise ConfigError("DevBench needs image_processing (data.pipeline.image_processing_for)")
    _check_model(model)
    tasks, skipped = {}, {}
    for task in TASKS:
        why = _missing(devbench_dir, task)
        if why:
            skipped[task] = why
        elif task == THINGS:
            tasks[task] = _things_task(model, tokenizer, devbench_dir, image_processing, batch_size)
        else:
            tasks[task] = _choice_task(model, tokenizer, devbench_dir, task, image_processing, batch_size)
    if not tasks:
        raise ConfigError(f"no DevBench task under {devbench_dir}: {'; '.join(skipped.values())}")
    return DevbenchResults(tasks, skipped)


# ---------------------------------------------------------------------------- reports


def format_devbench(results: DevbenchResults) -> str:
    lines = ["DevBench", f"{'task':<15} {'accuracy':>9} {'human sim':>10} {'RSA':>8}"]
    for name, result in results.tasks.items():
        if isinstance(result, ThingsResult):
            lines.append(f"{name:<15} {'':>9} {'':>10} {result.rsa:8.4f}")
            continue
        lines.append(f"{name:<15} {100 * result.accuracy:9.2f} {100 * result.human_similarity:10.2f} {'':>8}")
        for group, fit in result.fits.items():
            label = f"  age_bin {group}" if group != "all" else "  fit"
            note = f", {fit.text_mismatches} joined trials with another text" if fit.text_mismatches else ""
            lines.append(f"{label:<15} KL {fit.kl:.4f}  beta {fit.beta:.3f}  exp(-KL) {fit.human_similarity:.4f}"
                         f"  ({fit.trials} trials{note})")
    lines += [f"skipped {name}: {why}" for name, why in results.skipped.items()]
    return "\n".join(lines)


def summary(results: DevbenchResults) -> dict[str, Any]:
    out: dict[str, Any] = {"skipped": dict(results.skipped)}
    for name, result in results.tasks.items():
        if isinstance(result, ThingsResult):
            out[name] = {"rsa": result.rsa, "images": len(result.texts)}
        else:
            out[name] = {"accuracy": result.accuracy, "human_similarity": result.human_similarity,
                         "trials": len(result.texts),
                         "fits": {group: {**dataclasses.asdict(fit), "human_similarity": fit.human_similarity}
                                  for group, fit in result.fits.items()}}
    return out


def write_devbench(results: DevbenchResults, out_dir: str) -> None:
    """summary.json, a predictions file per task, and the pipeline's files under `pipeline/`
    (see write_pipeline_files for the place collation reads them)."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump(summary(results), f, indent=2)
    for name, result in results.tasks.items():
        with open(os.path.join(out_dir, f"{name}_predictions.jsonl"), "w") as f:
            if isinstance(result, ThingsResult):
                for text, row in zip(result.texts, result.similarities):
                    nearest = [result.texts[j] for j in np.argsort(-row) if result.texts[j] != text][:5]
                    f.write(json.dumps({"text": text, "nearest": nearest}) + "\n")
            else:
                for i, (text, scores, ok) in enumerate(zip(result.texts, result.scores, result.correct)):
                    f.write(json.dumps({"trial": i + 1, "text": text, "scores": scores.tolist(),
                                        "chosen": int(np.argmax(scores)) + 1, "correct": bool(ok)}) + "\n")
    write_pipeline_files(results, os.path.join(out_dir, "pipeline"))
    with open(os.path.join(out_dir, "report.txt"), "w") as f:
        f.write(format_devbench(results) + "\n")


def write_pipeline_files(results: DevbenchResults, directory: str, model_name: str = "model") -> None:
    """What eval.py writes in results/<model>/<revision>/zero_shot/devbench/ (collate_preds.py reads
    the three .npy files: (trials, images, texts) scores and the THINGS pairwise similarities)."""
    os.makedirs(directory, exist_ok=True)
    lines = []
    for name, result in results.tasks.items():
        if isinstance(result, ThingsResult):
            np.save(os.path.join(directory, f"{name}.npy"), result.embeddings)
            np.save(os.path.join(directory, f"{name}_pairwise_sims.npy"), result.similarities.astype(np.float32))
            _write_csv(os.path.join(directory, f"{name}_scores.csv"), ["model", "rsa"], [[model_name, result.rsa]])
            lines.append(f"Things Spearman Correlation: {result.rsa}")
            continue
        np.save(os.path.join(directory, f"{name}.npy"), result.scores[:, :, None])
        rows = [[i, *([group] if name == VISUAL_VOCAB else []), fit.kl, fit.beta, model_name, result.accuracy]
                for i, (group, fit) in enumerate(result.fits.items())]
        header = ["", *(["age_bin"] if name == VISUAL_VOCAB else []), "kl", "beta", "model", "accuracy"]
        csv_name = "lex-vv_scores.csv" if name == VISUAL_VOCAB else f"{name}_models.csv"  # viz_vocab.py, trog.py
        _write_csv(os.path.join(directory, csv_name), header, rows)
        label = "Visual Vocabulary" if name == VISUAL_VOCAB else "TROG"
        lines.append(f"{label} Accuracy: {result.accuracy}")
    with open(os.path.join(directory, "results.txt"), "w") as f:
        f.write("\n".join(lines))


def _write_csv(path: str, header: list, rows: list) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
