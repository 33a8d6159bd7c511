"""Decode, pad and resize every image of an experiment's data once (exact pixels, PNG).

    python data/cache_images.py --config configs/babylm_reference.yaml --out data/cache224 [--workers 16]

Then train with the `--set data.sources=[...]` line it prints. See jaxllava/data/image_cache.py.
"""
from __future__ import annotations

import argparse

from jaxllava.config import load_config
from jaxllava.data.image_cache import cache_images, sources_override
from jaxllava.data.pipeline import image_processing_for


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--out", required=True)
    parser.add_argument("--workers", type=int, default=0)
    args = parser.parse_args()
    config = load_config(args.config, args.overrides)
    if config.model.vision is None:
        raise SystemExit("the config has no vision tower: there is nothing to cache")
    processing = image_processing_for(config.data, config.model.vision.image_size)
    sources = cache_images(config.data, processing, args.out, workers=args.workers)
    print(f"--set '{sources_override(sources)}'")


if __name__ == "__main__":
    main()
