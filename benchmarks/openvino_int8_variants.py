"""OpenVINO INT8 graph variants around the LRN blocks, for timing against the engine ``build``
writes (issue 14's speed aim). A measurement, not a product path.

    python benchmarks/openvino_int8_variants.py MODEL.onnx CALIBRATION.json TODAY_ENGINE WORK

``TODAY_ENGINE`` is an OpenVINO INT8 engine of the same model and calibration built by the CLI;
each variant is written to ``WORK/<name>`` with a copy of its ``engine.json`` (artifact hashes
updated), so ``alexnet-deploy bench`` times them side by side:

* ``noreluq``: the CPU placement without the Q/DQ pair on ``relu1`` / ``relu2`` (the LRN inputs;
  ONNX Runtime needs it to fuse QLinearConv, OpenVINO dequantizes it again before its float LRN);
* ``noreluq-fold``: that, plus one LRN per block over ``[2N, C/2, H, W]``
  (``rewrite.lrn_fold_towers``);
* ``noreluq-window``: that without the fold, LRN in its element-wise form with the window sum as a
  1x1 grouped convolution (``rewrite.lrn_for_onnxruntime``).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import onnx

from alexnet_deploy.backends import get_backend
from alexnet_deploy.calibrate import load_calibration
from alexnet_deploy.fileio import sha256_file
from alexnet_deploy.quantize import to_int8
from alexnet_deploy.rewrite import lrn_fold_towers, lrn_for_onnxruntime


def without_qdq(graph: onnx.ModelProto, tensors: list[str]) -> onnx.ModelProto:
    """``graph`` with the QuantizeLinear/DequantizeLinear pair on each of ``tensors`` removed
    (readers of the dequantized tensor read the float tensor again)."""
    out = onnx.ModelProto()
    out.CopyFrom(graph)
    pairs = {f"{t}_dequantized": t for t in tensors}
    nodes = [n for n in out.graph.node
             if not (n.op_type in ("QuantizeLinear", "DequantizeLinear")
                     and n.name.split("/")[0] in tensors)]
    for node in nodes:
        for i, name in enumerate(node.input):
            node.input[i] = pairs.get(name, name)
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    return out


def main() -> None:
    model_path, cal_path, today, work = sys.argv[1:5]
    model = onnx.load(model_path)
    base = without_qdq(to_int8(model, load_calibration(cal_path), "cpu"), ["relu1", "relu2"])
    variants = {"noreluq": base, "noreluq-fold": lrn_fold_towers(base),
                "noreluq-window": lrn_for_onnxruntime(base)}
    backend = get_backend("openvino")
    for name, graph in variants.items():
        folder = Path(work) / name
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        backend.build(graph, folder, max_batch=64, threads=2)
        sidecar = json.loads((Path(today) / "engine.json").read_text())
        sidecar["artifacts"] = {f: sha256_file(folder / f) for f in sidecar["artifacts"]}
        (folder / "engine.json").write_text(json.dumps(sidecar, indent=1))
        print("wrote", folder)


if __name__ == "__main__":
    main()
