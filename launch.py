"""The one entry point: train, inspect-data, cache-images, cache-features, eval, generate, sweep, plot, compare-models,
convert.

    python launch.py train --config configs/tiny.yaml [--workdir DIR] [--set a.b=value ...]
    python launch.py inspect-data --config configs/tiny.yaml [--batches N] [--set ...]
    python launch.py cache-images --config CFG --out DIR [--workers N] [--set ...]
    python launch.py cache-features --config CFG --out DIR [--select patches|cls|mean] [--dtype D] [--set ...]
    python launch.py eval --checkpoint CKPT --task NAME=PATH [...]
    python launch.py generate --checkpoint CKPT (--prompt TEXT [--image IMG] | --inputs FILE) [--max-new-tokens N]
        [--temperature T --top-p P --seed S]
    python launch.py sweep --config A.yaml --config B.yaml [--set ...] --seeds 3 --out DIR [--only ARM:SEED]
    python launch.py plot RUNDIR... --out DIR
    python launch.py compare-models --checkpoint A --checkpoint B --text FILE [--task NAME=PATH ...]
    python launch.py convert {import-hf,import-reference,export-hf,export-babylm} ...

Exit codes: 0 done; 2 a mistake in the input (config, data, checkpoint), printed as one
`error:` line (`--debug` shows the traceback); 128 + the signal number when a run was
stopped by a signal after saving (143 for SIGTERM, 130 for SIGINT), so job scripts can
tell a preempted run from a finished one; 1 an unexpected failure (a bug: full traceback).
"""
from __future__ import annotations

import argparse
import sys


def _config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="YAML experiment file (see configs/)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one config value, e.g. --set optim.lr=1e-3 (repeatable)")


def cmd_inspect_data(args) -> int:
    from jaxllava.config import load_config
    from jaxllava.data.inspect import inspect
    from jaxllava.data.pipeline import DataPipeline
    from jaxllava.data.tokenizer import check_vocabulary

    config = load_config(args.config, args.overrides)
    pipeline = DataPipeline.for_model(config.data, config.model)
    check_vocabulary(pipeline.tokenizer, config.model.lm.vocab_size, f"data.tokenizer={config.data.tokenizer}")
    inspect(pipeline, args.batches, sys.stdout, microbatches_per_step=config.train.grad_accum)
    return 0


def cmd_train(args) -> int:
    from jaxllava.config import load_config
    from jaxllava.train.loop import train

    overrides = list(args.overrides)
    if args.workdir:
        overrides.append(f"train.workdir={args.workdir}")
    config = load_config(args.config, overrides)
    summary = train(config)
    return 128 + summary["signal"] if summary["signal"] is not None else 0


def cmd_cache_images(args) -> int:
    from jaxllava.config import load_config
    from jaxllava.data.image_cache import cache_images, sources_override
    from jaxllava.data.pipeline import image_processing_for
    from jaxllava.errors import ConfigError

    config = load_config(args.config, args.overrides)
    if config.model.vision is None or config.model.vision.kind == "features":
        raise ConfigError(f"{args.config}: the model has no vision tower (model.vision is null or reads features): "
                          f"there are no images to cache")
    processing = image_processing_for(config.data, config.model.vision.image_size)
    result = cache_images(config.data, processing, args.out, workers=args.workers)
    print(f"cached {result.images} images under {args.out}")
    for line in result.skips.summary_lines() if result.skips.total else []:
        print(line)
    print(f"train from the cache with: --set '{sources_override(result.sources)}'")
    return 0


def cmd_cache_features(args) -> int:
    from jaxllava.config import load_config
    from jaxllava.convert.features import cache_features, train_overrides_line

    config = load_config(args.config, args.overrides)
    result = cache_features(config, args.out, select=args.select, dtype=args.dtype, batch_size=args.batch_size)
    print(f"cached the {args.select} features of {result.images} images under {args.out} "
          f"({result.tokens} x {result.hidden_size} per image, {args.dtype})")
    for line in result.skips.summary_lines() if result.skips.total else []:
        print(line)
    print(f"train from the cache with: {train_overrides_line(result)}")
    return 0


def cmd_eval(args) -> int:
    from jaxllava.eval.cli import run_eval

    return run_eval(args)


def cmd_generate(args) -> int:
    from jaxllava.generate import run_generate

    return run_generate(args)


def cmd_sweep(args) -> int:
    from jaxllava.experiments.sweep import run_sweep

    return run_sweep(args.configs, args.overrides, args.seeds, args.out, only=args.only)


def cmd_plot(args) -> int:
    from jaxllava.experiments.plots import plot_runs

    for path in plot_runs(args.runs, args.out):
        print(f"wrote {path}")
    return 0


def cmd_compare_models(args) -> int:
    from jaxllava.experiments.compare import run_compare

    return run_compare(args)


def cmd_convert(args) -> int:
    from jaxllava.convert.cli import run_convert

    return run_convert(args)


def build_parser() -> argparse.ArgumentParser:
    from jaxllava.convert.cli import add_convert_parsers
    from jaxllava.eval.cli import add_eval_arguments
    from jaxllava.generate import add_generate_parser

    parser = argparse.ArgumentParser(prog="launch.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true", help="show the traceback of input errors too")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train (resumes automatically from the workdir's latest checkpoint)")
    _config_args(p)
    p.add_argument("--workdir", help="where the run lives (default: train.workdir of the config)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("inspect-data", help="print the dataset report and the first microbatches as JSON lines")
    _config_args(p)
    p.add_argument("--batches", type=int, default=8, help="microbatches to print (default 8)")
    p.set_defaults(func=cmd_inspect_data)

    p = sub.add_parser("cache-images", help="decode, pad and resize every image once (exact pixels, PNG), "
                                            "and print the --set that trains from the cache")
    _config_args(p)
    p.add_argument("--out", required=True, help="new cache directory (refused if it exists)")
    p.add_argument("--workers", type=int, default=0, help="processes decoding images (default 0: this one)")
    p.set_defaults(func=cmd_cache_images)

    p = sub.add_parser("cache-features", help="run the frozen vision tower once over every image record, store its "
                                              "features (.npy) and print the --set that trains from them")
    _config_args(p)
    p.add_argument("--out", required=True, help="new cache directory (refused if it exists); an interrupted run "
                                                "continues when rerun with the same arguments")
    p.add_argument("--select", choices=("patches", "cls", "mean"), default="patches",
                   help="patches: what the tower gives the resampler (P x E, feature_layer and feature_select as "
                        "configured); cls: the CLS vector of the final output (1 x E); mean: the mean of the final "
                        "output's patch vectors (1 x E) (default patches)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                   help="dtype the features are stored in (default float32)")
    p.add_argument("--batch-size", type=int, default=64,
                   help="images per tower call, split over all local devices (default 64)")
    p.set_defaults(func=cmd_cache_features)

    p = sub.add_parser("eval", help="score minimal pairs (BLiMP format) with a checkpoint")
    add_eval_arguments(p)
    p.set_defaults(func=cmd_eval)

    p = add_generate_parser(sub)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("sweep", help="train every config (arm) x seed, then compare the arms with intervals")
    p.add_argument("--config", dest="configs", action="append", required=True,
                   help="one arm's YAML experiment, named by its file stem (repeat for each arm)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one value in every arm (repeatable)")
    p.add_argument("--seeds", type=int, default=3, help="seeds per arm: train.seed = data.seed = 0 .. N-1 "
                                                         "(default 3)")
    p.add_argument("--out", required=True, help="sweep directory: <arm>/seed_<k> runs, sweep.json, table.txt")
    p.add_argument("--only", metavar="ARM:SEED", help="train just this run (one job of a sweep spread over hosts)")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("plot", help="PNG figures of runs' loss, evaluations, learning rate and modality mix")
    p.add_argument("runs", nargs="+", metavar="RUNDIR", help="jaxllava work directories (each a line per figure)")
    p.add_argument("--out", required=True, help="folder for the PNG files")
    p.set_defaults(func=cmd_plot)

    p = sub.add_parser("compare-models", help="two checkpoints on the same text: per-layer cosine and CKA, "
                                              "next-token KL, per-UID accuracy differences")
    p.add_argument("--checkpoint", action="append", required=True, help="give exactly two: A, then B")
    p.add_argument("--text", required=True, help="plain-text file, one sample per non-empty line")
    p.add_argument("--task", action="append", default=[], metavar="NAME=PATH",
                   help="BLiMP-format minimal pairs to compare per UID (repeatable)")
    p.add_argument("--max-tokens", type=int, default=8192, help="tokens kept for CKA (default 8192)")
    p.add_argument("--out", default="compare_models", help="folder for compare.json and layers.png")
    p.set_defaults(func=cmd_compare_models)

    p = sub.add_parser("convert", help="Hugging Face / reference checkpoints in and out")
    add_convert_parsers(p)
    p.set_defaults(func=cmd_convert)
    return parser


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv  # accepted anywhere on the line, not only before the subcommand
    args = build_parser().parse_args([a for a in argv if a != "--debug"])
    from jaxllava.errors import JaxllavaError

    try:
        return args.func(args)
    except JaxllavaError as error:
        if debug:
            raise
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
