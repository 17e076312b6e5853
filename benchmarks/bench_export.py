"""FP32 speed of the exported graphs on ONNX Runtime CPU, side by side, interleaved.

    python benchmarks/bench_export.py                        # full-size, random (He) weights
    python benchmarks/bench_export.py --checkpoint train/imagenette/best.pt
    python benchmarks/bench_export.py --alternatives --rounds 30 --json bench-export.json

Graphs (one full-size AlexNet, 227 px, 1000 classes unless --checkpoint says otherwise):

  plain      ``torch.onnx.export`` of AlexNetGrouped (the default dynamo exporter): LRN lowered to
             pad / avg-pool / pow / div, the baseline every ratio is against
  canonical  ``alexnet-deploy export``'s graph: native LRN per tower (what TensorRT gets)
  ort        canonical + ``rewrite.lrn_for_onnxruntime`` (what the ONNX Runtime backend runs)
  with --alternatives, other exact LRN forms measured in the same loop:
  ort-prescale  the rewrite with ``prescale=True`` (x scaled before squaring)
  ort-pow       the rewrite with ``Pow(d, 0.75)`` instead of Sqrt/Sqrt/Mul

Each round runs every graph once per batch size, in turn (batch 1: 16 calls, batch 16: 2 calls),
after a warm-up; the report gives the median img/s over rounds and the median over rounds of each
graph's speed ratio to ``plain`` in the same round (robust to load drifting during the run).
Before timing, every graph's logits are compared with the PyTorch reference on real images.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
PHOTOS = ROOT.parent / "shared" / "data" / "imagenet_samples48"


def realistic_model():
    """Full-size paper AlexNet with He-initialised weights (the paper's N(0, 0.01) init makes
    activations vanish layer by layer; these keep them at a trained network's scale)."""
    from alexnet_deploy.model import AlexNetConfig, AlexNetGrouped

    torch.manual_seed(0)
    model = AlexNetGrouped(AlexNetConfig())
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                torch.nn.init.kaiming_normal_(p)
            else:
                p.fill_(0.01)
    return model.eval()


def plain_export(model, folder: Path):
    """What a user gets from ``torch.onnx.export`` without this project (dynamic batch)."""
    import onnx

    size = model.cfg.image_size
    path = folder / "plain.onnx"
    with contextlib.redirect_stdout(io.StringIO()):  # the exporter narrates each step
        torch.onnx.export(model, (torch.zeros(1, 3, size, size),), str(path), dynamo=True,
                          input_names=["input"], output_names=["logits"],
                          dynamic_shapes={"x": {0: torch.export.Dim("N", min=1, max=1024)}})
    return onnx.load(str(path))


def pow_form(fast):
    """The rewrite with ``Pow(d, beta)`` in place of ``Sqrt -> Sqrt -> Mul`` (an alternative)."""
    import onnx
    from onnx import helper, numpy_helper

    out = onnx.ModelProto()
    out.CopyFrom(fast)
    nodes = []
    for node in out.graph.node:
        stem = node.name.rsplit(".", 1)[0]
        if node.name.endswith((".sqrt", ".qrt")):
            continue
        if node.name.endswith(".pow"):
            out.graph.initializer.append(numpy_helper.from_array(np.float32(0.75),
                                                                 f"{stem}.beta"))
            node = helper.make_node("Pow", [f"{stem}.window", f"{stem}.beta"], [node.name],
                                    name=node.name)
        nodes.append(node)
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    del out.graph.value_info[:]
    return out


def session(model, threads: int, profile_prefix: str | None = None):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    if profile_prefix:
        opts.enable_profiling = True
        opts.profile_file_prefix = profile_prefix
    return ort.InferenceSession(model.SerializeToString(), opts,
                                providers=["CPUExecutionProvider"])


def lrn_share(model, x: np.ndarray, threads: int, runs: int = 3) -> tuple[float, float]:
    """(ms per run, fraction of kernel time in the LRN blocks) from an ONNX Runtime profile.

    LRN-block kernels are the nodes named ``lrnK...``: native LRN, Split and Concat, or the
    rewrite's pieces (the layout reorders ONNX Runtime puts around its Conv are not counted).
    The first run is a warm-up and is left out.
    """
    with tempfile.TemporaryDirectory() as tmp:
        s = session(model, threads, str(Path(tmp) / "profile"))
        feed = {s.get_inputs()[0].name: x}
        for _ in range(runs + 1):
            s.run(None, feed)
        events = json.loads(Path(s.end_profiling()).read_text())
    first = min((e for e in events if e.get("name") == "model_run"), key=lambda e: e["ts"])
    warm_up_end = first["ts"] + first["dur"]
    kernels = [e for e in events if e.get("cat") == "Node" and e["ts"] > warm_up_end
               and e["name"].endswith("_kernel_time")]
    total = sum(e["dur"] for e in kernels)
    lrn = sum(e["dur"] for e in kernels if e["name"].startswith("lrn"))
    return total / runs / 1000, lrn / total


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def photos(spec, count: int) -> tuple[np.ndarray, str]:
    if PHOTOS.is_dir():
        from alexnet_deploy.export import load_parity_images

        images = load_parity_images(PHOTOS, spec, count)
        return np.concatenate([images] * -(-count // len(images)))[:count], str(PHOTOS)
    rng = np.random.default_rng(0)
    return rng.standard_normal((count, 3, spec.crop, spec.crop), dtype=np.float32), "random"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", type=Path, help="a trained checkpoint (default: random)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-sizes", default="1,16")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--alternatives", action="store_true",
                        help="also time other exact LRN forms (see the docstring)")
    parser.add_argument("--profile", action="store_true",
                        help="also profile canonical and ort: share of time in the LRN blocks")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args(argv)

    from alexnet_deploy import export as ex
    from alexnet_deploy.preprocess import PreprocessSpec
    from alexnet_deploy.rewrite import lrn_for_onnxruntime

    torch.set_num_threads(args.threads)
    if args.checkpoint:
        source = ex.source_from_checkpoint(args.checkpoint)
        model, spec = source.model, source.preprocess
    else:
        model, spec = realistic_model(), PreprocessSpec()
    canonical = ex.infer_shapes(ex.build_graph(model))
    graphs = {}
    with tempfile.TemporaryDirectory() as tmp:
        graphs["plain"] = plain_export(model, Path(tmp))
    graphs["canonical"] = canonical
    graphs["ort"] = lrn_for_onnxruntime(canonical)
    if args.alternatives:
        graphs["ort-prescale"] = lrn_for_onnxruntime(canonical, prescale=True)
        graphs["ort-pow"] = pow_form(graphs["ort"])
    sessions = {name: session(g, args.threads) for name, g in graphs.items()}
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    x, data = photos(spec, max(batch_sizes))

    with torch.inference_mode():
        reference = model(torch.from_numpy(x)).numpy()
    print(f"logits vs PyTorch on {len(x)} images from {data} (scale {np.abs(reference).max():.1f})")
    for name, s in sessions.items():
        got = s.run(None, {s.get_inputs()[0].name: x})[0]
        err = np.abs(got - reference).max()
        print(f"  {name:13s} nodes {len(graphs[name].graph.node):3d}  max |dlogit| {err:.2e}  "
              f"top-1 equal {int((got.argmax(1) == reference.argmax(1)).sum())}/{len(x)}")

    per_image = {(n, b): [] for n in sessions for b in batch_sizes}
    for b in batch_sizes:
        for s in sessions.values():  # warm-up
            s.run(None, {s.get_inputs()[0].name: x[:b]})
    for _ in range(args.rounds):
        for b in batch_sizes:
            calls = max(1, 16 // b)
            for name, s in sessions.items():
                feed = {s.get_inputs()[0].name: x[:b]}
                start = time.perf_counter()
                for _ in range(calls):
                    s.run(None, feed)
                per_image[name, b].append((time.perf_counter() - start) / (calls * b))

    import onnxruntime

    results = {"machine": f"{cpu_name()}, {os.cpu_count()} cores",
               "onnxruntime": onnxruntime.__version__, "torch": torch.__version__,
               "threads": args.threads, "rounds": args.rounds, "data": data,
               "command": " ".join(["python", "benchmarks/bench_export.py", *(argv or
                                                                               sys.argv[1:])]),
               "figures": []}
    print(f"\n{results['machine']}; ONNX Runtime {onnxruntime.__version__} CPU, "
          f"{args.threads} threads, "
          f"{args.rounds} interleaved rounds (median)")
    print(f"{'graph':13s} {'batch':>5s} {'img/s':>8s} {'x plain':>8s}")
    for b in batch_sizes:
        base = per_image["plain", b]
        for name in sessions:
            times = per_image[name, b]
            ratio = statistics.median(p / t for p, t in zip(base, times))
            ips = 1.0 / statistics.median(times)
            print(f"{name:13s} {b:5d} {ips:8.1f} {ratio:8.2f}")
            results["figures"].append({"graph": name, "batch": b, "img_per_s": round(ips, 1),
                                       "ratio_vs_plain": round(ratio, 3)})
    if args.profile:
        b = max(batch_sizes)
        print(f"\nONNX Runtime profile, batch {b}: kernel time in the LRN blocks")
        for name in ("canonical", "ort"):
            ms, share = lrn_share(graphs[name], x[:b], args.threads)
            print(f"  {name:13s} {ms:7.1f} ms per batch, LRN blocks {100 * share:4.1f}%")
            results[f"profile_{name}"] = {"ms_per_batch": round(ms, 1),
                                          "lrn_share": round(share, 3)}
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
