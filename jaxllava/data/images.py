"""Image files → normalised (size, size, 3) float32 pixels for the vision tower.

Pipeline, in the order of Hugging Face's slow (PIL) image processors and the
reference (docs/reference.md#image-preprocessing):

1. decode with Pillow and load every byte: a truncated or undecodable file is a
   `DataError`, never completed with grey or replaced by another sample (README
   pitfall 21). Before decoding, the size in the file's header is checked against
   `max_pixels`: a few hundred KB of PNG can hold a 144-megapixel picture that
   takes gigabytes to decode;
2. apply the EXIF orientation, so the pixels are the picture people see;
3. convert to RGB, see `to_rgb`;
4. aspect "pad": pad to a square with the mean colour, original centred
   (LLaVA's `expand2square`, image_aspect_ratio=pad); aspect "resize": squash;
5. bicubic resize to size × size (PIL BICUBIC, as the HF processors do);
6. rescale (1/255) and normalise with the processor's mean and std.
"""
from __future__ import annotations

import dataclasses
import json
import os
import struct
import warnings
import zlib

import numpy as np
from PIL import Image, ImageFile, ImageOps

from jaxllava.data.config import IMAGENET_MEAN, IMAGENET_STD, ImageConfig
from jaxllava.errors import ConfigError, DataError

# Exceptions Pillow raises for damaged files (struct/zlib/EOF come from inside plugins).
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error, IndexError)
# data.image.max_pixels decides which pictures are too large, checked right after the header is
# read; Pillow's own warning at its lower limit would only add noise before that error (or
# beside an image the budget allows). Its hard limit (twice the warning's) still applies.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_PIL_BICUBIC = 3  # the `resample` value of HF preprocessor configs that PIL BICUBIC matches


@dataclasses.dataclass(frozen=True)
class ImageProcessing:
    """How a file becomes the tower's input. Defaults: DINOv2 / ImageNet statistics."""

    size: int  # square output side (the tower's input size)
    aspect: str = "pad"  # "pad": pad to square with the mean colour | "resize": squash to square
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    rescale: float = 1 / 255
    # Larger images (width × height) are refused before they are decoded (`data.image.max_pixels`).
    max_pixels: int = ImageConfig.max_pixels

    def __post_init__(self):
        if not isinstance(self.size, int) or self.size <= 0:
            raise ConfigError(f"image size must be a positive integer, got {self.size!r}")
        if isinstance(self.max_pixels, bool) or not isinstance(self.max_pixels, int) or self.max_pixels <= 0:
            raise ConfigError(f"max_pixels must be a positive integer, got {self.max_pixels!r}")
        if self.aspect not in ("pad", "resize"):
            raise ConfigError(f"image aspect must be 'pad' or 'resize', got {self.aspect!r}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ConfigError(f"image mean/std need 3 values and a positive std, got {self.mean}, {self.std}")

    @property
    def background(self) -> tuple[int, int, int]:
        """Pad colour: the mean colour truncated to 8 bit, (123, 116, 103) for ImageNet (LLaVA `expand2square`)."""
        return tuple(int(x * 255) for x in self.mean)

    @classmethod
    def from_preprocessor_config(cls, path: str | os.PathLike, *, aspect: str = "pad") -> "ImageProcessing":
        """Read a Hugging Face `preprocessor_config.json` (BitImageProcessor for DINOv2,
        CLIPImageProcessor, SiglipImageProcessor).

        The output side is the size the tower sees: `crop_size` when the processor
        centre-crops (DINOv2: 224, not its shortest_edge 256; CLIP: 224 or 336),
        otherwise `size` (`height` == `width`, or `shortest_edge`). The image is
        resized straight to that side, never resized then cropped: this is the
        reference's `DINO_PROCESSOR_RESOLUTION=224` override (docs/reference.md#image-preprocessing),
        and for a padded square input CLIP's shortest-edge resize + crop gives the
        same pixels. `do_center_crop` missing means "crop if crop_size is given".
        Sizes may be ints (old CLIP configs) or dicts.
        """
        path = os.fspath(path)
        try:
            with open(path, encoding="utf-8") as f:
                config = json.load(f)
        except (OSError, ValueError) as e:
            raise ConfigError(f"cannot read preprocessor config {path}: {e}") from e
        if not isinstance(config, dict):
            raise ConfigError(f"{path}: a preprocessor config must be a JSON object")
        for flag in ("do_resize", "do_rescale", "do_normalize"):
            if config.get(flag, True) is not True:
                raise ConfigError(f"{path}: field {flag!r} is false; jaxllava always resizes, rescales and normalises")
        if config.get("resample", _PIL_BICUBIC) != _PIL_BICUBIC:
            raise ConfigError(f"{path}: field 'resample' is {config['resample']!r}; only bicubic (3) is supported")
        crops = config.get("do_center_crop", "crop_size" in config)
        key = "crop_size" if crops else "size"
        if key not in config:
            raise ConfigError(f"{path}: missing field {key!r}")
        side = _square_side(config[key], f"{path}: field {key!r}")
        stats = {}
        for name in ("image_mean", "image_std"):
            if name not in config:
                raise ConfigError(f"{path}: missing field {name!r}")
            value = config[name]
            stats[name] = tuple(float(v) for v in (value if isinstance(value, list) else [value] * 3))
        return cls(size=side, aspect=aspect, mean=stats["image_mean"], std=stats["image_std"],
                   rescale=float(config.get("rescale_factor", 1 / 255)))


def _square_side(size, where: str) -> int:
    if isinstance(size, int):
        return size
    if isinstance(size, dict):
        if "height" in size and "width" in size:
            if size["height"] != size["width"]:
                raise ConfigError(f"{where}: {size} is not square; the tower takes square images")
            return int(size["height"])
        if "shortest_edge" in size:
            return int(size["shortest_edge"])
    raise ConfigError(f"{where}: expected an int, {{'height', 'width'}} or {{'shortest_edge'}}, got {size!r}")


class _UnsupportedImage(Exception):
    """A decodable image in a mode whose colours cannot be read unambiguously."""


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB.

    - Transparency (an alpha band, or a palette/colour-key `transparency`) is
      composited onto white, as transformers' `convert_to_rgb` does for every HF
      processor. The reference called plain `.convert("RGB")`, which keeps the
      colour hidden under transparent pixels; for opaque images both agree.
    - 16-bit greyscale ("I;16*", and "I" holding 0..65535, as older Pillow decodes
      16-bit PNGs) is scaled by 255/65535 and rounded; Pillow's own conversion
      clips everything above 255 to white. Colour keys of 16-bit files are ignored.
    - Palette, greyscale, bilevel, CMYK (Pillow's naive, profile-free formula),
      YCbCr, LAB and HSV go through Pillow's converter.
    - 32-bit float ("F") and "I" values outside 0..65535 have no agreed range and
      are rejected.
    """
    if image.mode in _SIXTEEN_BIT_MODES:
        values = np.asarray(image).astype(np.int64)
        if values.size and (values.min() < 0 or values.max() > 65535):
            raise _UnsupportedImage(f"mode {image.mode} values span {values.min()}..{values.max()}, not 16-bit")
        grey = np.rint(values * (255 / 65535)).astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    if image.mode == "F":
        raise _UnsupportedImage("mode F (32-bit float) has no defined colour range")
    try:
        if "A" in image.getbands() or image.info.get("transparency") is not None:
            rgba = image.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(white, rgba).convert("RGB")
        return image.convert("RGB")
    except ValueError as e:  # Pillow has no converter for this mode
        raise _UnsupportedImage(f"mode {image.mode} cannot be converted to RGB: {e}") from e


_EXIF_ORIENTATION = 0x0112


def pad_to_square(image: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """Centre `image` on a square of `background`; offset (long - short) // 2 (LLaVA `expand2square`)."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    square = Image.new("RGB", (side, side), background)
    square.paste(image, ((side - width) // 2, (side - height) // 2))
    return square


class _TooManyPixels(Exception):
    """The picture is larger than the pixel budget; raised before it is decoded."""


def decoded_rgb(path: str | os.PathLike, processing: ImageProcessing, location: dict) -> Image.Image:
    """Steps 1-3: the upright RGB picture at full size; errors as `square_image`."""
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        raise ConfigError("PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True (set by some import); truncated images "
                          "would decode as grey padding, so jaxllava refuses to load images")
    try:
        with Image.open(path) as opened:  # reads the header only
            width, height = opened.size
            if width * height > processing.max_pixels:
                raise _TooManyPixels(f"{width}×{height} = {width * height} pixels, more than "
                                     f"data.image.max_pixels={processing.max_pixels}; refused before decoding")
            opened.load()
            # exif_transpose copies the image even when there is nothing to undo;
            # checking the tag first saves a full-image copy per sample.
            oriented = opened if opened.getexif().get(_EXIF_ORIENTATION, 1) == 1 else ImageOps.exif_transpose(opened)
            return to_rgb(oriented)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as e:
        raise DataError(f"image file not found ({e.strerror})", reason="missing_image", **location) from None
    except _TooManyPixels as e:
        raise DataError(str(e), reason="too_many_pixels", **location) from None
    except Image.DecompressionBombError as e:
        # Pillow's own limit (twice PIL.Image.MAX_IMAGE_PIXELS) refuses some pictures inside
        # `Image.open`, before their size can be compared with ours; they are just as large.
        raise DataError(f"more pixels than Pillow opens ({e}); data.image.max_pixels={processing.max_pixels}",
                        reason="too_many_pixels", **location) from None
    except _UnsupportedImage as e:
        raise DataError(str(e), reason="unsupported_image", **location) from None
    except _DECODE_ERRORS as e:
        raise DataError(f"truncated or undecodable image ({type(e).__name__}: {e})", reason="corrupt_image",
                        **location) from e


# The image `data.text_only_images: black` gives text-only records (an ablation, data/config.py):
# the processor's size, every pixel 0, as the reference's injected black image. No file has this name.
BLACK_IMAGE = "<black image: data.text_only_images=black>"


def check_image(path: str | os.PathLike, processing: ImageProcessing, *, record: str | int | None = None,
                record_id: str | None = None) -> None:
    """Raise what `load_image` would raise for this file, without the padding and resizing."""
    if path == BLACK_IMAGE:
        return
    decoded_rgb(path, processing, dict(file=os.fspath(path), record=record, record_id=record_id, field="image"))


def square_image(path: str | os.PathLike, processing: ImageProcessing, *, record: str | int | None = None,
                 record_id: str | None = None) -> Image.Image:
    """Steps 1-5: the RGB size × size picture the tower sees, before rescaling.

    Raises `DataError` (field "image", naming the file, `record` and `record_id`)
    with reason "missing_image" when there is no file, "too_many_pixels" when it
    holds more than `processing.max_pixels` pixels (checked before decoding),
    "corrupt_image" when it is truncated or undecodable, "unsupported_image" when
    its mode is ambiguous (see `to_rgb`). Never returns a substitute image. Saved
    losslessly (PNG), this is a cache of the expensive part: `load_image` of the
    saved file gives the same pixels (a square image of the right size is neither
    padded nor resized again).
    """
    if path == BLACK_IMAGE:
        return Image.new("RGB", (processing.size, processing.size))
    rgb = decoded_rgb(path, processing, dict(file=os.fspath(path), record=record, record_id=record_id,
                                              field="image"))
    if processing.aspect == "pad":
        rgb = pad_to_square(rgb, processing.background)
    if rgb.size != (processing.size, processing.size):
        rgb = rgb.resize((processing.size, processing.size), Image.Resampling.BICUBIC)
    return rgb


def load_image(path: str | os.PathLike, processing: ImageProcessing, *, record: str | int | None = None,
               record_id: str | None = None) -> np.ndarray:
    """Decode the image at `path` into normalised float32 pixels of shape (size, size, 3)
    (errors as `square_image`)."""
    return normalise(square_image(path, processing, record=record, record_id=record_id), processing)


def normalise(rgb: Image.Image, processing: ImageProcessing) -> np.ndarray:
    """Step 6: (x · rescale − mean) / std as one float32 multiply-add per value (a hot loop of the
    loader), the one place pixels are normalised (still images and video frames)."""
    scale = np.float32(processing.rescale) / np.asarray(processing.std, np.float32)
    shift = -np.asarray(processing.mean, np.float32) / np.asarray(processing.std, np.float32)
    pixels = np.asarray(rgb, dtype=np.float32)
    pixels *= scale
    pixels += shift
    return pixels
