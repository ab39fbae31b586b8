#!/usr/bin/env bash
# The GPU checks as one script: the op tests on CUDA (tests/ops, ~100 s on one H200), the backend rows of
# tests/test_cuda.py (~120 s), and one benchmark row at full ViT-B/16 size (bf16, batch 64: the timing
# phase alone took 133 s; the whole row needs more than the 220 s it was given once). Needs approxbp_fx
# installed (its entry point registers backend="approxbp") and a CUDA build of torch. Logs go to $OUT
# (default ./cuda-out).
#   bash benchmarks/cuda_checks.sh [tests|bench|all]      # default: all
set -uo pipefail
OUT=${OUT:-cuda-out}
WHAT=${1:-all}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
nvidia-smi -L
$PY -c "import torch, transformers, peft, approxbp_fx; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, torch.cuda.get_device_name())" || exit 3
if [ "$WHAT" != bench ]; then
  echo "== op tests on cuda"
  timeout 200 $PY -m pytest -q -x -p no:cacheprovider tests/ops -k cuda 2>&1 | tee "$OUT/ops.log" | tail -25
  echo "== backend on cuda"
  timeout 240 $PY -m pytest -q -s -p no:cacheprovider tests/test_cuda.py 2>&1 | tee "$OUT/backend.log" | grep -E "^cuda |passed|failed|Error|error" | tail -40
fi
if [ "$WHAT" != tests ]; then
  echo "== benchmark row"
  timeout 540 $PY benchmarks/run.py --device cuda --quick --only 'vit-b16/full/bf16' --out "$OUT" --time-limit 60 2>&1 | tee "$OUT/bench.log" | tail -40
fi
