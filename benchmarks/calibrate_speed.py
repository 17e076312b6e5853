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


def best_of(repeats: int, fn):
    times, result = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t)
    return min(times), result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, help="an exported .onnx (default: export one)")
    parser.add_argument("--image-size", type=int, default=67)
    parser.add_argument("--width-mult", type=float, default=0.25)
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    parser.add_argument("--num-images", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3, help="best of N for each timing")
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
                    "cpu": platform.processor() or platform.machine(), "best_of": args.repeats}

    def decode():
        return [b.images for b in datasets.iter_batches(args.data, spec, args.batch_size,
                                                        limit=args.num_images, seed=0)]

    decode()  # warm the data set's caches (npz read, worker start-up)
    report["decode_s"], batches = best_of(args.repeats, decode)
    n = sum(len(b) for b in batches)
    report["images"] = n
    session = _session(proto, tensors)
    session.run(tensors, {"input": batches[0]})
    report["onnxruntime_s"], _ = best_of(args.repeats, lambda: [
        session.run(tensors, {"input": b}) for b in batches])
    outputs = [session.run(tensors, {"input": b}) for b in batches[:4]]
    per_batch, _ = best_of(args.repeats, lambda: [
        HistogramCollector().update(v) for out in outputs for v in out])
    report["histogram_s"] = per_batch * len(batches) / len(outputs)
    elements = sum(v.size for v in outputs[0]) / len(batches[0])
    report["activation_elements_per_image"] = int(elements)

    print(f"{n} images, {len(tensors)} tensors, {elements / 1e6:.2f} M activation values per "
          f"image; decode {report['decode_s']:.2f} s, ONNX Runtime {report['onnxruntime_s']:.2f} s,"
          f" histograms {report['histogram_s']:.2f} s", file=sys.stderr)

    report["methods"] = {}
    for method in args.methods.split(","):
        def run(method=method):
            out = tmp / f"{method}.json"
            out.unlink(missing_ok=True)
            return calibrate(model_path, args.data, out, method=method,
                             num_images=args.num_images, batch_size=args.batch_size,
                             progress=False, say=lambda m: None)
        total, _ = best_of(args.repeats, run)
        calibrator = make_calibrator(method)

        def decoded(calibrator=calibrator):  # the same work on images already decoded
            stats = collect_activations(proto, batches, tensors=tensors, progress=False)
            return {name: calibrator(h) for name, h in stats.histograms.items()}, stats

        decoded_s, (_, stats) = best_of(args.repeats, decoded)
        histograms = list(stats.histograms.values())
        math_s, _ = best_of(args.repeats, lambda c=calibrator, hs=histograms: [c(h) for h in hs])
        report["methods"][method] = {"total_s": total, "img_per_s": n / total,
                                     "decoded_images_s": decoded_s, "calibrator_math_s": math_s}
        print(f"{method:>10}: {total:.2f} s end to end ({n / total:.0f} img/s); on decoded "
              f"images {decoded_s:.2f} s, of which calibrator math {math_s * 1e3:.0f} ms",
              file=sys.stderr)

    if args.compare_ort:
        report["onnxruntime_quantization"] = compare_ort(model_path, batches, args.repeats, tmp)

    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


def compare_ort(model_path: Path, batches: list[np.ndarray], repeats: int, tmp: Path) -> dict:
    """``onnxruntime.quantization`` calibrators on the same images (data already decoded)."""
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod
    from onnxruntime.quantization.calibrate import create_calibrator

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(batches)

        def get_next(self):
            b = next(self.it, None)
            return None if b is None else {"input": b}

    results = {}
    for name, method in (("entropy", CalibrationMethod.Entropy),
                         ("percentile", CalibrationMethod.Percentile),
                         ("minmax", CalibrationMethod.MinMax)):
        def run(method=method):
            calibrator = create_calibrator(model_path, augmented_model_path=str(tmp / "aug.onnx"),
                                           calibrate_method=method)
            calibrator.collect_data(Reader())
            return calibrator.compute_data()
        seconds, _ = best_of(repeats, run)
        results[name] = {"total_s": seconds}
        print(f"onnxruntime.quantization {name:>10}: {seconds:.2f} s (images already decoded)",
              file=sys.stderr)
    return results


if __name__ == "__main__":
    main()
