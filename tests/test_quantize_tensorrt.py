"""INT8 with FP16 elsewhere (``quantize.to_int8_fp16``), the TensorRT default for INT8."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto

from alexnet_deploy import quantize as Q
from alexnet_deploy.errors import UserError
from alexnet_deploy.graph import producers_of


def meta(model: onnx.ModelProto) -> dict:
    return {p.key: p.value for p in model.metadata_props}


def run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


@pytest.fixture(scope="module")
def graphs(small_model):
    from alexnet_deploy.calibrate import load_calibration

    model = onnx.load(str(small_model["onnx"]))
    cal = load_calibration(small_model["calibration"])
    return model, Q.to_int8(model, cal, "tensorrt"), Q.to_int8_fp16(model, cal, "tensorrt")


def test_scales_are_float16_and_everything_outside_lrn_is_float16(graphs):
    model, int8, mixed = graphs
    onnx.checker.check_model(mixed, full_check=True)
    assert Q.opset_version(model) < Q.FP16_QDQ_OPSET == Q.opset_version(mixed)
    inits = {t.name: t for t in mixed.graph.initializer}
    dq = [n for n in mixed.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert len(dq) == len([n for n in int8.graph.node if n.op_type in ("QuantizeLinear",
                                                                       "DequantizeLinear")])
    assert {inits[n.input[1]].data_type for n in dq} == {TensorProto.FLOAT16}
    # float initializers: float16, except the LRN blocks' own constants
    lrn = Q._lrn_nodes(mixed)
    lrn_reads = {i for n in mixed.graph.node if Q.node_label(n) in lrn for i in n.input}
    f32 = {t.name for t in mixed.graph.initializer if t.data_type == TensorProto.FLOAT}
    assert f32 <= lrn_reads
    # what enters an LRN block is cast to float32 first
    producers = producers_of(mixed.graph)
    entries = [producers[i] for n in mixed.graph.node if Q.node_label(n) in lrn
               for i in n.input if i in producers and Q.node_label(producers[i]) not in lrn]
    assert len(entries) == 2  # one per LRN block
    for cast in entries:
        assert cast.op_type == "Cast" and cast.attribute[0].i == TensorProto.FLOAT


def test_metadata_says_int8_with_fp16_fallback(graphs):
    _, int8, mixed = graphs
    m = meta(mixed)
    assert json.loads(m["alexnet_deploy.precision"]) == "int8"
    assert json.loads(m["alexnet_deploy.int8_fallback"]) == "fp16"
    assert json.loads(m["alexnet_deploy.layer_precision"]) == json.loads(
        meta(int8)["alexnet_deploy.layer_precision"])  # every layer int8


def test_kept_layers_run_in_fp16_not_fp32(small_model):
    from alexnet_deploy.calibrate import load_calibration

    model = onnx.load(str(small_model["onnx"]))
    cal = load_calibration(small_model["calibration"])
    mixed = Q.to_int8_fp16(model, cal, "tensorrt", keep_fp32=("fc8",))
    layers = json.loads(meta(mixed)["alexnet_deploy.layer_precision"])
    assert layers["fc8"] == "fp16" and layers["fc7"] == "int8"


def test_ort_runs_it_close_to_the_fp32_fallback_graph(graphs):
    _, int8, mixed = graphs
    x = np.random.default_rng(0).standard_normal((8, 3, 67, 67)).astype(np.float32)
    a, b = run(int8, x), run(mixed, x)
    assert b.dtype == np.float32 and np.isfinite(b).all()
    scale = np.abs(a).max()
    # FP16 rounding of the float parts on top of INT8: small, but not zero
    assert 0 < np.abs(a - b).max() < 0.05 * scale


def test_an_old_opset_that_cannot_convert_is_one_user_error(graphs, monkeypatch):
    from onnx import version_converter

    model, _, _ = graphs

    def fail(model, version):
        raise RuntimeError("No Adapter For Foo")

    monkeypatch.setattr(version_converter, "convert_version", fail)
    with pytest.raises(UserError, match="re-export with --opset 19"):
        Q.to_int8_fp16(model, Q._EveryAmax(), "tensorrt")
