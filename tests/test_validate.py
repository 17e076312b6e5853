"""``alexnet-deploy validate``: metrics, thresholds, JSON, and bad input."""

from __future__ import annotations

import json
import types

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from conftest import make_small_model

from alexnet_deploy.build import build_engine
from alexnet_deploy.cli import cli
from alexnet_deploy.data import label_map
from alexnet_deploy.errors import UserError
from alexnet_deploy.metadata import read_model_info, write_model_info
from alexnet_deploy.preprocess import PreprocessSpec
from alexnet_deploy.validate import (
    ValidationResult,
    _Accumulator,
    _failures,
    validate_engine,
)

REQUIRED_KEYS = {"engine.top1", "engine.top5", "reference.top1", "reference.top5",
                 "top1_agreement", "top5_overlap", "max_abs_logit_error", "num_images"}


@pytest.fixture(scope="module")
def engines(small_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("validate_engines")
    build_engine(small_model["onnx"], "fp32", root / "fp32", backend="onnxruntime")
    build_engine(small_model["onnx"], "int8", root / "int8", backend="onnxruntime",
                 calibration=small_model["calibration"])
    return root


def run(*args: str):
    return CliRunner().invoke(cli, ["validate", *args])


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and k in ("engine", "reference"):
            out.update(flatten(v, f"{k}."))
        else:
            out[prefix + k] = v
    return out


# ---- the metrics ----

def test_accumulator_metrics_on_hand_computed_logits():
    acc = _Accumulator(num_classes=6)
    reference = np.array([[6, 5, 4, 3, 2, 1], [1, 2, 3, 4, 5, 6]], np.float32)
    engine = np.array([[6, 5, 4, 3, 1, 2], [1, 2, 3, 4, 6, 5]], np.float32)
    labels = np.array([0, 4])
    acc.add(engine, reference, labels)
    assert acc.n == 2
    assert list(acc.hits) == [2, 2, 1, 2]  # engine top1, top5; reference top1, top5
    assert acc.agree == 1  # image 0 agrees (class 0); image 1: engine 4, reference 5
    # top-5 sets: image 0 both {0..3} + {4} vs {5}: 4/5; image 1: {1..5} both: 5/5
    assert acc.overlap == pytest.approx(4 / 5 + 5 / 5)
    assert acc.max_err == 1.0 and acc.sum_err / acc.count_err == pytest.approx(4 / 12)
    cos = float(engine[0] @ reference[0] / np.linalg.norm(engine[0]) / np.linalg.norm(reference[0]))
    assert acc.cos_min == pytest.approx(cos) and acc.cos_sum == pytest.approx(2 * cos)
    assert acc.nonfinite == 0
    acc.add(np.array([[np.nan, 0, 0, 0, 0, np.inf]], np.float32),
            np.zeros((1, 6), np.float32), np.array([1]))
    assert acc.nonfinite == 2 and acc.max_err == 1.0  # non-finite logits counted, not averaged


def test_label_map_matches_classes_by_name_then_id_then_imagenet_index():
    ds = types.SimpleNamespace(source="d", class_names=["b", "a"], class_ids=["n2", "n1"],
                               num_classes=2, imagenet1k_index=[7, 3])
    assert label_map(["a", "b", "c"], ds).tolist() == [1, 0]
    assert label_map(["n1", "n2"], ds).tolist() == [1, 0]
    assert label_map([str(i) for i in range(1000)], ds).tolist() == [7, 3]
    with pytest.raises(UserError, match=r"has class 'b' \(2 classes\), which the engine does not"):
        label_map(["x", "y"], ds, model="the engine")


# ---- against real engines ----

def test_fp32_engine_passes_and_writes_the_json_keys(engines, small_model, tmp_path):
    out = tmp_path / "v.json"
    result = run("--engine", str(engines / "fp32"), "--reference", str(small_model["onnx"]),
                 "--data", "synthetic:test", "--limit", "96", "--json", str(out),
                 "--batch-size", "40")
    assert result.exit_code == 0, result.output
    assert "PASS" in result.output
    d = json.loads(out.read_text())
    flat = flatten(d)
    assert REQUIRED_KEYS <= set(flat)
    assert flat["num_images"] == 96
    assert flat["top1_agreement"] == 1.0 and flat["top5_overlap"] == 1.0
    assert flat["max_abs_logit_error"] < 1e-4
    assert flat["engine.top1"] == flat["reference.top1"]
    for key in REQUIRED_KEYS - {"num_images", "max_abs_logit_error"}:
        assert 0.0 <= flat[key] <= 1.0, key
    assert d["passed"] is True and d["failures"] == []
    assert sum(v["num_images"] for v in d["per_class"].values()) == 96
    assert d["cosine_similarity"] == pytest.approx(1.0, abs=1e-9)
    assert d["nonfinite_logits"] == 0


def test_a_last_batch_below_the_engines_smallest_batch_is_padded(engines, small_model,
                                                                  tmp_path):
    # an engine whose profile starts at 16 (as a TensorRT --min-batch 16 one does); 40 images
    # in batches of 16 leave 8 at the end
    import shutil

    engine = tmp_path / "min16"
    shutil.copytree(engines / "fp32", engine)
    sidecar = json.loads((engine / "engine.json").read_text())
    sidecar["input"]["min_batch"] = 16
    (engine / "engine.json").write_text(json.dumps(sidecar))
    out = tmp_path / "v.json"
    result = run("--engine", str(engine), "--reference", str(small_model["onnx"]),
                 "--data", "synthetic:test", "--limit", "40", "--json", str(out))
    assert result.exit_code == 0, result.output
    d = json.loads(out.read_text())
    assert d["num_images"] == 40 and d["top1_agreement"] == 1.0
    result = run("--engine", str(engine), "--reference", str(small_model["onnx"]),
                 "--data", "synthetic:test", "--limit", "40", "--batch-size", "8")
    assert result.exit_code == 2
    assert "batch size 8 is outside this engine's range (16..any)" in result.output


def test_checkpoint_and_onnx_references_agree(engines, small_model):
    by_checkpoint = validate_engine(engines / "fp32", small_model["checkpoint"],
                                    "synthetic:test", limit=128, progress=False)
    by_onnx = validate_engine(engines / "fp32", small_model["onnx"], "synthetic:test",
                              limit=128, progress=False)
    assert by_checkpoint.passed and by_onnx.passed
    assert by_checkpoint.reference_top1 == by_onnx.reference_top1
    assert by_checkpoint.top1_agreement == 1.0
    assert by_checkpoint.max_abs_logit_error < 1e-4  # PyTorch vs ONNX Runtime, both FP32


def test_int8_engine_is_measured_as_quantized(engines, small_model):
    result = validate_engine(engines / "int8", small_model["checkpoint"], "synthetic:test",
                             limit=128, max_top1_drop=100, min_agreement=0.0, progress=False)
    assert result.passed and result.num_images == 128
    assert result.top1_agreement >= 0.9 and result.cosine_similarity > 0.99
    assert result.max_abs_logit_error > 1e-3  # not FP32 in disguise


def test_failing_thresholds_exit_1_and_say_which(engines, tmp_path_factory):
    other = make_small_model(tmp_path_factory.mktemp("other"), seed=1)  # same spec and classes
    result = run("--engine", str(engines / "fp32"), "--reference", str(other["checkpoint"]),
                 "--data", "synthetic:test", "--limit", "64", "--max-top1-drop", "100",
                 "--allow-other-reference", "--atol", "1000")
    assert result.exit_code == 1, result.output
    assert "FAIL" in result.output
    assert "not the model the engine was built from" in result.output
    assert "top-1 agreement" in result.output and "is below --min-agreement 99.00%" in \
        result.output
    assert "top-1 dropped" not in result.output  # only the check that failed is named


def validation_result(**kw) -> ValidationResult:
    """A passing INT8 result on 100 images; ``kw`` replaces fields."""
    fields = {"engine": "e", "backend": "b", "precision": "int8", "reference": "r",
              "data": "d", "num_images": 100, "engine_top1": 0.70, "engine_top5": 0.9,
              "reference_top1": 0.70, "reference_top5": 0.9, "top1_agreement": 0.995,
              "top5_overlap": 0.99, "max_abs_logit_error": 0.1, "mean_abs_logit_error": 0.01,
              "cosine_similarity": 0.999, "min_cosine_similarity": 0.99,
              "nonfinite_logits": 0, "per_class": {}, "max_top1_drop": 0.5,
              "min_agreement": 0.99}
    fields.update(kw)
    return ValidationResult(**fields)


def test_each_threshold_fails_on_its_own():
    result = validation_result
    assert _failures(result()) == []
    assert _failures(result(engine_top1=0.696)) == []  # 0.4 points: within 0.5
    (drop,) = _failures(result(engine_top1=0.69))
    assert drop.startswith("top-1 dropped 1.00 points (reference 70.00% -> engine 69.00%)")
    (agree,) = _failures(result(top1_agreement=0.98))
    assert agree == "top-1 agreement 98.00% is below --min-agreement 99.00%"
    (nan,) = _failures(result(nonfinite_logits=3))
    assert nan == "the engine produced 3 NaN/Inf logits"


def test_on_real_images(shared_data, tmp_path):
    """CIFAR-10 test photos (``../shared/data``): FP32 engine equal to its reference, INT8 close."""
    from alexnet_deploy.calibrate import calibrate

    npz = shared_data("cifar10_test_2k.npz")
    classes = tuple(str(c) for c in np.load(npz)["classes"])
    model = make_small_model(tmp_path, classes=classes)
    calibrate(model["onnx"], npz, tmp_path / "cal.json", method="minmax", num_images=64,
              progress=False, say=lambda _: None)
    build_engine(model["onnx"], "fp32", tmp_path / "fp32", backend="onnxruntime")
    build_engine(model["onnx"], "int8", tmp_path / "int8", backend="onnxruntime",
                 calibration=tmp_path / "cal.json")
    fp32 = validate_engine(tmp_path / "fp32", model["checkpoint"], npz, limit=256,
                           progress=False)
    assert fp32.passed and fp32.top1_agreement == 1.0 and fp32.num_images == 256
    assert set(fp32.per_class) == set(classes)
    int8 = validate_engine(tmp_path / "int8", model["checkpoint"], npz, limit=256,
                           min_agreement=0.0, max_top1_drop=100, progress=False)
    assert int8.reference_top1 == fp32.reference_top1
    assert int8.top1_agreement >= 0.9 and int8.cosine_similarity > 0.99


# ---- bad input: one line, exit 2 ----

def expect_error(result, message: str) -> None:
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output


def test_engine_path_missing_or_not_an_engine(small_model, tmp_path):
    common = ["--reference", str(small_model["onnx"]), "--data", "synthetic:test"]
    expect_error(run("--engine", str(tmp_path / "nope"), *common), "does not exist")
    expect_error(run("--engine", str(small_model["onnx"]), *common), "is not an engine folder")
    expect_error(run("--engine", str(tmp_path), *common), "is not an engine folder")


def test_tampered_engine_is_refused(engines, small_model, tmp_path):
    engine = tmp_path / "e"
    engine.mkdir()
    for f in (engines / "fp32").iterdir():
        (engine / f.name).write_bytes(f.read_bytes())
    with open(engine / "model.onnx", "ab") as f:
        f.write(b"\0")
    expect_error(run("--engine", str(engine), "--reference", str(small_model["onnx"]),
                     "--data", "synthetic:test"), "sidecar does not match the engine file")


def test_reference_with_another_preprocessing_is_refused(engines, small_model, tmp_path):
    model = onnx.load(str(small_model["onnx"]))
    info = read_model_info(model)
    info.preprocess = PreprocessSpec(crop=67, resize=80)
    write_model_info(model, info)
    other = tmp_path / "other.onnx"
    onnx.save(model, str(other))
    expect_error(run("--engine", str(engines / "fp32"), "--reference", str(other),
                     "--data", "synthetic:test"), "preprocesses images differently")


def test_data_with_other_classes_is_refused(engines, small_model, tmp_path):
    rng = np.random.default_rng(0)
    npz = tmp_path / "cats.npz"
    np.savez(npz, images=rng.integers(0, 255, (4, 80, 80, 3), dtype=np.uint8),
             labels=np.array([0, 1, 0, 1]), classes=np.array(["cat", "dog"]))
    expect_error(run("--engine", str(engines / "fp32"), "--reference", str(small_model["onnx"]),
                     "--data", str(npz)), "has class 'cat' (2 classes), which the engine does not know")


@pytest.mark.parametrize("option, message", [
    (["--min-agreement", "99"], "'--min-agreement': 99.0 is not in the range 0.0<=x<=1.0"),
    (["--max-top1-drop", "-1"], "'--max-top1-drop': -1.0 is not in the range x>=0.0"),
    (["--limit", "0"], "'--limit': 0 is not in the range x>=1"),
    (["--json", "/dev/null/v.json"], "/dev/null is a file, not a folder"),
])
def test_bad_options(engines, small_model, option, message):
    expect_error(run("--engine", str(engines / "fp32"), "--reference", str(small_model["onnx"]),
                     "--data", "synthetic:test", *option), message)
