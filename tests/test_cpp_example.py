"""examples/cpp: builds the C++ apps with CMake and checks them against the Python side.

* Preprocessing: ``alexnet_preprocess`` (the C++ decode + Pillow-port resize + normalize) equals
  ``PreprocessSpec.load_path`` bit for bit, on Pillow-written JPEG/PNG files of every kind the
  decoder handles and on the 48 ImageNet photos in ``../shared/data``.
* Classification: ``alexnet_classify_openvino`` on an OpenVINO engine of the full-size model
  (227 px, 1000 classes, fixed-seed random weights: no pretrained weights exist offline) gives
  the top-1 of Python's ``engine.classify`` for every photo, with probabilities within
  :data:`PROB_TOL`; several worker threads give the same predictions as one.
* TensorRT: the TensorRT app compiles where ``TensorRT_ROOT`` points at TensorRT (headers
  suffice, see examples/cpp/CMakeLists.txt); skipped otherwise. Nothing TensorRT runs here.

Skipped with a reason when cmake, a C++ compiler or the Debian packages that
``examples/cpp/install-deps.sh`` installs are missing. Marked ``openvino`` (the Python reference
loads an OpenVINO engine, so it runs in the OpenVINO test process) and ``slow``.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from alexnet_deploy.engine import EngineSidecar, write_sidecar
from alexnet_deploy.preprocess import PreprocessSpec
from tests.conftest import make_small_model, shared_path

pytestmark = [pytest.mark.cpp, pytest.mark.openvino, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "examples" / "cpp"
# Probabilities of the C++ app and of engine.classify may differ by this much (absolute). Both
# run the same OpenVINO engine on bit-identical inputs; measured difference 1.4e-16 (float64
# softmax summation order). The smallest top-1 margin on the 48 photos is 1.7e-4, so this
# tolerance cannot hide a swapped top-1.
PROB_TOL = 1e-6
MISSING_DEPS = ("Could NOT find JPEG", "Could NOT find PNG", "nlohmann_json")


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], check=False, capture_output=True,
                          text=True, **kw)


def _configure(build: Path, *args: str) -> subprocess.CompletedProcess:
    """``cmake -S examples/cpp -B build args``; skips when the dependencies are missing."""
    if shutil.which("cmake") is None or shutil.which("c++") is None:
        pytest.skip("cmake or a C++ compiler is missing: run examples/cpp/install-deps.sh")
    done = _run(["cmake", "-S", SOURCE, "-B", build, "-DCMAKE_BUILD_TYPE=Release", *args])
    if done.returncode != 0 and any(m in done.stdout + done.stderr for m in MISSING_DEPS):
        pytest.skip("libjpeg, libpng or nlohmann-json headers are missing: run "
                    "examples/cpp/install-deps.sh")
    assert done.returncode == 0, done.stdout + done.stderr
    return done


@pytest.fixture(scope="module")
def apps(tmp_path_factory) -> Path:
    """The folder holding the built alexnet_preprocess and alexnet_classify_openvino."""
    get_cmake_path = pytest.importorskip("openvino.utils").get_cmake_path
    build = tmp_path_factory.mktemp("cpp-build")
    configured = _configure(build, f"-DOpenVINO_DIR={get_cmake_path()}")
    assert "building alexnet_classify_openvino" in configured.stdout, configured.stdout
    done = _run(["cmake", "--build", build, "-j", "2"])
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return build


def _sidecar_only(folder: Path, spec: PreprocessSpec, backend: str = "openvino",
                  backend_version: str = "0", artifacts: tuple[str, ...] = ()) -> Path:
    """An engine folder holding a sidecar with ``spec`` and empty ``artifacts``: enough for
    alexnet_preprocess and for the apps' checks before they load a model."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in artifacts:
        (folder / name).write_bytes(b"")
    write_sidecar(folder, EngineSidecar(
        backend=backend, backend_version=backend_version, precision="fp32", layer_precision={},
        artifacts=dict.fromkeys(artifacts, "0"), preprocess=spec, classes=["a", "b"],
        input_shape=spec.input_shape))
    return folder


def _cpp_inputs(apps: Path, engine: Path, images: list[Path], out: Path) -> np.ndarray:
    done = _run([apps / "alexnet_preprocess", engine, out, *images])
    assert done.returncode == 0, done.stderr
    spec = EngineSidecar.from_dict(json.loads((engine / "engine.json").read_text())).preprocess
    return np.fromfile(out, np.float32).reshape(len(images), *spec.input_shape)


def _synthetic_images(folder: Path) -> list[Path]:
    """Files of every kind the C++ decoder handles, 53x37 (odd sizes exercise
    chroma upsampling at the edges): JPEG RGB 4:4:4/4:2:2/4:2:0, progressive, grayscale; PNG
    RGB, RGBA, L, LA, P, P with transparency, 1-bit, interlaced, 16-bit RGB, 16-bit gray."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(7)
    y, x = np.mgrid[0:37, 0:53]
    smooth = np.stack([x * 4, y * 6, (x + y) * 3], -1) % 256
    rgb = np.clip(smooth + rng.integers(-40, 40, smooth.shape), 0, 255).astype(np.uint8)
    img = Image.fromarray(rgb)
    gray = img.convert("L")
    files = {
        "rgb444.jpg": (img, {"quality": 90, "subsampling": 0}),
        "rgb422.jpg": (img, {"quality": 75, "subsampling": 1}),
        "rgb420.jpg": (img, {"quality": 60, "subsampling": 2}),
        "progressive.jpg": (img, {"quality": 80, "progressive": True}),
        "gray.jpg": (gray, {"quality": 85}),
        "rgb.png": (img, {}),
        "rgba.png": (Image.fromarray(np.dstack([rgb, rgb[..., :1]])), {}),
        "l.png": (gray, {}),
        "la.png": (Image.merge("LA", (gray, gray.point(lambda v: 255 - v))), {}),
        "p.png": (img.quantize(64), {}),
        "p_transparent.png": (img.quantize(16), {"transparency": 3}),
        "bilevel.png": (gray.convert("1"), {}),
        "interlaced.png": (img, {"interlace": 1}),
    }
    paths = []
    for name, (image, options) in files.items():
        path = folder / name
        image.save(path, **options)
        paths.append(path)
    paths.append(_write_png16(folder / "rgb16.png", rgb.astype(">u2") * 256 + 100))
    gray16 = folder / "gray16.png"  # Pillow mode I;16: open_image scales it by 1/257
    Image.fromarray((np.asarray(gray, np.uint16) * 257 + rng.integers(0, 257, (37, 53))
                     ).astype(np.uint16)).save(gray16)
    paths.append(gray16)
    return paths


def _write_png16(path: Path, rgb16: np.ndarray) -> Path:
    """A 16-bit RGB PNG (Pillow cannot write one): signature, IHDR, one IDAT, IEND."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data)))

    h, w, _ = rgb16.shape
    rows = b"".join(b"\0" + rgb16[y].astype(">u2").tobytes() for y in range(h))  # filter 0
    header = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)  # 16-bit, colour type 2 (RGB)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
                     + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))
    return path


@pytest.mark.parametrize("spec", [PreprocessSpec(crop=30, resize=37),  # decode only
                                  PreprocessSpec(crop=64, resize=80),  # upscale
                                  PreprocessSpec(crop=20, resize=24, interpolation="bicubic")],
                         ids=["no-resize", "bilinear-up", "bicubic-down"])
def test_preprocess_equals_python_on_every_file_kind(apps, tmp_path, spec):
    images = _synthetic_images(tmp_path / "images")
    engine = _sidecar_only(tmp_path / "engine", spec)
    cpp = _cpp_inputs(apps, engine, images, tmp_path / "inputs.f32")
    for image, got in zip(images, cpp):
        np.testing.assert_array_equal(got, spec.load_path(image), err_msg=image.name)


@pytest.mark.parametrize("spec", [PreprocessSpec(),  # the full-size model's: 256, 227 bilinear
                                  PreprocessSpec(interpolation="bicubic"),
                                  PreprocessSpec(crop=224, resize=600),  # upscaling
                                  PreprocessSpec(crop=67, resize=70)],  # downscaling 5-7x
                         ids=["default", "bicubic", "up", "down"])
def test_preprocess_equals_python_on_photos(apps, tmp_path, spec):
    photos = sorted(shared_path("imagenet_samples48").rglob("*.JPEG"))
    assert len(photos) == 48
    engine = _sidecar_only(tmp_path / "engine", spec)
    cpp = _cpp_inputs(apps, engine, photos, tmp_path / "inputs.f32")
    python = np.stack([spec.load_path(p) for p in photos])
    assert np.abs(cpp - python).max() == 0.0  # bit-exact, grayscale photos included


def test_bad_input_is_one_line_and_status_2(apps, tmp_path):
    classify = apps / "alexnet_classify_openvino"
    trt_engine = _sidecar_only(tmp_path / "trt", PreprocessSpec(crop=30, resize=37), "tensorrt")
    not_image = tmp_path / "notes.txt"
    not_image.write_text("hello")
    newer = _sidecar_only(tmp_path / "newer", PreprocessSpec(crop=30, resize=37),
                          backend_version="9999.0.0-1", artifacts=("model.xml", "model.bin"))
    cases = {
        "does not exist": [tmp_path / "absent", not_image],
        # the Python backend's message (OpenVinoBackend.check_compatible)
        "engine was built with OpenVINO 9999.0.0-1, newer than the installed": [newer, not_image],
        "was built for tensorrt": [trt_engine, not_image],
        "--threads needs": ["--threads", "0", trt_engine, not_image],
    }
    for expected, args in cases.items():
        done = _run([classify, *args])
        assert done.returncode == 2 and done.stderr.count("\n") == 1, (args, done.stderr)
        assert done.stderr.startswith("error: ") and expected in done.stderr, done.stderr
    ov_engine = _sidecar_only(tmp_path / "ov", PreprocessSpec(crop=30, resize=37))
    bad = [(not_image, f"image {not_image} is neither a JPEG nor a PNG")]
    for kind in ("PNG", "JPEG"):  # truncated files are refused, as by Pillow
        truncated = tmp_path / f"truncated.{kind.lower()}"
        noise = np.random.default_rng(0).integers(0, 256, (40, 40, 3), np.uint8)
        Image.fromarray(noise).save(truncated, kind)
        truncated.write_bytes(truncated.read_bytes()[:-500])  # well inside the pixel data
        bad.append((truncated, f"cannot decode {kind} image {truncated}"))
    for image, expected in bad:
        done = _run([apps / "alexnet_preprocess", ov_engine, tmp_path / "x.f32", image])
        assert done.returncode == 2 and expected in done.stderr, done.stderr
        assert not (tmp_path / "x.f32").exists() and not (tmp_path / "x.f32.tmp").exists()


@pytest.fixture(scope="module")
def full_engine(tmp_path_factory) -> Path:
    """An OpenVINO FP32 engine of the full-size model (227 px, 1000 classes, random weights)."""
    from alexnet_deploy.build import build_engine

    root = tmp_path_factory.mktemp("full-size")
    classes = tuple(f"class {i:03d}" for i in range(1000))
    paths = make_small_model(root, seed=13, size=227, classes=classes, width_mult=1.0)
    build_engine(paths["onnx"], "fp32", root / "fp32", backend="openvino", progress=False)
    return root / "fp32"


def _cpp_predictions(apps: Path, engine: Path, images: list[Path], threads: int) -> list[dict]:
    done = _run([apps / "alexnet_classify_openvino", "--json", "--threads", str(threads),
                 engine, *images])
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines()]


def test_classify_matches_engine_classify_on_photos(apps, full_engine):
    from alexnet_deploy.engine import load_engine

    photos = sorted(shared_path("imagenet_samples48").rglob("*.JPEG"))
    cpp = _cpp_predictions(apps, full_engine, photos, threads=2)
    with load_engine(full_engine) as engine:
        python = engine.classify(photos, top_k=1000)
    assert [p["source"] for p in cpp] == [str(p) for p in photos]
    for c, p in zip(cpp, python):
        assert c["indices"][0] == p.indices[0], c["source"]
        assert c["labels"][0] == p.labels[0]
        reference = dict(zip(p.indices, p.probabilities))
        for index, prob in zip(c["indices"], c["probabilities"]):
            assert abs(prob - reference[index]) <= PROB_TOL, (c["source"], index)


def test_classify_feeds_a_uint8_engine_its_pixels(apps, full_engine):
    # the same model built with --input uint8-nhwc: the app sends the resized, cropped pixels
    from alexnet_deploy.build import build_engine
    from alexnet_deploy.engine import load_engine

    u8 = full_engine.parent / "fp32-u8"
    if not u8.exists():
        build_engine(full_engine.parent / "model.onnx", "fp32", u8, backend="openvino",
                     input_format="uint8-nhwc", progress=False)
    photos = sorted(shared_path("imagenet_samples48").rglob("*.JPEG"))[:16]
    cpp = _cpp_predictions(apps, u8, photos, threads=2)
    with load_engine(u8) as engine:
        assert engine.takes_uint8
        python = engine.classify(photos, top_k=1000)
    for c, p in zip(cpp, python):
        assert c["indices"][0] == p.indices[0], c["source"]
        reference = dict(zip(p.indices, p.probabilities))
        for index, prob in zip(c["indices"], c["probabilities"]):
            assert abs(prob - reference[index]) <= PROB_TOL, (c["source"], index)


def test_threads_give_the_same_predictions(apps, full_engine, tmp_path):
    images = _synthetic_images(tmp_path / "images") * 2  # 28 images over 4 threads
    one = _cpp_predictions(apps, full_engine, images, threads=1)
    four = _cpp_predictions(apps, full_engine, images, threads=4)
    assert [p["source"] for p in four] == [str(p) for p in images]
    assert len({tuple(p["indices"]) for p in one}) > 1  # the images do get different answers
    for a, b in zip(one, four):
        assert a["indices"] == b["indices"]
        np.testing.assert_allclose(a["probabilities"], b["probabilities"], rtol=0, atol=PROB_TOL)


# ---- TensorRT: compile only, against whatever TensorRT_ROOT holds ----

def _fake_tensorrt(root: Path, version_h: str) -> Path:
    (root / "include").mkdir(parents=True)
    (root / "lib").mkdir()
    (root / "include" / "NvInfer.h").write_text("")
    (root / "include" / "NvInferVersion.h").write_text(version_h)
    (root / "lib" / "libnvinfer.so").write_text("")
    return root


# NvInferVersion.h of TensorRT 10.16 and 11.x (NV_TENSORRT_* are aliases) and of earlier releases
VERSION_H_ALIASED = ("#define TRT_MAJOR_ENTERPRISE 11\n#define TRT_MINOR_ENTERPRISE 1\n"
                     "#define TRT_PATCH_ENTERPRISE 0\n#define TRT_BUILD_ENTERPRISE 106\n"
                     "#define NV_TENSORRT_MAJOR TRT_MAJOR_ENTERPRISE //!< major\n"
                     "#define NV_TENSORRT_MINOR TRT_MINOR_ENTERPRISE\n"
                     "#define NV_TENSORRT_PATCH TRT_PATCH_ENTERPRISE\n"
                     "#define NV_TENSORRT_BUILD TRT_BUILD_ENTERPRISE\n")
VERSION_H_NUMERIC = ("#define NV_TENSORRT_MAJOR 10\n#define NV_TENSORRT_MINOR 3\n"
                     "#define NV_TENSORRT_PATCH 0\n#define NV_TENSORRT_BUILD 26\n")


@pytest.mark.parametrize(("version_h", "expected"), [(VERSION_H_ALIASED, "11.1.0.106"),
                                                     (VERSION_H_NUMERIC, "10.3.0.26")],
                         ids=["alias-10.16-and-11", "numeric-before-10.16"])
def test_find_tensorrt_reads_the_version(tmp_path, version_h, expected):
    if shutil.which("cmake") is None:
        pytest.skip("cmake is missing: run examples/cpp/install-deps.sh")
    root = _fake_tensorrt(tmp_path / "TensorRT", version_h)
    project = tmp_path / "project"
    project.mkdir()
    (project / "CMakeLists.txt").write_text(
        "cmake_minimum_required(VERSION 3.25)\nproject(probe LANGUAGES NONE)\n"
        f'list(APPEND CMAKE_MODULE_PATH "{SOURCE / "cmake"}")\n'
        "find_package(TensorRT REQUIRED)\n"
        'message(STATUS "probe: ${TensorRT_VERSION} ${TensorRT_LIBRARY}")\n')
    done = _run(["cmake", "-S", project, "-B", tmp_path / "build", f"-DTensorRT_ROOT={root}"])
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"probe: {expected} {root / 'lib' / 'libnvinfer.so'}" in done.stdout


def test_tensorrt_app_compiles(tmp_path):
    root = os.environ.get("TensorRT_ROOT")
    if not root:
        pytest.skip("TensorRT_ROOT not set")
    configured = _configure(tmp_path, f"-DTensorRT_ROOT={root}",
                            "-DALEXNET_TENSORRT_COMPILE_ONLY=ON")
    if "building alexnet_classify_tensorrt" in configured.stdout:
        target = "alexnet_classify_tensorrt"  # libraries found: compile and link
    else:
        assert "compiling alexnet_classify_tensorrt to object files" in configured.stdout, (
            configured.stdout)
        target = "alexnet_classify_tensorrt_objects"  # headers only
    done = _run(["cmake", "--build", tmp_path, "--target", target, "-j", "2"])
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
