"""Start-up at BabyLM scale: time to the first microbatch and peak memory, by corpus size.

    python benchmarks/startup.py [--sizes 10 50 100] [--format llava|text] [--epochs 4] [--images 20000]
    python benchmarks/startup.py --sizes 1 5            # a quick run
    python benchmarks/startup.py --padding [--samples 1000000]   # packing: padding and time

For each size (millions of words) it writes, once, under --workdir: plain-text lines with
BabyLM-like lengths (a mix of child-directed, subtitle, book and encyclopedia-like lines, about
9 words a line), as LLaVA JSONL text-only records (--format llava) or as `.train` files
(--format text), plus --images image-caption records (a few small PNGs, reused), and a word-level
tokenizer (data/make_sample_data.py's writer). Then, in a fresh subprocess per run, it times
`DataPipeline` and the first `next(iterator)`, then walking every microbatch's stats (what
train/setup.py::plan_steps reads), and reports the peak RSS after each.

Each size runs twice: "cold" then "warm". Where DataConfig has `table_cache`, the first run
starts from an empty cache and the second finds it; without it, the second run only finds the
files in the OS cache. Figures go in benchmarks/RESULTS.md with the command and the machine.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCABULARY = 8192  # distinct words of the generated text
IMAGE_TOKENS = 16
IMAGE_SIZE = 32
BUCKETS = (128, 256, 512, 1024, 2048)


# ---------------------------------------------------------------- data


def line_words(rng: np.random.Generator, n: int) -> np.ndarray:
    """Words per line, like BabyLM's text half: mostly short utterances, a tail of long lines."""
    kind = rng.choice(4, size=n, p=[0.45, 0.30, 0.20, 0.05])
    median = np.array([4.0, 7.0, 12.0, 35.0])[kind]
    spread = np.array([0.5, 0.5, 0.7, 0.8])[kind]
    return np.clip(np.round(rng.lognormal(np.log(median), spread)), 1, 1000).astype(np.int64)


def vocabulary() -> list[str]:
    return [f"w{k:x}" for k in range(VOCABULARY)]


def write_corpus(folder: str, million_words: int, fmt: str, images: int, seed: int = 0) -> dict:
    """Write the records once (a `done.json` marks a complete folder); return where they are."""
    done = os.path.join(folder, "done.json")
    if os.path.exists(done):
        with open(done) as f:
            return json.load(f)
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    words = np.array(vocabulary())
    target, written, lines = million_words * 1_000_000, 0, 0
    text_path = os.path.join(folder, "text.jsonl" if fmt == "llava" else "corpus.train")
    with open(text_path, "w") as out:
        while written < target:
            counts = line_words(rng, 200_000)
            counts = counts[:int(np.searchsorted(np.cumsum(counts), target - written, side="left")) + 1]
            ids = words[rng.integers(0, VOCABULARY, int(counts.sum()))]
            ends = np.cumsum(counts)
            texts = [" ".join(ids[e - c:e]) for c, e in zip(counts.tolist(), ends.tolist())]
            if fmt == "llava":  # the words need no JSON escaping
                out.writelines(f'{{"id": "t{lines + k}", "conversations": [{{"from": "human", "value": ""}}, '
                               f'{{"from": "gpt", "value": "{t}"}}]}}\n' for k, t in enumerate(texts))
            else:
                out.writelines(t + "\n" for t in texts)
            written += int(counts.sum())
            lines += len(texts)
    image_path = write_images(folder, images, words, rng)
    tokenizer = os.path.join(folder, "tokenizer")
    if not os.path.isdir(tokenizer):
        sys.path.insert(0, os.path.join(ROOT, "data"))
        import pathlib

        from make_sample_data import write_tokenizer

        write_tokenizer(pathlib.Path(tokenizer), [" ".join(vocabulary())])
    info = {"text": text_path, "format": fmt, "images": image_path, "tokenizer": tokenizer, "words": written,
            "lines": lines, "image_records": images}
    with open(done, "w") as f:
        json.dump(info, f)
    return info


def write_images(folder: str, n: int, words: np.ndarray, rng: np.random.Generator) -> str:
    from PIL import Image

    os.makedirs(os.path.join(folder, "img"), exist_ok=True)
    distinct = 16  # files reused by the records: the records, not the pixels, are what start-up reads
    for k in range(distinct):
        Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(os.path.join(folder, "img", f"{k}.png"))
    path = os.path.join(folder, "images.jsonl")
    with open(path, "w") as out:
        for i in range(n):
            caption = " ".join(words[rng.integers(0, VOCABULARY, int(rng.integers(5, 20)))])
            out.write(json.dumps({"id": f"i{i}", "image": f"img/{i % distinct}.png", "conversations": [
                {"from": "human", "value": "<image>"}, {"from": "gpt", "value": caption}]}) + "\n")
    return path


# ---------------------------------------------------------------- one run (a subprocess)


def peak_rss_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def child(spec: dict) -> dict:
    start = time.perf_counter()
    from jaxllava.data.config import DataConfig, SourceConfig
    from jaxllava.data.pipeline import DataPipeline

    imported = time.perf_counter()
    text = SourceConfig(path=spec["text"], format=spec["format"])
    images = SourceConfig(path=spec["images"])
    settings = dict(sources=(text, images), tokenizer=spec["tokenizer"], objective="plain_lm", buckets=BUCKETS,
                    pack_text=True, text_rows=8, image_rows=8, epochs=spec["epochs"], num_workers=0)
    cached = "table_cache" in {f.name for f in dataclasses.fields(DataConfig)}
    if cached:
        settings["table_cache"] = spec["cache"]
    pipeline = DataPipeline(DataConfig(**settings), image_tokens=IMAGE_TOKENS, image_size=IMAGE_SIZE)
    built = time.perf_counter()
    iterator = pipeline.iterator(num_workers=0)
    next(iterator)
    first = time.perf_counter()
    rss_first = peak_rss_mib()
    microbatches = sum(1 for _ in pipeline.stats())
    walked = time.perf_counter()
    getattr(iterator, "close", lambda: None)()
    return {"import_s": imported - start, "pipeline_s": built - imported, "first_batch_s": first - built,
            "to_first_batch_s": first - start, "peak_rss_first_mib": rss_first, "stats_walk_s": walked - first,
            "peak_rss_mib": peak_rss_mib(), "microbatches": microbatches, "samples": len(pipeline.table),
            "table_cache": cached}


def run_child(spec: dict) -> dict:
    # A PYTHONPATH given comes first, so a copy of another version of jaxllava can be timed.
    path = os.pathsep.join(p for p in (os.environ.get("PYTHONPATH"), ROOT) if p)
    env = dict(os.environ, PYTHONPATH=path, JAX_PLATFORMS="cpu")
    done = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True,
                          env=env, cwd=ROOT)
    if done.returncode:
        raise SystemExit(f"the run failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- packing


def first_fit(order: np.ndarray, lengths: np.ndarray, row_len: int, max_open: int = 64) -> int:
    """Rows made by the packing jaxllava used before (first fit, 64 open rows): the reference."""
    rows: list[int] = []  # space left per row
    open_rows: list[int] = []
    for i in order:
        n = int(lengths[i])
        for k, r in enumerate(open_rows):
            if rows[r] >= n:
                rows[r] -= n
                if rows[r] == 0:
                    open_rows.pop(k)
                break
        else:
            rows.append(row_len - n)
            if rows[-1] > 0:
                open_rows.append(len(rows) - 1)
                if len(open_rows) > max_open:
                    open_rows.pop(0)
    return len(rows)


def next_fit(order: np.ndarray, lengths: np.ndarray, row_len: int) -> int:
    ends = np.cumsum(lengths[order])
    rows, start = 0, 0
    while start < len(ends):
        base = ends[start - 1] if start else 0
        start = int(np.searchsorted(ends, base + row_len, side="right"))
        rows += 1
    return rows


def bundled_lengths() -> np.ndarray:
    """Token lengths of the bundled text records under plain_lm (BOS + words)."""
    with open(os.path.join(ROOT, "data", "sample", "text.jsonl")) as f:
        records = [json.loads(line) for line in f]
    return np.array([1 + len(" ".join(t.get("value", t.get("content", "")) for t in r["conversations"]).split())
                     for r in records])


def padding_report(samples: int) -> None:
    from jaxllava.data.packing import pack_rows

    rng = np.random.default_rng(0)
    cases = [
        ("bundled text records (data/sample), rows of 64", np.tile(bundled_lengths(), 10), 64),
        ("BabyLM-like lines (this script's corpus), rows of 2048", line_words(rng, samples) + 1, 2048),
        ("long-tailed (Pareto 1.2, 3 to 512 tokens), rows of 512",
         np.minimum(np.ceil(rng.pareto(1.2, samples) * 10) + 2, 512).astype(np.int64), 512),
        ("long-tailed (Pareto 1.2, 3 to 2048 tokens), rows of 2048",
         np.minimum(np.ceil(rng.pareto(1.2, samples) * 10) + 2, 2048).astype(np.int64), 2048),
        ("chunks of 300-512 tokens, rows of 2048", rng.integers(300, 513, samples // 10), 2048),
    ]
    print("| lengths | samples | first fit (before) | next fit alone | pack_rows (now) | first fit time | "
          "pack_rows time |")
    print("|---|---|---|---|---|---|---|")
    for name, lengths, row_len in cases:
        order = rng.permutation(len(lengths))
        tokens = int(lengths.sum())
        start = time.perf_counter()
        ff_rows = first_fit(order, lengths, row_len)
        ff_time = time.perf_counter() - start
        start = time.perf_counter()
        _, offsets = pack_rows(order, lengths, row_len)
        new_time = time.perf_counter() - start
        pad = [1 - tokens / (rows * row_len) for rows in (ff_rows, next_fit(order, lengths, row_len),
                                                          len(offsets) - 1)]
        print(f"| {name} | {len(lengths):,} | {pad[0]:.2%} | {pad[1]:.2%} | {pad[2]:.2%} | {ff_time:.2f} s | "
              f"{new_time:.2f} s |")


# ---------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10, 50, 100], help="millions of words")
    parser.add_argument("--format", choices=("llava", "text"), default="llava",
                        help="how the text is stored: LLaVA JSONL text-only records, or .train plain text")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--images", type=int, default=20_000, help="image-caption records beside the text")
    parser.add_argument("--workdir", default=os.path.join(ROOT, "runs", "startup_bench"),
                        help="where the generated corpora (kept between runs) and caches go")
    parser.add_argument("--padding", action="store_true", help="report packing padding and time instead")
    parser.add_argument("--samples", type=int, default=1_000_000, help="samples per --padding case")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    print(f"# {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}")
    if args.padding:
        padding_report(args.samples)
        return
    print("| words | format | run | samples | pipeline | first batch | to first batch | peak RSS then | "
          "stats walk | peak RSS | table cache |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for size in args.sizes:
        folder = os.path.join(args.workdir, f"{size}M-{args.format}")
        info = write_corpus(folder, size, args.format, args.images)
        cache = os.path.join(folder, f"table_cache-{time.time_ns()}")  # empty: the first run is cold
        for run in ("cold", "warm"):
            r = run_child(dict(info, epochs=args.epochs, cache=cache))
            print(f"| {info['words'] / 1e6:.0f}M | {args.format} | {run} | {r['samples']:,} | {r['pipeline_s']:.1f} s "
                  f"| {r['first_batch_s']:.1f} s | {r['to_first_batch_s']:.1f} s | {r['peak_rss_first_mib'] / 1024:.2f} GB "
                  f"| {r['stats_walk_s']:.1f} s | {r['peak_rss_mib'] / 1024:.2f} GB | "
                  f"{'yes' if r['table_cache'] else 'not integrated'} |", flush=True)
        shutil.rmtree(cache, ignore_errors=True)


if __name__ == "__main__":
    main()
