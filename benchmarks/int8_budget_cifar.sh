#!/usr/bin/env bash
# Issue 14, accuracy budget: the CIFAR recipe's model, tuned on cifar10_train_10k only, reported
# on cifar10_test_2k (which the tuning never reads).
#   bash benchmarks/int8_budget_cifar.sh CHECKPOINT [WORK]   (WORK defaults to /tmp/int8-cifar)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
CKPT=$1
WORK=${2:-/tmp/int8-cifar}
A="$ROOT/.venv/bin/alexnet-deploy"
DATA="$ROOT/../shared/data"
mkdir -p "$WORK"
[ -f "$WORK/model.onnx" ] || "$A" export --checkpoint "$CKPT" --out "$WORK/model.onnx"
# today's way: one entropy calibration on 512 training images, every layer INT8
[ -f "$WORK/entropy.json" ] || "$A" calibrate --model "$WORK/model.onnx" \
    --data "$DATA/cifar10_train_10k.npz" --num-images 512 --out "$WORK/entropy.json"
"$A" build --model "$WORK/model.onnx" --precision int8 --calibration "$WORK/entropy.json" \
    --backend onnxruntime --out "$WORK/int8-entropy"
for placement in cpu tensorrt; do
  "$A" build --model "$WORK/model.onnx" --precision int8 --backend onnxruntime \
      --placement $placement --min-agreement 0.99 \
      --calibration-data "$DATA/cifar10_train_10k.npz" --out "$WORK/int8-99-$placement"
done
for e in int8-entropy int8-99-cpu int8-99-tensorrt; do
  echo "== $e on cifar10_test_2k"
  "$A" validate --engine "$WORK/$e" --reference "$WORK/model.onnx" \
      --data "$DATA/cifar10_test_2k.npz" --min-agreement 0.99 --json "$WORK/$e.validate.json" || true
done
