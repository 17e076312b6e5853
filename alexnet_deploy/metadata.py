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
