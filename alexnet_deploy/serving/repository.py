"""``alexnet-deploy package``: a Triton model repository for an engine.

    DIR/<name>/config.pbtxt
    DIR/<name>/labels.txt                  one class name per line, in logit order
    DIR/<name>/<version>/model.onnx        native, ONNX Runtime engine
    DIR/<name>/<version>/model.xml + .bin  native, OpenVINO engine
    DIR/<name>/<version>/model.plan        native, TensorRT engine
    DIR/<name>/<version>/model.py          python: Triton's Python backend runs the engine ...
    DIR/<name>/<version>/engine/           ... copied here, through alexnet_deploy

``config.pbtxt`` (Triton's ``ModelConfig`` in protobuf text format) takes everything from the
engine's sidecar: input/output names, the input's type and dims without the batch dimension
(FP32 ``[C, H, W]``, or UINT8 ``[H, W, C]`` for a ``uint8-nhwc`` engine), ``max_batch_size``
(the engine's largest batch; a fixed-batch engine gets 0 and full dims; an engine that takes any
batch gets ``max_batch``), ``dynamic_batching`` (preferred batch sizes from ``bench --json`` when
given: every measured size within 10% of the best throughput), ``instance_group`` (``KIND_GPU``
for TensorRT, else ``KIND_CPU``), and the label file on the logits output. The TensorRT flavour
maps the compute capability the plan was built for (``cc_model_filenames``): a plan runs only on
GPUs of that capability.

Only the ``python`` flavour was served here (by the ``tritonserver`` bundled with PyTriton, which
has only the Python backend); the native flavours are checked by parsing their ``config.pbtxt``
with Triton's own protobuf, not by a Triton ONNX Runtime / OpenVINO / TensorRT backend. The
OpenVINO flavour sets no precision hint: on CPUs with bf16, Triton's OpenVINO backend may run the
engine in bf16 where ``alexnet-deploy`` runs it in FP32 (not checked here).

The ``python`` flavour's ``model.py`` imports ``alexnet_deploy``: install this package (and the
engine's backend) in the Python environment Triton's Python backend runs.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alexnet_deploy.engine import EngineSidecar, check_artifacts, engine_folder, read_sidecar
from alexnet_deploy.errors import UserError
from alexnet_deploy.fileio import umask
from alexnet_deploy.serving import (
    DEFAULT_MAX_BATCH,
    DEFAULT_MAX_QUEUE_DELAY_US,
    DEFAULT_MODEL_NAME,
    DEFAULT_TOP_K,
    IMAGE_INPUT,
    LABELS_OUTPUT,
    TRITON_DTYPES,
)

FLAVORS = ("native", "python")
LABEL_FILE = "labels.txt"
ENGINE_COPY = "engine"  # the python flavour's copy of the engine folder, beside model.py
# Triton model names: PyTriton's rule (letters, digits, dots, underscores, dashes), no dot-only
_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")
# native flavour per backend: (platform or backend line, {engine file: repository file})
_NATIVE = {
    "onnxruntime": ({"platform": "onnxruntime_onnx"}, {"model.onnx": "model.onnx"}),
    "openvino": ({"backend": "openvino"}, {"model.xml": "model.xml", "model.bin": "model.bin"}),
    "tensorrt": ({"platform": "tensorrt_plan"}, {"model.engine": "model.plan"}),
}
PREFERRED_WITHIN = 0.9  # preferred batch sizes: throughput at least this fraction of the best


class Enum(str):
    """A protobuf enum value: written bare in text format (``KIND_CPU``, not ``"KIND_CPU"``)."""


@dataclass
class Package:
    """What :func:`package` wrote: the model folder and its parsed-ready config text."""

    model_dir: Path
    config: dict[str, Any]
    flavor: str

    def summary(self) -> list[str]:
        c = self.config
        kind = c.get("platform") or c.get("backend")
        batching = c.get("dynamic_batching")
        pref = batching.get("preferred_batch_size") if batching else None
        state = "off" if batching is None else f"preferred {pref}" if pref else "on"
        line = (f"wrote Triton model {self.model_dir} ({self.flavor}: {kind}, max_batch_size "
                f"{c['max_batch_size']}, dynamic batching {state})")
        return [line]


def check_name(name: str) -> str:
    """``name`` if Triton accepts it as a model name; UserError otherwise."""
    if not _NAME.match(name or "") or set(name) == {"."}:
        raise UserError(f"model name {name!r} is not one Triton accepts: use letters, digits, "
                        "dots, underscores and dashes (e.g. alexnet_int8)")
    return name


def check_version(version: Any) -> int:
    """``version`` as a positive integer (Triton's version folders); UserError otherwise."""
    text = str(version).strip()
    if not text.isdigit() or int(text) < 1:
        raise UserError(f"model version {version!r} is not a positive integer (Triton's version "
                        "folders are 1, 2, ...)")
    return int(text)


def batch_limits(sidecar: EngineSidecar, max_batch: int | None = None) -> tuple[int, int]:
    """``(max_batch_size, fixed_batch)`` for Triton: a fixed-batch engine (min == max) gets
    ``(0, N)`` (no batch dimension: dims carry N); else the engine's largest batch (or
    ``max_batch``, default :data:`DEFAULT_MAX_BATCH`, for an engine that takes any) and 0.

    Raises:
        UserError: the engine needs batches of at least 2 (Triton may send 1), or ``max_batch``
            is below 1 or above the engine's profile.
    """
    lo, hi = sidecar.min_batch, sidecar.max_batch
    if hi is not None and lo == hi:
        return 0, hi
    if lo > 1:
        raise UserError(f"the engine takes batches of {lo}..{hi} only; Triton may send any batch "
                        "from 1: rebuild it with a profile starting at 1")
    if max_batch is not None and (max_batch < 1 or (hi is not None and max_batch > hi)):
        raise UserError(f"--max-batch {max_batch} is outside the engine's profile "
                        f"(1..{'any' if hi is None else hi})")
    return (max_batch or (hi if hi is not None else DEFAULT_MAX_BATCH)), 0


def preferred_batch_sizes(bench_json: Path | str, sidecar: EngineSidecar,
                          max_batch_size: int) -> list[int]:
    """Batch sizes from a ``bench --json`` file whose throughput is within 10% of the best
    measured one (sizes above ``max_batch_size`` left out). A file with several engines must hold
    exactly one of this engine's backend and precision."""
    path = Path(bench_json)
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"--bench {path} does not exist: write one with 'alexnet-deploy bench "
                        "--engine ENGINE --json FILE'") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"--bench {path} is not a JSON file from 'alexnet-deploy bench "
                        f"--json' ({e})") from e
    entries = doc.get("engines", [doc]) if isinstance(doc, dict) else []
    entries = [e for e in entries if isinstance(e, dict) and isinstance(e.get("results"), list)]
    if len(entries) > 1:
        entries = [e for e in entries if e.get("backend") == sidecar.backend
                   and e.get("precision") == sidecar.precision]
    if len(entries) != 1:
        raise UserError(f"--bench {path}: expected the results of one engine of backend "
                        f"{sidecar.backend} precision {sidecar.precision}, found {len(entries)}: "
                        "bench the engine alone with --json")
    try:
        measured = {int(r["batch_size"]): float(r["throughput"]) for r in entries[0]["results"]}
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"--bench {path}: a result lacks batch_size/throughput ({e})") from e
    measured = {b: t for b, t in measured.items() if 1 <= b <= max_batch_size}
    if not measured:
        raise UserError(f"--bench {path} has no batch size from 1 to {max_batch_size}: bench "
                        "the engine at the batch sizes Triton may form")
    best = max(measured.values())
    return sorted(b for b, t in measured.items() if t >= PREFERRED_WITHIN * best)


def model_config(sidecar: EngineSidecar, *, name: str = DEFAULT_MODEL_NAME,
                 flavor: str = "native", instances: int = 1,
                 max_queue_delay_us: int = DEFAULT_MAX_QUEUE_DELAY_US,
                 preferred: list[int] | None = None, max_batch: int | None = None,
                 top_k: int = DEFAULT_TOP_K) -> dict[str, Any]:
    """Triton's ``ModelConfig`` for the engine, as a dict in :func:`to_pbtxt`'s form.

    Args:
        sidecar: the engine's sidecar.
        name: the model name. Defaults to "alexnet".
        flavor: ``native`` (the engine's own format) or ``python`` (model.py). Defaults to native.
        instances: model instances (``instance_group`` count). Defaults to 1.
        max_queue_delay_us: the dynamic batcher's ``max_queue_delay_microseconds``. Defaults to
            500.
        preferred: ``preferred_batch_size`` list, or None for none. Defaults to None.
        max_batch: ``max_batch_size`` for an engine that takes any batch size. Defaults to None
            (:data:`DEFAULT_MAX_BATCH`).
        top_k: labels per answer of the python flavour. Defaults to 5.
    """
    if flavor not in FLAVORS:
        raise UserError(f"flavor {flavor!r} is not one of {', '.join(FLAVORS)}")
    if instances < 1:
        raise UserError(f"--instances {instances} must be at least 1")
    if max_queue_delay_us < 0:
        raise UserError(f"--max-queue-delay-us {max_queue_delay_us} must be 0 or more")
    max_batch_size, fixed = batch_limits(sidecar, max_batch)
    lead = [fixed] if fixed else []  # without a batch dimension, dims carry the fixed batch
    num_classes = sidecar.num_classes
    config: dict[str, Any] = {"name": check_name(name)}
    if flavor == "python":
        config["backend"] = "python"
    else:
        if sidecar.backend not in _NATIVE:
            raise UserError(f"engine backend {sidecar.backend!r} has no Triton backend: use "
                            "--flavor python")
        config.update(_NATIVE[sidecar.backend][0])
    config["max_batch_size"] = max_batch_size
    tensor = {"name": sidecar.input_name,
              "data_type": Enum("TYPE_" + TRITON_DTYPES[sidecar.input_dtype]),
              "dims": lead + list(sidecar.input_dims)}
    logits = {"name": sidecar.output_name, "data_type": Enum("TYPE_FP32"),
              "dims": lead + [num_classes], "label_filename": LABEL_FILE}
    if flavor == "python":
        k = max(1, min(int(top_k), num_classes))
        config["input"] = [{**tensor, "optional": True},
                           {"name": IMAGE_INPUT, "data_type": Enum("TYPE_STRING"),
                            "dims": lead + [1], "optional": True}]
        config["output"] = [logits, {"name": LABELS_OUTPUT, "data_type": Enum("TYPE_STRING"),
                                     "dims": lead + [k]}]
        config["parameters"] = {"top_k": {"string_value": str(k)}}
    else:
        config["input"] = [tensor]
        config["output"] = [logits]
    if max_batch_size > 0:
        batching: dict[str, Any] = {"max_queue_delay_microseconds": int(max_queue_delay_us)}
        if preferred:
            batching["preferred_batch_size"] = list(preferred)
        config["dynamic_batching"] = batching
    gpu = sidecar.backend == "tensorrt"
    config["instance_group"] = [{"count": int(instances),
                                 "kind": Enum("KIND_GPU" if gpu else "KIND_CPU")}]
    if flavor == "native" and gpu:
        config["default_model_filename"] = "model.plan"
        cc = sidecar.host.get("gpu_compute_capability")
        if cc:
            config["cc_model_filenames"] = {cc: "model.plan"}
    return config


def to_pbtxt(message: dict[str, Any], indent: int = 0) -> str:
    """A dict as protobuf text format: nested dicts are messages (a dict under ``parameters`` or
    ``cc_model_filenames`` is a map: ``key``/``value`` entries), lists of dicts repeated
    messages, lists of scalars repeated fields, :class:`Enum` bare, other strings quoted."""
    pad = "  " * indent
    lines = []
    for key, value in message.items():
        if isinstance(value, dict) and key in ("parameters", "cc_model_filenames"):
            for k, v in value.items():
                lines.append(f"{pad}{key} {{\n{to_pbtxt({'key': k, 'value': v}, indent + 1)}"
                             f"{pad}}}\n")
        elif isinstance(value, dict):
            lines.append(f"{pad}{key} {{\n{to_pbtxt(value, indent + 1)}{pad}}}\n")
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            for v in value:
                lines.append(f"{pad}{key} {{\n{to_pbtxt(v, indent + 1)}{pad}}}\n")
        elif isinstance(value, list):
            lines.append(f"{pad}{key}: [{', '.join(_scalar(v) for v in value)}]\n")
        else:
            lines.append(f"{pad}{key}: {_scalar(value)}\n")
    return "".join(lines)


def _scalar(value: Any) -> str:
    if isinstance(value, Enum):
        return str(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return str(value)
    return json.dumps(str(value))  # a quoted string with escapes protobuf text format reads


def package(engine: Path | str, triton_dir: Path | str, *, name: str = DEFAULT_MODEL_NAME,
            version: Any = 1, instances: int = 1,
            max_queue_delay_us: int = DEFAULT_MAX_QUEUE_DELAY_US, bench: Path | str | None = None,
            flavor: str = "native", max_batch: int | None = None, top_k: int = DEFAULT_TOP_K,
            say: Callable[[str], None] = lambda _: None) -> Package:
    """Write ``triton_dir/<name>/`` for the engine at ``engine``; return what was written.

    Args:
        engine: the engine folder (from ``alexnet-deploy build``).
        triton_dir: the model repository; created if absent (its parent must exist).
        name: the model name (a folder in the repository). Defaults to "alexnet".
        version: the version folder, a positive integer. Defaults to 1.
        instances: model instances. Defaults to 1.
        max_queue_delay_us: the dynamic batcher's queue delay. Defaults to 500.
        bench: a ``bench --json`` file of this engine for preferred batch sizes. Defaults to None.
        flavor: ``native`` or ``python``. Defaults to "native".
        max_batch: Triton's ``max_batch_size`` for an engine that takes any batch. Defaults to
            None (64).
        top_k: labels per answer (python flavour). Defaults to 5.
        say: progress messages. Defaults to none.

    Raises:
        UserError: a bad name or version, no engine or sidecar there, an artifact that does not
            match its sidecar, an existing ``<name>`` folder. Nothing is left half-written: the
            model folder is assembled beside its destination and renamed into place.
    """
    check_name(name)
    version = check_version(version)
    folder = engine_folder(engine)
    sidecar = read_sidecar(folder)
    check_artifacts(folder, sidecar)
    repo = Path(triton_dir)
    if repo.resolve().is_relative_to(folder.resolve()):
        raise UserError(f"--triton {repo} is inside the engine folder {folder}: write the "
                        "repository elsewhere")
    dest = repo / name
    if dest.exists() or dest.is_symlink():
        raise UserError(f"{dest} already exists: choose another --name, or remove it to replace "
                        "the model")
    if repo.exists() and not repo.is_dir():
        raise UserError(f"--triton {repo} is not a folder: give a model repository folder")
    if not repo.parent.resolve().is_dir():
        raise UserError(f"--triton {repo}: its parent folder does not exist")
    max_batch_size, _ = batch_limits(sidecar, max_batch)
    preferred = (preferred_batch_sizes(bench, sidecar, max_batch_size)
                 if bench is not None and max_batch_size > 0 else None)
    config = model_config(sidecar, name=name, flavor=flavor, instances=instances,
                          max_queue_delay_us=max_queue_delay_us, preferred=preferred,
                          max_batch=max_batch, top_k=top_k)
    try:
        repo.mkdir(exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=repo))
    except OSError as e:
        raise UserError(f"cannot write to --triton {repo}: {e.strerror or e}") from e
    try:
        vdir = tmp / str(version)
        vdir.mkdir()
        if flavor == "python":
            shutil.copytree(folder, vdir / ENGINE_COPY)
            shutil.copyfile(Path(__file__).with_name("triton_model.py"), vdir / "model.py")
        else:
            for src, dst in _NATIVE[sidecar.backend][1].items():
                shutil.copyfile(folder / src, vdir / dst)
        (tmp / LABEL_FILE).write_text("".join(f"{c}\n" for c in sidecar.classes))
        (tmp / "config.pbtxt").write_text(to_pbtxt(config))
        os.chmod(tmp, 0o777 & ~umask())  # mkdtemp makes it 0700
        os.replace(tmp, dest)
    except OSError as e:
        raise UserError(f"cannot write Triton model {dest}: {e.strerror or e}") from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    say(f"packaged engine {folder} as {dest}")
    return Package(model_dir=dest, config=config, flavor=flavor)
