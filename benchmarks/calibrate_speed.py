"""Wall time of ``alexnet-deploy calibrate``, per method, and where it goes.

Examples::

    python benchmarks/calibrate_speed.py                         # 512 CIFAR images, small model
    python benchmarks/calibrate_speed.py --image-size 227 --width-mult 1.0 \\
        --data ../shared/data/imagenette_train2k --num-images 256
    python benchmarks/calibrate_speed.py --model model.onnx --json calibrate_speed.json

Without ``--model`` it exports an untrained AlexNet (paper arch, LRN and groups; weights are
random, which changes nothing for timing) with ``alexnet_deploy.export``. For every method it
times the whole stage (``alexnet_deploy.calibrate.calibrate``: model load, decode, ONNX Runtime,
histograms, the calibrator, files) and the same work on images decoded beforehand
(``collect_activations`` + the calibrator), then parts of it alone: decoding, ONNX Runtime on
the same tensors (every activation a graph output, optimizations off, as calibrate runs it),
histogramming, and the calibrator's math. ``--compare-ort`` also
times ``onnxruntime.quantization``'s calibrators (``create_calibrator``: ``collect_data`` +
``compute_data``) on the same preprocessed images.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "cifar10_train_10k.npz"
METHODS = ("entropy", "percentile", "minmax", "mse")


def export_random_model(out: Path, image_size: int, width_mult: float, classes: int) -> Path:
    import torch

    from alexnet_deploy.export import ExportSource, export
    from alexnet_deploy.model import AlexNetConfig, AlexNetGrouped
    from alexnet_deploy.preprocess import PreprocessSpec

    torch.manual_seed(0)
    cfg = AlexNetConfig(num_classes=classes, image_size=image_size, width_mult=width_mult)
    model = AlexNetGrouped(cfg).eval()
    source = ExportSource(model=model, preprocess=PreprocessSpec.for_size(image_size),
                          classes=[str(i) for i in range(classes)], sha256="0" * 64, path=out)
    export(source, out)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, help="an exported .onnx (default: export one)")
    parser.add_argument("--image-size", type=int, default=67)
    parser.add_argument("--width-mult", type=float, default=0.25)
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    parser.add_argument("--num-images", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3,
                        help="rounds; each figure is the best of them")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--compare-ort", action="store_true",
                        help="also time onnxruntime.quantization's calibrators")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args(argv)

    import onnx

    from alexnet_deploy import data as datasets
    from alexnet_deploy.calibrate import (
        _session,
        activation_tensors,
        calibrate,
        collect_activations,
    )
    from alexnet_deploy.calibrators import HistogramCollector, make_calibrator
    from alexnet_deploy.metadata import read_model_info

    tmp = Path(tempfile.mkdtemp(prefix="calibrate-speed-"))
    model_path = args.model or export_random_model(tmp / "model.onnx", args.image_size,
                                                   args.width_mult, 10)
    proto = onnx.load(str(model_path))
    spec = read_model_info(proto).preprocess
    tensors = activation_tensors(proto)
    report: dict = {"model": str(model_path), "image_size": spec.crop, "data": args.data,
                    "num_images": args.num_images, "batch_size": args.batch_size,
                    "tensors": len(tensors), "host": platform.node(),
                    "cpu": platform.processor() or platform.machine(), "rounds": args.repeats}

    def decode():
        return [b.images for b in datasets.iter_batches(args.data, spec, args.batch_size,
                                                        limit=args.num_images, seed=0)]

    batches = decode()  # also warms the data set's caches (npz read, worker start-up)
    n = report["images"] = sum(len(b) for b in batches)
    session = _session(proto, tensors)
    outputs = [session.run(tensors, {"input": b}) for b in batches[:4]]
    elements = report["activation_elements_per_image"] = int(
        sum(v.size for v in outputs[0]) / len(batches[0]))
    methods = args.methods.split(",")

    def whole_stage(method):
        out = tmp / f"{method}.json"
        out.unlink(missing_ok=True)  # no reuse: time the work
        calibrate(model_path, args.data, out, method=method, num_images=args.num_images,
                  batch_size=args.batch_size, progress=False, say=lambda m: None)

    def on_decoded(method):  # the same work on images decoded beforehand
        stats = collect_activations(proto, batches, tensors=tensors, progress=False)
        calibrator = make_calibrator(method)
        return [calibrator(h) for h in stats.histograms.values()]

    parts = {
        "decode": decode,
        "onnxruntime": lambda: [session.run(tensors, {"input": b}) for b in batches],
        "histograms": lambda: [HistogramCollector().update(v) for out in outputs for v in out],
    }
    timed = dict(parts)
    for method in methods:
        timed[f"{method}/stage"] = functools.partial(whole_stage, method)
        timed[f"{method}/decoded"] = functools.partial(on_decoded, method)
    if args.compare_ort:
        for method in ORT_METHODS:
            timed[f"{method}/onnxruntime.quantization"] = functools.partial(
                ort_calibration, model_path, batches, method, tmp)

    # rounds interleave everything, so that a slower spell of a shared machine hits all alike
    samples: dict[str, list[float]] = {name: [] for name in timed}
    for _ in range(args.repeats):
        for name, fn in timed.items():
            t = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - t)
    # histograms were timed on the first batches' activations (keeping all would not fit)
    samples["histograms"] = [t * len(batches) / len(outputs) for t in samples["histograms"]]
    best = {name: min(v) for name, v in samples.items()}
    report["seconds_best"] = best
    report["seconds_all"] = samples
    print(f"{n} images, {len(tensors)} tensors, {elements / 1e6:.2f} M activation values per "
          f"image (best of {args.repeats}): decode {best['decode']:.2f} s, ONNX Runtime "
          f"{best['onnxruntime']:.2f} s, histograms {best['histograms']:.2f} s", file=sys.stderr)
    for method in methods:
        line = (f"{method:>10}: stage {best[f'{method}/stage']:.2f} s "
                f"({n / best[f'{method}/stage']:.0f} img/s); on decoded images "
                f"{best[f'{method}/decoded']:.2f} s")
        theirs = best.get(f"{method}/onnxruntime.quantization")
        if theirs:
            line += f"; onnxruntime.quantization on decoded images {theirs:.2f} s"
        print(line, file=sys.stderr)

    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


ORT_METHODS = ("entropy", "percentile", "minmax")


def ort_calibration(model_path: Path, batches: list[np.ndarray], method: str, tmp: Path):
    """``onnxruntime.quantization``'s calibrator on images already decoded."""
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod
    from onnxruntime.quantization.calibrate import create_calibrator

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(batches)

        def get_next(self):
            b = next(self.it, None)
            return None if b is None else {"input": b}

    kind = {"entropy": CalibrationMethod.Entropy, "percentile": CalibrationMethod.Percentile,
            "minmax": CalibrationMethod.MinMax}[method]
    calibrator = create_calibrator(model_path, augmented_model_path=str(tmp / "aug.onnx"),
                                   calibrate_method=kind)
    with contextlib.redirect_stdout(io.StringIO()):  # it prints its progress
        calibrator.collect_data(Reader())
        return calibrator.compute_data()


if __name__ == "__main__":
    main()
