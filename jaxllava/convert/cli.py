"""`python launch.py convert ...`: Hugging Face and reference checkpoints in and out.

    convert import-hf --lm DIR [--vision DIR] [--tokenizer DIR] --config CFG [--set k=v ...] --out CKPT
    convert import-hf --llava DIR [--tokenizer DIR] [--config CFG [--set k=v ...]] --out CKPT
    convert import-reference --dir DIR --out CKPT [--config CFG] [--vision-config DIR]
                             [--image-size N] [--drop-lape]
    convert export-hf --checkpoint CKPT --out DIR [--what lm|llava|reference]

Imports write a new jaxllava work directory (step 0, params only) that `train`
starts from (`train.init_from`) and `eval` scores; exports write a transformers
directory. Outputs appear only when complete (written under a temporary sibling
name, then renamed) and are never overwritten.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, TextIO

from jaxllava.checkpoint import REPORT_JSON
from jaxllava.errors import ConfigError


def add_convert_parsers(parser: argparse.ArgumentParser) -> None:
    """The `convert` subcommands and their arguments (shown by `launch.py convert WHAT -h`)."""
    sub = parser.add_subparsers(dest="what", required=True,
                                metavar="{import-hf,import-reference,export-hf,export-babylm}")
    p = sub.add_parser("import-hf", help="transformers LM (+ vision tower) directories, or a transformers LLaVA "
                                         "directory -> a jaxllava checkpoint")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--lm", help="transformers LlamaForCausalLM directory")
    source.add_argument("--llava", help="transformers LlavaForConditionalGeneration directory (e.g. llava-hf); "
                                        "the whole model, projector included")
    p.add_argument("--vision", help="with --lm: transformers vision tower directory (DINOv2, CLIP, SigLIP)")
    p.add_argument("--tokenizer", help="tokenizer directory (default: the --lm or --llava directory)")
    p.add_argument("--config", help="experiment YAML (data, optim, vision input, resampler and projector kinds); "
                                    "needed with --lm; with --llava only data/optim are read (default: the "
                                    "schema defaults)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config value (repeatable; needs --config)")
    p.add_argument("--out", required=True, help="new jaxllava work directory")

    p = sub.add_parser("import-reference", help="a checkpoint of the PyTorch reference -> a jaxllava checkpoint")
    p.add_argument("--dir", required=True, help="reference checkpoint directory (config.json, model.safetensors, "
                                                "tokenizer)")
    p.add_argument("--out", required=True, help="new jaxllava work directory")
    p.add_argument("--config", help="experiment YAML for data/optim settings (its model section is replaced)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config value (repeatable; needs --config)")
    p.add_argument("--vision-config", help="directory with the DINOv2 tower's config.json (default: inferred "
                                           "from the tensor shapes)")
    p.add_argument("--image-size", type=int, help="vision input size in pixels (default 224, the reference's "
                                                  "processor override)")
    p.add_argument("--drop-lape", action="store_true",
                   help="import a stage-2 checkpoint without its LAPE image-position embeddings")

    p = sub.add_parser("export-hf", help="a jaxllava checkpoint -> a transformers directory")
    p.add_argument("--checkpoint", required=True, help="jaxllava work directory (latest step), step directory or "
                                                       "milestones/chck_<N>M entry")
    p.add_argument("--out", required=True, help="new transformers directory")
    p.add_argument("--what", dest="export_what", choices=["lm", "llava", "reference"], default="lm",
                   help="lm: LlamaForCausalLM (what the BabyLM pipeline loads); llava: the full model as "
                        "transformers' LlavaForConditionalGeneration with its processor; reference: the full "
                        "model in the reference's LlavaLlamaForCausalLM layout")

    from jaxllava.convert.submission import add_export_babylm_parser

    add_export_babylm_parser(sub)


def print_report(report: dict, out: Optional[TextIO] = None) -> None:
    out = out or sys.stdout  # looked up at call time: a test may have replaced it
    if "mapped" in report:  # import-reference
        counts = {}
        for entry in report["mapped"].values():
            counts[entry["component"]] = counts.get(entry["component"], 0) + 1
        print("mapped tensors: " + ", ".join(f"{k} {v}" for k, v in counts.items()), file=out)
        unused = report["unused"]
    else:
        for part in ("lm", "vision"):
            if part in report:
                print(f"{part}: {len(report[part]['mapped'])} tensors mapped from {report[part]['directory']}",
                      file=out)
        unused = {**report.get("lm", {}).get("unused", {}), **report.get("vision", {}).get("unused", {})}
        for name, how in report.get("initialised", {}).items():
            print(f"initialised {name}: {how}", file=out)
    for name, reason in unused.items():
        print(f"unused {name}: {reason}", file=out)
    for note in report.get("notes", []):
        print(f"note: {note}", file=out)


def _run_import_hf(options) -> dict:
    from jaxllava.config import ExperimentConfig, load_config

    if options.overrides and not options.config:
        raise ConfigError("convert import-hf: --set needs --config")
    if options.llava:
        from jaxllava.convert.llava_hf import import_llava

        if options.vision:
            raise ConfigError("convert import-hf: --vision goes with --lm; a --llava directory holds its own tower")
        config = load_config(options.config, options.overrides) if options.config else ExperimentConfig()
        return import_llava(config, options.out, options.llava, options.tokenizer)
    from jaxllava.convert.hf import import_hf

    if not options.config:
        raise ConfigError("convert import-hf --lm: --config is required (it gives the vision input, resampler "
                          "and projector kinds)")
    return import_hf(load_config(options.config, options.overrides), options.out, options.lm, options.vision,
                     options.tokenizer)


def run_convert(options) -> int:
    from jaxllava.config import ExperimentConfig, load_config

    if options.what == "export-babylm":
        from jaxllava.convert.submission import run_export_babylm

        return run_export_babylm(options)
    if options.what == "import-hf":
        report = _run_import_hf(options)
    elif options.what == "import-reference":
        from jaxllava.convert.reference import import_reference

        if options.config:
            config = load_config(options.config, options.overrides)
        elif options.overrides:
            raise ConfigError("convert import-reference: --set needs --config")
        else:
            config = ExperimentConfig()
        report = import_reference(options.dir, options.out, config=config, vision_config_dir=options.vision_config,
                                  image_size=options.image_size, drop_lape=options.drop_lape)
    else:
        if options.export_what == "lm":
            from jaxllava.convert.hf import export_lm as export
        elif options.export_what == "llava":
            from jaxllava.convert.llava_hf import export_llava as export
        else:
            from jaxllava.convert.reference import export_reference as export
        report = export(options.checkpoint, options.out)
    print_report(report)
    if options.what.startswith("import"):
        print(f"wrote {os.path.abspath(options.out)} (report: {os.path.join(options.out, REPORT_JSON)})")
    else:
        print(f"wrote {report['out']} ({report['tensors']} tensors)")
    return 0
