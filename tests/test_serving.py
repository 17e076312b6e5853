"""Serving on Triton: package (config.pbtxt against Triton's own ModelConfig protobuf), the
request handler, serve (a real Triton through PyTriton) and the bundled tritonserver on a
python-flavour repository, each answer checked against the engine's own."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import shutil
import socket
import threading
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from alexnet_deploy.cli import cli
from alexnet_deploy.engine import load_engine, read_sidecar, write_sidecar
from alexnet_deploy.errors import UserError
from alexnet_deploy.serving import repository as repo_mod
from alexnet_deploy.serving.handler import Handler, RequestError
from alexnet_deploy.serving.loadtest import check_answer

REQUESTS, CONCURRENCY = 200, 8


def run_cli(*args) -> object:
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.fixture(scope="module")
def ort_engine(small_model, tmp_path_factory) -> Path:
    """An FP32 ONNX Runtime engine of the small test model (67 px, 10 classes, any batch)."""
    from alexnet_deploy.build import build_engine

    out = tmp_path_factory.mktemp("serving") / "fp32"
    build_engine(small_model["onnx"], "fp32", out, backend="onnxruntime")
    return out


@pytest.fixture(scope="module")
def trt_engine(ort_engine, tmp_path_factory) -> Path:
    """A stand-in TensorRT engine folder: a sidecar as TensorRT writes it (profile 1..16, built
    for compute capability 8.9) over a dummy plan. Packaging copies files; it never runs them."""
    folder = tmp_path_factory.mktemp("trt") / "trt_fp16"
    folder.mkdir()
    plan = b"not a real plan"
    (folder / "model.engine").write_bytes(plan)
    side = dataclasses.replace(read_sidecar(ort_engine), backend="tensorrt", precision="fp16",
                               backend_version="10.16.1", max_batch=16,
                               artifacts={"model.engine": hashlib.sha256(plan).hexdigest()},
                               host={"gpu": "NVIDIA L4", "gpu_compute_capability": "8.9"})
    write_sidecar(folder, side)
    return folder


def parse_config(model_dir: Path):
    """config.pbtxt parsed by Triton's own ``ModelConfig`` protobuf (tritonclient ships it)."""
    pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2",
                              reason="needs tritonclient (pip install 'alexnet-deploy[serve]')")
    from google.protobuf import text_format

    return text_format.Parse((model_dir / "config.pbtxt").read_text(), pb2.ModelConfig()), pb2


# ---- package: config.pbtxt checked field by field against the sidecar ----

@pytest.mark.parametrize("flavor", ["native", "python"])
def test_package_onnxruntime_config_matches_sidecar(ort_engine, tmp_path, flavor):
    side = read_sidecar(ort_engine)
    result = run_cli("package", "--engine", ort_engine, "--triton", tmp_path / "repo",
                     "--flavor", flavor, "--instances", 3, "--max-queue-delay-us", 250,
                     "--version", 2, "--name", "tiny")
    assert result.exit_code == 0, result.output
    model = tmp_path / "repo" / "tiny"
    cfg, pb2 = parse_config(model)
    assert cfg.name == "tiny"
    if flavor == "native":
        assert (cfg.platform, cfg.backend) == ("onnxruntime_onnx", "")
        assert sorted(p.name for p in (model / "2").iterdir()) == ["model.onnx"]
        assert (model / "2" / "model.onnx").read_bytes() == (ort_engine / "model.onnx").read_bytes()
        assert len(cfg.input) == 1 and len(cfg.output) == 1
    else:
        assert (cfg.platform, cfg.backend) == ("", "python")
        assert (model / "2" / "model.py").is_file()
        assert read_sidecar(model / "2" / "engine").to_dict() == side.to_dict()
        image = cfg.input[1]
        assert (image.name, image.data_type, list(image.dims), image.optional) == (
            "image", pb2.TYPE_STRING, [1], True)
        labels = cfg.output[1]
        assert (labels.name, labels.data_type, list(labels.dims)) == (
            "labels", pb2.TYPE_STRING, [5])
        assert cfg.parameters["top_k"].string_value == "5"
    assert cfg.max_batch_size == repo_mod.DEFAULT_MAX_BATCH  # the ORT engine takes any batch
    tensor, logits = cfg.input[0], cfg.output[0]
    assert (tensor.name, tensor.data_type, list(tensor.dims)) == (
        side.input_name, pb2.TYPE_FP32, [3, 67, 67])
    assert (logits.name, logits.data_type, list(logits.dims), logits.label_filename) == (
        side.output_name, pb2.TYPE_FP32, [10], "labels.txt")
    assert (model / "labels.txt").read_text().splitlines() == side.classes
    assert cfg.dynamic_batching.max_queue_delay_microseconds == 250
    assert list(cfg.dynamic_batching.preferred_batch_size) == []
    assert [(g.count, g.kind) for g in cfg.instance_group] == [(3, pb2.ModelInstanceGroup.KIND_CPU)]
    assert sorted(p.name for p in (tmp_path / "repo").iterdir()) == ["tiny"]  # no temp left


def test_package_tensorrt_config(trt_engine, tmp_path):
    side = read_sidecar(trt_engine)
    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps({"engine": "trt", "backend": "tensorrt", "precision": "fp16",
                                 "results": [{"batch_size": b, "throughput": t} for b, t in
                                             ((1, 900.0), (4, 2900.0), (8, 3300.0),
                                              (16, 3400.0), (32, 3500.0))]}))
    result = run_cli("package", "--engine", trt_engine, "--triton", tmp_path / "repo",
                     "--bench", bench)
    assert result.exit_code == 0, result.output
    model = tmp_path / "repo" / "alexnet"
    cfg, pb2 = parse_config(model)
    assert (cfg.platform, cfg.max_batch_size) == ("tensorrt_plan", 16)
    assert cfg.default_model_filename == "model.plan"
    assert dict(cfg.cc_model_filenames) == {"8.9": "model.plan"}
    assert (model / "1" / "model.plan").read_bytes() == (trt_engine / "model.engine").read_bytes()
    # 32 is above the profile; of 1..16, 8 and 16 are within 10% of the best (3400 img/s)
    assert list(cfg.dynamic_batching.preferred_batch_size) == [8, 16]
    assert [(g.count, g.kind) for g in cfg.instance_group] == [(1, pb2.ModelInstanceGroup.KIND_GPU)]
    assert list(cfg.input[0].dims) == list(side.input_shape)


def test_fixed_batch_engine_gets_max_batch_size_zero(ort_engine):
    side = dataclasses.replace(read_sidecar(ort_engine), backend="tensorrt", min_batch=4,
                               max_batch=4)
    config = repo_mod.model_config(side)
    assert config["max_batch_size"] == 0 and "dynamic_batching" not in config
    assert config["input"][0]["dims"] == [4, 3, 67, 67]
    assert config["output"][0]["dims"] == [4, 10]


def test_openvino_native_layout(ort_engine):
    side = dataclasses.replace(read_sidecar(ort_engine), backend="openvino")
    config = repo_mod.model_config(side)
    assert config["backend"] == "openvino" and "platform" not in config
    assert repo_mod._NATIVE["openvino"][1] == {"model.xml": "model.xml", "model.bin": "model.bin"}


def test_preferred_batch_sizes_rule(ort_engine, tmp_path):
    side = read_sidecar(ort_engine)
    bench = tmp_path / "b.json"
    bench.write_text(json.dumps({"results": [{"batch_size": 1, "throughput": 100},
                                             {"batch_size": 8, "throughput": 400},
                                             {"batch_size": 32, "throughput": 430},
                                             {"batch_size": 64, "throughput": 380}]}))
    assert repo_mod.preferred_batch_sizes(bench, side, 64) == [8, 32]
    assert repo_mod.preferred_batch_sizes(bench, side, 16) == [8]
    bench.write_text("{not json")
    with pytest.raises(UserError, match="not a JSON file"):
        repo_mod.preferred_batch_sizes(bench, side, 64)


@pytest.mark.parametrize("args, message", [
    (["--name", "a/b"], "model name 'a/b' is not one Triton accepts"),
    (["--name", ".."], "model name '..' is not one Triton accepts"),
    (["--version", "0"], "model version '0' is not a positive integer"),
    (["--version", "v1"], "model version 'v1' is not a positive integer"),
    (["--instances", "0"], "Invalid value for '--instances': 0 is not in the range x>=1"),
])
def test_package_refuses_bad_options(ort_engine, tmp_path, args, message):
    result = run_cli("package", "--engine", ort_engine, "--triton", tmp_path / "repo", *args)
    assert result.exit_code == 2 and f"error: {message}" in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "repo").exists() or not any((tmp_path / "repo").iterdir())


def test_package_refuses_existing_model_and_missing_sidecar(ort_engine, tmp_path):
    repo = tmp_path / "repo"
    assert run_cli("package", "--engine", ort_engine, "--triton", repo).exit_code == 0
    before = (repo / "alexnet" / "config.pbtxt").read_text()
    again = run_cli("package", "--engine", ort_engine, "--triton", repo, "--flavor", "python")
    assert again.exit_code == 2 and "already exists" in again.output
    assert (repo / "alexnet" / "config.pbtxt").read_text() == before
    bare = tmp_path / "bare"
    shutil.copytree(ort_engine, bare)
    (bare / "engine.json").unlink()
    missing = run_cli("package", "--engine", bare, "--triton", repo, "--name", "other")
    assert missing.exit_code == 2 and "no engine.json" in missing.output
    inside = run_cli("package", "--engine", ort_engine, "--triton", ort_engine / "repo")
    assert inside.exit_code == 2 and "inside the engine folder" in inside.output
    orphan = run_cli("package", "--engine", ort_engine, "--triton", tmp_path / "no" / "repo")
    assert orphan.exit_code == 2 and "its parent folder does not exist" in orphan.output
    assert not (tmp_path / "no").exists()
    assert sorted(p.name for p in repo.iterdir()) == ["alexnet"]


def test_package_leaves_nothing_when_a_copy_fails(ort_engine, tmp_path, monkeypatch):
    def broken(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(repo_mod.shutil, "copyfile", broken)
    with pytest.raises(UserError, match="No space left on device"):
        repo_mod.package(ort_engine, tmp_path / "repo")
    assert list((tmp_path / "repo").iterdir()) == []


# ---- the request handler both servers run ----

def encode(array: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt)
    return buf.getvalue()


def test_handler_runs_mixed_requests_in_one_batch_and_fails_only_bad_ones(ort_engine):
    rng = np.random.default_rng(0)
    with load_engine(ort_engine) as engine:
        handler = Handler(engine, top_k=3)
        x = rng.standard_normal((2, 3, 67, 67)).astype(np.float32)
        photo = rng.integers(0, 256, (90, 120, 3), dtype=np.uint8)
        calls = []
        real_infer = engine.infer
        engine.infer = lambda b: calls.append(len(b)) or real_infer(b)
        answers = handler.run([
            {"input": x},
            {"image": np.array([[b"not an image"]], dtype=object)},
            {"image": np.array([[encode(photo)]], dtype=object)},
            {"input": x[:1], "image": np.array([[b""]], dtype=object)},
            {"input": x[:, :, :10]},
        ])
        engine.infer = real_infer
        assert calls == [3]  # the two good requests' three images: one engine call
        assert np.allclose(answers[0]["logits"], engine.infer(x), atol=1e-5)
        want = engine.infer(engine.sidecar.preprocess.load(Image.fromarray(photo))[None])
        assert np.allclose(answers[2]["logits"], want, atol=1e-5)
        order = np.argsort(-want[0])[:3]
        assert list(answers[2]["labels"][0]) == [engine.sidecar.classes[i].encode()
                                                 for i in order]
        assert isinstance(answers[1], RequestError) and "cannot be decoded" in str(answers[1])
        assert isinstance(answers[3], RequestError) and "exactly one" in str(answers[3])
        assert isinstance(answers[4], RequestError) and "must be FP32" in str(answers[4])


@pytest.fixture(scope="module")
def u8_engine(small_model, tmp_path_factory) -> Path:
    """The FP32 ONNX Runtime engine of the small model taking uint8 NHWC pixels."""
    from alexnet_deploy.build import build_engine

    out = tmp_path_factory.mktemp("serving") / "fp32-u8"
    build_engine(small_model["onnx"], "fp32", out, backend="onnxruntime",
                 input_format="uint8-nhwc")
    return out


def test_a_uint8_engine_is_served_its_pixels(u8_engine, tmp_path):
    pixels = np.random.default_rng(3).integers(0, 256, (2, 67, 67, 3), dtype=np.uint8)
    with load_engine(u8_engine) as engine:
        handler = Handler(engine, top_k=2)
        good, floats = handler.run([{"input": pixels},
                                    {"input": np.zeros((1, 3, 67, 67), np.float32)}])
        assert np.array_equal(good["logits"], engine.infer(pixels))
        assert isinstance(floats, RequestError)
        assert "must be UINT8 [n, 67, 67, 3], got float32 [1, 3, 67, 67]" in str(floats)
    for flavor in ("native", "python"):
        result = run_cli("package", "--engine", u8_engine, "--triton", tmp_path / flavor,
                         "--flavor", flavor)
        assert result.exit_code == 0, result.output
        cfg, pb2 = parse_config(tmp_path / flavor / "alexnet")
        tensor = cfg.input[0]
        assert (tensor.data_type, list(tensor.dims)) == (pb2.TYPE_UINT8, [67, 67, 3])


def test_check_answer_catches_a_mixed_up_answer():
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal(10) * 3, rng.standard_normal(10) * 3
    assert check_answer(a.astype(np.float32), b"x", a, b"x") is not None
    assert check_answer(b.astype(np.float32), b"x", a, b"x") is None  # another image's answer
    assert check_answer(a.astype(np.float32), b"y", a, b"x") is None  # wrong label
    assert check_answer((a + 0.1).astype(np.float32), b"x", a, b"x") is None


# ---- real servers (need the serve extra: nvidia-pytriton, tritonclient) ----

def needs_triton():
    pytest.importorskip("pytriton", reason="needs PyTriton: pip install 'alexnet-deploy[serve]'")
    pytest.importorskip("tritonclient.http", reason="needs tritonclient[all]")


def send_concurrently(port_http: int, port_grpc: int, model: str, images: np.ndarray,
                      engine_logits: np.ndarray, labels: list[bytes]) -> dict[str, int]:
    """REQUESTS requests (one image each) from CONCURRENCY threads, half over HTTP and half over
    gRPC; counts of answers matching the engine's own ('ok') and not ('wrong')."""
    from alexnet_deploy.serving.loadtest import Client

    counts = {"ok": 0, "wrong": 0}
    lock = threading.Lock()

    def worker(t: int) -> None:
        protocol, port = ("http", port_http) if t % 2 == 0 else ("grpc", port_grpc)
        client = Client(protocol, port, model, "input", "logits")
        try:
            for k in range(t, REQUESTS, CONCURRENCY):
                i = k % len(images)
                logits, label = client.infer(images[i])
                good = check_answer(logits, label, engine_logits[i], labels[i]) is not None
                with lock:
                    counts["ok" if good else "wrong"] += 1
        finally:
            client.close()

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(CONCURRENCY)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return counts


def expected_answers(engine_dir: Path, n: int = 40):
    """``n`` synthetic images, the engine's logits for each at batch 1, and its top-1 labels."""
    from alexnet_deploy.bench import load_images

    with load_engine(engine_dir) as engine:
        images = load_images("synthetic:test", engine.sidecar.preprocess, n)
        logits = np.concatenate([engine.infer(images[i:i + 1]) for i in range(n)])
        labels = list(Handler(engine, top_k=1).labels(logits)[:, 0])
    logits = logits.astype(np.float64)
    # any image's answer given to another fails the check: a mix-up cannot pass
    assert all(check_answer(logits[j], labels[j], logits[i], labels[i]) is None
               for i in range(n) for j in range(n) if i != j)
    return images, logits, labels


def infer_image(port: int, model: str, data: bytes):
    from tritonclient import http

    client = http.InferenceServerClient(f"localhost:{port}")
    try:
        inp = http.InferInput("image", [1, 1], "BYTES")
        inp.set_data_from_numpy(np.array([[data]], dtype=object))
        return client.infer(model, [inp])
    finally:
        client.close()


def assert_malformed_requests_get_errors(port: int, model: str, image_model: str) -> None:
    from tritonclient import http
    from tritonclient.utils import InferenceServerException

    client = http.InferenceServerClient(f"localhost:{port}")
    try:
        for shape, dtype, arr in (([1, 3, 10, 10], "FP32", np.zeros((1, 3, 10, 10), np.float32)),
                                  ([1, 3, 67, 67], "FP64", np.zeros((1, 3, 67, 67), np.float64))):
            inp = http.InferInput("input", shape, dtype)
            inp.set_data_from_numpy(arr)
            with pytest.raises(InferenceServerException, match="input"):
                client.infer(model, [inp])
    finally:
        client.close()
    with pytest.raises(InferenceServerException, match="cannot be decoded"):
        infer_image(port, image_model, b"\x89PNG but not really")


def check_server(engine_dir: Path, ports, model: str, image_model: str) -> None:
    """REQUESTS tensor requests at CONCURRENCY answered like the engine; malformed requests
    refused one by one; an encoded JPEG answered like the engine; still serving afterwards."""
    images, logits, labels = expected_answers(engine_dir)
    counts = send_concurrently(ports.http, ports.grpc, model, images, logits, labels)
    assert counts == {"ok": REQUESTS, "wrong": 0}
    assert_malformed_requests_get_errors(ports.http, model, image_model)
    photo = np.random.default_rng(2).integers(0, 256, (80, 100, 3), dtype=np.uint8)
    jpeg = encode(photo, "JPEG")
    answer = infer_image(ports.http, image_model, jpeg)
    with load_engine(engine_dir) as engine, Image.open(io.BytesIO(jpeg)) as im:
        want = engine.infer(engine.sidecar.preprocess.load(im)[None])
    assert np.allclose(answer.as_numpy("logits"), want, atol=1e-4)
    again = send_concurrently(ports.http, ports.grpc, model, images[:8], logits[:8], labels[:8])
    assert again == {"ok": REQUESTS, "wrong": 0}


@pytest.mark.serving
@pytest.mark.slow
def test_serve_takes_uint8_pixels_for_a_uint8_engine(u8_engine, tmp_path):
    needs_triton()
    from tritonclient import grpc, http

    from alexnet_deploy.serving.server import Ports, ServerProcess, free_ports, serve_command

    ports = Ports(*free_ports())
    server = ServerProcess(serve_command(u8_engine, ports, max_batch=8), ports,
                           ["alexnet", "alexnet_image"], log=tmp_path / "serve.log")
    pixels = np.random.default_rng(4).integers(0, 256, (6, 67, 67, 3), dtype=np.uint8)
    try:
        server.wait_ready()
        with load_engine(u8_engine) as engine:
            want = engine.infer(pixels)
        for module, port in ((http, ports.http), (grpc, ports.grpc)):
            client = module.InferenceServerClient(f"localhost:{port}")
            try:
                for i in range(len(pixels)):
                    inp = module.InferInput("input", [1, 67, 67, 3], "UINT8")
                    inp.set_data_from_numpy(pixels[i:i + 1])
                    got = client.infer("alexnet", [inp]).as_numpy("logits")
                    assert np.allclose(got, want[i:i + 1], atol=1e-5)
            finally:
                client.close()
    finally:
        server.stop()


@pytest.mark.serving
@pytest.mark.slow
def test_serve_answers_concurrent_requests_like_the_engine(ort_engine, tmp_path):
    needs_triton()
    from alexnet_deploy.serving.server import Ports, ServerProcess, free_ports, serve_command

    ports = Ports(*free_ports())
    log = tmp_path / "serve.log"
    server = ServerProcess(serve_command(ort_engine, ports, max_batch=8, instances=2), ports,
                           ["alexnet", "alexnet_image"], log=log)
    try:
        server.wait_ready()
        check_server(ort_engine, ports, "alexnet", "alexnet_image")
    finally:
        status = server.stop()  # SIGINT to the process group, as Ctrl-C on a terminal
    assert status == 130, server.log_tail()
    assert "interrupted" in server.log_tail(300)
    assert not server.leftovers, "processes of the server outlived it"


@pytest.mark.serving
def test_serve_port_in_use_is_one_line(ort_engine):
    needs_triton()
    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        s.listen()
        port = s.getsockname()[1]
        result = run_cli("serve", "--engine", ort_engine, "--http-port", port)
    assert result.exit_code == 2
    assert result.output.strip() == (f"error: --http-port {port} is in use: stop what listens "
                                     "there or choose another port")


@pytest.mark.serving
@pytest.mark.slow
def test_python_flavour_repository_served_by_bundled_tritonserver(ort_engine, tmp_path):
    needs_triton()
    from alexnet_deploy.serving.server import (
        Ports,
        ServerProcess,
        backend_dir,
        free_ports,
        tritonserver_command,
        tritonserver_env,
    )

    repo = tmp_path / "repo"
    result = run_cli("package", "--engine", ort_engine, "--triton", repo, "--flavor", "python",
                     "--max-batch", 8)
    assert result.exit_code == 0, result.output
    ports = Ports(*free_ports())
    argv = tritonserver_command(repo, backend_dir(tmp_path / "backends"), ports)
    server = ServerProcess(argv, ports, ["alexnet"], env=tritonserver_env(),
                           log=tmp_path / "tritonserver.log")
    try:
        server.wait_ready()
        check_server(ort_engine, ports, "alexnet", "alexnet")
    finally:
        server.stop()
    assert not server.leftovers, "tritonserver or its backend stubs outlived it"


@pytest.mark.serving
@pytest.mark.slow
def test_loadtest_sweeps_both_settings_and_writes_a_report(ort_engine, tmp_path):
    needs_triton()
    report = tmp_path / "lt.md"
    result = run_cli("loadtest", "--engine", ort_engine, "--data", "synthetic:test",
                     "--concurrency", "1,4", "--protocols", "http,grpc", "--duration", 0.4,
                     "--rounds", 2,
                     "--images", 8, "--json", tmp_path / "lt.json", "--report", report)
    assert result.exit_code == 0, result.output
    doc = json.loads((tmp_path / "lt.json").read_text())
    levels = {(lv["batching"], lv["protocol"], lv["concurrency"]): lv for lv in doc["levels"]}
    assert set(levels) == {(b, p, c) for b in ("on", "off") for p in ("http", "grpc")
                           for c in (1, 4)}
    assert doc["passed"] and all(lv["ok"] > 0 and lv["failed"] == lv["wrong"] == 0
                                 for lv in levels.values())
    for lv in levels.values():  # two rounds pooled: req/s is their median
        assert len(lv["round_throughputs"]) == 2
        assert lv["throughput"] == pytest.approx(np.median(lv["round_throughputs"]), rel=1e-3)
        assert lv["p50_ms"] <= lv["p95_ms"] <= lv["p99_ms"]
        assert lv["server_cpu_s"] > 0 and lv["cpu_ms_per_request"] > 0
    text = report.read_text()
    assert "## Dynamic batching on vs off" in text and "no failed or wrong answers" in text
    assert "{" not in text  # every placeholder filled in
    assert (tmp_path / "lt-loadtest.png").stat().st_size > 0
    bad = run_cli("loadtest", "--engine", ort_engine, "--data", "synthetic:test",
                  "--protocols", "smtp")
    assert bad.exit_code == 2 and "error: --protocols ['smtp']" in bad.output


def test_serve_without_the_serve_extra_is_one_line(ort_engine, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "pytriton" else real(name, *a))
    result = run_cli("serve", "--engine", ort_engine)
    assert result.exit_code == 2
    assert result.output.strip() == ("error: serving needs pytriton: pip install "
                                     "'alexnet-deploy[serve]' (nvidia-pytriton, tritonclient[all])")
