"""Triton Python-backend model for an alexnet-deploy engine (written by ``alexnet-deploy package
--flavor python`` as ``<version>/model.py``, with the engine folder copied beside it as
``<version>/engine/``).

It needs ``alexnet-deploy`` (and the engine's backend: onnxruntime, openvino, or tensorrt and
pycuda) installed in the Python environment Triton's Python backend runs. Inputs: ``input`` (FP32
``[C, H, W]``, preprocessed; UINT8 ``[H, W, C]`` pixels for a ``uint8-nhwc`` engine) or ``image`` (BYTES ``[1]``, an encoded image the server decodes and
preprocesses as the engine's sidecar says). Outputs: ``logits`` and ``labels`` (the top-k class
names; k is the ``top_k`` parameter of config.pbtxt). Each execute call runs all its requests'
images as one engine batch; a malformed request gets its own error.
"""

import json
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils  # provided by Triton's Python backend

from alexnet_deploy.engine import load_engine
from alexnet_deploy.serving import IMAGE_INPUT
from alexnet_deploy.serving.handler import Handler, RequestError


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        top_k = int(config.get("parameters", {}).get("top_k", {}).get("string_value", "5"))
        self.engine = load_engine(Path(__file__).resolve().parent / "engine")
        self.handler = Handler(self.engine, top_k=top_k)
        self.inputs = (self.handler.input_name, IMAGE_INPUT)

    def execute(self, requests):
        arrays = []
        for request in requests:
            found = {}
            for name in self.inputs:
                tensor = pb_utils.get_input_tensor_by_name(request, name)
                if tensor is not None:
                    found[name] = tensor.as_numpy()
            arrays.append(found)
        try:
            answers = self.handler.run(arrays)
        except Exception as e:  # noqa: BLE001 - the engine failed: every request gets the error
            answers = [RequestError(f"inference failed: {e}")] * len(requests)
        responses = []
        for answer in answers:
            if isinstance(answer, Exception):
                responses.append(pb_utils.InferenceResponse(
                    output_tensors=[], error=pb_utils.TritonError(str(answer))))
            else:
                responses.append(pb_utils.InferenceResponse(output_tensors=[
                    pb_utils.Tensor(name, np.asarray(value)) for name, value in answer.items()]))
        return responses

    def finalize(self):
        self.engine.close()
