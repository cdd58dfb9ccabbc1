#!/usr/bin/env bash
# Issue 16's GPU check on a CUDA machine with no network (the H200 of the device tool): install the carried wheels
# (.whl/: bitsandbytes, llmcompressor, compressed-tensors, pydantic, datasets, ... none of torch/transformers/peft),
# then either the measurements (benchmarks/gpu_check.py) or, with `tests`, the repo's tests/gpu.
#   bash benchmarks/gpu_check.sh            # measurements -> $OUT/gpu_check.json, $OUT/bench.log (JSON lines), stderr log
#   bash benchmarks/gpu_check.sh tests      # python3 -m pytest -q tests/gpu -rs -> $OUT/tests.log
# GPU_CHECK_BUDGET_S / GPU_CHECK_PARTS / GPU_CHECK_TIMEOUT_S / GPU_CHECK_TESTS_ARGS tune it (see gpu_check.py).
set -o pipefail
OUT=${OUT:-/tmp/gpu_check_out}; mkdir -p "$OUT"; export OUT
cd "$(dirname "$0")/.."
t0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  2>&1 | tail -3 || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
echo "wheels installed in $(( $(date +%s) - t0 )) s"
nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv,noheader || true
if [ "${1:-bench}" = tests ]; then
  timeout "${GPU_CHECK_TIMEOUT_S:-200}" python3 -m pytest -q tests/gpu -rs -p no:cacheprovider \
    --timeout=150 ${GPU_CHECK_TESTS_ARGS:-} 2>&1 | tee "$OUT/tests.log"
else
  timeout -s INT "${GPU_CHECK_TIMEOUT_S:-380}" python3 benchmarks/gpu_check.py 2>"$OUT/bench.stderr.log" \
    | tee "$OUT/bench.log" | grep --line-buffered '^{'   # llmcompressor logs to stdout: keep the JSON lines here
  rc=$?
  echo "gpu_check.py exit $rc after $(( $(date +%s) - t0 )) s"; tail -c 1500 "$OUT/bench.stderr.log"
fi
