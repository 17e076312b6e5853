"""Training throughput: the two-tower model on ``cpu,cpu`` vs the single-device grouped form.

Both forms hold the same weights and run the same training step (forward, cross-entropy,
backward, SGD with momentum and weight decay) on the same batches. They are measured
interleaved, round by round with the order alternating, so a machine whose load changes during
the run slows both alike; the ratio of the medians is the figure that matters (goal: the two
towers within 15% of the grouped form, i.e. ratio >= 0.85).

Examples::

    python benchmarks/bench_towers.py                      # the cifar10 recipe's shape
    python benchmarks/bench_towers.py --image-size 227 --width-mult 1.0 --batch-size 32
    python benchmarks/bench_towers.py --threads 1 --rounds 12
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from alexnet_deploy.model import AlexNet, AlexNetConfig, two_tower_to_grouped


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, images: torch.Tensor,
               labels: torch.Tensor) -> None:
    loss = F.cross_entropy(model(images), labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image-size", type=int, default=67, help="input side (default 67)")
    parser.add_argument("--width-mult", type=float, default=0.5, help="width (default 0.5)")
    parser.add_argument("--num-classes", type=int, default=10, help="classes (default 10)")
    parser.add_argument("--batch-size", type=int, default=64, help="batch (default 64)")
    parser.add_argument("--steps", type=int, default=5, help="steps per round (default 5)")
    parser.add_argument("--rounds", type=int, default=8, help="rounds per form (default 8)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    cfg = AlexNetConfig(num_classes=args.num_classes, image_size=args.image_size,
                        width_mult=args.width_mult)
    torch.manual_seed(0)
    towers = AlexNet(cfg, ("cpu", "cpu"))
    models = {"two-tower cpu,cpu": towers, "grouped (1 device)": two_tower_to_grouped(towers)}
    optimizers = {name: torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9,
                                        weight_decay=5e-4) for name, m in models.items()}
    batches = [(torch.randn(args.batch_size, 3, args.image_size, args.image_size),
                torch.randint(0, args.num_classes, (args.batch_size,))) for _ in range(2)]

    for name, model in models.items():  # burn in: allocator, kernels, caches
        model.train()
        for images, labels in batches:
            train_step(model, optimizers[name], images, labels)

    rates: dict[str, list[float]] = {name: [] for name in models}
    names = list(models)
    for round_ in range(args.rounds):
        for name in names if round_ % 2 == 0 else names[::-1]:
            start = time.perf_counter()
            for step in range(args.steps):
                images, labels = batches[step % len(batches)]
                train_step(models[name], optimizers[name], images, labels)
            rates[name].append(args.steps * args.batch_size / (time.perf_counter() - start))

    print(f"AlexNet {args.image_size}px width {args.width_mult} batch {args.batch_size}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"{args.rounds} interleaved rounds x {args.steps} steps")
    for name in names:
        r = rates[name]
        print(f"  {name:20s} median {statistics.median(r):8.1f} img/s   "
              f"(min {min(r):.1f}, max {max(r):.1f})")
    ratio = statistics.median(rates[names[0]]) / statistics.median(rates[names[1]])
    per_round = [a / b for a, b in zip(rates[names[0]], rates[names[1]])]
    print(f"  two-tower / grouped: {ratio:.3f} (per-round ratios: median "
          f"{statistics.median(per_round):.3f}, min {min(per_round):.3f}, "
          f"max {max(per_round):.3f}); goal >= 0.85")


if __name__ == "__main__":
    main()
