"""``alexnet-deploy serve``: a real Triton Inference Server for an engine, through PyTriton.

PyTriton (``pip install 'alexnet-deploy[serve]'``) ships the ``tritonserver`` binary and its
Python backend; it binds Python callables as Triton models. Two models are served:

* ``<name>``: the engine's float32 input (``[n, C, H, W]``), with Triton's dynamic batcher: the
  requests waiting at a time (up to ``max_batch`` images, waiting at most ``max_queue_delay_us``)
  run as one engine batch.
* ``<name>_image``: encoded images (BYTES ``[n, 1]``), decoded and preprocessed in the server
  with the engine's sidecar. Not dynamically batched: PyTriton fails every request of a batch
  when one of them fails, so an undecodable image would fail the requests batched with it. A
  client batches images by sending several in one request.

Both answer ``logits`` and ``labels`` (top-k class names); see :mod:`alexnet_deploy.serving`.
Triton itself rejects a request of the wrong shape or data type; an undecodable image gets an
error for its request; either way the server goes on serving. ``--instances N`` binds N callables
on the one engine (engines are safe to call from several threads).

On this project's machines (pyenv-built Python) the Python backend stub loads the system's
``libpython`` unless ``LD_LIBRARY_PATH`` starts with the running interpreter's ``LIBDIR``;
:func:`triton_env` puts it there. NVML / DCGM warnings at start on a machine without a GPU are
harmless.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alexnet_deploy.engine import load_engine
from alexnet_deploy.errors import UserError
from alexnet_deploy.serving import (
    DEFAULT_MAX_QUEUE_DELAY_US,
    DEFAULT_MODEL_NAME,
    DEFAULT_TOP_K,
    IMAGE_INPUT,
    LABELS_OUTPUT,
    TRITON_DTYPES,
)
from alexnet_deploy.serving.handler import Handler
from alexnet_deploy.serving.repository import batch_limits, check_name

SERVE_HINT = "pip install 'alexnet-deploy[serve]' (nvidia-pytriton, tritonclient[all])"
READY_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class Ports:
    """The three ports a Triton server listens on."""

    http: int = 8000
    grpc: int = 8001
    metrics: int = 8002

    def check_free(self) -> None:
        """UserError naming the first port something already listens on (or that repeats)."""
        named = {"--http-port": self.http, "--grpc-port": self.grpc,
                 "--metrics-port": self.metrics}
        if len(set(named.values())) < 3:
            raise UserError(f"the HTTP, gRPC and metrics ports must differ, got {named}")
        for option, port in named.items():
            if not 1 <= port <= 65535:
                raise UserError(f"{option} {port} is not a port number (1..65535)")
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                try:
                    s.bind(("0.0.0.0", port))
                except OSError as e:
                    why = "is in use" if e.errno == errno.EADDRINUSE else f"cannot be used ({e})"
                    raise UserError(f"{option} {port} {why}: stop what listens there or choose "
                                    "another port") from None


def free_ports(count: int = 3) -> list[int]:
    """``count`` distinct TCP ports free right now (each bound to port 0, then released)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
                 for _ in range(count)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]


def triton_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """``env`` (default: this process's) with what Triton's Python backend needs to embed this
    interpreter: its ``LIBDIR`` first in ``LD_LIBRARY_PATH`` (else the stub may load another
    ``libpython``), and its ``bin`` folder first in ``PATH`` (the embedded interpreter finds its
    prefix, a virtual environment's site-packages included, from the ``python3`` found there)."""
    env = dict(os.environ if env is None else env)
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    paths = [p for p in env.get("LD_LIBRARY_PATH", "").split(":") if p and p != libdir]
    env["LD_LIBRARY_PATH"] = ":".join([libdir, *paths] if libdir else paths)
    bindir = str(Path(sys.executable).parent)
    env["PATH"] = ":".join([bindir, *[p for p in env.get("PATH", "").split(":") if p != bindir]])
    return env


def _require_pytriton() -> None:
    import importlib.util

    for module in ("pytriton", "tritonclient"):
        if importlib.util.find_spec(module) is None:
            raise UserError(f"serving needs {module}: {SERVE_HINT}")


def serve(engine: Path | str, *, ports: Ports = Ports(), name: str = DEFAULT_MODEL_NAME,
          max_batch: int | None = None, max_queue_delay_us: int = DEFAULT_MAX_QUEUE_DELAY_US,
          instances: int = 1, top_k: int = DEFAULT_TOP_K, threads: int | None = None,
          batching: bool = True, say: Callable[[str], None] = print) -> None:
    """Serve ``engine`` on Triton until Ctrl-C (or until the server stops).

    Args:
        engine: the engine folder.
        ports: HTTP, gRPC and metrics ports. Defaults to 8000, 8001, 8002.
        name: the tensor model's name; the image model is ``<name>_image``. Defaults to
            "alexnet".
        max_batch: the largest batch Triton forms (at most the engine's). Defaults to None: the
            engine's largest, or 64 for an engine that takes any batch.
        max_queue_delay_us: how long the dynamic batcher waits to fill a batch. Defaults to 500.
        instances: model instances sharing the engine. Defaults to 1.
        top_k: labels per answer. Defaults to 5.
        threads: CPU threads of the engine. Defaults to None (the backend's choice).
        batching: False serves the tensor model without the dynamic batcher (each request runs
            as sent; for side-by-side measurements). Defaults to True.
        say: where status lines go. Defaults to print.

    Raises:
        UserError: PyTriton is not installed, a port is in use, the engine does not load, the
            name or a number is out of range.
        KeyboardInterrupt: on Ctrl-C, after the server has stopped.
    """

    _require_pytriton()
    check_name(name)
    if instances < 1 or max_queue_delay_us < 0:
        raise UserError("--instances must be at least 1 and --max-queue-delay-us 0 or more")
    ports.check_free()
    with load_engine(engine, threads=threads) as loaded:
        max_batch_size, fixed = batch_limits(loaded.sidecar, max_batch)
        if fixed:
            raise UserError(f"engine {loaded.path} takes batches of exactly {fixed}: serve needs "
                            "an engine whose profile starts at 1")
        os.environ.update(triton_env())  # inherited by tritonserver and its Python backend stubs
        with _bound_triton(loaded, ports, name, max_batch_size, max_queue_delay_us, instances,
                           top_k, batching) as triton:
            wire = TRITON_DTYPES[loaded.sidecar.input_dtype]
            say(f"serving {loaded.path} as models {name!r} ({wire} input, dynamic batching "
                f"{'up to ' + str(max_batch_size) if batching else 'off'}) and '{name}_image' "
                f"(encoded images): HTTP localhost:{ports.http}, gRPC localhost:{ports.grpc}, "
                f"metrics localhost:{ports.metrics}/metrics; Ctrl-C stops")
            while triton.is_alive():
                time.sleep(0.5)
        raise UserError("the Triton server stopped unexpectedly (its log is above)")


@contextlib.contextmanager
def _bound_triton(engine: Any, ports: Ports, name: str, max_batch_size: int,
                  max_queue_delay_us: int, instances: int, top_k: int,
                  batching: bool) -> Iterator[Any]:
    import numpy as np
    from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
    from pytriton.triton import Triton, TritonConfig


    handler = Handler(engine, top_k=top_k)

    def infer(requests: Sequence[Any]) -> list[dict[str, np.ndarray]]:
        answers = handler.run(requests)
        bad = next((a for a in answers if isinstance(a, Exception)), None)
        if bad is not None:  # PyTriton answers one error for the whole call
            raise bad
        return answers  # type: ignore[return-value]

    side = engine.sidecar
    outputs = [Tensor(name=side.output_name, dtype=np.float32, shape=(side.num_classes,)),
               Tensor(name=LABELS_OUTPUT, dtype=bytes, shape=(handler.top_k,))]
    config = TritonConfig(http_port=ports.http, grpc_port=ports.grpc,
                          metrics_port=ports.metrics, exit_on_error=True)
    try:
        triton = Triton(config=config)
        triton.bind(model_name=name, infer_func=[infer] * instances,
                    inputs=[Tensor(name=side.input_name, dtype=np.dtype(side.input_dtype),
                                   shape=side.input_dims)],
                    outputs=outputs, strict=True,
                    config=ModelConfig(max_batch_size=max_batch_size, batcher=(
                        DynamicBatcher(max_queue_delay_microseconds=max_queue_delay_us)
                        if batching else None)))
        triton.bind(model_name=f"{name}_image", infer_func=[infer] * instances,
                    inputs=[Tensor(name=IMAGE_INPUT, dtype=bytes, shape=(1,))],
                    outputs=outputs, strict=True,
                    config=ModelConfig(max_batch_size=max_batch_size, batcher=None))
        triton.run()
    except Exception as e:
        raise UserError(f"Triton did not start ({type(e).__name__}: {e})") from e
    try:
        yield triton
    finally:
        triton.stop()


# ---- the bundled tritonserver on a model repository (e.g. a `package --flavor python` one) ----

def bundled_tritonserver() -> tuple[Path, Path]:
    """``(tritonserver binary, its python backend folder)`` shipped in the PyTriton wheel."""
    _require_pytriton()
    import pytriton

    root = Path(pytriton.__file__).parent / "tritonserver"
    binary, backend = root / "bin" / "tritonserver", root / "backends" / "python"
    if not binary.is_file() or not backend.is_dir():
        raise UserError(f"PyTriton at {root.parent} has no bundled tritonserver: {SERVE_HINT}")
    return binary, backend


def backend_dir(dest: Path | str) -> Path:
    """A Triton ``--backend-directory`` at ``dest`` holding the bundled Python backend with the
    stub for this interpreter's Python version copied into it (PyTriton keeps one stub per
    version in a separate folder; Triton looks for the stub beside the backend)."""
    binary, python = bundled_tritonserver()
    stub = (binary.parents[1] / "python_backend_stubs" / f"{sys.version_info[0]}."
            f"{sys.version_info[1]}" / "triton_python_backend_stub")
    if not stub.is_file():
        raise UserError(f"PyTriton has no Python backend stub for Python "
                        f"{sys.version_info[0]}.{sys.version_info[1]} ({stub})")
    dest = Path(dest)
    shutil.copytree(python, dest / "python", dirs_exist_ok=True)
    shutil.copy2(stub, dest / "python" / stub.name)
    return dest


def tritonserver_env() -> dict[str, str]:
    """:func:`triton_env` plus the shared libraries the PyTriton wheel bundles for its server
    (PyTriton adds them itself when it starts the server; a bare ``tritonserver`` needs them)."""
    from pytriton.utils.distribution import get_libs_path

    env = triton_env()
    env["LD_LIBRARY_PATH"] = f"{env['LD_LIBRARY_PATH']}:{get_libs_path()}".lstrip(":")
    return env


def tritonserver_command(repository: Path | str, backends: Path | str,
                         ports: Ports) -> list[str]:
    """The argument list that runs the bundled ``tritonserver`` on ``repository``."""
    binary, _ = bundled_tritonserver()
    return [str(binary), f"--model-repository={Path(repository).resolve()}",
            f"--backend-directory={Path(backends).resolve()}",
            f"--http-port={ports.http}", f"--grpc-port={ports.grpc}",
            f"--metrics-port={ports.metrics}", "--exit-on-error=true", "--exit-timeout-secs=5"]


# ---- a server in a child process, for tests and the load test ----

class ServerProcess:
    """A server command run in its own process group; :meth:`stop` ends the whole group.

    Args:
        argv: the command.
        ports: its ports (readiness is polled over HTTP).
        models: models that must be ready before :meth:`wait_ready` returns.
        env: its environment. Defaults to :func:`triton_env` of this process's.
        log: file the command's stdout and stderr go to. Defaults to None (discarded).
    """

    def __init__(self, argv: Sequence[str], ports: Ports, models: Sequence[str],
                 env: dict[str, str] | None = None, log: Path | None = None) -> None:
        self.argv, self.ports, self.models = list(argv), ports, list(models)
        self.log = log
        self.leftovers = False
        out = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115 - closed in stop
        self._out = out
        self.proc = subprocess.Popen(self.argv, env=env or triton_env(), stdout=out,
                                     stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> None:
        """Return once every model is ready; RuntimeError with the log's tail otherwise."""
        import tritonclient.http as httpclient

        deadline = time.monotonic() + timeout
        client = httpclient.InferenceServerClient(f"localhost:{self.ports.http}")
        try:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"server exited with {self.proc.returncode}: "
                                       f"{self.log_tail()}")
                with contextlib.suppress(Exception):
                    if all(client.is_model_ready(m) for m in self.models):
                        return
                time.sleep(0.5)
        finally:
            client.close()
        raise RuntimeError(f"server not ready after {timeout:.0f} s: {self.log_tail()}")

    def log_tail(self, chars: int = 3000) -> str:
        if not self.log or not Path(self.log).is_file():
            return "(no log)"
        return Path(self.log).read_text(errors="replace")[-chars:]

    def stop(self, sig: int = signal.SIGINT, timeout: float = 30.0) -> int | None:
        """Send ``sig`` to the process group, wait, then SIGKILL the group if anything is left
        (:attr:`leftovers` says whether anything was); return the command's exit status."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=timeout)
        deadline = time.monotonic() + 5.0  # children (backend stubs) may take a moment to exit
        while self._group_alive() and time.monotonic() < deadline:
            time.sleep(0.1)
        self.leftovers = self._group_alive()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        if self._out is not subprocess.DEVNULL:
            self._out.close()
        return self.proc.returncode

    def _group_alive(self) -> bool:
        if self.proc.poll() is None:
            return True
        try:
            os.killpg(self.proc.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    def __enter__(self) -> ServerProcess:  # noqa: PYI034 - typing.Self needs Python 3.11
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def serve_command(engine: Path | str, ports: Ports, **options: Any) -> list[str]:
    """``python -m alexnet_deploy serve --engine ENGINE --http-port ...`` plus ``options``
    (``max_batch=8`` -> ``--max-batch 8``; ``True`` -> a bare flag)."""
    argv = [sys.executable, "-m", "alexnet_deploy", "serve", "--engine", str(engine),
            "--http-port", str(ports.http), "--grpc-port", str(ports.grpc),
            "--metrics-port", str(ports.metrics)]
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            argv.append(flag)
        elif value not in (None, False):
            argv += [flag, str(value)]
    return argv
