"""What an exported ONNX model carries about itself, in its ``metadata_props``.

Every stage after export reads the preprocessing spec, class names and model config from here;
nothing downstream hard-codes them. Keys (values are JSON text):

==================================  ===================================================
``alexnet_deploy.preprocess``       :class:`~alexnet_deploy.preprocess.PreprocessSpec`
``alexnet_deploy.classes``          list of class names, index order
``alexnet_deploy.config``           :class:`~alexnet_deploy.model.AlexNetConfig` as a dict
``alexnet_deploy.source_sha256``    sha256 of the checkpoint / torchvision file exported
``alexnet_deploy.version``          the alexnet-deploy version that exported it
==================================  ===================================================
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from alexnet_deploy.errors import UserError
from alexnet_deploy.preprocess import PreprocessSpec

if TYPE_CHECKING:
    import onnx

PREFIX = "alexnet_deploy."
INPUT_NAME = "input"
OUTPUT_NAME = "logits"


@dataclass
class ModelInfo:
    preprocess: PreprocessSpec
    classes: list[str]
    config: dict = field(default_factory=dict)
    source_sha256: str = ""
    version: str = ""

    def to_props(self) -> dict[str, str]:
        return {
            PREFIX + "preprocess": self.preprocess.to_json(),
            PREFIX + "classes": json.dumps(self.classes),
            PREFIX + "config": json.dumps(self.config, sort_keys=True),
            PREFIX + "source_sha256": json.dumps(self.source_sha256),
            PREFIX + "version": json.dumps(self.version),
        }


def write_model_info(model: onnx.ModelProto, info: ModelInfo) -> None:
    """Replace the model's ``alexnet_deploy.*`` metadata with ``info`` (in place)."""
    keep = [p for p in model.metadata_props if not p.key.startswith(PREFIX)]
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
    if PREFIX + "preprocess" not in props:
        raise UserError(f"{where} has no alexnet-deploy metadata: export it with "
                        "'alexnet-deploy export' so the preprocessing spec travels with it")
    try:
        return ModelInfo(
            preprocess=PreprocessSpec.from_json(props[PREFIX + "preprocess"]),
            classes=json.loads(props.get(PREFIX + "classes", "[]")),
            config=json.loads(props.get(PREFIX + "config", "{}")),
            source_sha256=json.loads(props.get(PREFIX + "source_sha256", '""')),
            version=json.loads(props.get(PREFIX + "version", '""')),
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

    from alexnet_deploy.model import LAYERS, AlexNetConfig, AlexNetGrouped

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
