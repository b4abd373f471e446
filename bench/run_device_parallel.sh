#!/usr/bin/env bash
# Stage 4 on 2 GPUs in one go: FSDP2 == single-process step, 1→2 GPU scaling (DDP, FSDP2), the Qwen2.5-7B shape
# at 64k under FSDP2, resume after a kill, export + load in stage 5, LoRA under FSDP2.
# Usage (repo root, on a 2-GPU machine): bash bench/run_device_parallel.sh OUT_DIR [SECONDS_BUDGET]
# Steps run in order while the budget lasts; each writes JSON + its log into OUT_DIR/files (tarred at the end).
set -u
OUT=${1:-bench/results/device_parallel}
BUDGET=${2:-330}
ROOT=$(pwd)
W=${WORK:-/tmp/lp}
mkdir -p "$OUT/files" "$W"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1  # no NVLink multicast
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 PYTHONPATH="$ROOT:${PYTHONPATH:-}"
export LONGALIGN_HOME=${LONGALIGN_HOME:-$W/home}
F=$OUT/files
t0=$SECONDS
left() { echo $((BUDGET - (SECONDS - t0))); }
step() { echo "[$1] done at $((SECONDS - t0)) s" | tee -a "$F/timeline.txt"; }
port=29600
AL() { port=$((port + 1)); python3 -m accelerate.commands.launch --num_processes 2 --main_process_port $port "$@"; }
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$F/gpu.txt"
python3 -c "import torch, transformers, accelerate; print(torch.__version__, transformers.__version__, accelerate.__version__)" | tee -a "$F/gpu.txt"

# data + a small model shape (random init; config + the bundled tokenizer, made by tiny_model_dir)
SMALL=${SMALL_MODEL:-$W/small}
[ -f "$SMALL/config.json" ] || python3 -c "from longalign_lib.train import tiny_model_dir as t; t('$SMALL', hidden=576, layers=8, heads=9, kv_heads=3)"
python3 -c "from longalign_lib.train import verse_lookup_records as v; from longalign_lib.io import write_jsonl; \
write_jsonl('$W/verse.jsonl', v(200, 200, 4000, seed=1))"
C="--preset gpu-small --set model.name=random:$SMALL --set data.long_file=$W/verse.jsonl --set batching.world_size=2 \
--set batching.grad_accum=1 --set batching.max_pack_tokens=8192 --set train.tensorboard=false --set train.warmup_ratio=0 \
--set train.lr=1e-4 --set data.max_length=8192"

# A. one optimizer step: 1 process running both ranks' micro-batches (grad_accum 2) vs FSDP2 and DDP on 2 GPUs
python3 -m longalign_lib.cli train $C --run-dir $W/eq_single --set train.max_steps=1 --set train.save_steps=0 > "$F/eq_single.log" 2>&1
AL --config_file configs/accelerate/fsdp2.yaml -m longalign_lib.cli train $C --run-dir $W/eq_fsdp2 --set train.max_steps=1 --set train.save_steps=0 > "$F/eq_fsdp2.log" 2>&1
AL --config_file configs/accelerate/ddp.yaml -m longalign_lib.cli train $C --run-dir $W/eq_ddp --set train.max_steps=1 --set train.save_steps=0 > "$F/eq_ddp.log" 2>&1
python3 bench/parallel_checks.py equality $W/eq_single $W/eq_fsdp2 $W/eq_ddp --lr 1e-4 --out "$F/equality.json" > /dev/null 2>&1
for r in eq_single eq_fsdp2 eq_ddp; do tail -c 600 "$F/$r.log"; cp $W/$r/train_log.jsonl "$F/${r}_log.jsonl" 2>/dev/null; done
cat "$F/equality.json"; step equality

# B. the Qwen2.5-7B shape, full fine-tuning at 64k, FSDP2 on 2 GPUs
if [ "$(left)" -gt 120 ]; then
  AL --config_file configs/accelerate/fsdp2.yaml bench/train_parallel.py --shape qwen2.5-7b --seq 65536 --steps 4 \
      --warmup 1 --out "$F/fsdp2_qwen2.5-7b_64k.json" > "$F/fsdp2_7b.log" 2>&1; tail -c 1500 "$F/fsdp2_7b.log"; step 7b
fi
# C. scaling 1 → 2 GPUs, Qwen2.5-1.5B shape at 32k (one 32k row per GPU per step)
if [ "$(left)" -gt 100 ]; then
  python3 bench/train_parallel.py --shape qwen2.5-1.5b --seq 32768 --steps 6 --out "$F/scale_1gpu.json" > "$F/scale_1.log" 2>&1
  AL --config_file configs/accelerate/ddp.yaml bench/train_parallel.py --shape qwen2.5-1.5b --seq 32768 --steps 6 --out "$F/scale_2gpu_ddp.json" > "$F/scale_ddp.log" 2>&1
  AL --config_file configs/accelerate/fsdp2.yaml bench/train_parallel.py --shape qwen2.5-1.5b --seq 32768 --steps 6 --out "$F/scale_2gpu_fsdp2.json" > "$F/scale_fsdp2.log" 2>&1
  tail -c 400 "$F/scale_1.log" "$F/scale_ddp.log" "$F/scale_fsdp2.log"; step scaling
fi
# D. resume after a kill (FSDP2, sharded checkpoints every 2 steps), then stage 5 loads the exported model
if [ "$(left)" -gt 60 ]; then
  R="$C --set train.max_steps=30 --set train.save_steps=2"
  AL --config_file configs/accelerate/fsdp2.yaml -m longalign_lib.cli train $R --run-dir $W/r_full > "$F/r_full.log" 2>&1
  port=$((port + 1))
  setsid python3 -m accelerate.commands.launch --num_processes 2 --main_process_port $port --config_file configs/accelerate/fsdp2.yaml \
      -m longalign_lib.cli train $R --run-dir $W/r_kill > "$F/r_kill.log" 2>&1 &
  pid=$!
  for _ in $(seq 2400); do [ -f $W/r_kill/checkpoints/checkpoint-4/trainer_state.json ] && break; sleep 0.05; done
  kill -9 -- -$pid 2>/dev/null; wait $pid 2>/dev/null
  echo "killed with: $(ls $W/r_kill/checkpoints) ; log rows $(wc -l < $W/r_kill/train_log.jsonl)" | tee "$F/r_kill_state.txt"
  AL --config_file configs/accelerate/fsdp2.yaml -m longalign_lib.cli train $R --run-dir $W/r_kill --resume > "$F/r_resume.log" 2>&1
  python3 bench/parallel_checks.py resume $W/r_full $W/r_kill --out "$F/resume.json" > /dev/null 2>&1; cat "$F/resume.json" | head -c 1500
  ls $W/r_kill/model | tee "$F/export_files.txt"
  python3 -m longalign_lib.cli needle --preset gpu-small --run-dir $W/r_kill --set "eval.needle_lengths=[1024,2048]" \
      --set "eval.needle_depths=[0.0,1.0]" > "$F/needle.log" 2>&1; tail -c 800 "$F/needle.log"; step resume_export_load
fi
# E. LoRA under FSDP2: adapters trained on sharded layers, exported merged
if [ "$(left)" -gt 25 ]; then
  AL --config_file configs/accelerate/fsdp2.yaml -m longalign_lib.cli train $C --run-dir $W/lora --set model.lora=true \
      --set train.max_steps=3 --set train.save_steps=0 --set train.lr=1e-3 > "$F/lora.log" 2>&1
  python3 -c "
import json; from longalign_lib.models import load_model_and_tokenizer as l
m, _ = l('$W/lora/model', dtype='fp32', device='cpu'); names = [n for n, _ in m.named_parameters()]
log = [json.loads(x) for x in open('$W/lora/train_log.jsonl')]
print(json.dumps({'lora_params_left': sum('lora' in n for n in names), 'params': len(names), 'loss': [r['loss'] for r in log]}))
" > "$F/lora.json" 2>>"$F/lora.log"; cat "$F/lora.json"; tail -c 400 "$F/lora.log"; step lora
fi
tar czf "$OUT/logs.tgz" -C "$OUT" files
echo "total $((SECONDS - t0)) s"
