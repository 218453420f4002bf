#!/usr/bin/env bash
# The GPU path, proven on a lent GPU (issue 31): the GPU tests, then seconds per edit of BaFT, ROME and MEMIT on a
# randomly initialised LLaMA-2-7B-shaped model in bfloat16, as JSON that `kebench plan --edit-speed FILE` reads.
#
#   bash bench/gpu_check.sh                 # writes runs/bench/gpu-speed.json and runs/bench/gpu-tests.txt
#   OUT=/some/dir bash bench/gpu_check.sh   # writes them to /some/dir instead
#
# Needs only PyTorch (CUDA), transformers, peft, safetensors, pyyaml, numpy and pytest; the grid test also needs
# Ray, DuckDB and pyarrow and skips without them.  ROME/MEMIT/AlphaEdit's tests need the shared-offline corpus
# (KEBENCH_DATA=<folder with knowedit/, counterfact/>) and skip without it; the timing needs no data.
# About 2 minutes of tests and 2-4 minutes of timing on one H100 (model build, 1 warm-up + N edits per method).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" TOKENIZERS_PARALLELISM=false
PYTHON="${PYTHON:-python}"
OUT="${OUT:-runs/bench}"
N="${N:-3}"
mkdir -p "$OUT"

"$PYTHON" - <<'PY'
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda,
      "devices:", [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] or "none")
PY

started=$(date +%s)
"$PYTHON" -m pytest -q -rs -p no:cacheprovider tests/test_gpu.py 2>&1 | tee "$OUT/gpu-tests.txt"
tests=${PIPESTATUS[0]}
echo "gpu tests: exit $tests in $(( $(date +%s) - started )) s" | tee -a "$OUT/gpu-tests.txt"

started=$(date +%s)
"$PYTHON" bench/gpu_timing.py --n "$N" --json "$OUT/gpu-speed.json"
timing=$?
echo "gpu timing: exit $timing in $(( $(date +%s) - started )) s -> $OUT/gpu-speed.json"
exit $(( tests != 0 ? tests : timing ))
