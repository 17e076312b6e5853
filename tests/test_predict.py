"""The embedding API (``load_engine``, ``Engine.classify``) and ``alexnet-deploy predict``."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from alexnet_deploy import Prediction, UserError, load_engine
from alexnet_deploy.cli import cli
from alexnet_deploy.engine import top_k_predictions
from alexnet_deploy.preprocess import open_image
from tests.conftest import ROOT, shared_path


@pytest.fixture(scope="module")
def small_engine(small_model, tmp_path_factory):
    from alexnet_deploy.build import build_engine

    out = tmp_path_factory.mktemp("predict") / "fp32"
    build_engine(small_model["onnx"], "fp32", out, backend="onnxruntime")
    return out


@pytest.fixture(scope="module")
def imagenet_engine(tmp_path_factory):
    """A full-size engine exported from torchvision-format weights (fixed-seed He init: no
    pretrained weights exist offline, so the classes are right and the answers are not)."""
    from alexnet_deploy.build import build_engine
    from alexnet_deploy.export import run_export
    from alexnet_deploy.model import TorchvisionAlexNet

    folder = tmp_path_factory.mktemp("imagenet")
    torch.manual_seed(0)
    model = TorchvisionAlexNet()
    for p in model.parameters():  # He init: logits that differ between images
        torch.nn.init.kaiming_normal_(p) if p.dim() > 1 else torch.nn.init.zeros_(p)
    torch.save(model.state_dict(), folder / "alexnet.pth")
    run_export(folder / "model.onnx", torchvision_weights=folder / "alexnet.pth",
               parity_images=2)
    return build_engine(folder / "model.onnx", "fp32", folder / "engine",
                        backend="onnxruntime").path


def photos():
    return sorted(shared_path("imagenet_samples48").rglob("*.JPEG"))


def test_top_k_is_softmax_order_with_names():
    logits = np.array([[0.0, 2.0, 1.0], [5.0, 5.0, -1.0]], np.float32)
    got = top_k_predictions(logits, ["a", "b", "c"], 2, ["x", "y"])
    assert [p.labels for p in got] == [["b", "c"], ["a", "b"]]  # a tie keeps the lower index
    e = np.exp([0.0, 2.0, 1.0])
    assert got[0].probabilities == pytest.approx([e[1] / e.sum(), e[2] / e.sum()], rel=1e-12)
    assert got[1].probabilities[0] == got[1].probabilities[1]
    assert got[0].to_dict()["top_k"][0] == {"index": 1, "label": "b",
                                            "probability": got[0].probabilities[0]}


def test_predict_prints_top5_imagenet_names_and_matches_classify(imagenet_engine, tmp_path):
    """The 48 shared ImageNet photos through a torchvision-format engine: the CLI and the API
    give the same classes and probabilities for every photo."""
    files = photos()
    out = tmp_path / "preds.json"
    result = CliRunner().invoke(cli, ["predict", "--engine", str(imagenet_engine),
                                      str(files[0].parents[1]), "--json", str(out)])
    assert result.exit_code == 0, result.output
    lines = [ln for ln in result.stdout.splitlines() if ln.strip()]
    assert len(lines) == 48
    assert all(len(re.findall(r" \d+\.\d\d%", ln)) == 5 for ln in lines)
    written = json.loads(out.read_text())
    with load_engine(imagenet_engine) as engine:
        assert engine.sidecar.classes[0] == "tench" and engine.sidecar.classes[701] == "parachute"
        expected = engine.classify(files, top_k=5)
    assert written["num_images"] == 48 and written["skipped"] == []
    assert written["predictions"] == [p.to_dict() for p in expected]
    assert lines[0].startswith(f"{files[0]}: {expected[0].labels[0]} ")
    assert len({p.indices[0] for p in expected}) >= 3  # not one answer for every photo


def test_classify_takes_paths_pil_arrays_and_bytes_alike(small_engine, tmp_path):
    from alexnet_deploy.data import synthetic_dataset

    pil = synthetic_dataset("test").open_image(3)
    path = tmp_path / "image.png"
    pil.save(path)
    with load_engine(small_engine) as engine:
        got = engine.classify([path, pil, np.asarray(pil), path.read_bytes()], top_k=3)
        single = engine.classify(str(path), top_k=3)
    assert all(isinstance(p, Prediction) for p in got)
    assert len({(tuple(p.indices), tuple(p.probabilities)) for p in got}) == 1
    assert single[0].indices == got[0].indices and single[0].source == str(path)
    assert got[1].source == "<Image 1>" and got[3].source == "<bytes 3>"


def test_classify_batches_within_the_profile_in_input_order(small_engine):
    from alexnet_deploy.data import synthetic_dataset

    images = [synthetic_dataset("test").open_image(i) for i in range(7)]
    with load_engine(small_engine) as engine:
        one_batch = engine.classify(images, top_k=2)
        in_threes = engine.classify(images, top_k=2, batch_size=3)
        logits = engine.infer(engine.preprocess(images))
    assert [p.indices for p in in_threes] == [p.indices for p in one_batch]
    assert [p.indices[0] for p in one_batch] == list(logits.argmax(1))
    np.testing.assert_allclose([p.probabilities[0] for p in in_threes],
                               [p.probabilities[0] for p in one_batch], rtol=1e-5)


@pytest.mark.parametrize("kwargs, message", [
    ({"top_k": 0}, "top_k 0 is out of range: choose 1 to 10"),
    ({"top_k": 11}, "top_k 11 is out of range"),
    ({"batch_size": 0}, "batch size 0 is outside this engine's range"),
])
def test_classify_refuses_bad_arguments(small_engine, tmp_path, kwargs, message):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    with load_engine(small_engine) as engine, pytest.raises(UserError, match=message):
        engine.classify([tmp_path / "a.png"], **kwargs)


def test_a_bad_image_is_named_by_classify_and_skipped_by_predict(small_engine, tmp_path):
    good, bad = tmp_path / "good.png", tmp_path / "bad.jpg"
    Image.new("RGB", (90, 70), "orange").save(good)
    bad.write_text("not an image")
    with load_engine(small_engine) as engine, \
            pytest.raises(UserError, match=rf"{re.escape(str(bad))} is not a readable image"):
        engine.classify([good, bad])
    result = CliRunner().invoke(cli, ["predict", "--engine", str(small_engine), str(tmp_path)])
    assert result.exit_code == 1
    assert result.stdout.startswith(f"{good}: ")
    assert f"warning: skipped: {bad} is not a readable image" in result.stderr
    assert "classified 1 images" in result.stderr and "1 unreadable skipped" in result.stderr


def test_predict_refuses_missing_inputs_and_json_onto_an_input(small_engine, tmp_path):
    image = tmp_path / "a.png"
    Image.new("RGB", (70, 70)).save(image)
    before = image.read_bytes()
    for args, message in ([["nothing.png"], "image nothing.png does not exist"],
                          [[str(tmp_path / "empty")], "holds no image"],
                          [[str(image), "--json", str(image)], "is this command's input IMAGE"]):
        (tmp_path / "empty").mkdir(exist_ok=True)
        result = CliRunner().invoke(cli, ["predict", "--engine", str(small_engine), *args])
        assert result.exit_code == 2 and message in result.stderr, result.output
        assert len(result.stderr.strip().splitlines()) == 1
    assert image.read_bytes() == before


def test_sixteen_bit_images_are_scaled_not_clipped():
    ramp = (np.arange(64 * 64, dtype=np.uint32).reshape(64, 64) * 16).astype(np.uint16)
    buffer = io.BytesIO()
    Image.fromarray(ramp).save(buffer, format="PNG")  # a 16-bit grayscale PNG (mode I;16)
    assert Image.open(io.BytesIO(buffer.getvalue())).mode in ("I;16", "I")
    rgb = np.asarray(open_image(buffer.getvalue()))
    assert rgb.shape == (64, 64, 3)
    np.testing.assert_array_equal(rgb[..., 0], np.round(ramp / 257).astype(np.uint8))
    assert 120 < rgb.mean() < 135  # PIL's own convert("RGB") makes this almost all 255


def test_float_images_are_refused_with_one_line():
    with pytest.raises(UserError, match="image.tif: .*|mode F"):
        open_image(Image.fromarray(np.zeros((4, 4), np.float32)), name="image.tif")


def test_readme_embedding_snippet_runs_as_written(small_model, tmp_path):
    """The README's Python block, run in a folder laid out as 'make demo' leaves it."""
    from alexnet_deploy.build import build_engine

    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Embedding an engine in Python", 1)[1]
    code = section.split("```python", 1)[1].split("```", 1)[0]
    build_engine(small_model["onnx"], "int8", tmp_path / "engines" / "demo-int8",
                 backend="onnxruntime", calibration=small_model["calibration"])
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    assert len(proc.stdout.strip().splitlines()) == 3
