#!/usr/bin/env bash
# Issue 14, accuracy budget: the cifar10 recipe's model (trained with the recipe's 2,000-image
# holdout), tuned on cifar10_train_10k only (the build measures on that holdout), reported on
# cifar10_test_2k, which only validate reads.
#   bash benchmarks/int8_budget_cifar.sh CHECKPOINT [WORK]   (WORK defaults to /tmp/int8-cifar)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
CKPT=$1
WORK=${2:-/tmp/int8-cifar}
A="$ROOT/.venv/bin/alexnet-deploy"
DATA="$ROOT/../shared/data"
mkdir -p "$WORK"
[ -f "$WORK/model.onnx" ] || "$A" export --checkpoint "$CKPT" --out "$WORK/model.onnx"
# without a budget: one entropy calibration on 512 training images, every layer INT8
[ -f "$WORK/entropy.json" ] || "$A" calibrate --model "$WORK/model.onnx" \
    --data "$DATA/cifar10_train_10k.npz" --num-images 512 --out "$WORK/entropy.json"
for placement in cpu tensorrt; do
  backend=$([ $placement = cpu ] && echo auto || echo onnxruntime)
  "$A" build --model "$WORK/model.onnx" --precision int8 --calibration "$WORK/entropy.json" \
      --backend $backend --placement $placement --out "$WORK/int8-entropy-$placement"
  "$A" build --model "$WORK/model.onnx" --precision int8 --backend $backend \
      --placement $placement --min-agreement 0.99 \
      --calibration-data "$DATA/cifar10_train_10k.npz" --out "$WORK/int8-99-$placement"
done
for e in int8-entropy-cpu int8-99-cpu int8-entropy-tensorrt int8-99-tensorrt; do
  echo "== $e on cifar10_test_2k"
  "$A" validate --engine "$WORK/$e" --reference "$WORK/model.onnx" \
      --data "$DATA/cifar10_test_2k.npz" --min-agreement 0.99 --json "$WORK/$e.validate.json" || true
done
