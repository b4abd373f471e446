#!/usr/bin/env bash
# Sequence parallelism on 2 GPUs (issue 17): bf16 correctness, then the longest rows per shape, then a 1-GPU baseline.
# Run as: bash bench/run_device_sp.sh OUT [BUDGET_S]      (CPU dry run: DEVICE=cpu bash bench/run_device_sp.sh OUT 900)
# Each measurement is its own process with a time cap; a global deadline (BUDGET_S, default 235 s) shortens the
# caps of later runs and skips what cannot finish. Results: OUT/sp_results.jsonl (one JSON line per run), OUT/sp_log.txt.
set -u
OUT=${1:?usage: run_device_sp.sh OUT [BUDGET_S]}
BUDGET=${2:-235}
DEVICE=${DEVICE:-cuda}
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4} PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True TOKENIZERS_PARALLELISM=false
PY=${PY:-python3}
R=$OUT/sp_results.jsonl
L=$OUT/sp_log.txt
mkdir -p "$OUT"
START=$(date +%s)
PORT=29517
run() {  # run CAP_S CMD...: skipped when less than 15 s of the budget would be left for it
  local cap=$1; shift
  local left=$(( BUDGET - ($(date +%s) - START) ))
  (( cap > left )) && cap=$left
  if (( cap < 15 )); then echo "== SKIPPED (budget) $*" >> "$L"; echo "{\"skipped\": \"$*\"}" >> "$R"; return; fi
  echo "== $(date +%T) cap ${cap}s: $*" >> "$L"
  timeout -k 5 "$cap" "$@" >> "$L" 2>&1
  echo "== rc=$? at +$(( $(date +%s) - START ))s" >> "$L"
}
two() {  # two CAP_S ARGS...: bench/sp_throughput.py on 2 processes (one per GPU)
  local cap=$1; shift
  PORT=$((PORT + 1))
  run "$cap" $PY -m torch.distributed.run --nproc_per_node=2 --master_port=$PORT bench/sp_throughput.py \
    --device "$DEVICE" --out "$R" "$@"
}
if [ "$DEVICE" = cuda ]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >> "$L" 2>&1
  S1=qwen2.5-1.5b; S7=qwen2.5-7b; K=1024; DOC=16384
else
  S1=tiny; S7=tiny; K=2; DOC=128
fi
two 45 --check
two 45 --shape $S1 --seq $((256 * K)) --doc-tokens $DOC
two 60 --shape $S1 --seq $((512 * K)) --doc-tokens $DOC
two 55 --shape $S7 --seq $((128 * K)) --doc-tokens $DOC
two 75 --shape $S7 --seq $((256 * K)) --doc-tokens $DOC
run 30 $PY bench/sp_throughput.py --device "$DEVICE" --out "$R" --shape $S1 --seq $((64 * K)) --doc-tokens $DOC --sp 1
echo "== done at +$(( $(date +%s) - START ))s" >> "$L"
