"""Where an INT8 model's disagreements with FP32 come from: weights vs activations, tensor by tensor.

Examples::

    python benchmarks/int8_noise.py --checkpoint train/cifar10/best.pt \\
        --data ../shared/data/cifar10_train_10k.npz --val-data ../shared/data/cifar10_test_2k.npz

Exports the checkpoint, calibrates (entropy, ``--num-images`` images) and builds the CPU
placement's Q/DQ graph with ``quantize.to_int8``. Then, on ``--val-data`` (ONNX Runtime):

* the FP32 top-1 margin distribution (how many images are decided by a hair);
* the full INT8 graph; the same graph with float weights (every weight/bias DequantizeLinear
  replaced by the float tensor), which isolates the activations' rounding;
* one activation Q/DQ pair at a time (float weights, every other pair an Identity).

For each: images whose top-1 differs from FP32, and the rms / median / p90 of the absolute
logit error. A diagnostic, not a product path: the graph surgery keys on ``to_int8``'s node
names (``<tensor>/quantize``, ``<layer>/weight_dequantize``).
"""

from __future__ import annotations

import json

import numpy as np
from calibrate_methods import export_and_collect, parse_args  # this folder's script

MARGINS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5)


def float_weights(qdq, fp32) -> None:
    """Replace ``qdq``'s weight and bias dequantization by the float tensors of ``fp32``."""
    import onnx

    originals = {t.name: t for t in fp32.graph.initializer}
    for node in qdq.graph.node:
        if node.op_type == "DequantizeLinear" and node.name.endswith(
                ("/weight_dequantize", "/bias_dequantize")):
            source = node.input[0].removesuffix("_quantized")
            tensor = onnx.TensorProto()
            tensor.CopyFrom(originals[source])
            tensor.name = f"{source}_float"
            qdq.graph.initializer.append(tensor)
            node.op_type = "Identity"
            del node.input[:], node.attribute[:]
            node.input.append(tensor.name)


def only_activations(qdq, keep: set[str]) -> None:
    """Turn every activation Q/DQ pair of ``qdq`` whose tensor is not in ``keep`` into Identity."""
    for node in qdq.graph.node:
        stem, _, kind = node.name.rpartition("/")
        if node.op_type in ("QuantizeLinear", "DequantizeLinear") and \
                kind in ("quantize", "dequantize") and stem not in keep:
            node.op_type = "Identity"
            del node.input[1:]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(__doc__.split("\n")[0], argv)

    from alexnet_deploy import data as datasets
    from alexnet_deploy.calibrate import ZERO_TENSOR_AMAX
    from alexnet_deploy.calibrators import make_calibrator
    from alexnet_deploy.quantize import ort_logits, to_int8

    model, spec, stats = export_and_collect(args)
    entropy = make_calibrator("entropy")
    amax = {name: entropy(h) or ZERO_TENSOR_AMAX for name, h in stats.histograms.items()}
    images = np.concatenate([b.images for b in datasets.iter_batches(args.val_data, spec, 100)])
    reference = ort_logits(model, images)
    top2 = np.sort(reference, axis=1)[:, -2:]
    margin = top2[:, 1] - top2[:, 0]
    result: dict = {"num_images": len(images),
                    "margin_below": {str(m): float((margin < m).mean()) for m in MARGINS}}
    print(f"{len(images)} images of {args.val_data}; FP32 top-1 margin below "
          + ", ".join(f"{m}: {100 * v:.2f}%" for m, v in result["margin_below"].items()))

    def measure(label: str, graph) -> None:
        logits = ort_logits(graph, images)
        err = np.abs(logits - reference)
        flips = logits.argmax(1) != reference.argmax(1)
        row = {"flips": int(flips.sum()), "rms": float(np.sqrt((err ** 2).mean())),
               "median": float(np.median(err)), "p90": float(np.percentile(err, 90)),
               "flipped_margins": [round(float(m), 4) for m in np.sort(margin[flips])]}
        result[label] = row
        print(f"{label:>24}: {row['flips']:4d} differ  |logit err| rms {row['rms']:.4f} "
              f"median {row['median']:.4f} p90 {row['p90']:.4f}")

    def qdq():
        return to_int8(model, amax, "cpu")

    measure("int8", qdq())
    graph = qdq()
    float_weights(graph, model)
    measure("activations only", graph)
    tensors = sorted({n.name.rpartition("/")[0] for n in graph.graph.node
                      if n.op_type == "QuantizeLinear" and n.name.endswith("/quantize")})
    for tensor in tensors:
        graph = qdq()
        float_weights(graph, model)
        only_activations(graph, {tensor})
        measure(f"only {tensor}", graph)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
