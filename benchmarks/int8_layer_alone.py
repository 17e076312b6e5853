"""Each layer in INT8 alone (every other layer FP32): top-1 agreement with FP32 on the images
the accuracy budget holds out, for two calibration methods and both Q/DQ placements.

    python benchmarks/int8_layer_alone.py MODEL.onnx DATA

DATA is split as ``build --min-agreement`` splits it (``build.tuning_split``): the model's
training holdout when DATA is its training data, else a seeded draw.
"""

from __future__ import annotations

import argparse

import numpy as np
import onnx

from alexnet_deploy.build import (
    CALIBRATION_IMAGES,
    HELD_OUT_IMAGES,
    read_images,
    search_logits,
    tuning_split,
)
from alexnet_deploy.calibrate import amax_table, collect_activations
from alexnet_deploy.calibrators import make_calibrator
from alexnet_deploy.data import open_dataset
from alexnet_deploy.metadata import read_model_info
from alexnet_deploy.quantize import required_activations, to_int8, weighted_layers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("data")
    parser.add_argument("--methods", default="entropy,percentile")
    args = parser.parse_args()
    model = onnx.load(args.model)
    info = read_model_info(model)
    dataset = open_dataset(args.data)
    cal_at, held_at, source = tuning_split(len(dataset), dataset.fingerprint(),
                                           info.training_data, CALIBRATION_IMAGES,
                                           HELD_OUT_IMAGES)
    print(f"held out: {len(held_at)} images ({source}); calibration: {len(cal_at)}")
    cal, _ = read_images(dataset, info.preprocess, cal_at, False, "calibration images")
    held, _ = read_images(dataset, info.preprocess, held_at, False, "held-out images")
    reference = search_logits(model, held).argmax(1)
    tensors = list(dict.fromkeys(required_activations(model, "cpu")
                                 + required_activations(model, "tensorrt")))
    stats = collect_activations(model, (cal[i:i + 64] for i in range(0, len(cal), 64)),
                                tensors=tensors, total=len(cal), progress=False)
    names = [layer.name for layer in weighted_layers(model)]
    print("calibration, placement | all INT8 | " + " | ".join(names))
    for method in args.methods.split(","):
        amax = amax_table(stats.histograms, make_calibrator(method))[0]
        for target in ("cpu", "tensorrt"):
            row = [np.mean(search_logits(to_int8(model, amax, target), held).argmax(1)
                           == reference)]
            for name in names:
                graph = to_int8(model, amax, target, [n for n in names if n != name])
                row.append(np.mean(search_logits(graph, held).argmax(1) == reference))
            print(f"{method}, {target} | " + " | ".join(f"{100 * v:.2f}" for v in row),
                  flush=True)


if __name__ == "__main__":
    main()
