#!/usr/bin/env bash
# Issue 12 load test: a full-size (1,000-class) OpenVINO INT8 engine served by
# `alexnet-deploy serve`, swept by `alexnet-deploy loadtest` (concurrency 1..32, HTTP and gRPC,
# dynamic batching on vs off, every answer checked against the engine's own).
#
#   benchmarks/serving_loadtest.sh [WORK_DIR]        # default WORK_DIR: /tmp/alexnet-serving
#
# No trained full-size weights exist offline: the model is a torchvision-format AlexNet with
# fixed-seed He-initialised random weights (torch.manual_seed(0)), so speed and the answer checks
# are meaningful, accuracy is not. Torchvision's format is 224 px. Calibrated on 256 real
# Imagenette photos; the requests are the 48 ImageNet photos of ../shared/data/imagenet_samples48.
set -euo pipefail
cd "$(dirname "$0")/.."
W=${1:-/tmp/alexnet-serving}
DATA=../shared/data
BIN=.venv/bin
mkdir -p "$W"
if [ ! -f "$W/tv_int8_openvino/engine.json" ]; then
  $BIN/python - "$W/tv_seed0.pth" <<'PY'
import sys, torch
from alexnet_deploy.model import TorchvisionAlexNet
from alexnet_deploy.train import kaiming_init_
torch.manual_seed(0)
model = TorchvisionAlexNet(num_classes=1000)
kaiming_init_(model)
torch.save(model.state_dict(), sys.argv[1])
PY
  $BIN/alexnet-deploy export --torchvision-weights "$W/tv_seed0.pth" --out "$W/tv_seed0.onnx" \
    --parity-data $DATA/imagenet_samples48 --parity-images 8
  $BIN/alexnet-deploy calibrate --model "$W/tv_seed0.onnx" --data $DATA/imagenette_train2k \
    --num-images 256 --out "$W/tv_seed0.calib.json"
  $BIN/alexnet-deploy build --model "$W/tv_seed0.onnx" --precision int8 \
    --calibration "$W/tv_seed0.calib.json" --backend openvino --out "$W/tv_int8_openvino"
fi
$BIN/alexnet-deploy loadtest --engine "$W/tv_int8_openvino" --data $DATA/imagenet_samples48 \
  --images 48 --concurrency 1,2,4,8,16,32 --protocols http,grpc --batching on,off \
  --duration 2 --rounds 3 --json "$W/loadtest.json" --report docs/serving-loadtest.md
