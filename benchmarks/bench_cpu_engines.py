"""CPU engines as users get them: `build` writes them, `load_engine` loads them, side by side.

Examples::

    python benchmarks/bench_cpu_engines.py                    # full size, batch 1 and 16
    python benchmarks/bench_cpu_engines.py --seconds 5 --json cpu_engines.json

The model is the paper's AlexNet at 227 px with 1,000 classes (:func:`common.realistic_model`:
random weights at a trained network's activation scale; no trained full-size weights exist
offline). It is exported with ``run_export``, calibrated with ``calibrate`` (entropy, on
Imagenette photos from ../shared/data) and built with ``build_engine`` exactly as
``alexnet-deploy build`` does; each engine is loaded with ``load_engine`` and timed by
``bench_runners`` (interleaved slices, the same real photos for every target). Baselines, which
this project did not build: (a) a plain ``torch.onnx.export`` on ONNX Runtime and (b) stock
OpenVINO (defaults, same threads) on ONNX Runtime ``quantize_static``'s QDQ model (QUInt8
activations, per-channel, entropy: the variant OpenVINO compiles).

The ratios printed are against (a), and OpenVINO INT8 against (b): the README's CPU speed rows.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
from common import (
    DATA,
    BaselineOnnxRuntime,
    StockOpenVino,
    load_photos,
    plain_torch_export,
    realistic_model,
    run_quantize_static,
)

from alexnet_deploy.bench import BenchTarget, bench_runners, format_table, host_description
from alexnet_deploy.build import build_engine
from alexnet_deploy.calibrate import calibrate
from alexnet_deploy.checkpoint import save_checkpoint
from alexnet_deploy.data import iter_batches
from alexnet_deploy.engine import load_engine
from alexnet_deploy.export import run_export
from alexnet_deploy.model import grouped_to_two_tower
from alexnet_deploy.preprocess import PreprocessSpec

ENGINES = [  # name, backend, precision
    ("ort-fp32", "onnxruntime", "fp32"),
    ("ort-int8", "onnxruntime", "int8"),
    ("ov-fp32", "openvino", "fp32"),
    ("ov-int8", "openvino", "int8"),
]


def prepare(work: Path, calib_images: int, say) -> dict[str, Path]:
    """The baselines' graphs and this project's engines, written under ``work``."""
    from onnxruntime.quantization import CalibrationMethod, QuantType

    spec = PreprocessSpec()
    model = realistic_model(load_photos(DATA / "imagenet_samples48", spec, 16))
    paths = {"plain": plain_torch_export(model, work / "plain.onnx")}
    checkpoint = work / "model.pt"
    save_checkpoint(checkpoint, model=grouped_to_two_tower(model), config=model.cfg,
                    preprocess=spec, classes=[f"class{i}" for i in range(1000)])
    say("export, calibrate (entropy), build: the CLI's own functions")
    run_export(work / "model.onnx", checkpoint=checkpoint, parity_images=4)
    calib_data = DATA / "imagenette_train2k"
    calibrate(work / "model.onnx", calib_data, work / "calibration.json", method="entropy",
              num_images=calib_images, progress=False, say=lambda _: None)
    for name, backend, precision in ENGINES:
        build_engine(work / "model.onnx", precision, work / name, backend=backend,
                     calibration=work / "calibration.json" if precision == "int8" else None,
                     progress=False)
        paths[name] = work / name
    say("quantize_static (QUInt8 activations, per-channel, entropy) for the stock baseline")
    images = np.concatenate([b.images for b in iter_batches(calib_data, spec, 32,
                                                            limit=calib_images, seed=0)])
    paths["qs"] = work / "qs.onnx"
    run_quantize_static(work / "model.onnx", paths["qs"], images, QuantType.QUInt8,
                        CalibrationMethod.Entropy)
    return paths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--batch-sizes", default="1,16")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads of every target")
    parser.add_argument("--seconds", type=float, default=3.0, help="timed seconds per target")
    parser.add_argument("--calibration-images", type=int, default=256)
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--keep", default=None, metavar="DIR",
                        help="write the models and engines here and keep them; a folder "
                             "already holding them all is reused (default: a temporary folder)")
    args = parser.parse_args(argv)
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    chw = (3, 227, 227)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.keep or tmp)
        work.mkdir(parents=True, exist_ok=True)
        kept = {"plain": work / "plain.onnx", "qs": work / "qs.onnx",
                **{name: work / name for name, _, _ in ENGINES}}
        if all(p.exists() for p in kept.values()):
            print(f"reusing the models and engines in {work}")
            paths = kept
        else:
            paths = prepare(work, args.calibration_images, print)
        engines = [load_engine(paths[name], threads=args.threads) for name, _, _ in ENGINES]
        targets = [
            BenchTarget("(a) plain torch.onnx.export, ONNX Runtime",
                        BaselineOnnxRuntime(paths["plain"], chw, args.threads), "onnxruntime",
                        "fp32", preprocess=PreprocessSpec()),
            BenchTarget("(b) stock OpenVINO on quantize_static", StockOpenVino(
                paths["qs"], chw, args.threads), "openvino", "int8",
                preprocess=PreprocessSpec()),
            *[BenchTarget.from_engine(e, name) for e, (name, _, _) in zip(engines, ENGINES)],
        ]
        results = bench_runners(targets, sizes, duration=args.seconds,
                                data=DATA / "imagenet_samples48", progress=False)
        for engine in engines:
            engine.close()
    print(f"host: {host_description()}; {args.threads} threads per target")
    print(format_table(results))
    by_name = {r.name: r for r in results}
    rows = []
    for b in sizes:
        tput = {name: r.at(b).throughput for name, r in by_name.items()}
        plain, stock = tput[targets[0].name], tput[targets[1].name]
        row = {"batch": b, "img_s": {k: round(v, 1) for k, v in tput.items()},
               "ort_fp32_vs_plain": tput["ort-fp32"] / plain,
               "ort_int8_vs_ort_fp32": tput["ort-int8"] / tput["ort-fp32"],
               "ov_int8_vs_plain": tput["ov-int8"] / plain,
               "ov_int8_vs_stock_openvino_on_quantize_static": tput["ov-int8"] / stock}
        rows.append(row)
        print(f"batch {b}: " + ", ".join(f"{k} {v:.2f}x" for k, v in row.items()
                                          if k.endswith(("plain", "fp32", "static"))))
    if args.json:
        Path(args.json).write_text(json.dumps({"host": host_description(),
                                               "threads": args.threads, "rows": rows},
                                              indent=2) + "\n")


if __name__ == "__main__":
    main()
