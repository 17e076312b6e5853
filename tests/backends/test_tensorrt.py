"""The TensorRT backend where no TensorRT runs: imports, install hints, and (on a GPU) the
real thing.

The build and runner code are checked against the real TensorRT 10.16 and 11.4 Python bindings
in ``tests/conformance/`` (strict fakes generated from the bindings at test time, and a pycuda
model with pycuda's context rules). Tests marked ``tensorrt`` need a GPU with TensorRT and
pycuda and are skipped elsewhere.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import numpy as np
import pytest

from alexnet_deploy.backends import get_backend
from alexnet_deploy.backends import tensorrt as trt_backend
from alexnet_deploy.errors import UserError

CHW = (3, 67, 67)


# ---- without TensorRT ----

def test_module_imports_without_tensorrt_or_pycuda(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import tensorrt -> ImportError
    monkeypatch.setitem(sys.modules, "pycuda", None)
    module = importlib.reload(trt_backend)
    try:
        assert module.BACKEND.name == "tensorrt"
        module._available.cache_clear()
        assert module.BACKEND.available() is False
    finally:
        module._available.cache_clear()


def test_not_available_here_says_how_to_install():
    if trt_backend.BACKEND.available():
        pytest.skip("TensorRT and a GPU are present")
    with pytest.raises(UserError) as e:
        get_backend("tensorrt")
    text = str(e.value)
    for fact in ("pip install tensorrt pycuda --extra-index-url https://pypi.nvidia.com",
                 "tensorrt is the CUDA 13 build", "CUDA 12 driver install tensorrt-cu12",
                 "pycuda compiles from source and needs the CUDA toolkit"):
        assert fact in text


# ---- on a real GPU ----

@pytest.mark.tensorrt
@pytest.mark.gpu
def test_real_tensorrt_engine_matches_onnx_runtime(small_model, tmp_path):
    if not trt_backend.BACKEND.available():
        pytest.skip("needs an NVIDIA GPU with TensorRT and pycuda "
                    f"({trt_backend.INSTALL_HINT})")
    import onnxruntime as ort

    from alexnet_deploy.build import build_engine
    from alexnet_deploy.engine import load_engine

    build_engine(small_model["onnx"], "fp32", tmp_path / "trt", backend="tensorrt", max_batch=8)
    x = np.random.default_rng(0).standard_normal((8, *CHW)).astype(np.float32)
    reference = ort.InferenceSession(str(small_model["onnx"])).run(None, {"input": x})[0]
    with load_engine(tmp_path / "trt") as engine:
        np.testing.assert_allclose(engine.infer(x), reference, atol=1e-3, rtol=1e-3)
    assert Path(tmp_path / "trt" / "model.engine").stat().st_size > 0
