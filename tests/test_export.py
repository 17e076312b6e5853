"""Export: the canonical graph, its metadata, parity with PyTorch on real images, bad input."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from onnx import helper, numpy_helper

from alexnet_deploy import __version__
from alexnet_deploy import export as ex
from alexnet_deploy.checkpoint import save_checkpoint
from alexnet_deploy.cli import cli
from alexnet_deploy.fileio import sha256_file
from alexnet_deploy.metadata import read_model_info
from alexnet_deploy.model import (
    AlexNetConfig,
    AlexNetGrouped,
    TorchvisionAlexNet,
    grouped_to_two_tower,
)
from alexnet_deploy.preprocess import PreprocessSpec
from tests.conftest import shared_path

SMALL = {"num_classes": 10, "image_size": 67, "width_mult": 0.125}
# Node names (= output tensor names) of the paper graph, in order; fc8's output is "logits".
PAPER_NODES = [
    "conv1", "relu1", "lrn1.split", "lrn1.lrn0", "lrn1.lrn1", "lrn1", "pool1",
    "conv2", "relu2", "lrn2.split", "lrn2.lrn0", "lrn2.lrn1", "lrn2", "pool2",
    "conv3", "relu3", "conv4", "relu4", "conv5", "relu5", "pool5",
    "flatten", "fc6", "relu6", "fc7", "relu7", "fc8",
]
PAPER_CENSUS = {"Conv": 5, "Relu": 7, "LRN": 4, "Split": 2, "Concat": 2, "MaxPool": 3,
                "Flatten": 1, "Gemm": 3}
TORCHVISION_CENSUS = {"Conv": 5, "Relu": 7, "MaxPool": 3, "Flatten": 1, "Gemm": 3}


def he_init(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Weights that give varied, realistic activations (the paper's N(0, 0.01) gives ~0 logits)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                torch.nn.init.kaiming_normal_(p)
            else:
                torch.nn.init.uniform_(p, -0.1, 0.1)
    return model.eval()


def write_checkpoint(path: Path, model: AlexNetGrouped, classes=None) -> Path:
    cfg = model.cfg
    save_checkpoint(path, model=grouped_to_two_tower(model), config=cfg,
                    preprocess=PreprocessSpec.for_size(cfg.image_size),
                    classes=classes or [f"c{i}" for i in range(cfg.num_classes)])
    return path


def run_cli(*args: str):
    return CliRunner().invoke(cli, [str(a) for a in args])


def ort_logits(path_or_model, x: np.ndarray) -> np.ndarray:
    return ex.ort_session(path_or_model).run(["logits"], {"input": x})[0]


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("small")
    return write_checkpoint(folder / "small.pt", he_init(AlexNetGrouped(AlexNetConfig(**SMALL))))


@pytest.fixture(scope="module")
def trained_checkpoint(tmp_path_factory) -> Path:
    """A small paper AlexNet trained for 60 SGD steps on 320 real CIFAR-10 images (67 px)."""
    from alexnet_deploy.data import class_names, iter_batches

    npz = shared_path("cifar10_train_10k.npz")
    spec = PreprocessSpec.for_size(67)
    batch = next(iter_batches(npz, spec, batch_size=320, limit=320, seed=0, workers=0))
    images, labels = torch.from_numpy(batch.images), torch.from_numpy(batch.labels)
    model = he_init(AlexNetGrouped(AlexNetConfig(num_classes=10, image_size=67,
                                                 width_mult=0.25)))
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    gen = torch.Generator().manual_seed(0)
    losses, threads = [], torch.get_num_threads()
    torch.set_num_threads(1)  # a model this small only loses to thread hand-offs (10x on a busy box)
    try:
        for _ in range(60):
            idx = torch.randint(0, len(labels), (32,), generator=gen)
            loss = F.cross_entropy(model(images[idx]), labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
    finally:
        torch.set_num_threads(threads)
    model.eval()
    assert np.mean(losses[-10:]) < np.mean(losses[:10]), "the tiny model did not train"
    path = tmp_path_factory.mktemp("trained") / "trained.pt"
    return write_checkpoint(path, model, classes=class_names(npz))


# ---- the full-size graph ----

@pytest.fixture(scope="module")
def full_size(tmp_path_factory) -> tuple[Path, AlexNetGrouped]:
    """The paper's full-size model (227 px, 1000 classes), exported once, parity-checked on 4
    real ImageNet photos."""
    model = he_init(AlexNetGrouped(AlexNetConfig()))
    source = ex.ExportSource(model=model, preprocess=PreprocessSpec(),
                             classes=[str(i) for i in range(1000)], sha256="0" * 64,
                             path=Path("random-init"))
    images = ex.load_parity_images(shared_path("imagenet_samples48"), source.preprocess, 4)
    out = tmp_path_factory.mktemp("full") / "alexnet.onnx"
    result = ex.export(source, out, parity_images=images, parity_source="imagenet_samples48")
    assert result.parity.passed and result.parity.num_images == 4
    assert result.num_parameters == 60_965_224
    return out, model


def test_full_size_graph_is_the_hand_written_one(full_size):
    path, _ = full_size
    onnx.checker.check_model(str(path), full_check=True)
    model = onnx.load(str(path))
    graph = model.graph
    assert ex.op_counts(model) == PAPER_CENSUS
    assert [n.name for n in graph.node] == PAPER_NODES
    assert model.opset_import[0].version == ex.DEFAULT_OPSET
    assert [(v.name, ex._value_shapes([v])[0][1]) for v in graph.input] == \
        [("input", ["N", 3, 227, 227])]
    assert [(v.name, ex._value_shapes([v])[0][1]) for v in graph.output] == \
        [("logits", ["N", 1000])]
    attrs = {n.name: {a.name: helper.get_attribute_value(a) for a in n.attribute}
             for n in graph.node}
    assert [attrs[f"conv{i}"].get("group", 1) for i in range(1, 6)] == [1, 2, 1, 2, 2]
    assert attrs["conv1"]["strides"] == [4, 4] and attrs["conv1"]["pads"] == [0, 0, 0, 0]
    assert all(attrs[f"fc{i}"]["transB"] == 1 for i in (6, 7, 8))
    assert attrs["lrn1.lrn0"] == {"size": 5, "alpha": pytest.approx(5e-4), "beta": 0.75,
                                  "bias": 2.0}
    params = sum(int(np.prod(t.dims)) for t in graph.initializer)
    assert params == 60_965_224
    assert sorted(t.name for t in graph.initializer) == sorted(
        f"{layer}.{p}" for layer in ("conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7",
                                     "fc8") for p in ("weight", "bias"))


def test_full_size_runs_at_batch_1_7_64_from_one_file(full_size):
    path, _ = full_size
    session = ex.ort_session(path)
    x = np.random.default_rng(0).standard_normal((64, 3, 227, 227), dtype=np.float32)
    out = {n: session.run(["logits"], {"input": x[:n]})[0] for n in (1, 7, 64)}
    assert {n: o.shape for n, o in out.items()} == {1: (1, 1000), 7: (7, 1000), 64: (64, 1000)}
    # each image's logits do not depend on the batch it came in
    np.testing.assert_allclose(out[7], out[64][:7], rtol=0, atol=1e-5)
    np.testing.assert_allclose(out[1], out[64][:1], rtol=0, atol=1e-5)
    assert np.ptp(out[64], axis=0).max() > 1e-2  # different images, different logits


# ---- graph details on the small model ----

def test_names_and_tensors_are_readable(small_checkpoint):
    model = ex.build_graph(ex.source_from_checkpoint(small_checkpoint).model)
    names = [n.name for n in model.graph.node]
    # 67 px: pool5 is 1x1, so the exact adaptive 6x6 pool (two MatMuls) sits before flatten
    assert names == PAPER_NODES[:21] + ["avgpool.w", "avgpool"] + PAPER_NODES[21:]
    for node in model.graph.node:
        if node.op_type == "Split":
            assert list(node.output) == [f"{node.name[:4]}.t0", f"{node.name[:4]}.t1"]
        elif node.op_type == "LRN":
            assert list(node.output) == [f"{node.input[0]}.out"]
        elif node.name == "fc8":
            assert list(node.output) == ["logits"]
        else:
            assert list(node.output) == [node.name]
    assert not {"Dropout", "Identity", "Shape", "Gather", "If", "Constant"} & \
        set(ex.op_counts(model))


def test_metadata_round_trip(small_checkpoint, tmp_path):
    out = tmp_path / "m.onnx"
    result = run_cli("export", "--checkpoint", small_checkpoint, "--out", out,
                     "--parity-images", 4)
    assert result.exit_code == 0, result.output
    info = read_model_info(out)
    assert info.preprocess == PreprocessSpec.for_size(67)
    assert info.classes == [f"c{i}" for i in range(10)]
    assert info.config == AlexNetConfig(**SMALL).to_dict()
    assert info.source_sha256 == sha256_file(small_checkpoint)
    assert info.version == __version__
    assert f"sha256  {sha256_file(out)}" in result.output
    assert "ops     Concat 2, Conv 5, Flatten 1, Gemm 3, LRN 4, MatMul 2" in result.output


@pytest.mark.parametrize("opset", [13, 18, 21])
def test_opsets(small_checkpoint, opset):
    source = ex.source_from_checkpoint(small_checkpoint)
    model = ex.infer_shapes(ex.build_graph(source.model, opset))
    onnx.checker.check_model(model, full_check=True)
    assert model.opset_import[0].version == opset
    split = next(n for n in model.graph.node if n.op_type == "Split")
    assert any(a.name == "num_outputs" for a in split.attribute) == (opset >= 18)
    x = np.random.default_rng(1).standard_normal((3, 3, 67, 67), dtype=np.float32)
    assert ex.check_parity(model, source.model, x).passed


@pytest.mark.parametrize("size,avgpool_ops", [(99, {"MatMul": 2}), (227, {}),
                                              (419, {"AveragePool": 1})])
def test_adaptive_pool_forms_are_exact(size, avgpool_ops):
    """pool5 of 2x2 (MatMul form), 6x6 (omitted) and 12x12 (AveragePool 2x2/2) all match."""
    cfg = AlexNetConfig(num_classes=4, image_size=size, width_mult=0.0625)
    model = he_init(AlexNetGrouped(cfg))
    graph = ex.infer_shapes(ex.build_graph(model))
    census = ex.op_counts(graph)
    assert {k: census[k] for k in ("MatMul", "AveragePool") if k in census} == avgpool_ops
    x = np.random.default_rng(2).standard_normal((2, 3, size, size), dtype=np.float32)
    report = ex.check_parity(graph, model, x)
    assert report.passed, report.summary()


@pytest.mark.parametrize("side", [1, 2, 3, 4, 5, 6, 7, 11, 12, 13])
def test_adaptive_pool_matrix_is_pytorchs(side):
    x = torch.randn(2, 3, side, side)
    m = torch.from_numpy(ex.adaptive_pool_matrix(side))
    torch.testing.assert_close(m @ x @ m.T, F.adaptive_avg_pool2d(x, 6), rtol=0, atol=1e-6)


def test_pool5_size_matches_the_model():
    for arch, size in (("paper", 67), ("paper", 227), ("paper", 250), ("torchvision", 224),
                       ("torchvision", 63)):
        cfg = AlexNetConfig(image_size=size, arch=arch, width_mult=0.0625, num_classes=2)
        m = AlexNetGrouped(cfg).eval()
        with torch.no_grad():
            x = torch.zeros(1, 3, size, size)
            for i in (1, 2):
                x = F.max_pool2d(F.relu(getattr(m, f"conv{i}")(x)), 3, 2)
            for i in (3, 4, 5):
                x = getattr(m, f"conv{i}")(x)
            assert F.max_pool2d(x, 3, 2).shape[-1] == ex.pool5_size(cfg), (arch, size)


# ---- parity: trained model, real images; failure leaves nothing ----

def test_parity_on_a_trained_model_on_real_images(trained_checkpoint, shared_data, tmp_path):
    out = tmp_path / "trained.onnx"
    data = shared_data("cifar10_test_2k.npz")
    result = run_cli("export", "--checkpoint", trained_checkpoint, "--out", out,
                     "--parity-data", data, "--parity-images", 48)
    assert result.exit_code == 0, result.output
    assert "top-1 agreement 48/48" in result.output
    assert sorted(os.listdir(tmp_path)) == ["trained.onnx"]
    # independently: logits match the PyTorch reference and are not trivially small
    source = ex.source_from_checkpoint(trained_checkpoint)
    x = ex.load_parity_images(data, source.preprocess, 48)
    ours = ort_logits(out, x)
    with torch.inference_mode():
        ref = source.model(torch.from_numpy(x)).numpy()
    assert np.abs(ours - ref).max() <= ex.PARITY_MAX_ABS
    assert np.ptp(ref, axis=1).mean() > 1.0  # a trained model's logits, not near-constant
    assert len(set(ref.argmax(1).tolist())) > 1


def test_parity_failure_fails_the_export_and_leaves_no_file(small_checkpoint, tmp_path,
                                                            monkeypatch):
    real = ex.build_graph

    def perturbed(model, opset=ex.DEFAULT_OPSET):
        graph = real(model, opset)
        bias = next(t for t in graph.graph.initializer if t.name == "fc8.bias")
        bias.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(bias) + 1e-3, "fc8.bias"))
        return graph

    monkeypatch.setattr(ex, "build_graph", perturbed)
    out = tmp_path / "m.onnx"
    result = run_cli("export", "--checkpoint", small_checkpoint, "--out", out,
                     "--parity-images", 8)
    assert result.exit_code != 0
    assert result.output.startswith("error: parity check failed")
    assert "max |dlogit| 1.00e-03" in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert os.listdir(tmp_path) == []


def test_parity_report_fails_on_a_top1_flip():
    report = ex.ParityReport(num_images=4, max_abs=1e-6, mean_abs=1e-7, top1_agree=3)
    assert not report.passed
    assert ex.ParityReport(num_images=4, max_abs=1e-6, mean_abs=1e-7, top1_agree=4).passed
    assert not ex.ParityReport(num_images=4, max_abs=2e-4, mean_abs=1e-7, top1_agree=4).passed


# ---- torchvision weights ----

def test_torchvision_weights_export(tmp_path, shared_data):
    torch.manual_seed(0)
    weights = tmp_path / "tv.pth"
    torch.save(TorchvisionAlexNet(num_classes=10).state_dict(), weights)
    out = tmp_path / "tv.onnx"
    result = run_cli("export", "--torchvision-weights", weights, "--out", out,
                     "--parity-data", shared_data("imagenet_samples48"), "--parity-images", 8)
    assert result.exit_code == 0, result.output
    model = onnx.load(str(out), load_external_data=False)
    assert ex.op_counts(model) == TORCHVISION_CENSUS
    conv1 = next(n for n in model.graph.node if n.name == "conv1")
    assert helper.get_attribute_value(next(a for a in conv1.attribute if a.name == "pads")) \
        == [2, 2, 2, 2]
    info = read_model_info(model)
    assert (info.preprocess.crop, info.preprocess.resize) == (224, 256)
    assert info.config["arch"] == "torchvision" and info.classes[:2] == ["0", "1"]
    assert info.source_sha256 == sha256_file(weights)
    assert "top-1 agreement 8/8" in result.output


# ---- bad input: one line, exit != 0, no traceback, nothing left behind ----

def _stride0(shape) -> torch.Tensor:
    """A tensor of ``shape`` whose storage is one float (keeps fake state_dict files tiny)."""
    return torch.zeros(1).expand(*shape)


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory, small_checkpoint) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("bad")
    corrupt = folder / "corrupt.pt"
    corrupt.write_bytes(small_checkpoint.read_bytes()[:5000])
    state = torch.load(small_checkpoint, weights_only=True)
    state["config"]["arch"] = "resnet50"
    unknown = folder / "unknown_arch.pt"
    torch.save(state, unknown)
    reference = {k: _stride0(v.shape) for k, v in
                 TorchvisionAlexNet(num_classes=1).state_dict().items()}
    missing = folder / "missing.pth"
    torch.save({k: v for k, v in reference.items() if k != "classifier.4.weight"}, missing)
    misshaped = folder / "misshaped.pth"
    torch.save({**reference, "features.3.weight": _stride0((192, 64, 3, 3))}, misshaped)
    return {"corrupt": corrupt, "unknown_arch": unknown, "missing": missing,
            "misshaped": misshaped, "good": small_checkpoint}


def _out_dir(tmp_path: Path, kind: str) -> tuple[Path, Path]:
    """(folder to check afterwards, --out path) for a normal, missing or read-only folder."""
    if kind == "file in the way":
        (tmp_path / "file").write_text("")
        return tmp_path, tmp_path / "file" / "such" / "m.onnx"
    if kind == "read-only":
        if os.geteuid() == 0:  # root may write into a 0555 folder; sysfs refuses new files
            return Path("/sys"), Path("/sys/alexnet-deploy-test.onnx")
        folder = tmp_path / "ro"
        folder.mkdir()
        folder.chmod(0o555)
        return folder, folder / "m.onnx"
    return tmp_path, tmp_path / "m.onnx"


BAD_CASES = {
    "checkpoint missing": (["--checkpoint", "{dir}/nope.pt"], "does not exist", "ok"),
    "checkpoint corrupt": (["--checkpoint", "{corrupt}"], "corrupt", "ok"),
    "unknown architecture": (["--checkpoint", "{unknown_arch}"], "unknown architecture", "ok"),
    "not a checkpoint": (["--checkpoint", "{missing}"], "not an alexnet-deploy checkpoint",
                         "ok"),
    "opset too low": (["--checkpoint", "{good}", "--opset", "12"], "--opset 12", "ok"),
    "opset too high": (["--checkpoint", "{good}", "--opset", "99"], "--opset 99", "ok"),
    "output folder is a file": (["--checkpoint", "{good}"], "is a file, not a folder",
                                "file in the way"),
    "output folder read-only": (["--checkpoint", "{good}"], "{out_dir}", "read-only"),
    "torchvision keys missing": (["--torchvision-weights", "{missing}"], "classifier.4.weight",
                                 "ok"),
    "torchvision key misshaped": (["--torchvision-weights", "{misshaped}"],
                                  "features.3.weight has shape (192, 64, 3, 3)", "ok"),
    "torchvision file missing": (["--torchvision-weights", "{dir}/nope.pth"], "does not exist",
                                 "ok"),
    "torchvision file is a checkpoint": (["--torchvision-weights", "{good}"], "--checkpoint",
                                         "ok"),
    "both sources": (["--checkpoint", "{good}", "--torchvision-weights", "{missing}"],
                     "exactly one", "ok"),
    "no source": ([], "exactly one", "ok"),
    "no parity images": (["--checkpoint", "{good}", "--parity-images", "0"],
                         "--parity-images", "ok"),
    "parity data missing": (["--checkpoint", "{good}", "--parity-data", "{dir}/nope"], "nope",
                            "ok"),
}


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_bad_input_is_one_line_and_leaves_nothing(case, bad_files, tmp_path):
    args, expect, out_kind = BAD_CASES[case]
    folder, out = _out_dir(tmp_path, out_kind)
    names = {k: str(v) for k, v in bad_files.items()}
    argv = [a.format(dir=tmp_path, **names) for a in args]
    before = sorted(os.listdir(folder))
    result = run_cli("export", *argv, "--out", out)
    assert result.exit_code != 0
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert expect.format(out_dir=out.parent) in lines[0]
    assert "Traceback" not in result.output
    assert sorted(os.listdir(folder)) == before
    assert not out.exists()
