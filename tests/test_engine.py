"""The engine format: sidecar round trip, checked loading, atomic folders."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from alexnet_deploy.backends.tensorrt import BACKEND as TENSORRT
from alexnet_deploy.build import build_engine
from alexnet_deploy.engine import (
    FORMAT,
    SIDECAR_NAME,
    EngineSidecar,
    check_artifacts,
    engine_dir_atomic,
    load_engine,
    read_sidecar,
    write_sidecar,
)
from alexnet_deploy.errors import UserError
from alexnet_deploy.fileio import sha256_file, umask
from alexnet_deploy.preprocess import PreprocessSpec


def make_sidecar(**overrides) -> EngineSidecar:
    fields = {"backend": "onnxruntime", "backend_version": "1.20.0", "precision": "mixed",
              "layer_precision": {"conv1": "int8", "fc8": "fp32"},
              "artifacts": {"model.onnx": "ab" * 32}, "preprocess": PreprocessSpec.for_size(67),
              "classes": ["a", "b", "c"], "input_shape": (3, 67, 67), "max_batch": None,
              "placement": "cpu", "model_sha256": "cd" * 32, "calibration_sha256": "ef" * 32,
              "checkpoint_sha256": "01" * 32, "build_seconds": 1.25,
              "built_at": "2026-01-02T03:04:05+00:00",
              "host": {"hostname": "h", "platform": "p", "cpu": "c"}, "notes": ["n"]}
    fields.update(overrides)
    return EngineSidecar(**fields)


@pytest.fixture(scope="module")
def ort_engine(small_model, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("engines") / "fp32"
    build_engine(small_model["onnx"], "fp32", out, backend="onnxruntime")
    return out


def copy_engine(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


# ---- the sidecar ----

def test_sidecar_round_trips_through_its_json(tmp_path):
    sidecar = make_sidecar()
    write_sidecar(tmp_path, sidecar)
    again = read_sidecar(tmp_path)
    assert again == sidecar
    d = json.loads((tmp_path / SIDECAR_NAME).read_text())
    assert d["format"] == FORMAT
    assert d["backend"] == {"name": "onnxruntime", "version": "1.20.0"}
    assert d["source"] == {"model_sha256": "cd" * 32, "calibration_sha256": "ef" * 32,
                           "checkpoint_sha256": "01" * 32}
    assert d["input"] == {"name": "input", "shape": [3, 67, 67], "dtype": "float32",
                          "layout": "NCHW", "min_batch": 1, "max_batch": None,
                          "opt_batch": None}
    assert d["output"] == {"name": "logits", "num_classes": 3}
    assert d["preprocess"]["crop"] == 67
    assert d["build"]["host"]["cpu"] == "c"
    assert "tuning" not in d  # only budgeted INT8 builds carry one


def test_sidecar_round_trips_uint8_input_and_tuning(tmp_path):
    sidecar = make_sidecar(input_format="uint8-nhwc", tuning={"method": "mse", "fits": True})
    write_sidecar(tmp_path, sidecar)
    assert read_sidecar(tmp_path) == sidecar
    d = json.loads((tmp_path / SIDECAR_NAME).read_text())
    assert (d["input"]["dtype"], d["input"]["layout"]) == ("uint8", "NHWC")
    assert d["tuning"] == {"method": "mse", "fits": True}
    del d["input"]["layout"], d["input"]["dtype"]  # a sidecar written before both existed
    (tmp_path / SIDECAR_NAME).write_text(json.dumps(d))
    assert read_sidecar(tmp_path).input_format == "float32-nchw"
    with pytest.raises(UserError, match="input format"):
        make_sidecar(input_format="uint8-nchw")


def test_sidecar_refuses_unknown_precisions():
    with pytest.raises(UserError, match="precision 'int4'"):
        make_sidecar(precision="int4")
    with pytest.raises(UserError, match="layer precision"):
        make_sidecar(layer_precision={"conv1": "bf16"})


def test_read_sidecar_accepts_the_json_path_itself(tmp_path):
    write_sidecar(tmp_path, make_sidecar())
    assert read_sidecar(tmp_path / SIDECAR_NAME).backend == "onnxruntime"


@pytest.mark.parametrize("setup, message", [
    (lambda p: None, "does not exist"),
    (lambda p: p.write_text("x"), "is not an engine folder"),
    (lambda p: p.mkdir(), "is not an engine folder"),
    (lambda p: (p.mkdir(), (p / SIDECAR_NAME).write_text("{oops")), "not valid JSON"),
    (lambda p: (p.mkdir(), (p / SIDECAR_NAME).write_text('{"format": "other/1"}')),
     "not an alexnet-deploy engine sidecar"),
    (lambda p: (p.mkdir(), (p / SIDECAR_NAME).write_text(json.dumps({"format": FORMAT}))),
     "missing or has a malformed field"),
])
def test_read_sidecar_names_what_is_wrong(tmp_path, setup, message):
    path = tmp_path / "engine"
    setup(path)
    with pytest.raises(UserError, match=message):
        read_sidecar(path)


def test_check_artifacts_catches_tampering_and_missing_files(tmp_path):
    (tmp_path / "model.onnx").write_bytes(b"weights")
    sidecar = make_sidecar(artifacts={"model.onnx": sha256_file(tmp_path / "model.onnx")})
    check_artifacts(tmp_path, sidecar)  # intact
    (tmp_path / "model.onnx").write_bytes(b"weightz")
    with pytest.raises(UserError, match="sidecar does not match the engine file"):
        check_artifacts(tmp_path, sidecar)
    (tmp_path / "model.onnx").unlink()
    with pytest.raises(UserError, match="is missing"):
        check_artifacts(tmp_path, sidecar)
    with pytest.raises(UserError, match="outside its folder"):
        check_artifacts(tmp_path, make_sidecar(artifacts={"../model.onnx": "00"}))


# ---- loading ----

def test_load_engine_runs_what_build_wrote(ort_engine, small_model):
    import onnxruntime as ort

    x = np.random.default_rng(0).standard_normal((3, 3, 67, 67), dtype=np.float32)
    reference = ort.InferenceSession(str(small_model["onnx"])).run(None, {"input": x})[0]
    with load_engine(ort_engine, threads=1) as engine:
        assert engine.sidecar.backend == "onnxruntime"
        np.testing.assert_allclose(engine.infer(x), reference, atol=1e-4, rtol=1e-4)
        with pytest.raises(UserError, match=r"does not match engine .*\(N, 3, 67, 67\)"):
            engine.infer(x[:, :, :60, :60])


def test_load_engine_refuses_a_tampered_artifact(ort_engine, tmp_path):
    engine = copy_engine(ort_engine, tmp_path / "e")
    data = bytearray((engine / "model.onnx").read_bytes())
    data[-1] ^= 0xFF
    (engine / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(UserError, match="sidecar does not match the engine file"):
        load_engine(engine)


def test_load_engine_refuses_a_backend_that_is_not_installed(ort_engine, tmp_path):
    engine = copy_engine(ort_engine, tmp_path / "e")
    d = json.loads((engine / SIDECAR_NAME).read_text())
    d["backend"]["name"] = "tensorrt"  # no TensorRT on the CPU test machines
    (engine / SIDECAR_NAME).write_text(json.dumps(d))
    if TENSORRT.available():
        pytest.skip("TensorRT is installed here")
    with pytest.raises(UserError, match="pip install tensorrt pycuda"):
        load_engine(engine)
    d["backend"]["name"] = "tvm"
    (engine / SIDECAR_NAME).write_text(json.dumps(d))
    with pytest.raises(UserError, match="unknown backend 'tvm'"):
        load_engine(engine)


# ---- atomic folders ----

def test_engine_dir_atomic_leaves_nothing_behind_on_failure(tmp_path):
    dest = tmp_path / "engine"
    with pytest.raises(RuntimeError), engine_dir_atomic(dest) as tmp:
        (tmp / "model.onnx").write_bytes(b"half")
        raise RuntimeError("build failed")
    assert not dest.exists()
    assert list(tmp_path.iterdir()) == []


def test_engine_dir_atomic_replaces_an_earlier_engine_whole(tmp_path):
    dest = tmp_path / "engine"
    with engine_dir_atomic(dest) as tmp:
        (tmp / "old.bin").write_bytes(b"1")
        write_sidecar(tmp, make_sidecar())
    with engine_dir_atomic(dest) as tmp:
        (tmp / "new.bin").write_bytes(b"2")
        write_sidecar(tmp, make_sidecar())
    assert sorted(p.name for p in dest.iterdir()) == [SIDECAR_NAME, "new.bin"]
    assert [p.name for p in tmp_path.iterdir()] == ["engine"]
    assert oct(dest.stat().st_mode & 0o777) == oct(0o777 & ~umask())
    # a failed rebuild keeps the previous engine
    with pytest.raises(RuntimeError), engine_dir_atomic(dest) as tmp:
        raise RuntimeError
    assert (dest / "new.bin").read_bytes() == b"2"


def test_engine_dir_atomic_never_overwrites_what_it_did_not_write(tmp_path):
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "cat.jpg").write_bytes(b"meow")
    (tmp_path / "file").write_text("x")
    for dest in (tmp_path / "photos", tmp_path / "file"):
        with pytest.raises(UserError, match="exists and is not an engine folder"), \
                engine_dir_atomic(dest):
            pass
    assert (tmp_path / "photos" / "cat.jpg").read_bytes() == b"meow"
    with pytest.raises(UserError, match="is a file, not a folder"), \
            engine_dir_atomic(tmp_path / "file" / "engine"):
        pass
    with engine_dir_atomic(tmp_path / "missing" / "engine") as tmp:  # created when written
        (tmp / "engine.json").write_text("{}")
    assert (tmp_path / "missing" / "engine" / "engine.json").is_file()
