"""Our INT8 vs ``onnxruntime.quantization.quantize_static``: accuracy and calibration time.

Examples::

    python benchmarks/compare_quantize_static.py --checkpoint train/cifar10/best.pt
    python benchmarks/compare_quantize_static.py --model model.onnx --num-images 512 \\
        --calib-data ../shared/data/cifar10_train_10k.npz \\
        --val-data ../shared/data/cifar10_test_2k.npz --json compare.json

Same model, same calibration images (the seeded subset ``alexnet_deploy.calibrate`` picks, decoded
with the model's own preprocessing spec), same calibration method (entropy by default):

* ours: ``alexnet_deploy.calibrate.calibrate`` (decode, ONNX Runtime, histograms, the calibrator,
  JSON + TensorRT cache) then ``quantize.to_int8`` for both placements;
* theirs: decoding the same images, then ``quantize_static`` (QDQ, per-channel, the same method)
  with its default QInt8 activations (asymmetric) and with QUInt8.

Every INT8 model and the FP32 reference run on ONNX Runtime (CPU) over the held-out validation
images; the table gives top-1, top-1 agreement with FP32, the mean and max absolute logit error.
Goals (issue 4): ours at least as accurate, and calibration no slower.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from common import DATA, run_quantize_static  # this folder's shared pieces


def run_ort(path_or_model, images: np.ndarray, batch: int = 64) -> np.ndarray:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    model = path_or_model if isinstance(path_or_model, (str, Path)) else \
        path_or_model.SerializeToString()
    session = ort.InferenceSession(str(model) if isinstance(model, Path) else model, options,
                                   providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: images[i:i + batch]})[0]
                           for i in range(0, len(images), batch)])


def metrics(logits: np.ndarray, reference: np.ndarray, labels: np.ndarray) -> dict:
    top5 = np.argsort(-logits, 1)[:, :5]
    return {"top1": float(np.mean(logits.argmax(1) == labels)),
            "top5": float(np.mean([l in row for l, row in zip(labels, top5)])),
            "agreement": float(np.mean(logits.argmax(1) == reference.argmax(1))),
            "mean_abs_err": float(np.abs(logits - reference).mean()),
            "max_abs_err": float(np.abs(logits - reference).max())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", type=Path, help="an .onnx from 'alexnet-deploy export'")
    source.add_argument("--checkpoint", type=Path, help="a checkpoint to export first")
    parser.add_argument("--calib-data", default=str(DATA / "cifar10_train_10k.npz"))
    parser.add_argument("--val-data", default=str(DATA / "cifar10_test_2k.npz"))
    parser.add_argument("--num-images", type=int, default=512)
    parser.add_argument("--method", default="entropy", choices=("entropy", "minmax",
                                                                "percentile"))
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    say = lambda m: print(m, file=sys.stderr, flush=True)

    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantType

    from alexnet_deploy import quantize as Q
    from alexnet_deploy.calibrate import calibrate
    from alexnet_deploy.data import iter_batches
    from alexnet_deploy.metadata import read_model_info

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model_path = args.model
        if args.checkpoint:
            from alexnet_deploy.export import export, source_from_checkpoint

            model_path = work / "model.onnx"
            with contextlib.redirect_stdout(io.StringIO()):
                export(source_from_checkpoint(args.checkpoint), model_path)
        model = onnx.load(str(model_path))
        spec = read_model_info(model).preprocess

        say(f"ours: alexnet_deploy.calibrate ({args.method}, {args.num_images} images)")
        t0 = time.perf_counter()
        cal = calibrate(model_path, args.calib_data, work / "ours.json", method=args.method,
                        num_images=args.num_images, progress=False, say=lambda _: None)
        t1 = time.perf_counter()
        ours = {"cpu": Q.to_int8(model, cal, "cpu"), "tensorrt": Q.to_int8(model, cal, "tensorrt")}
        t2 = time.perf_counter()
        timing = {"ours_calibrate_s": t1 - t0, "ours_to_int8_s": (t2 - t1) / 2}

        say("theirs: decoding the same images, then quantize_static")
        t0 = time.perf_counter()
        images = np.concatenate([b.images for b in iter_batches(
            args.calib_data, spec, 32, limit=args.num_images, seed=0)])
        timing["decode_s"] = time.perf_counter() - t0

        method = {"entropy": CalibrationMethod.Entropy, "minmax": CalibrationMethod.MinMax,
                  "percentile": CalibrationMethod.Percentile}[args.method]
        theirs = {}
        for tag, act in (("qint8", QuantType.QInt8), ("quint8", QuantType.QUInt8)):
            theirs[tag] = work / f"qs_{tag}.onnx"
            timing[f"quantize_static_{tag}_s"] = run_quantize_static(
                model_path, theirs[tag], images, act, method)

        say("validating on held-out images")
        batches = list(iter_batches(args.val_data, spec, 64))
        val = np.concatenate([b.images for b in batches])
        labels = np.concatenate([b.labels for b in batches])
        reference = run_ort(model, val)
        rows = {"fp32": metrics(reference, reference, labels)}
        for target, graph in ours.items():
            rows[f"ours int8 ({target} placement)"] = metrics(run_ort(graph, val), reference,
                                                             labels)
        rows["ours int8 (cpu, channels-last LRN)"] = metrics(
            run_ort(Q.lrn_channels_last(ours["cpu"]), val), reference, labels)
        for tag, path in theirs.items():
            rows[f"quantize_static ({tag})"] = metrics(run_ort(path, val), reference, labels)

    print(f"model {args.model or args.checkpoint}; calibration {args.method} on "
          f"{args.num_images} images of {args.calib_data}; validation {len(val)} images of "
          f"{args.val_data}")
    print(f"{'':38s} {'top1':>7s} {'top5':>7s} {'agree':>7s} {'mean|err|':>10s} {'max|err|':>9s}")
    for name, r in rows.items():
        print(f"{name:38s} {100 * r['top1']:6.2f}% {100 * r['top5']:6.2f}% "
              f"{100 * r['agreement']:6.2f}% {r['mean_abs_err']:10.4f} {r['max_abs_err']:9.3f}")
    ours_best = max((r for k, r in rows.items() if k.startswith("ours")),
                    key=lambda r: r["agreement"])
    ours_cpu = rows["ours int8 (cpu placement)"]
    theirs_best = max((r for k, r in rows.items() if k.startswith("quantize_static")),
                      key=lambda r: r["agreement"])
    ours_time = timing["ours_calibrate_s"] + timing["ours_to_int8_s"]
    theirs_time = timing["decode_s"] + min(timing["quantize_static_qint8_s"],
                                           timing["quantize_static_quint8_s"])
    print(f"calibration wall time: ours {timing['ours_calibrate_s']:.1f} s calibrate + "
          f"{timing['ours_to_int8_s']:.2f} s to_int8 = {ours_time:.1f} s; theirs "
          f"{timing['decode_s']:.1f} s decode + {timing['quantize_static_qint8_s']:.1f} s "
          f"(qint8) / {timing['quantize_static_quint8_s']:.1f} s (quint8) quantize_static")
    checks = {
        "ours (cpu placement) agreement >= best quantize_static":
            ours_cpu["agreement"] >= theirs_best["agreement"],
        "ours (cpu placement) top-1 >= best quantize_static":
            ours_cpu["top1"] >= theirs_best["top1"],
        "ours (best placement) agreement >= best quantize_static":
            ours_best["agreement"] >= theirs_best["agreement"],
        "calibration no slower (ours <= fastest quantize_static, decode included)":
            ours_time <= theirs_time,
    }
    for name, ok in checks.items():
        print(f"goal {name}: {'PASS' if ok else 'MISS'}")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "timing": timing, "checks": checks,
                                         "num_images": args.num_images, "method": args.method},
                                        indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
