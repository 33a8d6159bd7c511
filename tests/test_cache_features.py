"""`cache-features`: the frozen tower's features of every image record, computed once; resumable
after a kill; bad data handled as training handles it; the printed `--set` trains from the cache."""
from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from conftest import image_record, text_record, write_json

import launch
from jaxllava.checkpoint import load_checkpoint_params, model_from_params, write_params_checkpoint
from jaxllava.config import load_config
from jaxllava.convert import features as features_module
from jaxllava.convert.features import cache_features
from jaxllava.data.batch import FeatureBatch, ImageBatch, batch_arrays
from jaxllava.data.images import load_image
from jaxllava.data.pipeline import DataPipeline, image_processing_for
from jaxllava.errors import ConfigError, DataError
from jaxllava.model.sharding import make_mesh
from jaxllava.model.llava import create_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny.yaml")
P, E = 16, 64  # the tiny tower: 32 px, 8 px patches → 4×4 patch vectors of width 64


def make_data(folder, *, bad: bool = False) -> list[str]:
    """Three sources: LLaVA records (images, a text-only record, an extra field), captions with
    image files, and a plain-text file; 9 image records in all. `bad`: a corrupt image (i1), a
    missing one (i3) and an invalid JSON line, which `skip` leaves out."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(9):
        Image.fromarray(rng.integers(0, 255, (20 + 3 * i, 40 - 2 * i, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    if bad:
        (folder / "1.png").write_bytes(b"not a png at all")
        os.remove(folder / "3.png")
    records = [image_record(i, f"{i}.png", "a red circle") for i in range(5)]
    records.insert(1, text_record(0, "the dog runs ."))
    records[3]["origin"] = {"keep": [1, 2]}
    lines = [json.dumps(r) for r in records]
    if bad:
        lines.insert(4, '{"id": "cut", "conversations": [')
    (folder / "caps.jsonl").write_text("\n".join(lines) + "\n")
    write_json(folder / "more.json", [{"caption": "two blue squares", "image": f"{i}.png", "id": f"c{i}"}
                                      for i in range(5, 9)])
    (folder / "text.train").write_text("the cat sees a dog .\nthe dogs run .\n")
    return [json.dumps([{"path": str(folder / "caps.jsonl"), "weight": 2.0},
                        {"path": str(folder / "more.json"), "format": "captions"},
                        {"path": str(folder / "text.train"), "format": "text", "weight": 0.5}])]


def tiny(folder, tokenizer, *extra, bad: bool = False) -> list[str]:
    return [f"data.sources={make_data(folder, bad=bad)[0]}", f"data.tokenizer={tokenizer}",
            "data.validation_fraction=0.0", *extra]


def read_records(path) -> list:
    with open(path, encoding="utf-8") as f:
        return json.load(f) if str(path).endswith(".json") else [json.loads(line) for line in f]


def read_features(path) -> np.ndarray:
    array = np.load(path)
    return array.view(ml_dtypes.bfloat16) if array.dtype == np.dtype("V2") else array


def cached(out) -> dict[str, np.ndarray]:
    """{record id: its feature row}, pairing each copy's i-th image record with row i."""
    rows = {}
    for name, fmt in (("caps.jsonl", "llava"), ("more.json", "captions")):
        entries = read_records(out / name)
        images = [e["id"] for e in entries if fmt == "captions" or e.get("image") is not None]
        array = read_features(out / f"{name.split('.')[0]}.features.npy")
        assert len(images) == array.shape[0]
        rows.update(zip(images, array))
    return rows


def direct(tower, pixels: np.ndarray, batch: int, select: str) -> np.ndarray:
    """The tower's output computed here, in batches of `batch` (the last one padded with zeros, as
    the cache pads it): XLA's float results depend on the batch shape, not on the code path."""
    def run(x):
        if select == "patches":
            return tower(x)
        final = tower.final_norm(tower.hidden_states(x)[-1])
        return final[:, :1] if select == "cls" else jnp.mean(final[:, 1:].astype(jnp.float32), axis=1, keepdims=True)

    run = jax.jit(run)
    padded = np.zeros((-(-len(pixels) // batch) * batch, *pixels.shape[1:]), np.float32)
    padded[:len(pixels)] = pixels
    return np.concatenate([np.asarray(run(padded[i:i + batch])) for i in range(0, len(padded), batch)])[:len(pixels)]


IMAGES = [f"i{i}" for i in range(5)] + [f"c{i}" for i in range(5, 9)]


def pixels_of(folder, config, ids) -> np.ndarray:
    processing = image_processing_for(config.data, config.model.vision.image_size)
    return np.stack([load_image(str(folder / f"{int(i[1:])}.png"), processing) for i in ids])


def test_patches_are_what_the_tower_gives_the_resampler_and_the_copies_keep_every_record(
        tmp_path, word_tokenizer_dir):
    config = load_config(TINY, tiny(tmp_path, word_tokenizer_dir))
    result = cache_features(config, str(tmp_path / "cache"), batch_size=4)
    out = tmp_path / "cache"
    assert sorted(os.listdir(out)) == ["cache.json", "caps.features.npy", "caps.jsonl", "more.features.npy",
                                       "more.json"]
    assert (result.images, result.tokens, result.hidden_size, result.resumed_at) == (9, P, E, 0)
    assert read_features(out / "caps.features.npy").shape == (5, P, E)
    assert read_features(out / "caps.features.npy").dtype == np.float32
    # every record, text-only too, with every field; the images are still named
    assert read_records(out / "caps.jsonl") == read_records(tmp_path / "caps.jsonl")
    assert read_records(out / "more.json") == read_records(tmp_path / "more.json")

    tower = create_model(config.model, make_mesh(), config.train.seed).vision
    expected = direct(tower, pixels_of(tmp_path, config, IMAGES), 4, "patches")
    rows = cached(out)
    for k, record_id in enumerate(IMAGES):
        np.testing.assert_array_equal(rows[record_id], expected[k])

    metadata = json.loads((out / "cache.json").read_text())
    assert metadata["select"] == "patches" and metadata["dtype"] == "float32"
    assert metadata["tower"]["parameters"] == "initialised from train.seed=0" and metadata["images"] == 9
    assert metadata["features"] == {"tokens": P, "hidden_size": E}
    assert [s.get("rows") for s in metadata["sources"]] == [5, 4, None]
    assert metadata["config"]["model"]["vision"]["kind"] == "dinov2"
    sources = json.loads(result.overrides()[0].partition("=")[2])
    assert sources[2] == {"path": str(tmp_path / "text.train"), "format": "text", "weight": 0.5,
                          "text_unit": "line", "chunk_tokens": 512}  # no image: trains from its own file
    assert [s["weight"] for s in sources] == [2.0, 1.0, 0.5]
    assert sources[0]["features"] == [str(out / "caps.features.npy")] and sources[1]["format"] == "captions"


@pytest.mark.parametrize("select, dtype", [("cls", "bfloat16"), ("mean", "float16")])
def test_cls_and_mean_read_the_final_output_whatever_the_feature_layer(tmp_path, word_tokenizer_dir, select, dtype):
    # feature_layer 1: the resampler gets the first block's output, but cls and mean read the last
    # block's, final-normed (transformers' last_hidden_state).
    config = load_config(TINY, tiny(tmp_path, word_tokenizer_dir, "model.vision.feature_layer=1"))
    result = cache_features(config, str(tmp_path / "cache"), select=select, dtype=dtype, batch_size=3)
    assert (result.tokens, result.hidden_size) == (1, E)
    rows = cached(tmp_path / "cache")
    assert rows["i0"].shape == (1, E) and rows["i0"].dtype == np.dtype(dtype if dtype == "float16" else
                                                                       ml_dtypes.bfloat16)
    tower = create_model(config.model, make_mesh(), config.train.seed).vision
    expected = direct(tower, pixels_of(tmp_path, config, IMAGES), 3, select).astype(rows["i0"].dtype)
    for k, record_id in enumerate(IMAGES):
        np.testing.assert_array_equal(rows[record_id], expected[k])
    assert json.loads(result.overrides()[1].partition("=")[2]) == {"kind": "features", "hidden_size": E, "tokens": 1}


def test_cls_is_refused_for_a_tower_without_one(tmp_path, word_tokenizer_dir):
    config = load_config(TINY, tiny(tmp_path, word_tokenizer_dir, "model.vision.kind=siglip"))
    with pytest.raises(ConfigError, match="--select cls: model.vision.kind siglip has no CLS token"):
        cache_features(config, str(tmp_path / "cache"), select="cls")
    assert not [name for name in os.listdir(tmp_path) if "cache" in name]


class Killed(BaseException):
    """Stands for the process being killed: not an input error, so the partial cache stays."""


def kill_after(monkeypatch, batches: int) -> None:
    """The next cache run is killed after `batches` batches are recorded, its next batch's rows
    written but not yet recorded (the progress record is the last write of a batch)."""
    real_save, saves = features_module._save_progress, []

    def save(staging, progress):
        saves.append(progress["done"])
        if len(saves) == batches + 2:  # the start, `batches` batches, then killed
            monkeypatch.setattr(features_module, "_save_progress", real_save)
            raise Killed
        real_save(staging, progress)

    monkeypatch.setattr(features_module, "_save_progress", save)


def test_a_killed_run_continues_where_it_stopped_and_equals_an_uninterrupted_run(
        tmp_path, word_tokenizer_dir, monkeypatch, capsys):
    data = tmp_path / "data"
    data.mkdir()
    config = load_config(TINY, tiny(data, word_tokenizer_dir, "data.on_bad_record=skip", bad=True))
    whole = cache_features(config, str(tmp_path / "whole"), batch_size=2)

    kill_after(monkeypatch, 2)
    with pytest.raises(Killed):
        cache_features(config, str(tmp_path / "resumed"), batch_size=2)
    assert not (tmp_path / "resumed").exists() and (tmp_path / ".resumed.partial").is_dir()

    with pytest.raises(ConfigError, match=r"\.resumed\.partial holds an interrupted feature cache of other "
                                          r"arguments.*select: 'patches' vs 'mean'"):
        cache_features(config, str(tmp_path / "resumed"), select="mean", batch_size=2)
    assert (tmp_path / ".resumed.partial" / "progress.json").is_file()

    real_load, loaded = features_module.load_image, []

    def counted(path, *args, **kwargs):
        loaded.append(os.path.basename(path))
        return real_load(path, *args, **kwargs)

    monkeypatch.setattr(features_module, "load_image", counted)
    capsys.readouterr()
    resumed = cache_features(config, str(tmp_path / "resumed"), batch_size=2)
    assert resumed.resumed_at == 4 and "continuing an interrupted run at 4/8 images" in capsys.readouterr().out
    # i3's file is missing, which the reader finds: 8 image records, the first 4 done before the kill.
    assert loaded == ["5.png", "6.png", "7.png", "8.png"]
    assert not (tmp_path / ".resumed.partial").exists()
    for name in ("caps.jsonl", "more.json", "caps.features.npy", "more.features.npy"):
        assert (tmp_path / "whole" / name).read_bytes() == (tmp_path / "resumed" / name).read_bytes(), name
    assert resumed.skips.counts == whole.skips.counts == {"corrupt_image": 1, "missing_image": 1, "json": 1}
    first, second = (json.loads((tmp_path / d / "cache.json").read_text()) for d in ("whole", "resumed"))
    assert first["skipped"] == second["skipped"] and first["images"] == second["images"] == 7


@pytest.mark.parametrize("damage, match", [
    ("progress.json", "progress record of an interrupted feature cache cannot be read"),
    ("rows-0.npy", "rows of an interrupted feature cache cannot be opened"),
])
def test_a_damaged_partial_cache_is_named_and_left_to_the_user(tmp_path, word_tokenizer_dir, monkeypatch,
                                                               damage, match):
    data = tmp_path / "data"
    data.mkdir()
    config = load_config(TINY, tiny(data, word_tokenizer_dir))
    kill_after(monkeypatch, 1)
    with pytest.raises(Killed):
        cache_features(config, str(tmp_path / "cache"), batch_size=4)
    (tmp_path / ".cache.partial" / damage).write_bytes(b"{truncated")
    with pytest.raises(ConfigError, match=f"{match}.*delete .*\\.cache\\.partial to start over"):
        cache_features(config, str(tmp_path / "cache"), batch_size=4)
    assert (tmp_path / ".cache.partial" / damage).read_bytes() == b"{truncated"


@pytest.mark.parametrize("extra, kwargs, match", [
    (["model.vision=null"], {}, "no vision tower"),
    (["model.vision.kind=features"], {}, "no vision tower"),
    (["data.use_images=false"], {}, "data.use_images is false"),
    ([], {"select": "max"}, "--select must be one of patches, cls, mean"),
    ([], {"dtype": "int8"}, "--dtype must be one of float32, bfloat16, float16"),
    ([], {"batch_size": 0}, "--batch-size must be a positive integer"),
])
def test_arguments_that_cannot_give_features_are_refused_before_any_work(tmp_path, word_tokenizer_dir, extra, kwargs,
                                                                          match):
    config = load_config(TINY, tiny(tmp_path, word_tokenizer_dir, *extra))
    with pytest.raises(ConfigError, match=match):
        cache_features(config, str(tmp_path / "cache"), **kwargs)
    assert not [name for name in os.listdir(tmp_path) if "cache" in name]


def test_a_source_that_already_has_features_or_no_image_record_is_refused(tmp_path, word_tokenizer_dir):
    make_data(tmp_path)
    np.save(tmp_path / "f.npy", np.zeros((4, E), np.float32))
    sources = [{"path": str(tmp_path / "more.json"), "format": "captions", "features": str(tmp_path / "f.npy")}]
    config = load_config(TINY, [f"data.sources={json.dumps(sources)}", f"data.tokenizer={word_tokenizer_dir}"])
    with pytest.raises(ConfigError, match=r"data\.sources\.0\.features is set .*f\.npy"):
        cache_features(config, str(tmp_path / "cache"))
    text_only = [{"path": str(tmp_path / "text.train"), "format": "text"}]
    config = load_config(TINY, [f"data.sources={json.dumps(text_only)}", f"data.tokenizer={word_tokenizer_dir}"])
    with pytest.raises(DataError, match="no image record in data.sources") as caught:
        cache_features(config, str(tmp_path / "cache"))
    assert caught.value.field == "data.sources"
    assert not [name for name in os.listdir(tmp_path) if "cache" in name]


def test_skip_leaves_out_exactly_what_training_skips(tmp_path, word_tokenizer_dir):
    config = load_config(TINY, tiny(tmp_path, word_tokenizer_dir, "data.on_bad_record=skip", bad=True))
    result = cache_features(config, str(tmp_path / "cache"), batch_size=4)
    training = DataPipeline.for_model(config.data, config.model)
    assert result.skips.counts == training.skips.counts == {"corrupt_image": 1, "missing_image": 1, "json": 1}
    assert "1.png" in result.skips.examples["corrupt_image"][0]
    kept = [record["id"] for record in read_records(tmp_path / "cache" / "caps.jsonl")]
    assert kept == ["i0", "t0", "i2", "i4"]
    rows = cached(tmp_path / "cache")
    assert sorted(rows) == ["c5", "c6", "c7", "c8", "i0", "i2", "i4"]
    # The good images are packed into fewer batches than their records: same values, batch-shaped bits.
    tower = create_model(config.model, make_mesh(), config.train.seed).vision
    ids = ["i0", "i2", "i4", "c5", "c6", "c7", "c8"]
    expected = direct(tower, pixels_of(tmp_path, config, ids), 4, "patches")
    for k, record_id in enumerate(ids):
        np.testing.assert_allclose(rows[record_id], expected[k], rtol=1e-5, atol=1e-5)
    metadata = json.loads((tmp_path / "cache" / "cache.json").read_text())
    assert metadata["skipped"]["total"] == 3 and metadata["images"] == 7


def test_error_policy_stops_at_the_bad_image_and_leaves_nothing(tmp_path, word_tokenizer_dir):
    data = tmp_path / "data"
    data.mkdir()
    config = load_config(TINY, tiny(data, word_tokenizer_dir))
    (data / "6.png").write_bytes(b"not a png at all")
    with pytest.raises(DataError) as caught:
        cache_features(config, str(tmp_path / "cache"), batch_size=2)
    assert (caught.value.reason, caught.value.record_id, caught.value.field) == ("corrupt_image", "c6", "image")
    assert str(data / "more.json") in str(caught.value)
    assert os.listdir(tmp_path) == ["data"]


def test_an_existing_output_is_refused_untouched(tmp_path, word_tokenizer_dir):
    config = load_config(TINY, tiny(tmp_path, word_tokenizer_dir))
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "mine.txt").write_text("keep me")
    with pytest.raises(DataError, match="already exists") as caught:
        cache_features(config, str(tmp_path / "cache"))
    assert caught.value.file == str(tmp_path / "cache")
    assert os.listdir(tmp_path / "cache") == ["mine.txt"]
    assert not (tmp_path / ".cache.partial").exists()


@pytest.fixture(scope="module")
def loud_checkpoint(tmp_path_factory, word_tokenizer_dir) -> str:
    """A checkpoint of the tiny model from seed 7 whose tower's final norm scales by 1e5, so its
    features overflow float16 and differ from train.seed 0's."""
    folder = tmp_path_factory.mktemp("loud")
    config = load_config(TINY, [f"data.tokenizer={word_tokenizer_dir}"])
    params = params_of_seed(config, seed=7)
    params["vision"]["final_norm"]["scale"] = params["vision"]["final_norm"]["scale"] * 1e5
    return write_params_checkpoint(str(folder / "ckpt"), config, params, word_tokenizer_dir, {"imported_from": "test"})


def params_of_seed(config, seed: int) -> dict:
    from flax import nnx

    model = create_model(config.model, make_mesh(), seed)
    return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))


def test_the_tower_comes_from_init_from_and_a_float16_overflow_is_an_error(
        tmp_path, word_tokenizer_dir, loud_checkpoint):
    config = load_config(TINY, tiny(tmp_path, word_tokenizer_dir, f"train.init_from={loud_checkpoint}"))
    result = cache_features(config, str(tmp_path / "cache"), batch_size=4)
    _, params, _ = load_checkpoint_params(loud_checkpoint)
    tower = model_from_params(config.model, params).vision
    expected = direct(tower, pixels_of(tmp_path, config, IMAGES), 4, "patches")
    rows = cached(tmp_path / "cache")
    for k, record_id in enumerate(IMAGES):
        np.testing.assert_array_equal(rows[record_id], expected[k])
    assert np.abs(expected).max() > 65504
    assert "train.init_from=" in json.loads((tmp_path / "cache" / "cache.json").read_text())["tower"]["parameters"]
    assert result.images == 9

    with pytest.raises(DataError, match="not finite in float16.*--dtype float32 or bfloat16") as caught:
        cache_features(config, str(tmp_path / "half"), dtype="float16", batch_size=4)
    assert caught.value.field == "image" and caught.value.record_id == "i0"
    assert not [name for name in os.listdir(tmp_path) if "half" in name]

    other = load_config(TINY, tiny(tmp_path, word_tokenizer_dir, f"train.init_from={loud_checkpoint}",
                                   "model.vision.feature_layer=1"))
    with pytest.raises(ConfigError, match=r"init_from.*vision tower differs.*model\.vision\.feature_layer: 1 vs -1"):
        cache_features(other, str(tmp_path / "other"))


def test_the_printed_set_trains_from_the_cache_on_the_same_batches(tmp_path, word_tokenizer_dir, capsys,
                                                                   monkeypatch):
    overrides = tiny(tmp_path, word_tokenizer_dir, "data.image_rows=4", "data.text_rows=2", "data.epochs=1")
    monkeypatch.setattr(features_module, "PROGRESS_EVERY", 2)
    argv = ["cache-features", "--config", TINY, "--out", str(tmp_path / "cache"), "--batch-size", "2"]
    for value in overrides:
        argv += ["--set", value]
    assert launch.main(argv) == 0
    out = capsys.readouterr().out
    assert [line.split(",")[0] for line in out.splitlines() if line.startswith("features: ")] == \
        ["features: 4/9 images (44%)", "features: 8/9 images (88%)", "features: 9/9 images (100%)"]
    assert f"cached the patches features of 9 images under {tmp_path / 'cache'} ({P} x {E} per image" in out
    line = next(line for line in out.splitlines() if line.startswith("train from the cache with: "))
    words = shlex.split(line.partition(": ")[2])
    assert words[0::2] == ["--set", "--set"]

    pixels_config = load_config(TINY, overrides)
    features_config = load_config(TINY, overrides + words[1::2])
    assert features_config.model.vision.kind == "features"
    assert (features_config.model.vision.tokens, features_config.model.vision.hidden_size) == (P, E)
    assert features_config.model.image_tokens == pixels_config.model.image_tokens

    from_pixels = DataPipeline.for_model(pixels_config.data, pixels_config.model)
    from_cache = DataPipeline.for_model(features_config.data, features_config.model)
    assert from_cache.table.ids == from_pixels.table.ids and len(from_cache) == len(from_pixels)
    tower = create_model(pixels_config.model, make_mesh(), pixels_config.train.seed).vision
    images = 0
    for a, b in zip(from_pixels.iterator(), from_cache.iterator()):
        assert isinstance(a, ImageBatch) == isinstance(b, FeatureBatch)
        assert a.stats == b.stats
        arrays_a, arrays_b = batch_arrays(a), batch_arrays(b)
        for key in arrays_a.keys() - {"pixels"}:
            np.testing.assert_array_equal(arrays_a[key], arrays_b[key])
        if isinstance(a, ImageBatch):
            real = a.image_rows
            images += int(real.sum())
            from_tower = np.asarray(jax.jit(lambda t, x: t(x))(tower, a.pixels))
            np.testing.assert_allclose(b.features[real], from_tower[real], rtol=1e-5, atol=1e-5)
    assert images == 2 * 5 + 4  # caps.jsonl has weight 2


def test_cache_features_help_describes_every_argument(capsys):
    with pytest.raises(SystemExit) as exit_info:
        launch.main(["cache-features", "-h"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for option in ("--config", "--set", "--out", "--select", "--dtype", "--batch-size"):
        assert any(line.strip().startswith(option) for line in out.splitlines()), (option, out)
    parser = launch.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices["cache-features"]
    assert all(action.help for action in sub._actions)


def test_batches_are_split_over_all_local_devices(tmp_path, word_tokenizer_dir):
    """Two host devices: --batch-size 3 becomes 4 rows, two on each, and gives the one-device values."""
    overrides = tiny(tmp_path, word_tokenizer_dir)
    one = cache_features(load_config(TINY, overrides), str(tmp_path / "one"), batch_size=4)
    script = ("import jax; assert len(jax.local_devices()) == 2\n"
              "from jaxllava.config import load_config\n"
              "from jaxllava.convert.features import cache_features\n"
              f"config = load_config({TINY!r}, {overrides!r})\n"
              f"cache_features(config, {str(tmp_path / 'two')!r}, batch_size=3)\n")
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}
    subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, check=True, capture_output=True)
    assert json.loads((tmp_path / "two" / "cache.json").read_text())["batch_rows"] == 4
    two, reference = cached(tmp_path / "two"), cached(tmp_path / "one")
    assert one.images == 9 and sorted(two) == sorted(reference)
    for record_id in reference:
        np.testing.assert_allclose(two[record_id], reference[record_id], rtol=1e-5, atol=1e-5)


def test_cache_then_train_equals_pixels_then_train_on_tiny_yaml(tmp_path, capsys):
    """The README's tiny run, once from pixels through its frozen tower and once from the features
    cache-features stored: the same batches, the same LM and projector, the same losses."""
    quick = ["train.steps=6", "train.log_every=1", "eval.tasks={}", "eval.at_start=false",
             "logging.tensorboard=false", "logging.progress=false"]
    argv = ["cache-features", "--config", TINY, "--out", str(tmp_path / "cache"), "--batch-size", "8"]
    assert launch.main(argv) == 0
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("train from the cache"))
    from_cache = shlex.split(line.partition(": ")[2])[1::2]

    losses = {}
    for name, extra in (("pixels", []), ("cache", from_cache)):
        workdir = tmp_path / f"run_from_{name}"
        argv = ["train", "--config", TINY, "--workdir", str(workdir)]
        for value in quick + extra:
            argv += ["--set", value]
        assert launch.main(argv) == 0
        rows = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
        losses[name] = [(r["step"], r["image_samples"], r["loss"]) for r in rows if "loss" in r]
    assert len(losses["pixels"]) == 6 and sum(r[1] for r in losses["pixels"]) > 0
    assert [r[:2] for r in losses["cache"]] == [r[:2] for r in losses["pixels"]]
    np.testing.assert_allclose([r[2] for r in losses["cache"]], [r[2] for r in losses["pixels"]], rtol=1e-5)
