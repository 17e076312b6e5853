"""What the benchmark scripts share: the full-size test model, real photos, the baselines.

Scripts in this folder import it as ``common`` (Python puts a script's own folder first on
``sys.path``); everything they measure of this project goes through its public stages
(``run_export``, ``calibrate``, ``build_engine``, ``load_engine``, ``bench_runners``).
"""

from __future__ import annotations

import contextlib
import io
import time
from pathlib import Path

import numpy as np

from alexnet_deploy.backends import InputMetadata, Runner

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"


def load_photos(folder: Path, spec, count: int) -> np.ndarray:
    """``count`` photos spread over ``folder`` (sorted), preprocessed by ``spec``."""
    files = sorted(folder.rglob("*.JPEG"))
    step = max(1, len(files) // count)
    return np.stack([spec.load_path(p) for p in files[::step][:count]]).astype(np.float32)


def realistic_model(photos: np.ndarray, seed: int = 0):
    """The full-size paper AlexNet (227 px, 1,000 classes) with random weights rescaled layer
    by layer (LSUV-style, on ``photos``) so every pre-activation has standard deviation ~1, as
    in a trained network; biases ~N(0, 0.1). No trained full-size weights exist offline; speed
    does not depend on the weight values, INT8 ranges do, hence the rescaling."""
    import torch

    from alexnet_deploy.model import LAYERS, AlexNetConfig, AlexNetGrouped

    torch.manual_seed(seed)
    model = AlexNetGrouped(AlexNetConfig()).eval()
    x = torch.from_numpy(photos)
    with torch.no_grad():
        for name in LAYERS:
            layer = getattr(model, name)
            layer.bias.zero_()
            seen: dict = {}
            hook = layer.register_forward_hook(lambda m, i, o, seen=seen: seen.__setitem__("out", o))
            model(x)
            hook.remove()
            layer.weight.mul_(1.0 / seen["out"].std().item())
            layer.bias.normal_(0.0, 0.1)
    return model


def plain_torch_export(model, path: Path) -> Path:
    """What a user gets from ``torch.onnx.export`` without this project (dynamic batch)."""
    import torch

    size = model.cfg.image_size
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        torch.onnx.export(model, (torch.zeros(1, 3, size, size),), str(path),
                          input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "N"}})
    return path


def run_quantize_static(src: Path, dst: Path, images: np.ndarray, activation_type,
                        method, batch: int = 32) -> float:
    """ONNX Runtime's ``quantize_static`` (QDQ, per-channel int8 weights) of ``src`` into ``dst``,
    calibrated on ``images`` in batches of ``batch``, its console output hidden; returns seconds.
    ``activation_type`` / ``method``: ``QuantType`` / ``CalibrationMethod`` members."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.i = 0

        def get_next(self):
            if self.i >= len(images):
                return None
            self.i += batch
            return {"input": images[self.i - batch:self.i]}

    t0 = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        quantize_static(str(src), str(dst), Reader(), quant_format=QuantFormat.QDQ,
                        per_channel=True, activation_type=activation_type,
                        weight_type=QuantType.QInt8, calibrate_method=method)
    return time.perf_counter() - t0


class BaselineOnnxRuntime(Runner):
    """A graph this project did not build (a baseline), on ONNX Runtime with the project's one
    session policy (:func:`alexnet_deploy.onnxrt.cpu_session`)."""

    def __init__(self, path: Path, chw: tuple[int, int, int], threads: int | None) -> None:
        from alexnet_deploy.onnxrt import cpu_session

        self.session = cpu_session(path, threads)
        self.meta = InputMetadata(name=self.session.get_inputs()[0].name, chw=chw)

    def infer(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.meta.name: batch})[0]

    def input_metadata(self) -> InputMetadata:
        return self.meta


class StockOpenVino(Runner):
    """A baseline graph on OpenVINO with its default settings but ``threads`` threads."""

    def __init__(self, path: Path, chw: tuple[int, int, int], threads: int | None) -> None:
        import openvino as ov

        config = {"INFERENCE_NUM_THREADS": threads} if threads else {}
        self.compiled = ov.Core().compile_model(str(path), "CPU", config)
        self.request = self.compiled.create_infer_request()  # one caller: bench is serial
        self.meta = InputMetadata(name=self.compiled.input(0).any_name, chw=chw)

    def infer(self, batch: np.ndarray) -> np.ndarray:
        return np.array(self.request.infer({0: batch})[self.compiled.output(0)])

    def input_metadata(self) -> InputMetadata:
        return self.meta
