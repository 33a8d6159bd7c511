"""`python launch.py convert ...`: Hugging Face and reference checkpoints in and out.

    convert import-hf --lm DIR [--vision DIR] [--tokenizer DIR] --config CFG [--set k=v ...] --out CKPT
    convert import-reference --dir DIR --out CKPT [--config CFG] [--vision-config DIR]
                             [--image-size N] [--drop-lape]
    convert export-hf --checkpoint CKPT --out DIR [--what lm|reference]

Imports write a new jaxllava work directory (step 0, params only) that `train`
starts from (`train.init_from`) and `eval` scores; exports write a transformers
directory. Outputs appear only when complete (written under a temporary sibling
name, then renamed) and are never overwritten.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import TextIO

from jaxllava.checkpoint import REPORT_JSON
from jaxllava.errors import ConfigError


def _parser(what: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"launch.py convert {what}")
    if what == "import-hf":
        parser.add_argument("--lm", required=True, help="transformers LlamaForCausalLM directory")
        parser.add_argument("--vision", help="transformers vision tower directory (DINOv2, CLIP, SigLIP)")
        parser.add_argument("--tokenizer", help="tokenizer directory (default: the --lm directory)")
        parser.add_argument("--config", required=True, help="experiment YAML (data, optim, vision input, "
                                                            "resampler and projector kinds)")
        parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
        parser.add_argument("--out", required=True, help="new jaxllava work directory")
    elif what == "import-reference":
        parser.add_argument("--dir", required=True, help="reference checkpoint directory (config.json, "
                                                         "model.safetensors, tokenizer)")
        parser.add_argument("--out", required=True, help="new jaxllava work directory")
        parser.add_argument("--config", help="experiment YAML for data/optim settings (model section replaced)")
        parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
        parser.add_argument("--vision-config", help="directory with the DINOv2 tower's config.json "
                                                    "(default: inferred from the tensor shapes)")
        parser.add_argument("--image-size", type=int, help="vision input size in pixels (default 224, the "
                                                           "reference's processor override)")
        parser.add_argument("--drop-lape", action="store_true",
                            help="import a stage-2 checkpoint without its LAPE image-position embeddings")
    else:
        parser.add_argument("--checkpoint", required=True, help="jaxllava work directory, step or milestone")
        parser.add_argument("--out", required=True, help="new transformers directory")
        parser.add_argument("--what", choices=["lm", "reference"], default="lm",
                            help="lm: LlamaForCausalLM (BabyLM pipeline); reference: the full model in the "
                                 "reference's LlavaLlamaForCausalLM layout")
    return parser


def print_report(report: dict, out: TextIO = sys.stdout) -> None:
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


def run_convert(args) -> int:
    from jaxllava.config import ExperimentConfig, load_config

    options = _parser(args.what).parse_args(args.rest)
    if args.what == "import-hf":
        from jaxllava.convert.hf import import_hf

        config = load_config(options.config, options.overrides)
        report = import_hf(config, options.out, options.lm, options.vision, options.tokenizer)
    elif args.what == "import-reference":
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
        if options.what == "lm":
            from jaxllava.convert.hf import export_lm as export
        else:
            from jaxllava.convert.reference import export_reference as export
        report = export(options.checkpoint, options.out)
    print_report(report)
    if args.what.startswith("import"):
        print(f"wrote {os.path.abspath(options.out)} (report: {os.path.join(options.out, REPORT_JSON)})")
    else:
        print(f"wrote {report['out']} ({report['tensors']} tensors)")
    return 0
