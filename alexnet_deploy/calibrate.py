"""Stage 3, ``alexnet-deploy calibrate``: per-tensor activation ranges of an exported model.

Examples::

    alexnet-deploy calibrate --model model.onnx --data ../shared/data/cifar10_train_10k.npz \\
        --method entropy --num-images 512 --out calibration/cifar-entropy.json
    alexnet-deploy calibrate --model model.onnx --data imagenette_train2k/ \\
        --method percentile --percentile 99.99 --out calibration/imagenette-p9999.json

Writes ``NAME.json`` (format ``alexnet-deploy/calibration/1``) and a TensorRT calibration cache
``NAME.cache`` beside it. The build stage reads the JSON through :func:`load_calibration`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from alexnet_deploy.errors import UserError

FORMAT = "alexnet-deploy/calibration/1"
INT8_MAX = 127


@dataclass
class Calibration:
    """Activation ranges of one model, as the quantizer reads them.

    Args:
        method: the calibrator that chose the ranges (``entropy``, ``percentile``, ``minmax``,
            ``mse``).
        num_images: how many images were run through the model.
        model_sha256: sha256 of the ``.onnx`` file that was calibrated.
        data_fingerprint: fingerprint of the calibration data (``data.dataset_fingerprint``).
        preprocess: the preprocessing spec the images were read with, as a dict.
        amax: tensor name -> the largest magnitude that maps to +-127 (always > 0).
        options: the method's options and the image selection (``num_images`` asked, ``seed``).
    """

    method: str
    num_images: int
    model_sha256: str
    data_fingerprint: str
    preprocess: dict
    amax: dict[str, float]
    options: dict = field(default_factory=dict)

    def scale(self, name: str) -> float:
        """The symmetric int8 scale of tensor ``name``: ``amax / 127`` (zero point 0)."""
        try:
            return self.amax[name] / INT8_MAX
        except KeyError:
            raise UserError(f"the calibration has no range for tensor {name!r}: it was made for "
                            "another graph; re-run 'alexnet-deploy calibrate' on this model") from None

    def to_dict(self) -> dict:
        return {
            "format": FORMAT,
            "method": self.method,
            "options": self.options,
            "num_images": self.num_images,
            "model_sha256": self.model_sha256,
            "data_fingerprint": self.data_fingerprint,
            "preprocess": self.preprocess,
            "tensors": {name: {"amax": amax, "scale": amax / INT8_MAX}
                        for name, amax in self.amax.items()},
        }

    @classmethod
    def from_dict(cls, d: dict, where: str = "calibration") -> "Calibration":
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            found = d.get("format") if isinstance(d, dict) else type(d).__name__
            raise UserError(f"{where} is not an alexnet-deploy calibration (format {found!r}, "
                            f"expected {FORMAT!r}): re-run 'alexnet-deploy calibrate'")
        try:
            amax = {str(name): float(t["amax"]) for name, t in d["tensors"].items()}
            calibration = cls(method=str(d["method"]), num_images=int(d["num_images"]),
                              model_sha256=str(d["model_sha256"]),
                              data_fingerprint=str(d["data_fingerprint"]),
                              preprocess=dict(d["preprocess"]), amax=amax,
                              options=dict(d.get("options", {})))
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise UserError(f"{where} is corrupt ({type(e).__name__}: {e}): "
                            "re-run 'alexnet-deploy calibrate'") from e
        bad = [n for n, a in amax.items() if not (math.isfinite(a) and a > 0)]
        if bad:
            raise UserError(f"{where} is corrupt: tensor {bad[0]!r} has amax {amax[bad[0]]} "
                            "(must be finite and > 0); re-run 'alexnet-deploy calibrate'")
        return calibration


def load_calibration(path: str | Path, model_sha256: str | None = None) -> Calibration:
    """Read a calibration JSON written by ``alexnet-deploy calibrate``.

    Args:
        path: the ``.json`` file.
        model_sha256: when given, the sha256 of the model about to be quantized; a calibration
            made for another model is refused. Defaults to None (no check).

    Raises:
        UserError: the file is missing, not JSON, not a calibration, or made for another model.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"calibration {path} does not exist: run 'alexnet-deploy calibrate' first")
    try:
        d = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"calibration {path} is not readable JSON ({e}): "
                        "re-run 'alexnet-deploy calibrate'") from e
    calibration = Calibration.from_dict(d, where=f"calibration {path}")
    if model_sha256 is not None and calibration.model_sha256 != model_sha256:
        raise UserError(f"calibration {path} was made for another model "
                        f"(sha {calibration.model_sha256[:12]}, this model is {model_sha256[:12]}); "
                        "re-run calibrate")
    return calibration
