"""INT8 accuracy of each calibration method on a trained model, from one pass of activations.

Examples::

    python benchmarks/calibrate_methods.py --checkpoint train/runs/demo/best.pt
    python benchmarks/calibrate_methods.py --checkpoint best.pt \\
        --data ../shared/data/cifar10_train_10k.npz --val-data ../shared/data/cifar10_test_2k.npz

Exports the checkpoint, collects the activation histograms of ``--num-images`` calibration
images once (``alexnet_deploy.calibrate.collect_activations``), then for every method (and
entropy with exact zeros kept, ``skip_zeros=False``) quantizes the model with
``alexnet_deploy.quantize.to_int8`` for both targets and reports top-1 and top-1 agreement with
the FP32 model on ``--val-data`` (ONNX Runtime, CPU).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np

VARIANTS = (("minmax", {}), ("percentile", {}), ("mse", {}), ("entropy", {}),
            ("entropy", {"skip_zeros": False}))


def parse_args(description: str, argv: list[str] | None = None) -> argparse.Namespace:
    """The options this script shares with ``int8_noise.py``."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--checkpoint", required=True, type=Path)
    parser.add_argument("--data", default="synthetic:train", help="calibration images")
    parser.add_argument("--val-data", default="synthetic:test")
    parser.add_argument("--num-images", type=int, default=512)
    parser.add_argument("--json", type=Path)
    return parser.parse_args(argv)


def export_and_collect(args: argparse.Namespace):
    """Export ``args.checkpoint`` to a temporary folder and collect the activation histograms of
    ``args.num_images`` calibration images: ``(model, preprocessing spec, ActivationStats)``."""
    import onnx

    from alexnet_deploy import data as datasets
    from alexnet_deploy.calibrate import collect_activations
    from alexnet_deploy.export import export, source_from_checkpoint

    path = Path(tempfile.mkdtemp(prefix="alexnet-deploy-bench-")) / "model.onnx"
    source = source_from_checkpoint(args.checkpoint)
    export(source, path)
    model = onnx.load(str(path))
    stats = collect_activations(model, (b.images for b in datasets.iter_batches(
        args.data, source.preprocess, 32, limit=args.num_images, seed=0)), total=args.num_images)
    return model, source.preprocess, stats


def main(argv: list[str] | None = None) -> None:
    args = parse_args(__doc__.split("\n")[0], argv)

    from alexnet_deploy import data as datasets
    from alexnet_deploy.calibrate import ZERO_TENSOR_AMAX
    from alexnet_deploy.calibrators import make_calibrator
    from alexnet_deploy.quantize import ort_logits, to_int8

    model, spec, stats = export_and_collect(args)
    val = list(datasets.iter_batches(args.val_data, spec, 100))
    images = np.concatenate([b.images for b in val])
    labels = np.concatenate([b.labels for b in val])
    reference = ort_logits(model, images).argmax(1)
    rows = {"fp32": {"top1": float((reference == labels).mean())}}
    print(f"FP32 top-1 {rows['fp32']['top1']:.3f} on {len(labels)} images of {args.val_data}; "
          f"calibrated on {stats.num_images} images of {args.data}")
    for method, options in VARIANTS:
        calibrator = make_calibrator(method, **options)
        amax = {name: calibrator(h) or ZERO_TENSOR_AMAX for name, h in stats.histograms.items()}
        name = method + ("(zeros kept)" if options else "")
        for target in ("cpu", "tensorrt"):
            predicted = ort_logits(to_int8(model, amax, target), images).argmax(1)
            row = {"top1": float((predicted == labels).mean()),
                   "agreement": float((predicted == reference).mean())}
            rows[f"{name}/{target}"] = row
            print(f"{name:>20} {target:>8}: top-1 {row['top1']:.3f}, agreement with FP32 "
                  f"{row['agreement']:.3f}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
