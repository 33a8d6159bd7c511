"""Image loading: pixel parity with Hugging Face's PIL processors, mode conversion, EXIF, padding, errors."""
from __future__ import annotations

import io
import json
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile

from jaxllava.data.images import ImageProcessing, load_image, pad_to_square
from jaxllava.errors import ConfigError, DataError

IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
CLIP_MEAN, CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]

# Preprocessor configs as published with the checkpoints (three JSON styles).
DINOV2_CONFIG = {"image_processor_type": "BitImageProcessor", "crop_size": {"height": 224, "width": 224},
                 "do_center_crop": True, "do_convert_rgb": True, "do_normalize": True, "do_rescale": True,
                 "do_resize": True, "image_mean": IMAGENET_MEAN, "image_std": IMAGENET_STD, "resample": 3,
                 "rescale_factor": 1 / 255, "size": {"shortest_edge": 256}}
CLIP_CONFIG = {"feature_extractor_type": "CLIPFeatureExtractor", "crop_size": 224, "do_center_crop": True,
               "do_normalize": True, "do_resize": True, "image_mean": CLIP_MEAN, "image_std": CLIP_STD,
               "resample": 3, "size": 224}  # old int sizes, no rescale_factor
SIGLIP_CONFIG = {"image_processor_type": "SiglipImageProcessor", "do_normalize": True, "do_rescale": True,
                 "do_resize": True, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "resample": 3,
                 "rescale_factor": 1 / 255, "size": {"height": 384, "width": 384}}


def write_json(path, payload) -> str:
    path.write_text(json.dumps(payload))
    return str(path)


def noise_image(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def as_uint8(pixels: np.ndarray, processing: ImageProcessing) -> np.ndarray:
    """Undo normalisation, back to 0..255 values."""
    return (pixels * np.asarray(processing.std) + np.asarray(processing.mean)) / processing.rescale


def hf_pixels(processor, image: Image.Image) -> np.ndarray:
    return processor(image, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)


@pytest.fixture
def non_square_png(tmp_path):
    path = tmp_path / "wide.png"
    noise_image(61, 37).save(path)
    return path


def test_padded_image_matches_bit_processor_as_the_reference_configured_it(non_square_png):
    """docs/reference.md#image-preprocessing: DINOv2's BitImageProcessor with size 224×224 and crop 224 after expand2square."""
    from transformers import BitImageProcessor

    processing = ImageProcessing(size=224)
    processor = BitImageProcessor(size={"height": 224, "width": 224}, crop_size={"height": 224, "width": 224},
                                  do_center_crop=True, image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD)
    expected = hf_pixels(processor, pad_to_square(Image.open(non_square_png).convert("RGB"), (123, 116, 103)))
    ours = load_image(non_square_png, processing)
    assert ours.shape == (224, 224, 3) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, expected, atol=1e-5, rtol=0)


def test_clip_config_matches_clip_processor_on_the_padded_image(tmp_path, non_square_png):
    from transformers import CLIPImageProcessor

    processing = ImageProcessing.from_preprocessor_config(write_json(tmp_path / "clip.json", CLIP_CONFIG))
    expected = hf_pixels(CLIPImageProcessor(**CLIP_CONFIG),
                         pad_to_square(Image.open(non_square_png).convert("RGB"), processing.background))
    np.testing.assert_allclose(load_image(non_square_png, processing), expected, atol=1e-5, rtol=0)


def test_siglip_config_with_resize_aspect_matches_siglip_processor(tmp_path, non_square_png):
    from transformers import SiglipImageProcessor

    processing = ImageProcessing.from_preprocessor_config(write_json(tmp_path / "siglip.json", SIGLIP_CONFIG),
                                                          aspect="resize")
    expected = hf_pixels(SiglipImageProcessor(**SIGLIP_CONFIG), Image.open(non_square_png))
    np.testing.assert_allclose(load_image(non_square_png, processing), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("config, size, mean, rescale", [
    (DINOV2_CONFIG, 224, IMAGENET_MEAN, 1 / 255),  # crop_size wins over shortest_edge 256
    (CLIP_CONFIG, 224, CLIP_MEAN, 1 / 255),
    ({**CLIP_CONFIG, "crop_size": {"height": 336, "width": 336}, "size": {"shortest_edge": 336}}, 336, CLIP_MEAN,
     1 / 255),
    (SIGLIP_CONFIG, 384, [0.5, 0.5, 0.5], 1 / 255),
    ({**SIGLIP_CONFIG, "rescale_factor": 0.5, "image_mean": 0.25, "image_std": 2.0}, 384, [0.25] * 3, 0.5),
], ids=["dinov2", "clip-int-sizes", "clip-336", "siglip", "scalar-stats"])
def test_preprocessor_config_gives_the_tower_input_size(tmp_path, config, size, mean, rescale):
    processing = ImageProcessing.from_preprocessor_config(write_json(tmp_path / "p.json", config))
    assert (processing.size, processing.mean, processing.rescale, processing.aspect) == (size, tuple(mean),
                                                                                          rescale, "pad")


@pytest.mark.parametrize("change, field", [
    ({"size": {"height": 224, "width": 256}}, "size"),
    ({"resample": 2}, "resample"),
    ({"do_normalize": False}, "do_normalize"),
    ({"size": {"longest_edge": 224}}, "size"),
], ids=["non-square", "bilinear", "no-normalize", "unknown-size"])
def test_preprocessor_config_rejects_what_cannot_be_reproduced(tmp_path, change, field):
    path = write_json(tmp_path / "bad.json", {**SIGLIP_CONFIG, **change})
    with pytest.raises(ConfigError, match=field) as caught:
        ImageProcessing.from_preprocessor_config(path)
    assert "bad.json" in str(caught.value)


def _save(image: Image.Image, path, **params) -> str:
    image.save(path, **params)
    return str(path)


def _palette_image() -> Image.Image:
    image = Image.new("P", (2, 1))
    image.putpalette([10, 20, 30, 200, 100, 50])
    image.putpixel((1, 0), 1)
    return image


def _mode_cases(tmp_path):
    """(file, expected RGB of pixel (0, 0), of pixel (1, 0)); each file is 2×1."""
    rgba = Image.new("RGBA", (2, 1), (200, 100, 50, 0))
    rgba.putpixel((1, 0), (200, 100, 50, 255))
    la = Image.new("LA", (2, 1), (90, 0))
    la.putpixel((1, 0), (90, 255))
    grey = Image.new("L", (2, 1), 77)
    grey.putpixel((1, 0), 200)
    cmyk = Image.new("CMYK", (2, 1), (0, 255, 255, 0))
    cmyk.putpixel((1, 0), (0, 0, 0, 255))
    sixteen = Image.fromarray(np.array([[1000, 51400]], dtype=np.uint16))
    assert sixteen.mode == "I;16"
    return {
        "P": (_save(_palette_image(), tmp_path / "p.png"), (10, 20, 30), (200, 100, 50)),
        # transparent palette entries are composited onto white, like transformers' convert_to_rgb
        "P-transparency": (_save(_palette_image(), tmp_path / "pt.png", transparency=0), (255, 255, 255),
                           (200, 100, 50)),
        "RGBA": (_save(rgba, tmp_path / "rgba.png"), (255, 255, 255), (200, 100, 50)),
        "LA": (_save(la, tmp_path / "la.png"), (255, 255, 255), (90, 90, 90)),
        "L": (_save(grey, tmp_path / "l.png"), (77, 77, 77), (200, 200, 200)),
        "CMYK": (_save(cmyk, tmp_path / "cmyk.tif"), (255, 0, 0), (0, 0, 0)),
        # 16-bit scaled by 255/65535 (1000 -> 4, 51400 -> 200); Pillow's convert would clip both to 255
        "I;16": (_save(sixteen, tmp_path / "i16.png"), (4, 4, 4), (200, 200, 200)),
        "I": (_save(Image.fromarray(np.array([[1000, 51400]], dtype=np.int32)), tmp_path / "i32.tif"), (4, 4, 4),
              (200, 200, 200)),
    }


@pytest.mark.parametrize("mode", ["P", "P-transparency", "RGBA", "LA", "L", "CMYK", "I;16", "I"])
def test_every_mode_converts_to_the_expected_rgb(tmp_path, mode):
    path, first, second = _mode_cases(tmp_path)[mode]
    with Image.open(path) as image:  # the file really is in that mode
        assert image.mode == mode.split("-")[0]
    processing = ImageProcessing(size=2, aspect="resize")  # 2×1 → 2×2 keeps each column's colour
    values = as_uint8(load_image(path, processing), processing)
    np.testing.assert_allclose(values[0, 0], first, atol=1e-3)
    np.testing.assert_allclose(values[0, 1], second, atol=1e-3)


@pytest.mark.parametrize("array, mode", [
    (np.array([[1.0, 0.5]], dtype=np.float32), "F"),
    (np.array([[0, 70000]], dtype=np.int32), "I"),
], ids=["float", "32-bit-int-out-of-16-bit-range"])
def test_ambiguous_modes_are_rejected(tmp_path, array, mode):
    path = _save(Image.fromarray(array), tmp_path / "ambiguous.tif")
    with pytest.raises(DataError, match=f"mode {mode}") as caught:
        load_image(path, ImageProcessing(size=2), record=3, record_id="cap-3")
    assert caught.value.reason == "unsupported_image" and path in str(caught.value)


def test_pad_uses_the_mean_colour_and_centres_the_image(tmp_path):
    processing = ImageProcessing(size=33)  # equal to the long side, so resizing keeps every pixel
    assert processing.background == (123, 116, 103)  # docs/reference.md#image-preprocessing
    colour = (10, 200, 30)
    for size, axis in (((33, 16), 0), ((16, 33), 1)):
        path = _save(Image.new("RGB", size, colour), tmp_path / f"{size[0]}x{size[1]}.png")
        values = np.moveaxis(as_uint8(load_image(path, processing), processing), axis, 0)
        # offset (33 - 16) // 2 = 8: 8 pad lines before the image, 9 after
        np.testing.assert_allclose(values[:8], np.broadcast_to((123, 116, 103), values[:8].shape), atol=1e-3)
        np.testing.assert_allclose(values[8:24], np.broadcast_to(colour, values[8:24].shape), atol=1e-3)
        np.testing.assert_allclose(values[24:], np.broadcast_to((123, 116, 103), values[24:].shape), atol=1e-3)


def test_exif_rotated_jpeg_is_turned_upright(tmp_path):
    stored = Image.new("RGB", (32, 16), (230, 20, 20))  # left half red, right half blue
    stored.paste((20, 20, 230), (16, 0, 32, 16))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation 6: the viewer rotates 90° clockwise, so the left half ends on top
    path = _save(stored, tmp_path / "rotated.jpg", exif=exif, quality=95)
    processing = ImageProcessing(size=32)
    values = as_uint8(load_image(path, processing), processing)
    # upright it is 16 wide × 32 tall: pad columns at the sides, red above blue
    np.testing.assert_allclose(values[:, :7], np.broadcast_to((123, 116, 103), values[:, :7].shape), atol=2)
    assert (values[2:14, 10:22, 0] > 180).all() and (values[2:14, 10:22, 2] < 70).all()
    assert (values[18:30, 10:22, 2] > 180).all() and (values[18:30, 10:22, 0] < 70).all()


def _truncated(image: Image.Image, path, fmt: str, keep: float) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    data = buffer.getvalue()
    path.write_bytes(data[:int(len(data) * keep)])
    return str(path)


@pytest.mark.parametrize("make_file, reason", [
    (lambda d: str(d / "absent.png"), "missing_image"),
    (lambda d: str(d), "missing_image"),  # a directory is not an image file
    (lambda d: _truncated(noise_image(64, 64), d / "cut.png", "PNG", 0.5), "corrupt_image"),
    (lambda d: _truncated(noise_image(64, 64), d / "cut.jpg", "JPEG", 0.6), "corrupt_image"),
    (lambda d: (d / "noise.png").write_bytes(np.random.default_rng(1).bytes(2000)) and str(d / "noise.png"),
     "corrupt_image"),
], ids=["missing", "directory", "truncated-png", "truncated-jpeg", "random-bytes"])
def test_bad_image_file_raises_data_error_naming_file_record_and_field(tmp_path, make_file, reason):
    path = make_file(tmp_path)
    with pytest.raises(DataError) as caught:
        load_image(path, ImageProcessing(size=8), record="line 7", record_id="cap-0007")
    error = caught.value
    assert (error.reason, error.field, error.file, error.record, error.record_id) == (
        reason, "image", path, "line 7", "cap-0007")
    assert all(part in str(error) for part in (path, "line 7", "cap-0007", "'image'"))


def test_loading_refuses_to_run_when_truncated_images_are_allowed(tmp_path, monkeypatch):
    path = _save(Image.new("RGB", (4, 4)), tmp_path / "ok.png")
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(ConfigError, match="LOAD_TRUNCATED_IMAGES"):
        load_image(path, ImageProcessing(size=4))


@pytest.mark.parametrize("kwargs", [{"size": 0}, {"size": 8, "aspect": "crop"}, {"size": 8, "std": (1, 0, 1)},
                                    {"size": 8, "max_pixels": 0}, {"size": 8, "max_pixels": 1.5e6}])
def test_invalid_processing_settings_are_config_errors(kwargs):
    with pytest.raises(ConfigError):
        ImageProcessing(**kwargs)


def png_header_only(path, width: int, height: int) -> str:
    """A valid PNG header declaring width × height, followed by no pixel data: a few bytes on disk."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b""))
    return str(path)


def _never_decode(monkeypatch):
    def never(self):
        raise AssertionError("the image was decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", never)


def test_image_over_the_pixel_budget_is_refused_before_it_is_decoded(tmp_path, monkeypatch):
    path = _save(Image.new("RGB", (400, 300), (10, 20, 30)), tmp_path / "big.png")  # solid: tiny on disk
    _never_decode(monkeypatch)
    with pytest.raises(DataError) as caught:
        load_image(path, ImageProcessing(size=8, max_pixels=400 * 300 - 1), record="line 2", record_id="big")
    error = caught.value
    assert (error.reason, error.field, error.file, error.record, error.record_id) == (
        "too_many_pixels", "image", path, "line 2", "big")
    assert "400×300 = 120000 pixels" in str(error) and "max_pixels=119999" in str(error)


def test_image_exactly_at_the_pixel_budget_is_loaded(tmp_path):
    path = _save(Image.new("RGB", (400, 300), (10, 20, 30)), tmp_path / "big.png")
    assert load_image(path, ImageProcessing(size=8, max_pixels=400 * 300)).shape == (8, 8, 3)


def test_144_megapixel_header_is_refused_by_the_default_budget_without_decoding(tmp_path, monkeypatch):
    path = png_header_only(tmp_path / "bomb.png", 12_000, 12_000)
    assert (tmp_path / "bomb.png").stat().st_size < 100
    _never_decode(monkeypatch)
    with pytest.raises(DataError) as caught:
        load_image(path, ImageProcessing(size=8), record=0, record_id="bomb")
    assert caught.value.reason == "too_many_pixels" and "12000×12000" in str(caught.value)


def test_pillow_decompression_bomb_error_has_the_same_reason(tmp_path, monkeypatch):
    # Above twice its limit Pillow raises inside Image.open, before our budget sees the size.
    path = _save(Image.new("RGB", (100, 100)), tmp_path / "img.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(DataError) as caught:
        load_image(path, ImageProcessing(size=8), record=1, record_id="b")
    assert caught.value.reason == "too_many_pixels" and caught.value.field == "image"


def test_image_processing_for_takes_max_pixels_from_the_config(tmp_path):
    from jaxllava.data.config import DataConfig, ImageConfig
    from jaxllava.data.pipeline import image_processing_for

    cfg = DataConfig(image=ImageConfig(max_pixels=1234))
    assert image_processing_for(cfg, 16).max_pixels == 1234
    from_file = DataConfig(image=ImageConfig(max_pixels=99, preprocessor_config=write_json(tmp_path / "p.json",
                                                                                             SIGLIP_CONFIG)))
    assert image_processing_for(from_file, 16).max_pixels == 99
    assert ImageProcessing(size=8).max_pixels == ImageConfig().max_pixels


def corrupt_image_config(tmp_path, tokenizer, **changes):
    from conftest import image_record, write_json as write_records, write_png

    from jaxllava.data.config import DataConfig, SourceConfig

    (tmp_path / "broken.png").write_bytes(b"not a png at all")
    write_png(str(tmp_path / "ok.png"))
    path = write_records(tmp_path / "recs.json", [image_record(0, "ok.png", "a red circle"),
                                                   image_record(1, "broken.png", "a red circle")])
    return DataConfig(sources=(SourceConfig(path),), tokenizer=tokenizer, buckets=(16,), image_rows=1, **changes)


def test_check_images_stops_a_run_with_a_corrupt_image_at_start(tmp_path, word_tokenizer_dir):
    from jaxllava.data.pipeline import DataPipeline

    cfg = corrupt_image_config(tmp_path, word_tokenizer_dir, check_images=True)
    with pytest.raises(DataError) as caught:
        DataPipeline(cfg, image_tokens=6, image_size=8)
    error = caught.value
    assert (error.reason, error.field, error.file, error.record_id) == (
        "corrupt_image", "image", str(tmp_path / "broken.png"), "i1")
    assert error.record == f"{tmp_path / 'recs.json'} record 1"


def test_check_images_refuses_an_image_over_the_pixel_budget_at_start(tmp_path, word_tokenizer_dir):
    from jaxllava.data.config import ImageConfig
    from jaxllava.data.pipeline import DataPipeline

    cfg = corrupt_image_config(tmp_path, word_tokenizer_dir, check_images=True, image=ImageConfig(max_pixels=50))
    with pytest.raises(DataError) as caught:  # ok.png is 12×8 = 96 pixels, and comes first
        DataPipeline(cfg, image_tokens=6, image_size=8)
    assert (caught.value.reason, caught.value.record_id) == ("too_many_pixels", "i0")


def test_without_check_images_a_corrupt_image_is_found_when_its_batch_is_built(tmp_path, word_tokenizer_dir):
    from jaxllava.data.pipeline import DataPipeline

    pipeline = DataPipeline(corrupt_image_config(tmp_path, word_tokenizer_dir), image_tokens=6, image_size=8)
    assert pipeline.summary.image_samples == 2
    with pytest.raises(DataError, match="undecodable"):
        [pipeline.builder(plan) for plan in pipeline.plans]


def test_check_images_under_skip_counts_the_bad_image(tmp_path, word_tokenizer_dir):
    from jaxllava.data.pipeline import DataPipeline

    cfg = corrupt_image_config(tmp_path, word_tokenizer_dir, check_images=True, on_bad_record="skip")
    pipeline = DataPipeline(cfg, image_tokens=6, image_size=8)
    assert pipeline.table.ids == ["i0"] and dict(pipeline.skips.counts) == {"corrupt_image": 1}
