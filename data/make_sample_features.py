"""Compute the BabyLM miniature's caption features from the bundled images (offline).

    python data/make_sample_features.py [--out data/sample/babylm/captions_features.npy]

Runs `launch.py cache-features` on `configs/tiny.yaml` (the tiny DINOv2-style tower,
initialised from train.seed, every image record kept), its sources narrowed to
`data/sample/captions.json`, with `--select mean`, and stores
the result the way BabyLM ships its DINOv2 states: float32 `(N, D)`, one global vector
per caption, row i for caption i of `data/sample/babylm/captions.json` (whose captions
are those of `data/sample/captions.json`, in the same order). `configs/tiny_features.yaml`
trains on it. Run `data/make_sample_data.py` first when the images change.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys
import tempfile

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "data" / "sample" / "babylm" / "captions_features.npy"
CAPTIONS = ROOT / "data" / "sample" / "captions.json"


def sample_features() -> np.ndarray:
    """(N, D) float32 mean-pooled tiny-tower features of the bundled caption images."""
    sys.path.insert(0, str(ROOT))
    from jaxllava.config import load_config
    from jaxllava.convert.features import cache_features

    # tiny.yaml also trains on qa.json (the same images, asked about): one row per caption only.
    only_captions = f"data.sources={json.dumps([{'path': str(CAPTIONS)}])}"
    config = load_config(str(ROOT / "configs" / "tiny.yaml"), ["data.validation_fraction=0", only_captions])
    with tempfile.TemporaryDirectory() as tmp:
        result = cache_features(config, str(pathlib.Path(tmp) / "cache"), select="mean", dtype="float32")
        (captions,) = [s for s in result.sources if s.features]
        features = np.concatenate([np.load(path) for path in captions.features])
    return features.reshape(len(features), -1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=pathlib.Path, default=DEFAULT_OUT)
    out = parser.parse_args().out
    features = sample_features()
    np.save(out, features)
    print(f"wrote {out}: {features.shape[0]} x {features.shape[1]} {features.dtype}")


if __name__ == "__main__":
    main()
