"""Shared fixtures: real data from ../shared/data (skipped with a reason when absent)."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
import torch

from tests import data_usage

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"

# Two cores on CI: keep each test process to them and make tests reproducible.
torch.set_num_threads(2)

# The Ctrl-C tests send SIGINT to the processes they start. A suite started as a background job
# of a script (`make test &`, nohup) has SIGINT ignored, and its children would inherit that;
# give the suite Python's default handler, so they get SIGINT as from a terminal.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


def shared_path(name: str) -> Path:
    """``../shared/data/<name>``, or skip the test with a reason when it is absent. The test (or
    the fixture) that asks is counted in the closing line on data-dependent tests."""
    data_usage.note_use()
    path = SHARED_DATA / name
    if not path.exists():
        pytest.skip(f"real data {path} is absent (it lives in ../shared/data beside the checkout)")
    return path


@pytest.fixture
def shared_data():
    return shared_path


# ---- a closing line on the tests that depend on ../shared/data (tests/data_usage.py) ----

def pytest_runtest_setup(item):
    data_usage.test_starts(item)


def pytest_runtest_logreport(report):
    data_usage.record(report)


def pytest_terminal_summary(terminalreporter):
    for line in data_usage.summary_lines(SHARED_DATA):
        terminalreporter.write_line(line)


# ---- small exported models and calibrations (build / validate / backend tests) ----

SMALL_SIZE = 67  # the paper model's smallest input
SMALL_CLASSES = ("disc", "ring", "square", "triangle", "cross", "star", "crescent", "stripes",
                 "checkerboard", "dots")  # the synthetic data set's classes, so its labels apply


def make_small_model(folder: Path, *, seed: int = 0, size: int = SMALL_SIZE,
                     classes: tuple[str, ...] = SMALL_CLASSES,
                     width_mult: float = 0.125) -> dict[str, Path]:
    """An untrained paper AlexNet with varied logits (small by default: width x1/8; 1.0 with
    ``size=227`` and 1000 classes is the full-size model): ``checkpoint`` (.pt) and its
    canonical export ``onnx``, written under ``folder``."""
    from alexnet_deploy.checkpoint import save_checkpoint
    from alexnet_deploy.export import export, source_from_checkpoint
    from alexnet_deploy.model import AlexNetConfig, AlexNetGrouped, grouped_to_two_tower
    from alexnet_deploy.preprocess import PreprocessSpec

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    cfg = AlexNetConfig(num_classes=len(classes), image_size=size, width_mult=width_mult)
    grouped = AlexNetGrouped(cfg).eval()
    # the paper's N(0, 0.01) init gives near-constant logits; He init makes images differ
    for p in grouped.parameters():
        if p.dim() > 1:
            torch.nn.init.kaiming_normal_(p)
        else:
            torch.nn.init.uniform_(p, -0.1, 0.1)
    paths = {"checkpoint": folder / "model.pt", "onnx": folder / "model.onnx"}
    save_checkpoint(paths["checkpoint"], model=grouped_to_two_tower(grouped), config=cfg,
                    preprocess=PreprocessSpec.for_size(size), classes=list(classes))
    export(source_from_checkpoint(paths["checkpoint"]), paths["onnx"])
    return paths


@pytest.fixture(scope="session")
def small_model(tmp_path_factory) -> dict[str, Path]:
    """``{"checkpoint", "onnx", "calibration"}``: a small model, its export, and a minmax
    calibration of it on 64 synthetic training images."""
    from alexnet_deploy.calibrate import calibrate

    paths = make_small_model(tmp_path_factory.mktemp("small_model"))
    paths["calibration"] = paths["onnx"].with_name("calibration.json")
    calibrate(paths["onnx"], "synthetic:train", paths["calibration"], method="minmax",
              num_images=64, progress=False, say=lambda _: None)
    return paths



def build_every_precision(small_model: dict[str, Path], root: Path, backend: str) -> Path:
    """FP32, FP16 and INT8 engines of ``small_model`` on ``backend``, in ``root/<precision>``."""
    from alexnet_deploy.build import build_engine

    for precision in ("fp32", "fp16", "int8"):
        build_engine(small_model["onnx"], precision, root / precision, backend=backend,
                     calibration=small_model["calibration"] if precision == "int8" else None)
    return root


def onnx_logits(model_path: Path, images):
    """``model_path``'s logits for ``images`` on ONNX Runtime's CPU provider (the reference)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    return session.run(None, {"input": images})[0]


def real_images(spec, count: int = 48):
    """``count`` real CIFAR-10 test images through ``spec`` (float32 NCHW), or, where
    ../shared/data is absent, the embedded synthetic test images (so the test still runs)."""
    import numpy as np

    from alexnet_deploy.data import iter_batches

    path = SHARED_DATA / "cifar10_test_2k.npz"
    data = str(path) if path.exists() else "synthetic:test"
    batches = iter_batches(data, spec, batch_size=count, limit=count, seed=0, workers=0)
    return np.ascontiguousarray(next(iter(batches)).images)


def assert_thread_safe(engine, images, *, threads: int = 4, calls: int = 25,
                       batch: int = 3) -> None:
    """``threads`` threads x ``calls`` calls of ``engine.infer`` on different batches of
    ``images``: every result equal, bit for bit, to the single-threaded result for the same
    batch, and no exception."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    batches = [images[i:i + batch] for i in range(0, len(images) - batch + 1, batch)]
    expected = [engine.infer(b) for b in batches]
    assert len({e.tobytes() for e in expected}) == len(batches)  # the batches really differ
    start = threading.Barrier(threads)

    def worker(t: int) -> list[tuple[int, int]]:
        start.wait()  # all threads call at once
        wrong = []
        for c in range(calls):
            k = (t * 5 + c) % len(batches)
            if not np.array_equal(engine.infer(batches[k]), expected[k]):
                wrong.append((c, k))
        return wrong

    with ThreadPoolExecutor(threads) as pool:
        wrong = [w for f in [pool.submit(worker, t) for t in range(threads)] for w in f.result()]
    assert not wrong, f"{len(wrong)} of {threads * calls} concurrent calls returned wrong logits"
