"""What an exported ONNX model carries about itself, in its ``metadata_props``.

Every stage after export reads the preprocessing spec, class names and model config from here;
nothing downstream hard-codes them. This module is the one registry of the keys; every stage
reads and writes them through :func:`get_meta` / :func:`set_meta` (values are JSON text):

==================================  ===================================================
written by export (:class:`ModelInfo`)
``alexnet_deploy.preprocess``       :class:`~alexnet_deploy.preprocess.PreprocessSpec`
``alexnet_deploy.classes``          list of class names, index order
``alexnet_deploy.config``           :class:`~alexnet_deploy.model.AlexNetConfig` as a dict
``alexnet_deploy.source_sha256``    sha256 of the checkpoint / torchvision file exported
``alexnet_deploy.version``          the alexnet-deploy version that exported it
``alexnet_deploy.training_data``    the training data's fingerprint and the images training
                                    held out (``Checkpoint.training_data``), read by the
                                    INT8 accuracy budget
written by the precision rewrites (:mod:`alexnet_deploy.quantize`)
``alexnet_deploy.precision``        ``int8`` or ``fp16``
``alexnet_deploy.int8_target``      the Q/DQ placement (``cpu`` or ``tensorrt``)
``alexnet_deploy.layer_precision``  ``conv1`` .. ``fc8`` -> ``int8`` / ``fp16`` / ``fp32``
``alexnet_deploy.lrn_form``         how LRN is laid out, where a rewrite changed it
``alexnet_deploy.int8_fallback``    ``fp16`` when INT8 leaves the rest in FP16 (``to_int8_fp16``)
written by the exact rewrites (:mod:`alexnet_deploy.rewrite`)
``alexnet_deploy.rewrites``         names of the rewrites applied, in order
==================================  ===================================================
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from alexnet_deploy.errors import UserError
from alexnet_deploy.preprocess import PreprocessSpec

if TYPE_CHECKING:
    import onnx

PREFIX = "alexnet_deploy."
INPUT_NAME = "input"
OUTPUT_NAME = "logits"

# The keys (see the table above), without PREFIX
PREPROCESS, CLASSES, CONFIG, SOURCE_SHA256, VERSION, TRAINING_DATA = (
    "preprocess", "classes", "config", "source_sha256", "version", "training_data")
PRECISION, INT8_TARGET, LAYER_PRECISION, LRN_FORM = (
    "precision", "int8_target", "layer_precision", "lrn_form")
REWRITES = "rewrites"
INT8_FALLBACK = "int8_fallback"  # "fp16": what INT8 leaves unquantized runs in FP16
EXPORT_KEYS = (PREPROCESS, CLASSES, CONFIG, SOURCE_SHA256, VERSION, TRAINING_DATA)
KEYS = (*EXPORT_KEYS, PRECISION, INT8_TARGET, LAYER_PRECISION, LRN_FORM, REWRITES, INT8_FALLBACK)


def set_meta(model: onnx.ModelProto, key: str, value: Any) -> None:
    """Set ``alexnet_deploy.<key>`` to ``value`` (as JSON) in the model's metadata, in place."""
    if key not in KEYS:
        raise ValueError(f"unregistered metadata key {key!r}: add it to metadata.KEYS")
    full, text = PREFIX + key, json.dumps(value)
    for entry in model.metadata_props:
        if entry.key == full:
            entry.value = text
            return
    entry = model.metadata_props.add()
    entry.key, entry.value = full, text


def get_meta(model: onnx.ModelProto, key: str, default: Any = None) -> Any:
    """The JSON value of ``alexnet_deploy.<key>``, or ``default`` when absent."""
    if key not in KEYS:
        raise ValueError(f"unregistered metadata key {key!r}: add it to metadata.KEYS")
    for entry in model.metadata_props:
        if entry.key == PREFIX + key:
            return json.loads(entry.value)
    return default


@dataclass
class ModelInfo:
    preprocess: PreprocessSpec
    classes: list[str]
    config: dict = field(default_factory=dict)
    source_sha256: str = ""
    version: str = ""
    training_data: dict = field(default_factory=dict)

    def to_props(self) -> dict[str, str]:
        return {
            PREFIX + PREPROCESS: self.preprocess.to_json(),
            PREFIX + CLASSES: json.dumps(self.classes),
            PREFIX + CONFIG: json.dumps(self.config, sort_keys=True),
            PREFIX + SOURCE_SHA256: json.dumps(self.source_sha256),
            PREFIX + VERSION: json.dumps(self.version),
            PREFIX + TRAINING_DATA: json.dumps(self.training_data, sort_keys=True),
        }


def write_model_info(model: onnx.ModelProto, info: ModelInfo) -> None:
    """Replace the model's export keys (:data:`EXPORT_KEYS`) with ``info``, in place; keys the
    rewrites wrote (precision, layer precision, rewrites) are kept."""
    ours = {PREFIX + k for k in EXPORT_KEYS}
    keep = [p for p in model.metadata_props if p.key not in ours]
    del model.metadata_props[:]
    model.metadata_props.extend(keep)
    for key, value in info.to_props().items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value


def read_model_info(model: onnx.ModelProto | str | Path) -> ModelInfo:
    """The :class:`ModelInfo` of an exported model (a ModelProto or a path to one)."""
    import onnx

    where = "the model"
    if not isinstance(model, onnx.ModelProto):
        where = str(model)
        model = load_onnx(model, load_weights=False)
    props = {p.key: p.value for p in model.metadata_props}
    if PREFIX + PREPROCESS not in props:
        raise UserError(f"{where} has no alexnet-deploy metadata: export it with "
                        "'alexnet-deploy export' so the preprocessing spec travels with it")
    try:
        return ModelInfo(
            preprocess=PreprocessSpec.from_json(props[PREFIX + PREPROCESS]),
            classes=json.loads(props.get(PREFIX + CLASSES, "[]")),
            config=json.loads(props.get(PREFIX + CONFIG, "{}")),
            source_sha256=json.loads(props.get(PREFIX + SOURCE_SHA256, '""')),
            version=json.loads(props.get(PREFIX + VERSION, '""')),
            training_data=json.loads(props.get(PREFIX + TRAINING_DATA, "{}")),
        )
    except json.JSONDecodeError as e:
        raise UserError(f"{where} has malformed alexnet-deploy metadata ({e}): re-export it") from e


def load_onnx(path: str | Path, load_weights: bool = True) -> onnx.ModelProto:
    """Load an ONNX file; UserError naming the file if it is missing or not ONNX."""
    import onnx
    from google.protobuf.message import DecodeError

    path = Path(path)
    if not path.is_file():
        raise UserError(f"model {path} does not exist: pass the .onnx written by "
                        "'alexnet-deploy export'")
    try:
        return onnx.load(str(path), load_external_data=load_weights)
    except (DecodeError, OSError, ValueError) as e:
        raise UserError(f"{path} is not a readable ONNX model ({e}): re-export it") from e


def check_alexnet_graph(model: onnx.ModelProto, info: ModelInfo, where: str = "the model"
                        ) -> None:
    """UserError unless ``model``'s graph is the AlexNet that ``info`` (its own metadata)
    describes, as ``alexnet-deploy export`` writes it: nodes ``conv1`` .. ``conv5`` (Conv) and
    ``fc6`` .. ``fc8`` (Gemm), every weight of the recorded config under its ``state_dict`` name
    with its shape, and one ``logits`` output per class. Metadata copied onto another graph
    does not pass. Reads only names and shapes (``model`` may be loaded without weights).
    """
    import torch

    from alexnet_deploy.model import LAYERS, AlexNetConfig, AlexNetGrouped  # lazy: torch

    hint = "pass the .onnx written by 'alexnet-deploy export'"
    try:
        cfg = AlexNetConfig.from_dict(info.config)
    except (TypeError, ValueError, UserError) as e:
        raise UserError(f"{where} has no usable AlexNet config in its metadata ({e}): {hint}"
                        ) from None
    ops = {node.name: node.op_type for node in model.graph.node}
    for layer in LAYERS:
        op = "Gemm" if layer.startswith("fc") else "Conv"
        if ops.get(layer) != op:
            found = f"a {ops[layer]} node" if layer in ops else "no such node"
            raise UserError(f"{where} is not an AlexNet export: layer {layer} should be a {op} "
                            f"node, the graph has {found}; {hint}")
    with torch.device("meta"):  # shapes only: no memory for the weights
        expected = {k: tuple(v.shape) for k, v in AlexNetGrouped(cfg).state_dict().items()}
    weights = {t.name: tuple(t.dims) for t in model.graph.initializer}
    for name, shape in expected.items():
        if weights.get(name) != shape:
            found = f"shape {list(weights[name])}" if name in weights else "no such weight"
            raise UserError(f"{where} is not the AlexNet its metadata describes: {name} should "
                            f"have shape {list(shape)} ({cfg.arch}, {cfg.num_classes} classes, "
                            f"width x{cfg.width_mult:g}), the graph has {found}; {hint}")
    outputs = [(v.name, [d.dim_value or d.dim_param for d in v.type.tensor_type.shape.dim])
               for v in model.graph.output]
    if [name for name, _ in outputs] != [OUTPUT_NAME] or outputs[0][1][-1:] != \
            [len(info.classes)] or len(info.classes) != cfg.num_classes:
        raise UserError(f"{where} is not an AlexNet export of {len(info.classes)} classes: its "
                        f"outputs are {outputs}, expected {OUTPUT_NAME} [N, {len(info.classes)}];"
                        f" {hint}")
