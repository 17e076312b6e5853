"""What a Triton model instance runs: a list of requests -> one engine call -> one answer each.

Both servers use it: ``alexnet-deploy serve`` (a PyTriton callable) and the ``python``-flavour
``model.py`` (Triton's Python backend). A request is a mapping of input name -> numpy array with
the batch dimension first: either the engine's own input (float32 ``[n, C, H, W]``, or uint8
``[n, H, W, C]`` pixels for a ``uint8-nhwc`` engine) or encoded images
``image`` ``[n, 1]`` (BYTES). All good requests of a call run as one engine batch; a bad request
gets its own error and does not stop the others.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from alexnet_deploy.engine import top_k_predictions
from alexnet_deploy.errors import UserError
from alexnet_deploy.serving import DEFAULT_TOP_K, IMAGE_INPUT, LABELS_OUTPUT, TRITON_DTYPES


class RequestError(UserError):
    """A malformed request: it gets this message as its Triton error; the server goes on."""


class Handler:
    """Runs batches of Triton requests on one loaded engine; safe to share between threads
    (model instances), as the engine is.

    Args:
        engine: a loaded :class:`~alexnet_deploy.engine.Engine`.
        top_k: how many labels each answer carries (at most the number of classes). Defaults to 5.
    """

    def __init__(self, engine: Any, top_k: int = DEFAULT_TOP_K) -> None:
        sidecar = engine.sidecar
        if sidecar.input_name == IMAGE_INPUT or sidecar.output_name == LABELS_OUTPUT:
            raise UserError(f"engine {engine.path}: its tensor names ({sidecar.input_name!r}, "
                            f"{sidecar.output_name!r}) clash with the served {IMAGE_INPUT!r} / "
                            f"{LABELS_OUTPUT!r}; rebuild it from a standard export")
        self.engine = engine
        self.top_k = max(1, min(int(top_k), sidecar.num_classes))
        self.input_name = sidecar.input_name
        self.output_name = sidecar.output_name
        # the input tensor as it must arrive, for error messages
        self._wire = (f"{TRITON_DTYPES[sidecar.input_dtype]} "
                      f"[n, {', '.join(map(str, sidecar.input_dims))}]")
        self._labels = np.array([c.encode() for c in sidecar.classes], dtype=object)

    def run(self, requests: Sequence[Mapping[str, np.ndarray]]
            ) -> list[dict[str, np.ndarray] | RequestError]:
        """One answer per request, in order: ``{output_name: logits [n, classes], "labels":
        [n, top_k] bytes}``, or the :class:`RequestError` that request gets."""
        batches: list[np.ndarray | RequestError] = []
        for request in requests:
            try:
                batches.append(self._inputs(request))
            except RequestError as e:
                batches.append(e)
        good = [b for b in batches if isinstance(b, np.ndarray)]
        if not good:
            return list(batches)  # type: ignore[arg-type]
        logits = self.engine.infer(np.concatenate(good) if len(good) > 1 else good[0])
        answers: list[dict[str, np.ndarray] | RequestError] = []
        start = 0
        for b in batches:
            if isinstance(b, RequestError):
                answers.append(b)
                continue
            part = logits[start:start + len(b)]
            start += len(b)
            answers.append({self.output_name: part, LABELS_OUTPUT: self.labels(part)})
        return answers

    def labels(self, logits: np.ndarray) -> np.ndarray:
        """``[n, top_k]`` class names (bytes) of the most probable classes, best first."""

        predictions = top_k_predictions(logits, self.engine.sidecar.classes, self.top_k,
                                        [""] * len(logits))
        return np.array([[label.encode() for label in p.labels] for p in predictions],
                        dtype=object).reshape(len(logits), self.top_k)

    def _inputs(self, request: Mapping[str, np.ndarray]) -> np.ndarray:
        has_tensor, has_image = self.input_name in request, IMAGE_INPUT in request
        side, wire = self.engine.sidecar, self._wire
        if has_tensor == has_image:
            raise RequestError(f"send exactly one of the inputs {self.input_name!r} ({wire}) or "
                               f"{IMAGE_INPUT!r} (BYTES [n, 1], encoded images)")
        if has_tensor:
            batch = np.asarray(request[self.input_name])
            if (batch.dtype != np.dtype(side.input_dtype) or batch.ndim != 4
                    or batch.shape[1:] != side.input_dims):
                raise RequestError(f"input {self.input_name!r} must be {wire}, got "
                                   f"{batch.dtype} {list(batch.shape)}")
            return batch
        return self.decode(request[IMAGE_INPUT])

    def decode(self, images: np.ndarray) -> np.ndarray:
        """``[n, 1]`` encoded images -> the engine's input batch
        (:meth:`Engine.preprocess <alexnet_deploy.engine.Engine.preprocess>`)."""
        items = np.asarray(images, dtype=object).reshape(len(images), -1)
        if items.shape[1] != 1:
            raise RequestError(f"input {IMAGE_INPUT!r} must be BYTES [n, 1] (one encoded image "
                               f"per row), got {list(np.shape(images))}")
        data = list(items[:, 0])
        for i, item in enumerate(data):
            # only bytes: a string would be taken as a path and read from the server's disk
            if not isinstance(item, (bytes, bytearray)) or not item:
                raise RequestError(f"image {i} of the request is empty or not bytes")
        try:
            return self.engine.preprocess(data)
        except UserError as e:
            raise RequestError(f"image of the request cannot be decoded: {e}") from e
