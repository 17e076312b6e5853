#!/usr/bin/env bash
# Everything in this project that needs an NVIDIA GPU, in one run meant to take under 10 minutes on
# one GPU, with one markdown report. `make gpu-check` runs it; so does `scripts/gpu-check.sh [OUT_DIR]`.
#
#   1. the GPU-marked tests (pytest -m "gpu or tensorrt or pycuda");
#   2. two-tower training on cuda:0,cuda:0 (and cuda:0,cuda:1 when there are two GPUs), with
#      and without AMP (the demo recipe: 8 epochs of synthetic shapes, about a minute on two
#      CPU cores);
#   3. the PyTorch CUDA reference in bench: eager FP32, FP16 autocast, torch.compile;
#   4. where TensorRT and pycuda are installed: FP32, FP16 and INT8 engines of the trained model,
#      each validated against the reference (the CPU thresholds), then benched at batch
#      1/8/64/256 with the H2D / compute / D2H split, with and without transfers.
#
# Each step's exit status, time and log go into OUT_DIR/gpu-check.md; the script exits 1 when
# a step failed (and goes on with the steps that do not depend on it). Written on a machine
# without a GPU: this script has not run on one yet.
set -u -o pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
OUT="${1:-$ROOT/gpu-check}"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
CLI=("$PY" -m alexnet_deploy)
BATCHES="1,8,64,256"
mkdir -p "$OUT/logs"
REPORT="$OUT/gpu-check.md"
FAILED=0
ROWS=()

step() {  # step NAME CMD...: run, log, time; record a table row
    local name="$1"; shift
    local log="$OUT/logs/$name.log" start end status
    start=$(date +%s)
    echo "== $name: $*" | tee "$log"
    "$@" >>"$log" 2>&1
    status=$?
    end=$(date +%s)
    if [ $status -eq 0 ]; then result="ok"; else result="FAILED ($status)"; FAILED=1; fi
    echo "   $result in $((end - start)) s (log: $log)"
    ROWS+=("| $name | $result | $((end - start)) s | \`$*\` |")
    return $status
}

skip() {  # skip NAME REASON
    echo "== $1: skipped ($2)"
    ROWS+=("| $1 | skipped: $2 | - | |")
}

cd "$ROOT" || exit 2
if ! command -v nvidia-smi >/dev/null || ! nvidia-smi -L >/dev/null 2>&1; then
    echo "error: no NVIDIA GPU here (nvidia-smi finds none): gpu-check needs one" >&2
    exit 2
fi
GPUS=$(nvidia-smi -L | wc -l)
step environment sh -c "nvidia-smi; $PY -c 'import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name(0))'; $PY -m pip list 2>/dev/null | grep -i -E 'tensorrt|pycuda|onnxruntime|torch'"

step tests-gpu "$PY" -m pytest -q -m "gpu or tensorrt or pycuda" -rs

TRAIN="$OUT/train"
for amp in --amp --no-amp; do
    step "train-cuda0-cuda0$amp" "${CLI[@]}" train --recipe demo \
        --devices cuda:0,cuda:0 "$amp" --out "$TRAIN/c00$amp"
done
if [ "$GPUS" -ge 2 ]; then
    for amp in --amp --no-amp; do
        step "train-cuda0-cuda1$amp" "${CLI[@]}" train --recipe demo \
            --devices cuda:0,cuda:1 "$amp" --out "$TRAIN/c01$amp"
    done
else
    skip train-cuda0-cuda1 "one GPU"
fi
CKPT="$TRAIN/c00--no-amp/best.pt"

step bench-torch-cuda "${CLI[@]}" bench --reference "$CKPT" --batch-sizes "$BATCHES" \
    --duration 2 --warmup 1 --json "$OUT/bench-torch.json"

HAVE_TRT=1
"$PY" -c "from alexnet_deploy.backends.tensorrt import BACKEND; raise SystemExit(not BACKEND.available())" \
    || HAVE_TRT=0
if [ "$HAVE_TRT" -eq 1 ] && [ -f "$CKPT" ]; then
    step export "${CLI[@]}" export --checkpoint "$CKPT" --out "$OUT/model.onnx"
    step calibrate "${CLI[@]}" calibrate --model "$OUT/model.onnx" --data synthetic:train \
        --out "$OUT/calibration.json"
    ENGINES=()
    for p in fp32 fp16 int8; do
        cal=(); [ "$p" = int8 ] && cal=(--calibration "$OUT/calibration.json")
        if step "build-$p" "${CLI[@]}" build --model "$OUT/model.onnx" --precision "$p" \
                "${cal[@]}" --backend tensorrt --max-batch 256 \
                --timing-cache "$OUT/timing.cache" --out "$OUT/engines/$p"; then
            step "validate-$p" "${CLI[@]}" validate --engine "$OUT/engines/$p" \
                --reference "$CKPT" --data synthetic:test --json "$OUT/validate-$p.json"
            ENGINES+=(--engine "$OUT/engines/$p")
        fi
    done
    if [ "${#ENGINES[@]}" -gt 0 ]; then
        step bench-tensorrt "${CLI[@]}" bench "${ENGINES[@]}" --batch-sizes "$BATCHES" \
            --duration 2 --warmup 1 --json "$OUT/bench-trt.json" --report "$OUT/bench-trt.md"
        step bench-tensorrt-no-transfers "${CLI[@]}" bench "${ENGINES[@]}" \
            --batch-sizes "$BATCHES" --duration 2 --warmup 1 --no-transfers \
            --json "$OUT/bench-trt-no-transfers.json"
    fi
else
    skip tensorrt "TensorRT or pycuda not installed, or training failed"
fi

{
    echo "# gpu-check on $(hostname)"
    echo
    echo "$(date -u +%Y-%m-%dT%H:%M:%SZ); $GPUS GPU(s): $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | paste -sd ';')"
    echo
    echo "| step | result | time | command |"
    echo "|---|---|---|---|"
    printf '%s\n' "${ROWS[@]}"
    echo
    for f in "$OUT"/bench-*.json; do
        [ -f "$f" ] || continue
        echo "## $(basename "$f" .json)"
        echo
        "$PY" - "$f" <<'PYEOF'
import json, sys
doc = json.load(open(sys.argv[1]))
print("| engine | batch | img/s | p50 ms | H2D | compute | D2H | enqueue |")
print("|---|---:|---:|---:|---:|---:|---:|---:|")
for e in doc.get("engines", [doc]):
    for r in e["results"]:
        st = r.get("stages_ms", {})
        cell = lambda k: f"{st[k]['p50']:.3f}" if k in st else "-"
        print(f"| {e['engine']} | {r['batch_size']} | {r['throughput']:.1f} | "
              f"{r['latency_ms']['p50']:.3f} | {cell('h2d')} | {cell('compute')} | "
              f"{cell('d2h')} | {cell('enqueue')} |")
print()
PYEOF
    done
    [ -f "$OUT/bench-trt.md" ] && echo "Full TensorRT bench report: bench-trt.md"
} >"$REPORT"
echo "wrote $REPORT"
exit $FAILED
