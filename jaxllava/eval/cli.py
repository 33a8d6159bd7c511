"""`python launch.py eval`: score BabyLM's zero-shot tasks with a jaxllava checkpoint.

    python launch.py eval --checkpoint runs/tiny --task blimp=evaluation_data/full_eval/blimp_filtered \\
        [--task ewok=.../ewok_filtered] [--image-template none --image-template "<image>\\n{text}"] \\
        [--protocol 2025|2024] [--batch-size 64] [--dtype float32|bfloat16] [--out DIR]
    python launch.py eval --checkpoint runs/tiny --suite babylm2025 --data-root evaluation_data \\
        [--image-source vqa=DIR --image-source winoground=DIR] [--out DIR]

--suite: every task of the set found under --data-root, each with its own reader, the image
tasks with and without vision, results also in the pipeline's tree (suite.py).

--checkpoint: a work directory (its latest complete step), a step directory or a
`milestones/chck_<N>M` entry; the model and the tokenizer come from the checkpoint.
--task NAME=PATH: a `*.jsonl` file or a directory of them, BLiMP/supplement, EWoK, VQA or
Winoground (told apart by their fields, evaluator.py); NAME names the outputs; image tasks
read their images from --image-source NAME=PATH (default images/ beside the file). --image-template:
"none" (bare text) or a template ending in "{text}"; repeat it to report settings side
by side; default bare text only. --dtype: the model's compute dtype whatever its
training dtype; default float32, as the official pipeline loads checkpoints in float32
(docs/evaluation.md#precision). bfloat16 runs the layers and the vocabulary projection in bf16
for speed; parameters stay float32 in memory, and the log-softmax and the score sums
are float32. Its scores differ from float32 by bf16 rounding, so near-tied pairs may
flip: report official numbers in float32.

Prints per task the accuracy per UID and field, the macro average over UIDs (the
pipeline's number) beside chance, and the settings side by side; writes into --out
(default `<workdir>/eval/<step>`) `summary.json` and, per task and setting,
`predictions.jsonl`, `summary.json` and the pipeline's `best_temperature_report.txt`
and `predictions.json` (evaluator.MinimalPairEvaluator.write).
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from typing import Optional, Sequence

from jaxllava.errors import ConfigError
from jaxllava.eval.config import check_task_name
from jaxllava.eval.pipeline_layout import TASK_SETS

NONE = "none"


def parse_tasks(specs: Sequence[str]) -> dict[str, str]:
    """["blimp=path", ...] → {"blimp": "path"}; names must be unique and path-safe."""
    tasks: dict[str, str] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not path:
            raise ConfigError(f"--task {spec!r}: expected NAME=PATH")
        try:
            check_task_name(name)
        except ValueError as e:
            raise ConfigError(f"--task {spec!r}: {e}") from None
        if name in tasks:
            raise ConfigError(f"--task {spec!r}: the name {name!r} is given twice")
        tasks[name] = path
    if not tasks:
        raise ConfigError("give at least one --task NAME=PATH")
    return tasks


def parse_image_templates(values: Optional[Sequence[str]]) -> tuple[bool, tuple[str, ...]]:
    """(bare text?, templates) from the repeated --image-template values; none given: bare text only.

    A shell passes "<image>\\n{text}" with a backslash and an "n"; that escape is read as a newline,
    the reference's template (docs/reference.md#evaluation).
    """
    if not values:
        return True, ()
    bare = NONE in values
    templates = tuple(v.replace("\\n", "\n") for v in values if v != NONE)
    return bare, templates


def add_eval_arguments(parser) -> None:
    parser.add_argument("--checkpoint", required=True,
                        help="jaxllava work directory (its latest complete step), step directory, or "
                             "milestones/chck_<N>M entry; the model and tokenizer come from it")
    parser.add_argument("--task", action="append", default=[], metavar="NAME=PATH",
                        help="a BLiMP / supplement / EWoK / VQA / Winoground *.jsonl file or a directory of them; "
                             "NAME (letters, digits, '_', '.', '-') names the outputs (repeatable)")
    parser.add_argument("--suite", choices=sorted(TASK_SETS),
                        help="every task of a BabyLM 2025 task set found under --data-root (instead of --task)")
    parser.add_argument("--data-root", help="with --suite: evaluation_data (or its full_eval / fast_eval), or a "
                                            "folder with a babylm_tasks.json (e.g. data/sample)")
    parser.add_argument("--image-source", action="append", default=[], metavar="NAME=PATH",
                        help="an image task's images: a folder, a features .npy or a save_to_disk directory "
                             "(default: images/ beside the task's file) (repeatable)")
    parser.add_argument("--image-template", action="append", default=None,
                        help='"none" (bare text) or literal text ending in {text}, e.g. "<image>\\n{text}"; '
                             "repeat to report settings side by side (default: bare text only)")
    parser.add_argument("--protocol", choices=["2025", "2024"], default="2025",
                        help="which BabyLM pipeline's scoring to reproduce (default 2025)")
    parser.add_argument("--batch-size", type=int, default=64, help="candidates per device batch (default 64)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                        help="compute dtype (default float32, as the official pipeline)")
    parser.add_argument("--out", help="directory for predictions and summary (default <workdir>/eval/<step>)")


def default_out_dir(checkpoint: str) -> str:
    from jaxllava.checkpoint import resolve_checkpoint

    location = resolve_checkpoint(checkpoint)
    base = location.workdir or os.path.dirname(location.step_dir)
    return os.path.join(base, "eval", str(location.step))


def _load_model(checkpoint: str, dtype: str):
    """(config, model, tokenizer, run record, devices holding the model) of a checkpoint."""
    import jax
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec

    from jaxllava.checkpoint import load_checkpoint_params, model_from_params
    from jaxllava.data.tokenizer import load_tokenizer
    from jaxllava.model.sharding import make_mesh

    config, params, record = load_checkpoint_params(checkpoint)
    tokenizer = load_tokenizer(config.data.tokenizer)
    # Every local device holds the model (BabyLM-sized) and scores its share of each batch's rows.
    everywhere = NamedSharding(make_mesh(data=-1), PartitionSpec())
    model = model_from_params(dataclasses.replace(config.model, dtype=dtype), jax.device_put(params, everywhere))
    devices = len(jax.tree.leaves(nnx.state(model, nnx.Param))[0].sharding.device_set)
    return config, model, tokenizer, record, devices


def _image_processing(config):
    """Pixels for image tasks exactly as the run's training made them; None without a tower."""
    from jaxllava.data.pipeline import image_processing_for

    vision = config.model.vision
    if vision is None or vision.kind == "features":
        return None
    return image_processing_for(config.data, vision.image_size)


def _revision(checkpoint: str) -> str:
    """The pipeline's revision name: chck_<N>M for a milestones/ entry, else main."""
    name = os.path.basename(os.path.normpath(checkpoint)).removesuffix(".json")
    parent = os.path.basename(os.path.dirname(os.path.normpath(checkpoint)))
    return name if parent == "milestones" else "main"


def run_eval(args) -> int:
    if bool(args.task) == bool(args.suite):
        raise ConfigError("give either --task NAME=PATH (repeatable) or --suite with --data-root")
    if args.suite and not args.data_root:
        raise ConfigError(f"--suite {args.suite} needs --data-root (the folder holding the task files)")
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {args.batch_size}")
    image_sources = parse_tasks(args.image_source) if args.image_source else {}
    return _run_suite(args, image_sources) if args.suite else _run_tasks(args, image_sources)


def _run_suite(args, image_sources: dict[str, str]) -> int:
    import jax

    from jaxllava.checkpoint import read_meta, resolve_checkpoint
    from jaxllava.eval.suite import run_suite

    config, model, tokenizer, record, devices = _load_model(args.checkpoint, args.dtype)
    out = args.out or default_out_dir(args.checkpoint)
    started = time.monotonic()
    result = run_suite(model, tokenizer, suite=args.suite, data_root=args.data_root, out=out,
                       workdir=resolve_checkpoint(args.checkpoint).workdir, revision=_revision(args.checkpoint),
                       image_sources=image_sources, image_processing=_image_processing(config),
                       batch_size=args.batch_size)
    meta = read_meta(args.checkpoint)
    result.update(suite=args.suite, data_root=os.path.abspath(args.data_root),
                  checkpoint=os.path.abspath(args.checkpoint), step=meta.get("step"),
                  words_seen=meta.get("words_seen"), dtype=args.dtype, seconds=round(time.monotonic() - started, 3),
                  device=jax.devices()[0].device_kind, devices=devices, run_created=record.get("created"))
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "suite.json"), "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
    print(f"wrote suite.json, per-task outputs and the pipeline's results tree ({result['results_tree']}) "
          f"under {out}", file=sys.stderr)
    return 0


def _run_tasks(args, image_sources: dict[str, str]) -> int:
    import jax

    from jaxllava.checkpoint import read_meta
    from jaxllava.eval.evaluator import MinimalPairEvaluator

    tasks = parse_tasks(args.task)
    bare_text, templates = parse_image_templates(args.image_template)
    config, model, tokenizer, record, model_devices = _load_model(args.checkpoint, args.dtype)
    evaluator = MinimalPairEvaluator(tasks, tokenizer, image_templates=templates, bare_text=bare_text,
                                     protocol=args.protocol, batch_size=args.batch_size,
                                     image_sources=image_sources, image_processing=_image_processing(config))

    started = time.monotonic()
    results = evaluator.evaluate(model)
    seconds = time.monotonic() - started
    print(evaluator.format(results))
    items = sum(len(task.items) for task in evaluator.tasks.values())
    settings = len(evaluator.settings)
    print(f"\n{items} items x {settings} setting(s) scored in {seconds:.1f} s "
          f"({items * settings / seconds:.1f} items/s, compilation included) on {jax.devices()[0].device_kind}")

    out = args.out or default_out_dir(args.checkpoint)
    meta = read_meta(args.checkpoint)
    path = evaluator.write(results, out, extra={
        "checkpoint": os.path.abspath(args.checkpoint), "step": meta.get("step"),
        "words_seen": meta.get("words_seen"), "tokenizer": config.data.tokenizer, "dtype": args.dtype,
        "batch_size": args.batch_size, "seconds": round(seconds, 3), "device": jax.devices()[0].device_kind,
        "devices": model_devices,  # the devices sharing each batch
        "run_created": record.get("created")})
    print(f"wrote {path} and per-task predictions under {out}", file=sys.stderr)
    return 0
