"""Feature cache: run a frozen vision tower once over every image record, and train without it.

A frozen tower computes the same vectors for an image at every epoch, and is most of an
image step's cost. `cache_features` runs it once over every image record of the config's
`data.sources` and writes, per source, a copy of its record file and `<stem>.features.npy`
whose row i belongs to the copy's i-th image record: what a source's `features:` reads
(jaxllava/data/sources.py::FeatureStore) for a `model.vision.kind: features` model.

What is stored (`select`):
  patches  exactly what the tower hands the resampler, `LlavaModel.vision(pixels)` with the
           configured feature_layer and feature_select: (rows, P, E)
  cls      the CLS vector of the tower's final output (transformers' last_hidden_state[:, 0];
           not the configured feature_layer): (rows, 1, E); a tower without CLS (SigLIP) is refused
  mean     the mean over the patch vectors of that same final output, CLS excluded: (rows, 1, E)
in float32, bfloat16 or float16 (`dtype`; numpy stores bfloat16 as 2-byte void, which the
feature reader views back).

Records and images are read and validated as training reads them (records.read_records_with_raw,
images.load_image with pipeline.image_processing_for's settings): under `on_bad_record: skip` a
bad record or image is counted and its record left out of the copy, under `error` it stops the
run with its DataError. The tower's parameters are those training would start from: those of
`train.init_from`, else the ones training initialises from `train.seed` (the same computation
as `train.setup.create_model`, so a random tiny tower gives the features training computes).

Batches of `batch_size` images (rounded up to a multiple of the local devices) are split over a
data-parallel mesh of all local devices, the tower replicated; the last batch is padded, so the
tower compiles once. Resumable: rows go into preallocated `.npy` files, memory-mapped, in a
hidden `.<out>.partial` sibling of `out`; after each batch its rows are flushed and
`progress.json` records how many images are done, and a rerun with the same arguments continues
from there (other arguments are refused, naming what differs, so a slip never mixes two
settings in one file). The finished cache is assembled, then renamed to `out`. A bad input
(config, record, image) removes the partial directory, so nothing half-written stays behind;
a kill or a crash keeps it for the rerun.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shlex
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Optional, TextIO

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from jaxllava.checkpoint import load_checkpoint_params, resolve_checkpoint
from jaxllava.config import ExperimentConfig, config_differences, config_to_dict
from jaxllava.data.config import SourceConfig
from jaxllava.data.images import ImageProcessing, load_image
from jaxllava.data.pipeline import image_processing_for
from jaxllava.data.records import SkipReport, fingerprint_files, read_records_with_raw
from jaxllava.data.sources import caption_record
from jaxllava.errors import ConfigError, DataError, JaxllavaError
from jaxllava.model.llava import DTYPES, create_model
from jaxllava.model.sharding import activation_sharding, batch_sharding, make_mesh, tree_shardings
from jaxllava.model.vision import VisionTower

SELECTS = ("patches", "cls", "mean")
STORED_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16),
                 "float16": np.dtype(np.float16)}
METADATA = "cache.json"
PROGRESS = "progress.json"
PROGRESS_EVERY = 10  # batches between progress lines
_COPY_ROWS = 4096  # rows copied at a time when skipped images leave a features file shorter


@dataclasses.dataclass
class FeatureCacheResult:
    sources: list[SourceConfig]  # the sources to train from: copies with `features:`, text sources as they were
    tokens: int  # P, feature vectors per image
    hidden_size: int  # E, their width
    images: int  # rows written, over all sources
    skips: SkipReport  # records and images left out under `on_bad_record: skip` (also in cache.json)
    resumed_at: int  # images already done by an interrupted run when this one started (0: a fresh run)

    def overrides(self) -> list[str]:
        """The `--set` values that train from the cache, as JSON (which YAML reads), so paths with
        `: `, `, ` or `#` stay one value: the new `data.sources` and a features `model.vision`."""
        items = []
        for source in self.sources:
            item: dict[str, Any] = {"path": source.path, "format": source.format, "weight": source.weight}
            if source.format == "text":
                item.update(text_unit=source.text_unit, chunk_tokens=source.chunk_tokens)
            if source.features:
                item["features"] = list(source.features)
            items.append(item)
        vision = {"kind": "features", "hidden_size": self.hidden_size, "tokens": self.tokens}
        return [f"data.sources={json.dumps(items)}", f"model.vision={json.dumps(vision)}"]


@dataclasses.dataclass(frozen=True)
class _Job:
    """One image record: the tower's input for one row of its source's features."""

    source: int
    image: str
    where: str  # "<file> record 3", as training names it
    record_id: str


@dataclasses.dataclass
class _Source:
    config: SourceConfig
    stem: Optional[str]  # the copy is <stem><ext> and its features <stem>.features.npy; None: a text source
    extension: str
    entries: list[tuple[str, Optional[int]]]  # (the entry as written, its job index or None)
    jobs: int  # image records: rows allocated for it

    @property
    def copy_name(self) -> str:
        return self.stem + self.extension

    @property
    def features_name(self) -> str:
        return f"{self.stem}.features.npy"


def cache_features(config: ExperimentConfig, out: str, *, select: str = "patches", dtype: str = "float32",
                   batch_size: int = 64, stream: Optional[TextIO] = None) -> FeatureCacheResult:
    """Cache the tower's `select` features of every image record of `config` at `out` (which must
    not exist), continuing an interrupted run of the same arguments; progress lines go to `stream`
    (stdout by default)."""
    stream = sys.stdout if stream is None else stream
    _check_arguments(config, select, dtype, batch_size)
    out = os.path.abspath(out)
    if os.path.lexists(out):
        raise DataError("the cache directory already exists; remove it or choose another --out", file=out,
                        reason="file")
    skips = SkipReport()
    sources, jobs = _read_sources(config, skips)
    processing = image_processing_for(config.data, config.model.vision.image_size)
    mesh = make_mesh(data=-1, devices=jax.local_devices())
    devices = mesh.devices.size
    rows = -(-batch_size // devices) * devices
    graphdef, state, params_from = _tower(config, mesh)
    shape = jax.eval_shape(lambda s, x: _compute(graphdef, select, s, x), state,
                           jax.ShapeDtypeStruct((1, processing.size, processing.size, 3), jnp.float32)).shape[1:]
    settings = _settings(config, sources, processing, select, dtype, rows, params_from, mesh)
    staging = os.path.join(os.path.dirname(out), f".{os.path.basename(out)}.partial")
    progress = _claim(staging, settings, sources)
    # Outside the clean-up below: a partial cache that cannot be reopened is the user's to delete.
    arrays = _open_rows(staging, sources, shape, STORED_DTYPES[dtype], fresh=progress["done"] == 0)
    try:
        resumed_at = progress["done"]
        for entry in progress["skipped"]:
            skips.add(DataError(entry["message"], reason=entry["reason"]))
        if resumed_at:
            print(f"features: continuing an interrupted run at {resumed_at}/{len(jobs)} images ({staging})",
                  file=stream, flush=True)
        run = _Batches(jobs, processing, config.data.on_bad_record, skips, arrays, staging, progress, stream)
        run.go(lambda pixels: _device_features(graphdef, select, state, pixels, mesh), rows, dtype)
        del arrays
        result = FeatureCacheResult(sources=[], tokens=int(shape[0]), hidden_size=int(shape[1]),
                                    images=sum(progress["rows"]), skips=skips, resumed_at=resumed_at)
        vision = config.model.vision
        metadata = {"select": select, "dtype": dtype,
                    "tower": {"kind": vision.kind, "parameters": params_from, "feature_layer": vision.feature_layer,
                              "feature_select": vision.feature_select, "compute_dtype": config.model.dtype},
                    "batch_rows": rows, "features": {"tokens": result.tokens, "hidden_size": result.hidden_size},
                    "image_processing": dataclasses.asdict(processing), "config": config_to_dict(config)}
        result.sources = _finish(staging, out, sources, progress, metadata, result)
    except JaxllavaError:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return result


def _check_arguments(config: ExperimentConfig, select: str, dtype: str, batch_size: int) -> None:
    vision = config.model.vision
    if vision is None or vision.kind == "features":
        raise ConfigError("the model has no vision tower (model.vision is null or reads features): there is no "
                          "tower to compute features with")
    if select not in SELECTS:
        raise ConfigError(f"--select must be one of {', '.join(SELECTS)}, got {select!r}")
    if dtype not in STORED_DTYPES:
        raise ConfigError(f"--dtype must be one of {', '.join(STORED_DTYPES)}, got {dtype!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"--batch-size must be a positive integer, got {batch_size!r}")
    if select == "cls" and not vision.has_cls:
        raise ConfigError(f"--select cls: model.vision.kind {vision.kind} has no CLS token; use --select mean "
                          f"or patches")
    if not config.data.use_images:
        raise ConfigError("data.use_images is false: training reads no image, so there are no features to cache")
    for index, source in enumerate(config.data.sources):
        if source.features:
            raise ConfigError(f"data.sources.{index}.features is set ({', '.join(source.features)}): that "
                              f"source's features are already computed; leave it out of this config")


def _read_sources(config: ExperimentConfig, skips: SkipReport) -> tuple[list[_Source], list[_Job]]:
    """Every source's entries as the copy will hold them, and the image records in order; bad
    records raise or are counted in `skips` exactly as training's reader does."""
    data = config.data
    sources, jobs, taken = [], [], {os.path.splitext(METADATA)[0]}
    for k, source in enumerate(data.sources):
        if source.format == "text":
            sources.append(_Source(source, None, "", [], 0))
            continue
        originals: dict[int, Any] = {}
        entry = None
        if source.format == "captions":
            def entry(raw, originals=originals):
                # The copy keeps the captions file's own entries (strings or objects), not the
                # LLaVA records they stand for; the converted object is alive until written.
                converted = caption_record(raw, with_features=False)
                originals[id(converted)] = raw
                return converted
        pairs = read_records_with_raw(source.path, image_folder=source.image_folder, on_bad_record=data.on_bad_record,
                                      skips=skips, allow_outside=source.allow_outside, entry=entry)
        stem, extension = os.path.splitext(os.path.basename(source.path))
        if stem in taken:
            stem = f"source{k}_{stem}"
        taken.add(stem)
        entries, first = [], len(jobs)
        for record, raw in pairs:
            job = None
            if record.image is not None:
                job = len(jobs)
                jobs.append(_Job(k, record.image, f"{record.file} {record.where}", record.id))
            entries.append((json.dumps(originals.get(id(raw), raw)), job))
        sources.append(_Source(source, stem, extension, entries, len(jobs) - first))
    if not jobs:
        raise DataError("no image record in data.sources: there is nothing to compute features of",
                        field="data.sources", reason="file")
    return sources, jobs


def _tower(config: ExperimentConfig, mesh) -> tuple[Any, Any, str]:
    """(graph, parameters replicated on `mesh`, where they came from) of the tower training would use."""
    init_from = config.train.init_from
    if not init_from:
        graphdef, state = nnx.split(create_model(config.model, mesh, config.train.seed).vision)
        return graphdef, state, f"initialised from train.seed={config.train.seed}"
    stored, params, _ = load_checkpoint_params(init_from)
    if stored.model.vision != config.model.vision:
        raise ConfigError(f"train.init_from={init_from}: its vision tower differs from this config's in "
                          + "; ".join(config_differences(config.model.vision, stored.model.vision, "model.vision"))
                          + " (this config's value first)")
    abstract = nnx.eval_shape(lambda: VisionTower(config.model.vision, dtype=DTYPES[config.model.dtype],
                                                  rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    placed = jax.device_put(params["vision"], nnx.to_pure_dict(tree_shardings(state, mesh)))
    nnx.replace_by_pure_dict(state, placed)
    return graphdef, state, f"train.init_from={resolve_checkpoint(init_from).step_dir}"


def _compute(graphdef, select: str, state, pixels: jax.Array) -> jax.Array:
    tower = nnx.merge(graphdef, state)
    if select == "patches":
        return tower(pixels)
    final = tower.hidden_states(pixels)[-1]
    if tower.final_norm is not None:  # DINOv2 and SigLIP normalise their last_hidden_state, CLIP does not
        final = tower.final_norm(final)
    if select == "cls":
        return final[:, :1]
    patches = final[:, int(tower.config.has_cls):]
    return jnp.mean(patches.astype(jnp.float32), axis=1, keepdims=True)


_compute_jit = jax.jit(_compute, static_argnums=(0, 1))


def _device_features(graphdef, select: str, state, pixels: np.ndarray, mesh) -> np.ndarray:
    # Under the mesh's activation rules, as the train step runs the tower.
    with activation_sharding(mesh):
        placed = jax.device_put(pixels, batch_sharding(mesh, pixels.shape))
        return np.asarray(_compute_jit(graphdef, select, state, placed))


def _settings(config: ExperimentConfig, sources: list[_Source], processing: ImageProcessing, select: str,
              dtype: str, rows: int, params_from: str, mesh) -> dict:
    """Everything that decides the rows' values: a rerun continues only when all of it is unchanged."""
    return {"select": select, "dtype": dtype, "tower parameters": params_from,
            "model.vision": config_to_dict(config.model.vision), "model.dtype": config.model.dtype,
            "data.sources": config_to_dict(config.data.sources), "data.on_bad_record": config.data.on_bad_record,
            "image processing": config_to_dict(dataclasses.asdict(processing)),
            "record files sha256": fingerprint_files([s.config.path for s in sources if s.stem is not None]),
            "batch rows": rows, "devices": f"{mesh.devices.size} {jax.local_devices()[0].platform}"}


def _claim(staging: str, settings: dict, sources: list[_Source]) -> dict:
    """The progress of an interrupted run of the same settings in `staging`, or a fresh start."""
    path = os.path.join(staging, PROGRESS)
    if os.path.isfile(path):
        try:
            with open(path, encoding="utf-8") as f:
                progress = json.load(f)
        except (OSError, ValueError) as error:
            raise ConfigError(f"{path}: the progress record of an interrupted feature cache cannot be read "
                              f"({error}); delete {staging} to start over") from None
        saved, now = progress.get("settings", {}), json.loads(json.dumps(settings))
        if saved != now:
            differences = config_differences(saved, now)
            raise ConfigError(f"{staging} holds an interrupted feature cache of other arguments (saved vs now: "
                              f"{'; '.join(differences)}); rerun with its arguments to continue it, or delete it "
                              f"to start over")
        return progress
    # No progress file: nothing was computed yet (a run stopped while allocating), so start over.
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(staging)
    progress = {"settings": settings, "done": 0, "rows": [0] * len(sources), "skipped": []}
    _save_progress(staging, progress)
    return progress


def _save_progress(staging: str, progress: dict) -> None:
    # Written whole and renamed, so a kill mid-write leaves the previous record.
    path = os.path.join(staging, PROGRESS)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(progress, f)
    os.replace(path + ".tmp", path)


def _rows_path(staging: str, k: int) -> str:
    return os.path.join(staging, f"rows-{k}.npy")


def _open_rows(staging: str, sources: list[_Source], shape, dtype: np.dtype, *, fresh: bool
               ) -> list[Optional[np.ndarray]]:
    """Per source, its preallocated rows (memory-mapped), None for a source without images."""
    arrays = []
    for k, source in enumerate(sources):
        if not source.jobs:
            arrays.append(None)
            continue
        path, expected = _rows_path(staging, k), (source.jobs, *shape)
        if fresh:
            array = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=expected)
        else:
            try:
                array = np.lib.format.open_memmap(path, mode="r+")
            except (OSError, ValueError) as error:
                raise ConfigError(f"{path}: the rows of an interrupted feature cache cannot be opened ({error}); "
                                  f"delete {staging} to start over") from None
            if array.shape != expected or array.dtype.itemsize != dtype.itemsize:
                raise ConfigError(f"{path}: holds {array.dtype} {array.shape}, expected {dtype} {expected}; "
                                  f"delete {staging} to start over")
        # numpy reads bfloat16 back as 2-byte void
        arrays.append(array.view(dtype) if array.dtype != dtype else array)
    return arrays


class _Batches:
    """Decodes the images of batch b + 1 in threads while the devices compute batch b; writes each
    batch's rows, flushes them, then records the progress."""

    def __init__(self, jobs, processing, on_bad_record, skips, arrays, staging, progress, stream):
        self.jobs, self.processing, self.on_bad_record, self.skips = jobs, processing, on_bad_record, skips
        self.arrays, self.staging, self.progress, self.stream = arrays, staging, progress, stream

    def go(self, compute, rows: int, dtype: str) -> None:
        total, start = len(self.jobs), self.progress["done"]
        began, batches = time.monotonic(), 0
        pool = ThreadPoolExecutor(min(8, os.cpu_count() or 1))
        try:
            ahead = self._submit(pool, start, rows)
            for lo in range(start, total, rows):
                current, ahead = ahead, self._submit(pool, lo + rows, rows)
                good = self._loaded(lo, [future.result() for future in current])
                if good:
                    self._write(good, compute, rows, dtype)
                self.progress["done"] = min(lo + rows, total)
                _save_progress(self.staging, self.progress)
                batches += 1
                if batches % PROGRESS_EVERY == 0 or self.progress["done"] == total:
                    self._report(total, start, began)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def _submit(self, pool, lo: int, rows: int) -> list:
        return [pool.submit(_load, job, self.processing) for job in self.jobs[lo:lo + rows]]

    def _loaded(self, lo: int, loaded: list) -> list[tuple[int, np.ndarray]]:
        good = []
        for index, item in enumerate(loaded, start=lo):
            if isinstance(item, DataError):
                if self.on_bad_record != "skip":
                    raise item
                self.skips.add(item)
                self.progress["skipped"].append({"job": index, "reason": item.reason, "message": str(item)})
            else:
                good.append((index, item))
        return good

    def _write(self, good: list[tuple[int, np.ndarray]], compute, rows: int, dtype: str) -> None:
        pixels = np.zeros((rows, *good[0][1].shape), np.float32)  # the padding rows are computed and dropped
        for r, (_, image) in enumerate(good):
            pixels[r] = image
        with np.errstate(over="ignore"):  # a value float16 cannot hold is reported below, naming its image
            values = compute(pixels)[:len(good)].astype(STORED_DTYPES[dtype])
        finite = np.isfinite(values.astype(np.float32).reshape(len(good), -1)).all(axis=1)
        touched = set()
        for (index, _), row, ok in zip(good, values, finite):
            job = self.jobs[index]
            if not ok:
                raise DataError(f"the tower's features of this image are not finite in {dtype} (float16 holds "
                                f"magnitudes up to 65504): use --dtype float32 or bfloat16", file=job.image,
                                record=job.where, record_id=job.record_id, field="image", reason="bad_features")
            self.arrays[job.source][self.progress["rows"][job.source]] = row
            self.progress["rows"][job.source] += 1
            touched.add(job.source)
        for k in touched:
            self.arrays[k].flush()

    def _report(self, total: int, start: int, began: float) -> None:
        done = self.progress["done"]
        rate = (done - start) / max(time.monotonic() - began, 1e-9)
        print(f"features: {done}/{total} images ({100 * done // total}%), {len(self.progress['skipped'])} "
              f"skipped, {rate:.1f} images/s", file=self.stream, flush=True)


def _load(job: _Job, processing: ImageProcessing):
    """The image's pixels, or its DataError (returned: the batch decides whether it is skipped)."""
    try:
        return load_image(job.image, processing, record=job.where, record_id=job.record_id)
    except DataError as error:
        return error


def _finish(staging: str, out: str, sources: list[_Source], progress: dict, metadata: dict,
            result: FeatureCacheResult) -> list[SourceConfig]:
    """Assemble the cache in `staging/out` (again from the start if a kill stopped it there), rename
    it to `out`, and return the sources that train from it."""
    assembly = os.path.join(staging, "out")
    shutil.rmtree(assembly, ignore_errors=True)
    os.mkdir(assembly)
    failed = {entry["job"] for entry in progress["skipped"]}
    trained, described = [], []
    for k, source in enumerate(sources):
        if source.stem is None:  # a text source has no image: it trains from its own files
            trained.append(source.config)
            described.append({"path": source.config.path, "format": "text"})
            continue
        lines = [line for line, job in source.entries if job is None or job not in failed]
        with open(os.path.join(assembly, source.copy_name), "w", encoding="utf-8") as f:
            if source.extension.lower() == ".jsonl":
                f.writelines(line + "\n" for line in lines)
            else:
                f.write("[" + ",\n".join(lines) + "]\n")
        rows = progress["rows"][k]
        features = ()
        if rows:
            _final_rows(_rows_path(staging, k), os.path.join(assembly, source.features_name), rows)
            features = (os.path.join(out, source.features_name),)
        trained.append(SourceConfig(path=os.path.join(out, source.copy_name), weight=source.config.weight,
                                    format=source.config.format, features=features))
        described.append({"path": source.config.path, "format": source.config.format, "copy": source.copy_name,
                          "records": len(lines), "features": source.features_name if rows else None,
                          "rows": rows})
    result.sources = trained
    metadata.update(sources=described, images=result.images, set=result.overrides(),
                    skipped={"total": result.skips.total, "counts": dict(result.skips.counts),
                             "examples": result.skips.examples})
    with open(os.path.join(assembly, METADATA), "w", encoding="utf-8") as f:
        json.dump(metadata, f, indent=2)
        f.write("\n")
    if os.path.lexists(out):  # made by someone else while this ran: renaming over it could replace it
        raise DataError("the cache directory appeared while the features were computed; remove it or choose "
                        "another --out", file=out, reason="file")
    os.rename(assembly, out)
    shutil.rmtree(staging, ignore_errors=True)
    return trained


def _final_rows(rows_path: str, target: str, rows: int) -> None:
    """The first `rows` rows of the preallocated file as a .npy of exactly that many: the same file
    (a hard link) when every image was good, else a copy of those rows."""
    array = np.load(rows_path, mmap_mode="r")
    if array.shape[0] == rows:
        try:
            os.link(rows_path, target)
            return
        except OSError:  # a file system without hard links
            pass
    copy = np.lib.format.open_memmap(target, mode="w+", dtype=array.dtype, shape=(rows, *array.shape[1:]))
    for lo in range(0, rows, _COPY_ROWS):
        copy[lo:lo + _COPY_ROWS] = array[lo:min(lo + _COPY_ROWS, rows)]
    copy.flush()
    del copy, array


def train_overrides_line(result: FeatureCacheResult) -> str:
    """The `--set` arguments that train from the cache, quoted for a POSIX shell."""
    return " ".join(f"--set {shlex.quote(value)}" for value in result.overrides())

