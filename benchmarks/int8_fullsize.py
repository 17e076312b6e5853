"""Issue 14's full-size speed check: helpers for ``benchmarks/int8_fullsize.sh``.

Examples::

    python benchmarks/int8_fullsize.py checkpoint work/fullsize.pt
    python benchmarks/int8_fullsize.py profile engines/ov-int8 --batch 16 --seconds 10
    python benchmarks/int8_fullsize.py agree engines/ov-int8 engines/ov-int8-u8 \\
        ../shared/data/imagenet_samples48

``checkpoint`` writes the full-size paper AlexNet (227 px, 1,000 ImageNet classes) with
fixed-seed He-initialised weights (``train.kaiming_init_``, seed 0): no trained full-size weights
exist offline, and speed does not depend on the weight values. ``profile`` runs an OpenVINO
engine folder with ``PERF_COUNT`` on and prints each node type's share of the executed time.
``agree`` classifies the photos with two engines through :meth:`Engine.classify` (each in the
input format its sidecar names) and prints their top-1 agreement.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def make_checkpoint(out: Path, seed: int = 0) -> None:
    import torch

    from alexnet_deploy.checkpoint import save_checkpoint
    from alexnet_deploy.data import imagenet1k_classes
    from alexnet_deploy.model import AlexNetConfig, AlexNetGrouped, grouped_to_two_tower
    from alexnet_deploy.preprocess import PreprocessSpec
    from alexnet_deploy.train import kaiming_init_

    torch.manual_seed(seed)
    cfg = AlexNetConfig()
    model = AlexNetGrouped(cfg).eval()
    kaiming_init_(model)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(out, model=grouped_to_two_tower(model), config=cfg,
                    preprocess=PreprocessSpec(), classes=imagenet1k_classes())
    print(f"wrote {out}: full-size AlexNet, He init, seed {seed}")


def profile(engine: str, batch: int, seconds: float, threads: int) -> None:
    """Per node type share of OpenVINO's executed time (``PERF_COUNT``), summed over calls."""
    import numpy as np
    import openvino as ov

    from alexnet_deploy.engine import read_sidecar

    sc = read_sidecar(engine)
    core = ov.Core()
    compiled = core.compile_model(core.read_model(str(Path(engine) / "model.xml")), "CPU",
                                  {"PERF_COUNT": True, "INFERENCE_NUM_THREADS": threads})
    request = compiled.create_infer_request()
    c, h, w = sc.input_shape
    rng = np.random.default_rng(0)
    x = (rng.integers(0, 256, (batch, h, w, c), dtype=np.uint8)
         if sc.input_format == "uint8-nhwc" else
         rng.standard_normal((batch, c, h, w), dtype=np.float32))
    request.infer({0: x})
    totals: dict[str, float] = defaultdict(float)
    calls, end = 0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        request.infer({0: x})
        calls += 1
        for info in request.profiling_info:
            if info.status == info.Status.EXECUTED:
                totals[f"{info.node_type} ({info.exec_type})"] += \
                    info.real_time.total_seconds() * 1e3
    total = sum(totals.values())
    print(f"{engine}: batch {batch}, {calls} calls, {total / calls:.2f} ms/call executed")
    for name, ms in sorted(totals.items(), key=lambda kv: -kv[1]):
        if ms / total >= 0.005:
            print(f"  {100 * ms / total:5.1f}%  {ms / calls:7.3f} ms  {name}")


def agree(first: str, second: str, photos: str) -> None:
    from alexnet_deploy.engine import load_engine
    from alexnet_deploy.predict import collect_images

    images = collect_images([photos])
    with load_engine(first) as a, load_engine(second) as b:
        pa = a.classify(images, top_k=1)
        pb = b.classify(images, top_k=1)
    same = sum(x.indices[0] == y.indices[0] for x, y in zip(pa, pb))
    # a random-weight model could send every photo to one class, which would agree trivially
    distinct = len({x.indices[0] for x in pa})
    print(f"top-1 agreement {first} ({a.sidecar.input_format}) vs {second} "
          f"({b.sidecar.input_format}): {same}/{len(images)} = {100 * same / len(images):.1f}% "
          f"({distinct} distinct top-1 classes)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("checkpoint")
    p.add_argument("out", type=Path)
    p = sub.add_parser("profile")
    p.add_argument("engine")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--threads", type=int, default=2)
    p = sub.add_parser("agree")
    p.add_argument("first")
    p.add_argument("second")
    p.add_argument("photos")
    args = parser.parse_args()
    if args.cmd == "checkpoint":
        make_checkpoint(args.out)
    elif args.cmd == "profile":
        profile(args.engine, args.batch, args.seconds, args.threads)
    else:
        agree(args.first, args.second, args.photos)


if __name__ == "__main__":
    main()
