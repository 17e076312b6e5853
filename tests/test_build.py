"""``alexnet-deploy build``: what it writes, what it prints, and how it refuses bad input."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest
from click.testing import CliRunner

from alexnet_deploy.backends.onnxruntime import BACKEND as ONNXRUNTIME
from alexnet_deploy.backends.tensorrt import BACKEND as TENSORRT
from alexnet_deploy.build import build_engine
from alexnet_deploy.cli import cli
from alexnet_deploy.engine import SIDECAR_NAME, read_sidecar
from alexnet_deploy.errors import UserError
from alexnet_deploy.fileio import sha256_file
from alexnet_deploy.metadata import read_model_info, write_model_info
from alexnet_deploy.preprocess import PreprocessSpec

LAYERS = ["conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7", "fc8"]


def run(*args: str):
    return CliRunner().invoke(cli, ["build", *args])


def test_build_writes_a_complete_engine_folder_and_prints_a_summary(small_model, tmp_path):
    out = tmp_path / "engines" / "fp32"
    out.parent.mkdir()
    result = run("--model", str(small_model["onnx"]), "--precision", "fp32",
                 "--backend", "onnxruntime", "--out", str(out), "--threads", "1")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == [SIDECAR_NAME, "model.onnx"]
    assert [p.name for p in out.parent.iterdir()] == ["fp32"]  # no temporary folder left
    sidecar = read_sidecar(out)
    assert sidecar.backend == "onnxruntime"
    assert sidecar.backend_version == ONNXRUNTIME.version()
    assert sidecar.precision == "fp32"
    assert sidecar.layer_precision == {name: "fp32" for name in LAYERS}
    assert sidecar.model_sha256 == sha256_file(small_model["onnx"])
    assert sidecar.checkpoint_sha256 == sha256_file(small_model["checkpoint"])
    assert sidecar.calibration_sha256 is None and sidecar.placement is None
    assert sidecar.artifacts == {"model.onnx": sha256_file(out / "model.onnx")}
    info = read_model_info(small_model["onnx"])
    assert sidecar.preprocess == info.preprocess and sidecar.classes == info.classes
    assert sidecar.input_shape == (3, 67, 67) and sidecar.max_batch is None
    assert sidecar.build_seconds > 0 and sidecar.built_at.endswith("+00:00")
    assert {"hostname", "platform", "cpu"} <= set(sidecar.host)
    for text in ("backend    onnxruntime", "precision  fp32", "conv1=fp32", "fc8=fp32",
                 "size ", "build time"):
        assert text in result.output


def test_int8_build_records_calibration_and_placement(small_model, tmp_path):
    result = build_engine(small_model["onnx"], "int8", tmp_path / "int8", backend="onnxruntime",
                          calibration=small_model["calibration"])
    sc = result.sidecar
    assert sc.precision == "int8" and sc.placement == "cpu"
    assert sc.layer_precision == {name: "int8" for name in LAYERS}
    assert sc.calibration_sha256 == sha256_file(small_model["calibration"])
    assert result.size_bytes < 0.5 * (small_model["onnx"].stat().st_size)


def test_rebuilding_replaces_the_engine(small_model, tmp_path):
    out = tmp_path / "e"
    build_engine(small_model["onnx"], "fp16", out, backend="onnxruntime")
    build_engine(small_model["onnx"], "fp32", out, backend="onnxruntime")
    assert read_sidecar(out).precision == "fp32"
    assert [p.name for p in tmp_path.iterdir()] == ["e"]


@pytest.fixture
def small_tuning(monkeypatch):
    """A budgeted search on fewer images (the logic, not the statistics, is under test)."""
    import alexnet_deploy.build as build_mod

    monkeypatch.setattr(build_mod, "CALIBRATION_IMAGES", 128)
    monkeypatch.setattr(build_mod, "HELD_OUT_IMAGES", 384)
    monkeypatch.setattr(build_mod, "SPEED_SECONDS", 0.2)


def test_max_top1_drop_keeps_costly_layers_fp32(small_model, tmp_path, small_tuning):
    # labels count here (the synthetic data's classes are the model's), so the budget is in
    # top-1 accuracy points; with --calibration the method is fixed and every image read is
    # held out
    result = build_engine(small_model["onnx"], "int8", tmp_path / "mixed", backend="onnxruntime",
                          calibration=small_model["calibration"], max_top1_drop=0.1,
                          calibration_data="synthetic:train", progress=False)
    mixed = result.mixed
    assert mixed is not None and mixed.measure == "accuracy drop" and mixed.num_images == 384
    assert mixed.final.drop_high <= 0.1 and mixed.fits
    kept = set(mixed.fp32_layers)
    assert {k for k, v in result.sidecar.layer_precision.items() if v == "fp32"} == kept
    assert result.sidecar.precision == ("int8" if not kept else "mixed")
    assert list(result.tuning["methods"]) == ["minmax"]  # the file's method, not a search
    assert result.tuning["data"]["calibration_images"] == 0
    assert result.sidecar.calibration_sha256 == sha256_file(small_model["calibration"])
    assert any(line.startswith("budget     top-1 drop <= 0.1 pt (at 95% confidence) on 384 "
                               "held-out images") for line in result.summary())


def test_failed_build_leaves_nothing_behind(small_model, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise UserError("backend exploded")

    monkeypatch.setattr(ONNXRUNTIME, "build", broken)
    result = run("--model", str(small_model["onnx"]), "--precision", "fp32",
                 "--backend", "onnxruntime", "--out", str(tmp_path / "e"))
    assert result.exit_code == 2
    assert "error: backend exploded" in result.output
    assert list(tmp_path.iterdir()) == []


# ---- bad input: one line, exit 2 ----

def expect_error(result, message: str) -> None:
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output


def test_int8_needs_a_calibration(small_model, tmp_path):
    expect_error(run("--model", str(small_model["onnx"]), "--precision", "int8",
                     "--out", str(tmp_path / "e")), "INT8 needs --calibration FILE")


def test_calibration_for_another_model_is_refused(small_model, tmp_path):
    other = tmp_path / "other.onnx"
    model = onnx.load(str(small_model["onnx"]))
    model.doc_string = "another export"
    onnx.save(model, str(other))
    expect_error(run("--model", str(other), "--precision", "int8", "--backend", "onnxruntime",
                     "--calibration", str(small_model["calibration"]),
                     "--out", str(tmp_path / "e")), "was made for another model")
    assert not (tmp_path / "e").exists()


def test_unknown_backend(small_model, tmp_path):
    expect_error(run("--model", str(small_model["onnx"]), "--precision", "fp32",
                     "--backend", "tflite", "--out", str(tmp_path / "e")),
                 "'tflite' is not one of 'auto', 'onnxruntime', 'openvino', 'tensorrt'")


def test_backend_not_installed_says_how_to_install(small_model, tmp_path):
    if TENSORRT.available():
        pytest.skip("TensorRT is installed here")
    expect_error(run("--model", str(small_model["onnx"]), "--precision", "fp32",
                     "--backend", "tensorrt", "--out", str(tmp_path / "e")),
                 "pip install tensorrt pycuda --extra-index-url https://pypi.nvidia.com "
                 "(tensorrt is the CUDA 13 build: with a CUDA 12 driver install tensorrt-cu12")


def test_model_whose_input_does_not_match_its_spec(small_model, tmp_path):
    model = onnx.load(str(small_model["onnx"]))
    info = read_model_info(model)
    info.preprocess = PreprocessSpec.for_size(96)
    write_model_info(model, info)
    path = tmp_path / "mismatch.onnx"
    onnx.save(model, str(path))
    expect_error(run("--model", str(path), "--precision", "fp32", "--backend", "onnxruntime",
                     "--out", str(tmp_path / "e")), "[N, 3, 96, 96]")


@pytest.mark.parametrize("extra, message", [
    (["--precision", "fp32", "--max-top1-drop", "0.5"], "use them with --precision int8"),
    (["--precision", "int8", "--max-top1-drop", "0.5"], "needs --calibration-data"),
    (["--precision", "fp32", "--max-batch", "0"], "'--max-batch': 0 is not in the range x>=1"),
])
def test_option_combinations_are_checked(small_model, tmp_path, extra, message):
    if "int8" in extra:
        extra = [*extra, "--calibration", str(small_model["calibration"])]
    expect_error(run("--model", str(small_model["onnx"]), *extra, "--out",
                     str(tmp_path / "e")), message)


def test_missing_model_and_unwritable_out(small_model, tmp_path):
    expect_error(run("--model", str(tmp_path / "nope.onnx"), "--precision", "fp32",
                     "--out", str(tmp_path / "e")), "does not exist")
    (tmp_path / "file").write_text("")
    expect_error(run("--model", str(small_model["onnx"]), "--precision", "fp32",
                     "--out", str(tmp_path / "file" / "e")), "is a file, not a folder")
    # a missing folder above --out is created when the engine is written
    assert run("--model", str(small_model["onnx"]), "--precision", "fp32", "--backend",
               "onnxruntime", "--out", str(tmp_path / "missing" / "e")).exit_code == 0
    assert (tmp_path / "missing" / "e" / "engine.json").is_file()
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "a.jpg").write_bytes(b"x")
    expect_error(run("--model", str(small_model["onnx"]), "--precision", "fp32",
                     "--backend", "onnxruntime", "--out", str(tmp_path / "photos")),
                 "not an engine folder")
    assert [p.name for p in (tmp_path / "photos").iterdir()] == ["a.jpg"]


def test_sidecar_json_is_what_the_readme_documents(small_model, tmp_path):
    build_engine(small_model["onnx"], "fp32", tmp_path / "e", backend="onnxruntime")
    d = json.loads(Path(tmp_path / "e" / SIDECAR_NAME).read_text())
    assert list(d) == ["format", "alexnet_deploy_version", "backend", "precision",
                       "layer_precision", "placement", "source", "artifacts", "input", "output",
                       "preprocess", "classes", "build", "notes"]


@pytest.mark.parametrize("options, message", [
    (["--min-batch", "9", "--max-batch", "8"], "--min-batch must be between 1 and --max-batch (8)"),
    (["--opt-batch", "16", "--max-batch", "8"], "--opt-batch must be between --min-batch (1)"),
    (["--timing-cache", "t.cache", "--no-timing-cache"], "exclude each other"),
    (["--int8-fallback", "fp16"], "--int8-fallback sets what an INT8 engine does not quantize"),
])
def test_tensorrt_profile_options_are_checked_first(small_model, tmp_path, options, message):
    expect_error(run("--model", str(small_model["onnx"]), "--precision", "fp32",
                     "--out", str(tmp_path / "e"), *options), message)
    assert not (tmp_path / "e").exists()


def test_profile_options_are_ignored_with_a_note_on_cpu_backends(small_model, tmp_path):
    result = run("--model", str(small_model["onnx"]), "--precision", "fp32", "--backend",
                 "onnxruntime", "--min-batch", "2", "--out", str(tmp_path / "e"))
    assert result.exit_code == 0, result.output
    assert "--min-batch/--opt-batch shape TensorRT profiles; onnxruntime engines take any " \
        "batch: ignored" in result.output


# ---- accuracy budget (issue 14) ----


def test_min_agreement_calibrates_chooses_a_method_and_records_it(small_model, tmp_path,
                                                                  small_tuning):
    result = build_engine(small_model["onnx"], "int8", tmp_path / "e", backend="onnxruntime",
                          min_agreement=0.9, calibration_data="synthetic:train",
                          progress=False)
    sc = read_sidecar(tmp_path / "e")
    t = sc.tuning
    assert t is not None and t == result.tuning
    assert sc.calibration_sha256 is None  # calibrated by the build itself
    assert t["data"] == {"path": "synthetic:train", "fingerprint": t["data"]["fingerprint"],
                         "calibration_images": 128, "held_out_images": 384,
                         "held_out_from": "other data", "seed": 0, "views": ["clean"]}
    assert list(t["methods"]) == ["entropy", "percentile", "mse", "minmax"]
    best = max(m["agreement"] for m in t["methods"].values())
    assert t["methods"][t["method"]]["agreement"] == best
    assert t["all_int8"] == t["methods"][t["method"]]
    assert t["fits"] and t["held_out"]["agreement_low"] >= 0.9
    assert t["held_out"]["agreement_low"] < t["held_out"]["agreement"]
    assert set(t["calibration"]) >= {"input"} and all(v > 0 for v in t["calibration"].values())
    assert t["layer_precision"] == sc.layer_precision
    assert t["speed"]["note"] == "none: every layer is INT8" or t["speed"]["ratio"] > 0
    text = "\n".join(result.summary())
    assert ("budget     agreement >= 90% (at 95% confidence) on 384 held-out images (not the "
            "model's training data; 128 others calibrated)") in text
    assert f"chose {t['method']}" in text


def test_a_budget_no_int8_layer_meets_fails_in_one_line_unless_best_effort(
        small_model, tmp_path, small_tuning):
    # 100% agreement at 95% confidence: no measured mix can show it (the bound of 384/384 is
    # 99.3%), so every layer would have to stay FP32
    out = tmp_path / "e"
    result = run("--model", str(small_model["onnx"]), "--precision", "int8",
                 "--backend", "onnxruntime", "--min-agreement", "1.0",
                 "--calibration-data", "synthetic:train", "--out", str(out))
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: the budget (agreement >= 100% (at "
                                                   "95% confidence)) cannot be met")
    assert "closest:" in lines[0] and "--best-effort" in lines[0]
    assert not out.exists()
    result = run("--model", str(small_model["onnx"]), "--precision", "int8",
                 "--backend", "onnxruntime", "--min-agreement", "1.0", "--best-effort",
                 "--calibration-data", "synthetic:train", "--out", str(out))
    assert result.exit_code == 0, result.output
    sc = read_sidecar(out)
    assert sc.tuning["fits"] is False and "int8" in sc.layer_precision.values()
    assert "NOT MET (--best-effort)" in result.output


def _trained_on(small_model, folder: Path, data: str, holdout: int) -> Path:
    """A copy of the small model whose metadata says it was trained on ``data``, ``holdout``
    of its images held out (as export writes it from a checkpoint)."""
    from alexnet_deploy.data import open_dataset

    model = onnx.load(small_model["onnx"])
    info = read_model_info(model)
    ds = open_dataset(data)
    info.training_data = {"fingerprint": ds.fingerprint(), "images": len(ds),
                          "holdout": holdout, "holdout_seed": 0}
    write_model_info(model, info)
    folder.mkdir(parents=True, exist_ok=True)
    onnx.save(model, folder / "model.onnx")
    return folder / "model.onnx"


def test_tuning_split_uses_the_holdout_of_the_models_own_training_data():
    import numpy as np

    from alexnet_deploy.build import tuning_split
    from alexnet_deploy.data import holdout_indices, open_dataset

    ds = open_dataset("synthetic:test")  # 1,000 images
    record = {"fingerprint": ds.fingerprint(), "images": 1000, "holdout": 300,
              "holdout_seed": 7}
    cal, held, source = tuning_split(len(ds), ds.fingerprint(), record, n_cal=200,
                                     held_cap=4096)
    assert source == "holdout"
    assert np.array_equal(held, holdout_indices(1000, 300, seed=7))
    assert len(cal) == 200 and not set(cal.tolist()) & set(held.tolist())
    # a cap below the holdout: a seeded draw of the holdout, never another image
    _, capped, _ = tuning_split(len(ds), ds.fingerprint(), record, n_cal=200, held_cap=100)
    assert len(capped) == 100 and set(capped.tolist()) <= set(held.tolist())
    # the training data without a holdout, and other data: one seeded permutation
    for rec, expected in [({**record, "holdout": 0}, "training data"),
                          ({**record, "fingerprint": "0" * 64}, "other data"),
                          ({}, "other data")]:
        cal, held, source = tuning_split(len(ds), ds.fingerprint(), rec, n_cal=200,
                                         held_cap=500)
        assert source == expected and len(cal) == 200 and len(held) == 500
        assert not set(cal.tolist()) & set(held.tolist())
    # a set too small for both parts: a third calibrates
    cal, held, _ = tuning_split(len(ds), ds.fingerprint(), {}, n_cal=1024, held_cap=4096)
    assert (len(cal), len(held)) == (333, 667)


def test_a_budget_on_the_training_data_measures_on_its_holdout(small_model, tmp_path,
                                                               small_tuning):
    model = _trained_on(small_model, tmp_path / "held", "synthetic:train", holdout=200)
    result = build_engine(model, "int8", tmp_path / "e", backend="onnxruntime",
                          min_agreement=0.9, calibration_data="synthetic:train", progress=False)
    data = read_sidecar(tmp_path / "e").tuning["data"]
    assert data["held_out_from"] == "holdout" and data["held_out_images"] == 200
    assert data["calibration_images"] == 128
    assert not any("flatters INT8" in m for m in result.messages)


def test_a_budget_on_training_data_without_a_holdout_says_it_flatters_int8(
        small_model, tmp_path, small_tuning):
    model = _trained_on(small_model, tmp_path / "seen", "synthetic:train", holdout=0)
    result = run("--model", str(model), "--precision", "int8", "--backend", "onnxruntime",
                 "--min-agreement", "0.9", "--calibration-data", "synthetic:train",
                 "--out", str(tmp_path / "e"))
    assert result.exit_code == 0, result.output
    assert read_sidecar(tmp_path / "e").tuning["data"]["held_out_from"] == "training data"
    assert ("--calibration-data synthetic:train is the data the model was trained on and "
            "training held none of it out") in result.output
    assert "train with --holdout N" in result.output


def test_a_tensorrt_budget_searches_graphs_with_fp16_elsewhere(small_model, small_tuning,
                                                                monkeypatch):
    # TensorRT runs what INT8 leaves in FP16 by default, so the search must measure that graph
    # (on ONNX Runtime here), not the FP32-elsewhere one
    import alexnet_deploy.build as build_mod
    from alexnet_deploy.metadata import get_meta
    from alexnet_deploy.quantize import Budget

    seen = []
    real = build_mod.search_logits

    def spy(graph, images, batch_size=64):
        seen.append(get_meta(graph, "int8_fallback"))
        return real(graph, images, batch_size)

    monkeypatch.setattr(build_mod, "search_logits", spy)
    model = onnx.load(small_model["onnx"])
    info = read_model_info(model)
    tuning, _, _ = build_mod.tune_int8(
        model, None, "synthetic:train", info.preprocess, info.classes,
        Budget(min_agreement=1.0), "tensorrt", progress=False, fallback="fp16")
    assert tuning["fallback_precision"] == "fp16"
    quantized = [s for s in seen if s is not None]
    # every candidate graph ran FP16 elsewhere; only the FP32 reference has no fallback key
    assert len(quantized) == len(seen) - 1 and set(quantized) == {"fp16"}
    assert len(quantized) > 4  # the four methods' all-INT8 graphs, then the layer search


def test_budget_options_are_checked(small_model, tmp_path):
    for args, message in [
            (["--precision", "fp32", "--min-agreement", "0.99"], "use them with --precision int8"),
            (["--precision", "int8", "--min-agreement", "0.99"], "needs --calibration-data"),
            (["--precision", "int8", "--min-agreement", "99", "--calibration-data", "x"],
             "Invalid value for '--min-agreement': 99.0 is not in the range 0.0<=x<=1.0"),
            (["--precision", "fp32", "--placement", "cpu"], "with --precision int8")]:
        result = run("--model", str(small_model["onnx"]), "--backend", "onnxruntime",
                     "--out", str(tmp_path / "e"), *args)
        assert result.exit_code == 2 and message in result.output, result.output


# ---- uint8 NHWC input (issue 14) ----


def test_uint8_input_engine_classifies_like_the_float_engine(small_model, tmp_path):
    import numpy as np

    from alexnet_deploy.engine import load_engine

    build_engine(small_model["onnx"], "fp32", tmp_path / "f32", backend="onnxruntime")
    result = build_engine(small_model["onnx"], "fp32", tmp_path / "u8", backend="onnxruntime",
                          input_format="uint8-nhwc")
    assert "input uint8 [N, 67, 67, 3] (NHWC pixels)" in "\n".join(result.summary())
    raw = json.loads((tmp_path / "u8" / SIDECAR_NAME).read_text())["input"]
    assert (raw["dtype"], raw["layout"], raw["shape"]) == ("uint8", "NHWC", [3, 67, 67])
    rng = np.random.default_rng(0)
    photos = [rng.integers(0, 256, (90, 120, 3), dtype=np.uint8) for _ in range(6)]
    with load_engine(tmp_path / "f32") as f32, load_engine(tmp_path / "u8") as u8:
        assert u8.takes_uint8 and not f32.takes_uint8
        pixels = u8.preprocess(photos)
        assert pixels.dtype == np.uint8 and pixels.shape == (6, 67, 67, 3)
        floats = f32.preprocess(photos)
        assert floats.dtype == np.float32 and floats.shape == (6, 3, 67, 67)
        want = f32.infer(floats)
        got = u8.infer(pixels)
        assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()
        np.testing.assert_array_equal(u8.infer(floats), got)  # float batches are converted
        a, b = f32.classify(photos, top_k=3), u8.classify(photos, top_k=3)
        assert [p.indices for p in a] == [p.indices for p in b]
        with pytest.raises(UserError, match=r"uint8 \(N, H, W, C\)"):
            u8.infer(pixels[:, :60])
