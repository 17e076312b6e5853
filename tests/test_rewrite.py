"""Backend rewrites compute the canonical graph's function (checked on ONNX Runtime)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from alexnet_deploy import export as ex
from alexnet_deploy import rewrite as rw
from alexnet_deploy.graph import lrn_blocks
from alexnet_deploy.model import (
    LRN_BETA,
    LRN_K,
    LRN_SIZE,
    TORCH_LRN_ALPHA,
    AlexNetConfig,
    AlexNetGrouped,
    group_lrn,
)
from alexnet_deploy.preprocess import PreprocessSpec
from tests.conftest import shared_path

REL_TOL = 1e-5  # max |rewrite - canonical| <= REL_TOL * max |canonical|


def he_init(model: torch.nn.Module) -> torch.nn.Module:
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            torch.nn.init.kaiming_normal_(p) if p.dim() > 1 else torch.nn.init.uniform_(p, 0, .1)
    return model.eval()


def run(model: onnx.ModelProto, x: np.ndarray, outputs: list[str]) -> list[np.ndarray]:
    """Run ``model`` on ONNX Runtime with ``outputs`` (intermediate tensors too) exposed."""
    model = _expose(model, outputs)
    feed = {model.graph.input[0].name: x}
    return ex.ort_session(model).run(outputs, feed)


def _expose(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    have = {o.name for o in out.graph.output}
    out.graph.output.extend(helper.make_empty_tensor_value_info(n) for n in names
                            if n not in have)
    return out


def assert_close(a: np.ndarray, b: np.ndarray, rel: float = REL_TOL) -> None:
    err = np.abs(a.astype(np.float64) - b).max()
    assert err <= rel * np.abs(b).max(), f"max abs diff {err:.3g} vs scale {np.abs(b).max():.3g}"


@pytest.fixture(scope="module")
def small_graph() -> tuple[onnx.ModelProto, AlexNetGrouped]:
    model = he_init(AlexNetGrouped(AlexNetConfig(num_classes=10, image_size=99,
                                                 width_mult=0.25)))
    return ex.infer_shapes(ex.build_graph(model)), model


@pytest.fixture(scope="module")
def real_images() -> np.ndarray:
    return ex.load_parity_images(shared_path("imagenette_val300"), PreprocessSpec.for_size(99),
                                 16)


def test_lrn_for_onnxruntime_equals_the_canonical_graph(small_graph, real_images):
    canonical, torch_model = small_graph
    fast = rw.lrn_for_onnxruntime(canonical)
    onnx.checker.check_model(fast, full_check=True)
    names = ["lrn1", "lrn2", "logits"]
    for got, want in zip(run(fast, real_images, names), run(canonical, real_images, names)):
        assert_close(got, want)
    report = ex.check_parity(fast, torch_model, real_images)
    assert report.passed, report.summary()


def test_lrn_for_onnxruntime_graph(small_graph):
    canonical, _ = small_graph
    before = canonical.SerializeToString()
    fast = rw.lrn_for_onnxruntime(canonical)
    assert canonical.SerializeToString() == before  # the input is not modified
    census = ex.op_counts(fast)
    assert not {"LRN", "Split", "Concat"} & set(census)
    assert census["Conv"] == 7 and census["Sqrt"] == 4 and census["Div"] == 2
    names = [n.name for n in fast.graph.node]
    assert names[2:8] == ["lrn1.sq", "lrn1.window", "lrn1.sqrt", "lrn1.qrt", "lrn1.pow", "lrn1"]
    lrn1 = next(n for n in fast.graph.node if n.name == "lrn1")
    assert (lrn1.op_type, list(lrn1.input), list(lrn1.output)) == \
        ("Div", ["relu1", "lrn1.pow"], ["lrn1"])
    assert [o.name for o in fast.graph.output] == ["logits"]
    assert {p.key: p.value for p in fast.metadata_props}.items() >= \
        {p.key: p.value for p in canonical.metadata_props}.items()
    assert rw.applied_rewrites(fast) == ["lrn_for_onnxruntime"]
    assert rw.applied_rewrites(canonical) == []
    # nothing left to rewrite the second time
    again = rw.lrn_for_onnxruntime(fast)
    assert [n.name for n in again.graph.node] == names


def test_lrn_window_is_a_band_inside_each_group():
    w = rw.lrn_window(8, 2, 5, 1.0)[:, :, 0, 0]
    assert w.shape == (8, 4)
    # output channel 1 of tower 0 sums its own channels 0..3 (0,1,2,3 clipped at the edge)
    np.testing.assert_array_equal(w[1], [1, 1, 1, 1])
    np.testing.assert_array_equal(w[0], [1, 1, 1, 0])
    np.testing.assert_array_equal(w[3], [0, 1, 1, 1])
    np.testing.assert_array_equal(w[4:], w[:4])  # tower 1: same band over its own channels


def _block_graph(channels: int, groups: int, beta: float = LRN_BETA) -> onnx.ModelProto:
    """``x`` -> per-group native LRN -> ``y`` (the canonical block, or a lone LRN)."""
    g = ex._GraphWriter(17)
    g.group_lrn("x", "y", groups)
    if beta != LRN_BETA:
        for node in g.nodes:
            for a in node.attribute:
                if a.name == "beta":
                    a.f = beta
    graph = helper.make_graph(
        g.nodes, "block", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                         ["N", channels, 5, 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", channels, 5, 5])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_the_window_never_crosses_the_tower_boundary():
    # tower 0's last channel is huge: only tower 0's channels near it may be damped
    x = np.full((1, 8, 5, 5), 0.5, np.float32)
    x[:, 3] = 3000.0
    block = _block_graph(8, 2)
    (got,) = run(rw.lrn_for_onnxruntime(block), x, ["y"])
    (want,) = run(block, x, ["y"])
    assert_close(got, want)
    per_tower = group_lrn(torch.from_numpy(x), 2).numpy()
    assert_close(got, per_tower)
    merged = torch.nn.functional.local_response_norm(torch.from_numpy(x), LRN_SIZE,
                                                     TORCH_LRN_ALPHA, LRN_BETA, LRN_K).numpy()
    assert abs(merged[0, 4, 0, 0] - got[0, 4, 0, 0]) > 0.1  # the input does tell them apart


@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("beta", [0.75, 0.5, 0.6])
@pytest.mark.parametrize("prescale", [False, True])
def test_every_form_matches_native_lrn(groups, beta, prescale):
    """Lone and per-tower LRN, the three power forms, with and without pre-scaling, on
    activations from 0 to 1000 (x**2 up to 1e6)."""
    block = _block_graph(12, groups, beta)
    fast = rw.lrn_for_onnxruntime(block, prescale=prescale)
    ops = ex.op_counts(fast)
    assert "LRN" not in ops
    assert ("Pow" in ops) == (beta not in (0.5, 0.75))
    x = np.random.default_rng(0).uniform(0, 1000, (3, 12, 5, 5)).astype(np.float32)
    x[:, :, 0] = 0.0  # ReLU zeros
    x[:, :, 1] = np.random.default_rng(1).uniform(0, 0.1, (3, 12, 5))
    (got,) = run(fast, x, ["y"])
    (want,) = run(block, x, ["y"])
    assert_close(got, want)



def test_rewrite_after_onnxruntime_quantization(small_graph, real_images, tmp_path):
    """``quantize_static`` puts Q/DQ between Split and each LRN: each tower's LRN is then
    rewritten alone, and its output equals the native one on the same dequantized input."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{"input": real_images[i:i + 4]} for i in range(0, 16, 4)])

        def get_next(self):
            return next(self.batches, None)

    canonical, _ = small_graph
    onnx.save(canonical, str(tmp_path / "f32.onnx"))
    quantize_static(str(tmp_path / "f32.onnx"), str(tmp_path / "q.onnx"), Reader(),
                    quant_format=QuantFormat.QDQ, per_channel=True)
    quantized = onnx.load(str(tmp_path / "q.onnx"))
    blocks = lrn_blocks(quantized)
    assert len(blocks) == 4 and {b.groups for b in blocks} == {1}
    fast = rw.lrn_for_onnxruntime(quantized)
    assert "LRN" not in ex.op_counts(fast)
    towers = [b.output for b in blocks]
    for got, want in zip(run(fast, real_images, towers), run(quantized, real_images, towers)):
        assert_close(got, want)


# ---- per-tower LRN as one op, uint8 NHWC input ----


@pytest.mark.parametrize("groups", [2, 4])
def test_lrn_fold_towers_is_exact(groups):
    """One LRN over [G*N, C/G, H, W] equals Split / per-tower LRN / Concat (to float32 rounding:
    ONNX Runtime's LRN kernel rounds a few elements 1 ulp differently by position), and a
    strong channel at a tower's edge does not leak into the next tower."""
    block = _block_graph(16, groups)
    folded = rw.lrn_fold_towers(block)
    assert ex.op_counts(folded) == {"Reshape": 2, "LRN": 1}
    assert rw.applied_rewrites(folded) == ["lrn_fold_towers"]
    x = np.random.default_rng(0).uniform(0, 50, (3, 16, 5, 5)).astype(np.float32)
    x[:, 16 // groups - 1] = 1000.0  # last channel of tower 0: damps its neighbours in-tower only
    (got,) = run(folded, x, ["y"])
    (want,) = run(block, x, ["y"])
    assert_close(got, want, rel=1e-6)
    merged = torch.nn.functional.local_response_norm(torch.from_numpy(x), LRN_SIZE,
                                                     TORCH_LRN_ALPHA, LRN_BETA, LRN_K).numpy()
    assert np.abs(merged - want).max() > 1.0  # a fold that ignored the towers would differ


def test_lrn_fold_towers_leaves_a_lone_lrn():
    block = _block_graph(8, 1)
    assert ex.op_counts(rw.lrn_fold_towers(block)) == {"LRN": 1}


def test_lrn_fold_towers_on_the_whole_model(small_graph, real_images):
    canonical, _ = small_graph
    folded = rw.lrn_fold_towers(canonical)
    ops = ex.op_counts(folded)
    assert "Split" not in ops and "Concat" not in ops and ops["LRN"] == 2
    (got,) = run(folded, real_images, ["logits"])
    (want,) = run(canonical, real_images, ["logits"])
    assert_close(got, want, rel=1e-6)


def test_uint8_nhwc_input_matches_preprocessing(small_graph):
    """The uint8 graph on raw pixels equals the float graph on PreprocessSpec.normalize's
    output (up to float32 rounding of the folded multiply-add), and denormalize inverts
    normalize exactly."""
    canonical, _ = small_graph
    spec = PreprocessSpec.for_size(99)
    pixels = np.random.default_rng(0).integers(0, 256, (4, 99, 99, 3), dtype=np.uint8)
    floats = np.stack([spec.normalize(p) for p in pixels])
    np.testing.assert_array_equal(spec.denormalize(floats), pixels)
    u8 = rw.uint8_nhwc_input(canonical, spec.mean, spec.std)
    assert u8.graph.input[0].name == "input"
    assert u8.graph.input[0].type.tensor_type.elem_type == TensorProto.UINT8
    assert [d.dim_value for d in u8.graph.input[0].type.tensor_type.shape.dim][1:] == [99, 99, 3]
    (got,) = run(u8, pixels, ["logits"])
    (want,) = run(canonical, floats, ["logits"])
    assert_close(got, want)
    (normalized,) = run(u8, pixels, ["input.float"])
    assert np.abs(normalized - floats).max() < 1e-5
    # channels really are mapped: swapping R and B changes the result
    (swapped,) = run(u8, np.ascontiguousarray(pixels[..., ::-1]), ["logits"])
    assert np.abs(swapped - want).max() > 1e-3
