"""``alexnet-deploy calibrate``: the stage, its files, and bad input."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from alexnet_deploy import data as datasets
from alexnet_deploy.calibrate import (
    FORMAT,
    ZERO_TENSOR_AMAX,
    Calibration,
    activation_tensors,
    calibrate,
    load_calibration,
    read_trt_cache,
    trt_cache_text,
    trt_version_number,
)
from alexnet_deploy.cli import cli
from alexnet_deploy.errors import UserError
from alexnet_deploy.fileio import sha256_file
from alexnet_deploy.metadata import ModelInfo, write_model_info
from alexnet_deploy.preprocess import PreprocessSpec

CROP = 16
SPEC = PreprocessSpec.for_size(CROP)
TENSORS = ["input", "conv1", "relu1", "pool1", "flatten", "logits"]


def tiny_model(path: Path, *, crop: int = CROP, spec: PreprocessSpec = SPEC, seed: int = 0,
               batch: int | str = "N", metadata: bool = True, extra=None) -> Path:
    """``input -> conv1 -> relu1 -> pool1 -> flatten -> fc (logits)``, the exporter's naming;
    ``extra(nodes, inits)`` may add nodes after ``relu1``."""
    rng = np.random.default_rng(seed)
    side = (crop - 2) // 2
    inits = [numpy_helper.from_array(rng.normal(0, 0.3, (4, 3, 3, 3)).astype(np.float32),
                                     "conv1.weight"),
             numpy_helper.from_array(rng.normal(0, 0.1, 4).astype(np.float32), "conv1.bias"),
             numpy_helper.from_array(rng.normal(0, 0.1, (3, 4 * side * side)).astype(np.float32),
                                     "fc.weight"),
             numpy_helper.from_array(np.zeros(3, np.float32), "fc.bias")]
    nodes = [helper.make_node("Conv", ["input", "conv1.weight", "conv1.bias"], ["conv1"],
                              name="conv1"),
             helper.make_node("Relu", ["conv1"], ["relu1"], name="relu1"),
             helper.make_node("MaxPool", ["relu1"], ["pool1"], name="pool1", kernel_shape=[2, 2],
                              strides=[2, 2]),
             helper.make_node("Flatten", ["pool1"], ["flatten"], name="flatten"),
             helper.make_node("Gemm", ["flatten", "fc.weight", "fc.bias"], ["logits"], name="fc",
                              transB=1)]
    if extra is not None:
        extra(nodes, inits)
    graph = helper.make_graph(
        nodes, "tiny", [helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                                      [batch, 3, crop, crop])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, 3])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    if metadata:
        write_model_info(model, ModelInfo(preprocess=spec, classes=["a", "b", "c"]))
    onnx.save(model, path)
    return path


def npz_data(path: Path, n: int = 40, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    np.savez(path, images=rng.integers(0, 256, (n, 20, 20, 3), dtype=np.uint8),
             labels=rng.integers(0, 3, n), classes=np.array(["a", "b", "c"]))
    return path


@pytest.fixture
def work(tmp_path):
    return tiny_model(tmp_path / "model.onnx"), npz_data(tmp_path / "cal.npz"), tmp_path


def run_cli(*args: str):
    return CliRunner().invoke(cli, ["calibrate", *args])


def run(model, data, out, **kw) -> Calibration:
    kw.setdefault("progress", False)
    return calibrate(model, data, out, say=kw.pop("say", lambda m: None), **kw)


# ---- the calibration file ----

def test_calibrate_writes_the_documented_json(work):
    model, data, tmp = work
    result = run_cli("--model", str(model), "--data", str(data), "--method", "percentile",
                     "--num-images", "24", "--seed", "3", "--out", str(tmp / "c.json"))
    assert result.exit_code == 0, result.output
    assert "calibrated 6 tensors on 24 images with percentile" in result.output
    d = json.loads((tmp / "c.json").read_text())
    assert d["format"] == FORMAT == "alexnet-deploy/calibration/1"
    assert d["method"] == "percentile" and d["num_images"] == 24
    assert d["options"] == {"percentile": 99.99, "num_images": 24, "seed": 3}
    assert d["model_sha256"] == sha256_file(model)
    assert d["data_fingerprint"] == datasets.dataset_fingerprint(data)
    assert d["preprocess"] == SPEC.to_dict()
    assert list(d["tensors"]) == TENSORS
    for t in d["tensors"].values():
        assert t["amax"] > 0 and t["scale"] == t["amax"] / 127
    loaded = load_calibration(tmp / "c.json", model_sha256=sha256_file(model))
    assert loaded.scale("relu1") == d["tensors"]["relu1"]["scale"]


def reference_activations(model: Path, data: Path, n: int, seed: int) -> dict[str, np.ndarray]:
    """Every activation of the calibration images, straight from ONNX Runtime."""
    proto = onnx.load(model)
    proto.graph.output.extend(onnx.ValueInfoProto(name=t) for t in TENSORS[:-1])
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    images = np.concatenate([b.images for b in datasets.iter_batches(
        data, SPEC, 64, limit=n, seed=seed, workers=0)])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, {"input": images}))) | {"input": images}


def test_minmax_is_the_exact_max_of_every_activation(work):
    model, data, tmp = work
    calibration = run(model, data, tmp / "m.json", method="minmax", num_images=30, seed=1,
                      batch_size=7)
    reference = reference_activations(model, data, 30, 1)
    assert set(calibration.amax) == set(reference)
    for name, values in reference.items():
        assert calibration.amax[name] == pytest.approx(float(np.abs(values).max()), rel=1e-6), name


@pytest.mark.parametrize("method", ["entropy", "percentile", "minmax", "mse"])
def test_the_result_does_not_depend_on_the_batch_size(work, method):
    model, data, tmp = work
    results = [run(model, data, tmp / f"{method}-{b}.json", method=method, batch_size=b).amax
               for b in (1, 7, 64)]
    assert results[0] == results[1] == results[2]


def test_a_fixed_batch_model_is_padded_and_the_padding_left_out(tmp_path):
    model = tiny_model(tmp_path / "fixed.onnx", batch=4)
    data = npz_data(tmp_path / "d.npz", n=10)
    calibration = run(model, data, tmp_path / "f.json", method="minmax", batch_size=4)
    dynamic = run(tiny_model(tmp_path / "dyn.onnx"), data, tmp_path / "d.json", method="minmax")
    assert calibration.num_images == 10 and calibration.amax == dynamic.amax


def test_constants_are_not_activations():
    shape = numpy_helper.from_array(np.array([0, -1]))
    graph = helper.make_graph(
        [helper.make_node("Constant", [], ["shape"], value=shape),
         helper.make_node("Identity", ["shape"], ["shape2"]),          # computed from constants
         helper.make_node("Neg", ["w"], ["minus_w"]),                   # from an initializer
         helper.make_node("Mul", ["input", "minus_w"], ["scaled"]),
         helper.make_node("Reshape", ["scaled", "shape2"], ["flat"])],
        "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("flat", TensorProto.FLOAT, [2, 3])],
        [numpy_helper.from_array(np.ones(3, np.float32), "w")])
    assert activation_tensors(helper.make_model(graph)) == ["input", "scaled", "flat"]


def test_an_all_zero_tensor_gets_a_tiny_scale_and_a_warning(tmp_path):
    def zeroed(nodes, inits):
        inits.append(numpy_helper.from_array(np.zeros(1, np.float32), "zero"))
        nodes.append(helper.make_node("Mul", ["relu1", "zero"], ["dead"], name="dead"))

    model = tiny_model(tmp_path / "z.onnx", extra=zeroed)
    said = []
    calibration = run(model, npz_data(tmp_path / "d.npz"), tmp_path / "z.json",
                      say=said.append)
    assert calibration.amax["dead"] == ZERO_TENSOR_AMAX == 127 * 2.0 ** -20
    assert calibration.scale("dead") == 2.0 ** -20
    assert any("warning: 1 tensor(s) were all zeros" in m and "dead" in m for m in said)
    assert load_calibration(tmp_path / "z.json").amax["dead"] == ZERO_TENSOR_AMAX


# ---- re-running ----

def test_rerunning_reuses_the_file_until_something_changes(work, monkeypatch):
    model, data, tmp = work
    out = tmp / "r.json"
    first = run(model, data, out, method="entropy")
    text = out.read_text()

    import alexnet_deploy.calibrate as stage

    def fail(*a, **k):
        raise AssertionError("recomputed")

    monkeypatch.setattr(stage, "collect_activations", fail)
    said = []
    assert run(model, data, out, method="entropy", batch_size=5, say=said.append) == first
    assert out.read_text() == text and any(m.startswith(f"reusing {out}") for m in said)
    (tmp / "r.cache").unlink()
    run(model, data, out, method="entropy")           # the cache is rewritten from the JSON
    assert (tmp / "r.cache").is_file()
    monkeypatch.undo()

    changes = [{"method": "mse"}, {"method": "percentile", "percentile": 99.9},
               {"method": "entropy", "num_images": 20}, {"method": "entropy", "seed": 1}]
    for change in changes:
        assert run(model, data, out, **change).options != first.options, change
    other = tiny_model(tmp / "other.onnx", seed=1)
    assert run(other, data, out).model_sha256 != first.model_sha256
    assert run(model, npz_data(tmp / "d2.npz", seed=5), out).data_fingerprint != \
        first.data_fingerprint


def test_fewer_images_than_asked_uses_them_all_and_says_so(tmp_path):
    model = tiny_model(tmp_path / "m.onnx")
    result = run_cli("--model", str(model), "--data", str(npz_data(tmp_path / "d.npz", n=9)),
                     "--num-images", "50", "--out", str(tmp_path / "c.json"))
    assert result.exit_code == 0, result.output
    assert "holds 9 images, fewer than --num-images 50: calibrating on all 9" in result.output
    assert json.loads((tmp_path / "c.json").read_text())["num_images"] == 9


# ---- the TensorRT cache ----

def test_trt_cache_format_exactly():
    assert trt_cache_text({"input": 1.0, "conv1": 0.5, "relu1": -2.0}, "10.16.1") == (
        "TRT-101601-EntropyCalibration2\n"
        "input: 3f800000\n"
        "conv1: 3f000000\n"
        "relu1: c0000000\n")
    assert trt_version_number("10.16.1") == 101601
    assert trt_version_number("10.0.1") == 100001
    assert trt_version_number("8.6.1") == 8601
    for bad in ("ten", "10.100.0", "0.1"):
        with pytest.raises(UserError):
            trt_version_number(bad)


def test_trt_cache_beside_the_json_round_trips(work):
    model, data, tmp = work
    result = run_cli("--model", str(model), "--data", str(data), "--trt-version", "10.8.0",
                     "--out", str(tmp / "e.json"))
    assert result.exit_code == 0, result.output
    header, scales = read_trt_cache(tmp / "e.cache")
    assert header == "TRT-100800-EntropyCalibration2"
    tensors = json.loads((tmp / "e.json").read_text())["tensors"]
    assert list(scales) == list(tensors)
    for name, scale in scales.items():
        assert scale == struct.unpack(">f", struct.pack(">f", tensors[name]["scale"]))[0]
    lines = (tmp / "e.cache").read_text().splitlines()[1:]
    assert all(len(line.rpartition(": ")[2]) == 8 for line in lines)


# ---- bad input: one line, exit 2, no traceback, nothing written ----

def assert_refused(result, *fragments: str, out: Path | None = None) -> None:
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    if out is not None:
        assert not out.exists() and not out.with_suffix(".cache").exists()
        assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]


def test_empty_data_folder(work):
    model, _, tmp = work
    (tmp / "empty").mkdir()
    out = tmp / "c.json"
    assert_refused(run_cli("--model", str(model), "--data", str(tmp / "empty"),
                           "--out", str(out)), "empty", out=out)


def test_data_with_only_unreadable_images(work):
    model, _, tmp = work
    (tmp / "bad" / "cls").mkdir(parents=True)
    (tmp / "bad" / "cls" / "x.jpg").write_bytes(b"not a jpeg")
    out = tmp / "c.json"
    result = run_cli("--model", str(model), "--data", str(tmp / "bad"), "--out", str(out))
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert result.output.strip().splitlines()[-1].startswith("error: no readable images")
    assert not out.exists()


def test_model_input_that_does_not_match_its_spec(tmp_path):
    model = tiny_model(tmp_path / "m.onnx", crop=16, spec=PreprocessSpec.for_size(20))
    out = tmp_path / "c.json"
    assert_refused(run_cli("--model", str(model), "--data", str(npz_data(tmp_path / "d.npz")),
                           "--out", str(out)),
                   "has shape [N, 3, 16, 16]", "[N, 3, 20, 20]", out=out)


def test_model_without_metadata_or_missing(tmp_path):
    data = str(npz_data(tmp_path / "d.npz"))
    out = tmp_path / "c.json"
    bare = tiny_model(tmp_path / "bare.onnx", metadata=False)
    assert_refused(run_cli("--model", str(bare), "--data", data, "--out", str(out)),
                   "no alexnet-deploy metadata", out=out)
    assert_refused(run_cli("--model", str(tmp_path / "nope.onnx"), "--data", data,
                           "--out", str(out)), "does not exist", out=out)


def test_nan_in_an_activation_names_the_tensor(tmp_path):
    def log_of_input(nodes, inits):
        nodes.append(helper.make_node("Log", ["conv1"], ["log_conv1"], name="log_conv1"))

    model = tiny_model(tmp_path / "nan.onnx", extra=log_of_input)
    out = tmp_path / "c.json"
    assert_refused(run_cli("--model", str(model), "--data", str(npz_data(tmp_path / "d.npz")),
                           "--num-images", "20", "--out", str(out)),
                   "activation 'log_conv1' holds NaN or Inf", out=out)


def test_bad_options(work):
    model, data, tmp = work
    args = ["--model", str(model), "--data", str(data)]
    assert_refused(run_cli(*args, "--out", str(tmp / "c.txt")), "must end in .json")
    (tmp / "file").write_text("")
    assert_refused(run_cli(*args, "--out", str(tmp / "file" / "c.json")), "not a folder")
    assert_refused(run_cli(*args, "--method", "entropy", "--percentile", "99",
                           "--out", str(tmp / "c.json")), "--percentile")
    assert_refused(run_cli(*args, "--method", "percentile", "--percentile", "120",
                           "--out", str(tmp / "c.json")), "percentile must be in (0, 100]")
    assert_refused(run_cli(*args, "--num-images", "0", "--out", str(tmp / "c.json")),
                   "--num-images")
    assert_refused(run_cli(*args, "--trt-version", "x", "--out", str(tmp / "c.json")),
                   "TensorRT version 'x'")
    assert not list(tmp.glob("c.*"))


# ---- load_calibration ----

def test_load_calibration_refuses_what_it_cannot_trust(work):
    model, data, tmp = work
    out = tmp / "c.json"
    run(model, data, out)
    good = json.loads(out.read_text())
    sha = sha256_file(model)
    assert load_calibration(out, model_sha256=sha).model_sha256 == sha

    with pytest.raises(UserError, match=r"was made for another model \(sha .*\); re-run calibrate"):
        load_calibration(out, model_sha256="0" * 64)
    with pytest.raises(UserError, match="does not exist"):
        load_calibration(tmp / "missing.json")
    cases = {"not json": "{", "wrong format": json.dumps({**good, "format": "x"}),
             "no tensors": json.dumps({k: v for k, v in good.items() if k != "tensors"}),
             "zero amax": json.dumps({**good, "tensors": {"input": {"amax": 0.0}}}),
             "a list": "[]"}
    for case, text in cases.items():
        out.write_text(text)
        with pytest.raises(UserError, match=str(out)):
            load_calibration(out)
        assert case


def test_scale_of_an_unknown_tensor(work):
    model, data, tmp = work
    calibration = run(model, data, tmp / "c.json")
    with pytest.raises(UserError, match="no range for tensor 'conv9'"):
        calibration.scale("conv9")


# ---- the pipeline's threads ----

def _prefetch_threads() -> int:
    import threading

    return sum(t.name == "calibrate-prefetch" for t in threading.enumerate())


def wait_for_no_prefetch_threads(timeout: float = 3.0) -> int:
    import time

    deadline = time.monotonic() + timeout
    while _prefetch_threads() and time.monotonic() < deadline:
        time.sleep(0.05)
    return _prefetch_threads()


def test_background_passes_items_and_errors_through_and_stops_early():
    from alexnet_deploy.calibrate import _background

    assert list(_background(_background(iter(range(50)), 2), 1)) == list(range(50))

    def failing():
        yield 1
        raise UserError("decode failed")

    with pytest.raises(UserError, match="decode failed"):
        list(_background(_background(failing(), 2), 1))
    chain = _background(_background(iter(range(10**6)), 2), 1)
    assert next(chain) == 0
    chain.close()
    assert wait_for_no_prefetch_threads() == 0


def test_a_failed_run_leaves_no_threads_behind(tmp_path):
    def log_of_input(nodes, inits):
        nodes.append(helper.make_node("Log", ["conv1"], ["log_conv1"], name="log_conv1"))

    model = tiny_model(tmp_path / "nan.onnx", extra=log_of_input)
    with pytest.raises(UserError, match="log_conv1"):
        run(model, npz_data(tmp_path / "d.npz", n=200), tmp_path / "c.json", batch_size=4)
    assert wait_for_no_prefetch_threads() == 0


# ---- real images ----

def test_real_cifar_images_every_method(shared_data, tmp_path):
    data = shared_data("cifar10_train_10k.npz")
    model = tiny_model(tmp_path / "m.onnx")
    got = {m: run(model, data, tmp_path / f"{m}.json", method=m, num_images=64).amax
           for m in ("minmax", "percentile", "entropy", "mse")}
    # the input's largest magnitude is a saturated blue pixel: (1 - 0.406) / 0.225
    assert got["minmax"]["input"] == pytest.approx((1 - 0.406) / 0.225, rel=1e-5)
    for method in ("percentile", "entropy", "mse"):
        for name, amax in got[method].items():
            assert 0 < amax <= got["minmax"][name], (method, name)
    assert load_calibration(tmp_path / "mse.json").num_images == 64


@pytest.mark.parametrize("installed, expected", [
    ({}, ("10.16.1", "no TensorRT is installed here")),
    ({"tensorrt-cu12": "10.3.0.26"}, ("10.3.0.26", "the installed tensorrt-cu12")),
    ({"tensorrt": "11.4.0.106"}, ("10.16.1", ("the installed tensorrt 11.4.0.106 reads no "
                                              "calibration caches"))),
])
def test_cache_header_names_the_installed_tensorrt_and_says_why(monkeypatch, installed,
                                                                 expected):
    from importlib import metadata

    from alexnet_deploy.calibrate import trt_header_version

    def version(dist):
        if dist in installed:
            return installed[dist]
        raise metadata.PackageNotFoundError(dist)

    monkeypatch.setattr(metadata, "version", version)
    found, why = trt_header_version(None)
    assert found == expected[0] and expected[1] in why
    assert trt_header_version("10.0.1") == ("10.0.1", "given with --trt-version")
