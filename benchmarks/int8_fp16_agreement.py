"""INT8 with FP16 elsewhere vs INT8 with FP32 elsewhere, for TensorRT's Q/DQ placement, on the CPU.

Examples::

    python benchmarks/int8_fp16_agreement.py --checkpoint train/cifar10/best.pt \\
        --data ../shared/data/cifar10_train_10k.npz --val-data ../shared/data/cifar10_test_2k.npz

Exports the checkpoint, calibrates with entropy on ``--num-images`` images (the project's
default), builds the graphs TensorRT would get -- FP16 (``quantize.to_fp16``), INT8 with FP32
elsewhere (``to_int8(target="tensorrt")``), INT8 with FP16 elsewhere (``to_int8_fp16``) -- and
runs each, and the FP32 model, on ONNX Runtime (CPU) over ``--val-data``: top-1, top-1 agreement
with FP32, and the logit error. ONNX Runtime's CPU provider has few FP16 kernels: it runs an
FP16 op by casting its FP16 inputs to FP32 and its output back to FP16 (FP32 arithmetic inside
each op), and its optimizer drops some of those round trips (conv1/conv2 outputs reach the FP32
LRN unrounded): an approximation of TensorRT, not a bit-exact run (docs/results.md, TensorRT).
"""

from __future__ import annotations

import json

import numpy as np
from calibrate_methods import export_and_collect, parse_args  # this folder's script


def main(argv: list[str] | None = None) -> None:
    args = parse_args(__doc__.split("\n")[0], argv)

    from alexnet_deploy import data as datasets
    from alexnet_deploy.calibrate import ZERO_TENSOR_AMAX
    from alexnet_deploy.calibrators import make_calibrator
    from alexnet_deploy.quantize import ort_logits, to_fp16, to_int8, to_int8_fp16

    model, spec, stats = export_and_collect(args)
    calibrator = make_calibrator("entropy")
    amax = {name: calibrator(h) or ZERO_TENSOR_AMAX for name, h in stats.histograms.items()}
    val = list(datasets.iter_batches(args.val_data, spec, 100))
    images = np.concatenate([b.images for b in val])
    labels = np.concatenate([b.labels for b in val])
    fp32 = ort_logits(model, images)
    graphs = {"fp16": to_fp16(model), "int8 + fp32 elsewhere": to_int8(model, amax, "tensorrt"),
              "int8 + fp16 elsewhere": to_int8_fp16(model, amax, "tensorrt")}
    rows = {"fp32": {"top1": float((fp32.argmax(1) == labels).mean())}}
    logits = {}
    for name, graph in graphs.items():
        out = logits[name] = ort_logits(graph, images)
        err = np.abs(out - fp32)
        rows[name] = {"top1": float((out.argmax(1) == labels).mean()),
                      "agreement": float((out.argmax(1) == fp32.argmax(1)).mean()),
                      "max_abs_logit_error": float(err.max()),
                      "median_abs_logit_error": float(np.median(err))}
    a, b = logits["int8 + fp32 elsewhere"], logits["int8 + fp16 elsewhere"]
    rows["int8 + fp16 elsewhere"]["agreement_with_int8_fp32"] = float(
        (a.argmax(1) == b.argmax(1)).mean())
    print(f"{len(labels)} images of {args.val_data}; calibrated (entropy) on {stats.num_images} "
          f"images of {args.data}")
    print(f"{'graph':24} {'top-1':>7} {'agree':>7} {'max |dlogit|':>13} {'median':>9}")
    for name, row in rows.items():
        print(f"{name:24} {row['top1']:7.4f} {row.get('agreement', 1.0):7.4f} "
              f"{row.get('max_abs_logit_error', 0.0):13.4f} "
              f"{row.get('median_abs_logit_error', 0.0):9.5f}")
    print("int8 + fp16 vs int8 + fp32 elsewhere, top-1 agreement: "
          f"{rows['int8 + fp16 elsewhere']['agreement_with_int8_fp32']:.4f}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
