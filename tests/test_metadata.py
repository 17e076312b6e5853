"""The metadata key registry: every stage reads and writes ``alexnet_deploy.*`` keys through it."""

from __future__ import annotations

import onnx
import pytest

from alexnet_deploy import metadata as meta
from alexnet_deploy.preprocess import PreprocessSpec


def _info(classes):
    return meta.ModelInfo(preprocess=PreprocessSpec.for_size(67), classes=classes)


def test_write_model_info_keeps_what_the_rewrites_recorded():
    model = onnx.ModelProto()
    meta.write_model_info(model, _info(["a"]))
    meta.set_meta(model, meta.LAYER_PRECISION, {"conv1": "int8"})
    meta.set_meta(model, meta.REWRITES, ["lrn_for_onnxruntime"])
    meta.write_model_info(model, _info(["a", "b"]))  # e.g. metadata refreshed after the quantizer
    assert meta.get_meta(model, meta.LAYER_PRECISION) == {"conv1": "int8"}
    assert meta.get_meta(model, meta.REWRITES) == ["lrn_for_onnxruntime"]
    assert meta.read_model_info(model).classes == ["a", "b"]
    assert sum(p.key == meta.PREFIX + meta.CLASSES for p in model.metadata_props) == 1


def test_set_meta_replaces_and_unregistered_keys_are_refused():
    model = onnx.ModelProto()
    meta.set_meta(model, meta.PRECISION, "int8")
    meta.set_meta(model, meta.PRECISION, "fp16")
    assert [(p.key, p.value) for p in model.metadata_props] == [("alexnet_deploy.precision",
                                                                 '"fp16"')]
    assert meta.get_meta(model, meta.INT8_TARGET, "none") == "none"
    with pytest.raises(ValueError, match="unregistered metadata key 'colour'"):
        meta.set_meta(model, "colour", 1)
