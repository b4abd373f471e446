#!/usr/bin/env bash
# One GPU session for the kernels work: the GPU tests of tests/test_kernels.py (Liger vs plain, packed vs one by one,
# grouping exactness, the checkpointing budget), then bench/train_compare.py; every file goes under OUT.
# Usage (repo root, on the GPU machine, liger-kernel installed): bash bench/run_device_compare.sh OUT [BENCH_BUDGET_S]
set -u
OUT=${1:-bench/results/compare}
BUDGET=${2:-1800}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 MPLBACKEND=Agg TOKENIZERS_PARALLELISM=false
export PYTHONPATH="$(pwd):${PYTHONPATH:-}" LONGALIGN_HOME=${LONGALIGN_HOME:-/tmp/longalign_home}
t0=$SECONDS
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/env.txt" 2>&1
python3 -c "import torch, transformers, triton; from importlib.metadata import version as v; \
print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__, \
'liger-kernel', v('liger-kernel'))" >> "$OUT/env.txt" 2>&1
timeout 75 python3 -m pytest -q -m gpu tests/test_kernels.py -p no:cacheprovider -s -rA > "$OUT/pytest_gpu.log" 2>&1
echo "[tests] rc=$? $((SECONDS - t0)) s"
tail -4 "$OUT/pytest_gpu.log"
python3 bench/train_compare.py --out-dir "$OUT" --budget-s "$BUDGET" --cap-s 110 > "$OUT/bench.log" 2>&1
echo "[bench] rc=$? $((SECONDS - t0)) s"
tail -32 "$OUT/bench.log"
