"""The preprocessing spec: the one definition of how an image becomes a model input.

Training, export, calibration, validation and benchmarking all read it from here. It travels with
the model: inside every checkpoint (``"preprocess"``), in the ONNX model's ``metadata_props``
(key ``alexnet_deploy.preprocess``) and in every engine sidecar.

Images are opened and converted to 8-bit RGB in one place, :func:`open_image` / :func:`to_rgb`
(files, encoded bytes, PIL images, uint8 arrays; 16-bit images are scaled to 8 bits, not clipped).

Evaluation transform (``PreprocessSpec.load``): decode, convert to RGB, resize the shorter side to
``resize`` (bilinear), center-crop ``crop`` x ``crop``, scale to 0..1, subtract ``mean`` and divide
by ``std`` per channel, lay out as ``CHW`` float32. Training augmentation (random crops, flips,
PCA lighting) lives in :mod:`alexnet_deploy.data` and starts from the same resize.
"""

from __future__ import annotations

import io
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from alexnet_deploy.errors import UserError, first_line

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: What :func:`open_image` accepts: a file path, the bytes of an encoded image (JPEG, PNG, ...),
#: a PIL image, or a uint8 ``HxWx3`` RGB (or ``HxW`` grayscale) array.
ImageLike = str | Path | bytes | bytearray | memoryview | Image.Image | np.ndarray
#: Errors PIL raises for unreadable, truncated or hostile files (and :class:`UnsupportedImage`).
DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


class UnsupportedImage(ValueError):
    """An image that decodes but cannot be turned into 8-bit RGB faithfully."""


def to_rgb(image: Image.Image) -> Image.Image:
    """``image`` as 8-bit RGB, converted faithfully or refused with :class:`UnsupportedImage`.

    PIL's own ``convert("RGB")`` clips 16-bit grayscale (mode ``I;16``/``I``, e.g. 16-bit PNGs)
    to 255, turning most of the image white: those are scaled to 8 bits here (``v / 257``,
    rounded). 32-bit float images (mode ``F``) have no agreed range and are refused. Palette
    images with transparency go through RGBA; alpha is dropped, as torchvision does.
    """
    if image.mode == "RGB":
        return image
    if image.mode in _SIXTEEN_BIT_MODES:
        values = np.asarray(image, dtype=np.int64)
        if values.size and (values.min() < 0 or values.max() > 65535):
            raise UnsupportedImage(f"{image.mode} pixel values span {values.min()}..{values.max()}"
                                   ", not 0..65535; convert the image to 8-bit RGB first")
        image = Image.fromarray(((values + 128) // 257).astype(np.uint8), mode="L")
    elif image.mode == "F":
        raise UnsupportedImage("32-bit floating-point image (mode F) has no fixed range; "
                               "convert it to 8-bit RGB first")
    elif image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    return image.convert("RGB")


def open_image(image: ImageLike, name: str | None = None) -> Image.Image:
    """Decode ``image`` (see :data:`ImageLike`) into an 8-bit RGB PIL image.

    Raises:
        UserError: one line naming the file (or ``name``) and what is wrong with it.
    """
    label = name or (str(image) if isinstance(image, (str, Path)) else type(image).__name__)
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or not (image.ndim == 2 or (image.ndim == 3
                                                               and image.shape[2] == 3)):
            raise UserError(f"{label}: an image array must be uint8 HxWx3 (RGB) or HxW, got "
                            f"{image.dtype} {list(image.shape)}")
        return Image.fromarray(np.ascontiguousarray(image)).convert("RGB")
    try:
        if isinstance(image, Image.Image):
            image.load()
            return to_rgb(image)
        if isinstance(image, (bytes, bytearray, memoryview)):
            source = io.BytesIO(bytes(image))
        elif isinstance(image, (str, Path)):
            if not Path(image).is_file():
                raise UserError(f"image {image} does not exist or is not a file")
            source = image
        else:
            raise UserError(f"{label}: not an image (pass a file path, encoded bytes, a PIL "
                            "image or a uint8 HxWx3 array)")
        with Image.open(source) as opened:
            opened.load()  # decode now: a truncated file fails here, not later
            rgb = to_rgb(opened)
            return rgb.copy() if rgb is opened else rgb
    except DECODE_ERRORS as e:
        raise UserError(f"{label} is not a readable image ({first_line(e)}): pass a JPEG, PNG, "
                        "BMP or WebP file") from e


@dataclass(frozen=True)
class PreprocessSpec:
    """How to turn an RGB image into one ``float32`` model input.

    Args:
        crop: side of the square the model sees (its input height and width). Defaults to 227.
        resize: the shorter image side is resized to this before cropping. Defaults to 256.
        mean: per-channel mean subtracted after scaling pixels to 0..1. Defaults to ImageNet's.
        std: per-channel std divided after subtracting the mean. Defaults to ImageNet's.
        channel_order: order of the three channels in the input tensor. Always ``"RGB"``.
        layout: tensor layout of a batch. Always ``"NCHW"``.
        interpolation: resampling filter for the resize. Defaults to ``"bilinear"``.
    """

    crop: int = 227
    resize: int = 256
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    channel_order: str = "RGB"
    layout: str = "NCHW"
    interpolation: str = "bilinear"
    _version: int = field(default=1, repr=False)

    def __post_init__(self) -> None:
        if self.crop < 1 or self.resize < self.crop:
            raise UserError(
                f"preprocessing spec: resize ({self.resize}) must be >= crop ({self.crop}) >= 1"
            )
        if self.channel_order != "RGB" or self.layout != "NCHW":
            raise UserError(
                f"preprocessing spec: only RGB/NCHW is supported, got "
                f"{self.channel_order}/{self.layout}"
            )
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise UserError("preprocessing spec: mean and std need three values, std > 0")

    @classmethod
    def for_size(cls, crop: int) -> PreprocessSpec:
        """The default spec for a model of input side ``crop``: resize keeps the 256/227 ratio."""
        return cls(crop=crop, resize=max(crop, round(crop * 256 / 227)))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["version"] = d.pop("_version")
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> PreprocessSpec:
        known = {"crop", "resize", "mean", "std", "channel_order", "layout", "interpolation"}
        try:
            kwargs = {k: d[k] for k in known if k in d}
            kwargs["mean"] = tuple(float(v) for v in kwargs.get("mean", IMAGENET_MEAN))
            kwargs["std"] = tuple(float(v) for v in kwargs.get("std", IMAGENET_STD))
            return cls(**kwargs)
        except (TypeError, ValueError) as e:
            raise UserError(f"preprocessing spec is malformed ({e}): re-export the model") from e

    @classmethod
    def from_json(cls, text: str) -> PreprocessSpec:
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as e:
            raise UserError(f"preprocessing spec is not valid JSON ({e})") from e

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of one preprocessed image."""
        return (3, self.crop, self.crop)

    # ---- the evaluation transform, on PIL images and uint8 arrays ----

    def resize_image(self, image: Image.Image) -> Image.Image:
        """Convert to RGB (:func:`to_rgb`) and resize the shorter side to ``resize``."""
        image = to_rgb(image)
        w, h = image.size
        scale = self.resize / min(w, h)
        size = (max(self.resize, round(w * scale)), max(self.resize, round(h * scale)))
        if size != (w, h):
            image = image.resize(size, _FILTERS[self.interpolation])
        return image

    def normalize(self, hwc_uint8: np.ndarray) -> np.ndarray:
        """``HWC`` uint8 RGB -> ``CHW`` float32, scaled and normalized."""
        x = hwc_uint8.astype(np.float32) * (1.0 / 255.0)
        x = (x - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        return np.ascontiguousarray(x.transpose(2, 0, 1))

    def denormalize(self, nchw: np.ndarray) -> np.ndarray:
        """The inverse of :meth:`normalize` on a batch: float32 ``[N, C, H, W]`` -> uint8
        ``[N, H, W, C]`` (rounded, clipped to 0..255). Exact for images :meth:`normalize` made:
        their float32 error is far below half a code."""
        x = np.asarray(nchw, np.float32).transpose(0, 2, 3, 1)
        x = (x * np.asarray(self.std, np.float32) + np.asarray(self.mean, np.float32)) * 255.0
        return np.ascontiguousarray(np.clip(np.rint(x), 0, 255).astype(np.uint8))

    def crop_uint8(self, image: Image.Image) -> np.ndarray:
        """One PIL image -> its resized, center-cropped ``HWC`` uint8 RGB pixels (what an engine
        built with ``--input uint8-nhwc`` takes)."""
        image = self.resize_image(image)
        w, h = image.size
        left, top = (w - self.crop) // 2, (h - self.crop) // 2
        image = image.crop((left, top, left + self.crop, top + self.crop))
        return np.asarray(image, dtype=np.uint8)

    def load(self, image: Image.Image) -> np.ndarray:
        """One PIL image -> one ``CHW`` float32 model input (resize, center crop, normalize)."""
        return self.normalize(self.crop_uint8(image))

    def load_path(self, path: Path | str) -> np.ndarray:
        """One image file -> one ``CHW`` float32 model input; UserError naming a bad file."""
        return self.load(open_image(path))


_FILTERS = {
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "nearest": Image.Resampling.NEAREST,
}
