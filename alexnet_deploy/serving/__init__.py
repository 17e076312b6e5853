"""Serving engines on NVIDIA Triton Inference Server.

Three parts, one module each:

* :mod:`~alexnet_deploy.serving.repository`: ``alexnet-deploy package`` writes a Triton model
  repository (``config.pbtxt``, the versioned model files, a label file) for an engine, either in
  the engine's own format for Triton's own backend (``native``) or as a Python-backend
  ``model.py`` that runs the engine through this project (``python``).
* :mod:`~alexnet_deploy.serving.server`: ``alexnet-deploy serve`` starts a real Triton server
  through PyTriton, serving an engine with dynamic batching; and the helpers that start the
  ``tritonserver`` binary bundled with PyTriton on a repository.
* :mod:`~alexnet_deploy.serving.loadtest`: ``alexnet-deploy loadtest``, a concurrency sweep over
  HTTP and gRPC with every answer checked against the engine's own.

:mod:`~alexnet_deploy.serving.handler` is what both servers run per batch of requests.
PyTriton and tritonclient (the ``serve`` extra) are imported inside the functions that use them,
so this package imports without them.

The served interface, the same for ``serve`` and the ``python`` flavour:

============  =======  ==================  ===================================================
tensor        type     dims (per image)    what
============  =======  ==================  ===================================================
``input``     FP32     ``[C, H, W]``       a preprocessed image (the sidecar's input name);
              UINT8    ``[H, W, C]``       for a ``--input uint8-nhwc`` engine: the resized,
                                           cropped RGB pixels (a quarter of the bytes)
``image``     BYTES    ``[1]``             an encoded image (JPEG, PNG, ...), preprocessed by
                                           the server with the engine's own preprocessing
``logits``    FP32     ``[num_classes]``   the engine's logits (the sidecar's output name)
``labels``    BYTES    ``[top_k]``         the names of the ``top_k`` highest logits, best first
============  =======  ==================  ===================================================
"""

from __future__ import annotations

IMAGE_INPUT = "image"
LABELS_OUTPUT = "labels"
DEFAULT_MODEL_NAME = "alexnet"
DEFAULT_TOP_K = 5
#: the largest batch Triton forms for an engine that takes any batch size (the CPU backends)
DEFAULT_MAX_BATCH = 64
#: how long Triton's dynamic batcher waits for more requests to fill a batch
DEFAULT_MAX_QUEUE_DELAY_US = 500
#: Triton's name of each engine input dtype (``EngineSidecar.input_dtype``)
TRITON_DTYPES = {"float32": "FP32", "uint8": "UINT8"}
