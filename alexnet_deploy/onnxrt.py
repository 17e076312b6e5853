"""ONNX Runtime sessions: the one place the project creates them, with one thread policy.

The ONNX Runtime backend, export's parity check, calibration, the mixed-precision search and
validation's ONNX reference all run models through :func:`cpu_session`, so they share one set of
session options (:func:`session_options`): the CPU provider, ``threads`` intra-op threads (None:
one per physical core), one inter-op thread, and worker threads that sleep instead of spinning.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from alexnet_deploy.errors import UserError, first_line

if TYPE_CHECKING:
    import onnx


def session_options(threads: int | None = None, *, optimize: bool = True) -> Any:
    """CPU ``SessionOptions``.

    Args:
        threads: intra-op threads. Defaults to None (ONNX Runtime's default, one per physical
            core).
        optimize: every graph optimization (``ORT_ENABLE_ALL``); False runs the graph as written
            (calibration reads intermediate tensors by name). Defaults to True.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = int(threads or 0)
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    options.log_severity_level = 3  # errors only: no warnings on stderr for every session
    # Idle worker threads sleep instead of spinning: on a 2-core machine shared with the caller's
    # own threads (decoding, histograms, other engines) spinning cost 20-40% (docs/notes.md).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


def cpu_session(model: onnx.ModelProto | bytes | str | Path, threads: int | None = None, *,
                optimize: bool = True, what: str = "the model") -> Any:
    """An ``InferenceSession`` on the CPU provider for a model, its bytes or its path.

    Raises:
        UserError: one line, ``ONNX Runtime X cannot load {what} (reason)``.
    """
    import onnxruntime as ort

    if isinstance(model, Path):
        model = str(model)
    elif not isinstance(model, (str, bytes)):
        model = model.SerializeToString()
    try:
        return ort.InferenceSession(model, sess_options=session_options(threads,
                                                                        optimize=optimize),
                                    providers=["CPUExecutionProvider"])
    except Exception as e:  # ORT raises its own Fail/InvalidGraph/... types
        raise UserError(f"ONNX Runtime {ort.__version__} cannot load {what} "
                        f"({first_line(e)})") from e


def ort_logits(model: onnx.ModelProto, images: np.ndarray, batch_size: int = 32,
               threads: int | None = None) -> np.ndarray:
    """``model``'s first output over ``images`` (NCHW float32), ``batch_size`` at a time."""
    session = cpu_session(model, threads)
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: images[i:i + batch_size]})[0]
                           for i in range(0, len(images), batch_size)])
