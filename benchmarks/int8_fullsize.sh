#!/usr/bin/env bash
# Issue 14, full-size speed: today's INT8 engines (main at 6210a04, built by its own CLI) against
# the new ones (per-tower LRN as one op, uint8 NHWC input), OpenVINO and ONNX Runtime, timed side
# by side in one `alexnet-deploy bench` run; OpenVINO's per-layer profile; uint8-input agreement.
#   bash benchmarks/int8_fullsize.sh [WORK]      (WORK defaults to /tmp/int8-fullsize)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
WORK=${1:-/tmp/int8-fullsize}
PY="$ROOT/.venv/bin/python"
NEW="$ROOT/.venv/bin/alexnet-deploy"
DATA="$ROOT/../shared/data"
mkdir -p "$WORK"
# today's CLI: the same package at the commit this work started from
if [ ! -d "$WORK/main-src" ]; then
  mkdir -p "$WORK/main-src" && git -C "$ROOT" archive 6210a04 alexnet_deploy | tar -x -C "$WORK/main-src"
fi
OLD() { PYTHONPATH="$WORK/main-src" "$PY" -m alexnet_deploy "$@"; }

[ -f "$WORK/fullsize.pt" ] || "$PY" "$ROOT/benchmarks/int8_fullsize.py" checkpoint "$WORK/fullsize.pt"
[ -f "$WORK/model.onnx" ] || "$NEW" export --checkpoint "$WORK/fullsize.pt" --out "$WORK/model.onnx"
[ -f "$WORK/cal.json" ] || "$NEW" calibrate --model "$WORK/model.onnx" \
    --data "$DATA/imagenette_train2k" --num-images 256 --out "$WORK/cal.json"
for backend in openvino onnxruntime; do
  OLD build --model "$WORK/model.onnx" --precision int8 --calibration "$WORK/cal.json" \
      --backend $backend --out "$WORK/$backend-today"
  "$NEW" build --model "$WORK/model.onnx" --precision int8 --calibration "$WORK/cal.json" \
      --backend $backend --out "$WORK/$backend-f32in"
  "$NEW" build --model "$WORK/model.onnx" --precision int8 --calibration "$WORK/cal.json" \
      --backend $backend --input uint8-nhwc --out "$WORK/$backend-u8in"
done
