"""Fixtures of the conformance tests: the real TensorRT APIs (per version), the strict fake
generated from each, the simulated TensorRT behind it and the pycuda model."""

from __future__ import annotations

import importlib.machinery
import sys
from types import SimpleNamespace

import pytest

from .pycuda_model import PycudaModel
from .simulation import Simulation
from .tensorrt_api import VERSIONS, Unavailable, make_fake, real_api


@pytest.fixture(scope="session", params=sorted(VERSIONS), ids=lambda v: f"trt{v.split('.')[0]}")
def api(request) -> dict:
    """The real bindings' API of one TensorRT version (downloaded and introspected once)."""
    try:
        return real_api(request.param)
    except Unavailable as e:
        pytest.skip(f"conformance to the real TensorRT {request.param} bindings not checked: {e}")


def install(monkeypatch, api: dict, **sim_options) -> SimpleNamespace:
    """Put a strict fake ``tensorrt`` (from ``api``) and the pycuda model in ``sys.modules``."""
    from alexnet_deploy.backends import tensorrt as trt_backend

    cuda_model = PycudaModel()
    pycuda, driver = cuda_model.modules()
    sim = Simulation(**sim_options)
    holder: list = []
    trt = make_fake(api, sim.behaviours(holder, cuda_model))
    holder.append(trt)
    for module in (trt, pycuda, driver):  # importlib.util.find_spec wants a spec
        module.__spec__ = importlib.machinery.ModuleSpec(module.__name__, None)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setitem(sys.modules, "pycuda", pycuda)
    monkeypatch.setitem(sys.modules, "pycuda.driver", driver)
    trt_backend._available.cache_clear()
    return SimpleNamespace(trt=trt, sim=sim, cuda=cuda_model, driver=driver)


@pytest.fixture
def env(api, monkeypatch, tmp_path) -> SimpleNamespace:
    """The fakes installed for one version: ``env.trt``, ``env.sim``, ``env.cuda``."""
    from alexnet_deploy.backends import tensorrt as trt_backend

    monkeypatch.setenv("ALEXNET_DEPLOY_CACHE", str(tmp_path / "cache"))
    yield install(monkeypatch, api)
    trt_backend._available.cache_clear()
