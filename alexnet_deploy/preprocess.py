"""The preprocessing spec: the one definition of how an image becomes a model input.

Training, export, calibration, validation and benchmarking all read it from here. It travels with
the model: inside every checkpoint (``"preprocess"``), in the ONNX model's ``metadata_props``
(key ``alexnet_deploy.preprocess``) and in every engine sidecar.

Evaluation transform (``PreprocessSpec.load``): decode, convert to RGB, resize the shorter side to
``resize`` (bilinear), center-crop ``crop`` x ``crop``, scale to 0..1, subtract ``mean`` and divide
by ``std`` per channel, lay out as ``CHW`` float32. Training augmentation (random crops, flips,
PCA lighting) lives in :mod:`alexnet_deploy.data` and starts from the same resize.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from alexnet_deploy.errors import UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


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
        """Convert to RGB and resize the shorter side to ``resize``."""
        image = image.convert("RGB")
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

    def load(self, image: Image.Image) -> np.ndarray:
        """One PIL image -> one ``CHW`` float32 model input (resize, center crop, normalize)."""
        image = self.resize_image(image)
        w, h = image.size
        left, top = (w - self.crop) // 2, (h - self.crop) // 2
        image = image.crop((left, top, left + self.crop, top + self.crop))
        return self.normalize(np.asarray(image, dtype=np.uint8))

    def load_path(self, path: Path | str) -> np.ndarray:
        with Image.open(path) as image:
            return self.load(image)


_FILTERS = {
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "nearest": Image.Resampling.NEAREST,
}
