"""The ONNX Runtime backend: session options, the graph it builds per precision, its accuracy."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from alexnet_deploy.backends import get_backend
from alexnet_deploy.backends.onnxruntime import ARTIFACT, BACKEND, FP16_NOTE, session_options
from alexnet_deploy.engine import load_engine
from alexnet_deploy.errors import UserError
from alexnet_deploy.rewrite import applied_rewrites
from tests.conftest import build_every_precision, onnx_logits


@pytest.fixture(scope="module")
def images():
    """Preprocessed synthetic test images at the small model's size."""
    from alexnet_deploy.data import iter_batches
    from alexnet_deploy.preprocess import PreprocessSpec

    batch = next(iter_batches("synthetic:test", PreprocessSpec.for_size(67), 64, limit=64,
                              seed=0, workers=0))
    return batch.images


@pytest.fixture(scope="module")
def engines(small_model, tmp_path_factory):
    return build_every_precision(small_model, tmp_path_factory.mktemp("ort_engines"), "onnxruntime")


def test_session_options_follow_the_threads_argument():
    options = session_options(3)
    assert options.intra_op_num_threads == 3
    assert options.inter_op_num_threads == 1
    assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    assert session_options(None).intra_op_num_threads == 0  # ONNX Runtime's default


def test_is_available_and_found_by_name():
    assert BACKEND.available()
    assert get_backend("onnxruntime") is BACKEND


@pytest.mark.parametrize("batch", [1, 7, 64])
def test_fp32_engine_equals_the_canonical_graph(engines, small_model, images, batch):
    with load_engine(engines / "fp32", threads=2) as engine:
        got = engine.infer(images[:batch])
    np.testing.assert_allclose(got, onnx_logits(small_model["onnx"], images[:batch]),
                               atol=1e-4, rtol=1e-4)


def test_artifact_is_the_rewritten_precision_graph(engines):
    for precision in ("fp32", "fp16", "int8"):
        model = onnx.load(str(engines / precision / ARTIFACT))
        ops = {n.op_type for n in model.graph.node}
        assert "LRN" not in ops, precision  # ONNX Runtime's slow LRN kernel is rewritten away
        expected = "lrn_channels_last" if precision == "int8" else "lrn_for_onnxruntime"
        assert applied_rewrites(model) == [expected]
        # float32 in and out, whatever the precision inside
        for value in (*model.graph.input, *model.graph.output):
            assert value.type.tensor_type.elem_type == TensorProto.FLOAT
    int8 = onnx.load(str(engines / "int8" / ARTIFACT))
    assert sum(n.op_type == "QuantizeLinear" for n in int8.graph.node) >= 8
    fp16 = onnx.load(str(engines / "fp16" / ARTIFACT))
    assert {t.data_type for t in fp16.graph.initializer if t.name == "conv1.weight"} == \
        {TensorProto.FLOAT16}


def test_fp16_engine_is_close_and_says_how_onnx_runtime_runs_it(engines, small_model, images):
    sidecar = json.loads((engines / "fp16" / "engine.json").read_text())
    assert sidecar["precision"] == "fp16"
    assert set(sidecar["layer_precision"].values()) == {"fp16"}
    assert FP16_NOTE in sidecar["notes"]
    reference = onnx_logits(small_model["onnx"], images)
    with load_engine(engines / "fp16") as engine:
        got = engine.infer(images)
    assert got.dtype == np.float32
    scale = np.abs(reference).max()
    assert np.abs(got - reference).max() < 5e-3 * scale
    assert np.mean(got.argmax(1) == reference.argmax(1)) >= 0.98


def test_int8_engine_tracks_fp32(engines, small_model, images):
    sidecar = json.loads((engines / "int8" / "engine.json").read_text())
    assert sidecar["placement"] == "cpu"
    assert set(sidecar["layer_precision"].values()) == {"int8"}
    reference = onnx_logits(small_model["onnx"], images)
    with load_engine(engines / "int8") as engine:
        got = engine.infer(images)
    cosine = np.sum(got * reference, 1) / np.linalg.norm(got, axis=1) \
        / np.linalg.norm(reference, axis=1)
    assert cosine.min() > 0.99
    assert np.mean(got.argmax(1) == reference.argmax(1)) >= 0.9
    assert not np.allclose(got, reference, atol=1e-4)  # it really is quantized


def test_build_refuses_a_graph_onnx_runtime_cannot_load(tmp_path):
    node = helper.make_node("NoSuchOp", ["input"], ["logits"], domain="com.example")
    graph = helper.make_graph([node], "g",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("com.example", 1)])
    with pytest.raises(UserError, match="ONNX Runtime .* cannot load the model"):
        BACKEND.build(model, tmp_path)
    assert not (tmp_path / ARTIFACT).exists()


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_engine_is_safe_to_call_from_several_threads(engines, precision):
    from tests.conftest import assert_thread_safe, real_images

    with load_engine(engines / precision, threads=2) as engine:
        assert_thread_safe(engine, real_images(engine.sidecar.preprocess))
