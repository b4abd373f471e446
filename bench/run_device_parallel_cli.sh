#!/usr/bin/env bash
# Issue 27 on 2 GPUs: each sharded combination through the product's own CLI, as a user types it,
#   accelerate launch --config_file configs/accelerate/<x>.yaml --num_processes 2 -m longalign_lib.cli train ...
# Combinations (COMBOS): fsdp2 (FSDP2 + the Liger kernels + `auto` checkpointing: the gpu-small defaults on CUDA),
# lora (LoRA under FSDP2), sp2 (train.sequence_parallel=2, sequence_parallel.yaml), zero3 (DeepSpeed ZeRO-3).
# Shapes (SHAPES): small = the real SmolLM2-135M of gpu-small at 16k; 7b = the Qwen2.5-7B shape, random init, 64k.
# For each: loss vs the single-process reference (bf16 tolerance below), tokens/s per GPU, MFU, peak memory per GPU
# (the log's fullest GPU + nvidia-smi per GPU), resume after kill -9 (vs the uninterrupted run), all into OUT.
#
# Usage (repo root, 2 GPUs; the offline SmolLM2 set up by `python3 -m longalign_lib.models`):
#   bash bench/run_device_parallel_cli.sh OUT [BUDGET_S]          (default 540 s: one device call is at most 600 s)
#   SHAPES=7b COMBOS="fsdp2 zero3" bash bench/run_device_parallel_cli.sh OUT 540     (split over several calls:
#   results append to OUT/results.jsonl, one JSON line per measurement, and OUT/table.md is rebuilt each time)
# DeepSpeed: if `import deepspeed` fails and .whl/deepspeed/*.whl exist (bench/README.md: how they were built), they
# are installed with --target $W/site first (no network needed). Without it the zero3 combination is skipped.
# Tolerance (bf16, docs/performance.md): step-1 loss within 1e-3 relative of the single process; step 2 (after one
# bf16 update) within 2e-3. The 7B reference cannot train full-size on one GPU (16 B/parameter of states = 122 GB
# before activations), so for 7b the loss check runs on the 7B width at REF7_LAYERS layers (default 4), the
# throughput, memory and kill -9 runs on the full 28 layers.
set -u
OUT=${1:?usage: run_device_parallel_cli.sh OUT [BUDGET_S]}
BUDGET=${2:-540}
SHAPES=${SHAPES:-small 7b}
COMBOS=${COMBOS:-fsdp2 lora sp2 zero3}
STEPS=${STEPS:-6}            # 7b throughput runs: median of steps 3.. (steps 1-2 warm up)
STEPS_SMALL=${STEPS_SMALL:-12}  # small: more steps, so that the kill -9 lands before the run ends
REF7_LAYERS=${REF7_LAYERS:-4}
ROOT=$(pwd)
W=${WORK:-/tmp/lpcli}
mkdir -p "$OUT/logs" "$W"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1  # no NVLink multicast
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
export LONGALIGN_HOME=${LONGALIGN_HOME:-$W/home}
R=$OUT/results.jsonl
L=$OUT/logs
t0=$SECONDS
left() { echo $((BUDGET - (SECONDS - t0))); }
port=$((29700 + RANDOM % 200))
note() { echo "[$((SECONDS - t0)) s] $*" | tee -a "$OUT/timeline.txt"; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"

# DeepSpeed from the carried wheels (pure Python: deepspeed 0.19.8 py3-none-any + 5 small dependencies)
if ! python3 -c "import deepspeed" 2>/dev/null && ls "$ROOT"/.whl/deepspeed/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target "$W/site" "$ROOT"/.whl/deepspeed/*.whl
fi
[ -d "$W/site" ] && export PYTHONPATH="$W/site:${PYTHONPATH:-}"
export PYTHONPATH="$ROOT:${PYTHONPATH:-}"
HAS_DS=$(python3 -c "import deepspeed; print(1)" 2>/dev/null || echo 0)
python3 -c "import torch, transformers, accelerate; print(torch.__version__, transformers.__version__, accelerate.__version__)" \
  | tee -a "$OUT/gpu.txt"
[ "$HAS_DS" = 1 ] && python3 -c "import deepspeed; print('deepspeed', deepspeed.__version__)" 2>/dev/null | tail -1 | tee -a "$OUT/gpu.txt"

# models and data (once per WORK dir): the offline SmolLM2, the 7B shape (config + SmolLM2's tokenizer), records
python3 -c "from longalign_lib.models import convert_bundled; convert_bundled(quiet=True)" > "$L/setup.log" 2>&1
python3 - "$W" "$REF7_LAYERS" >> "$L/setup.log" 2>&1 <<'EOF'
import sys
from pathlib import Path
sys.path.insert(0, "bench")
from train_throughput import SHAPES, model_config
from longalign_lib.io import write_jsonl
from longalign_lib.models import load_tokenizer
from longalign_lib.train import verse_lookup_records
w, ref_layers = Path(sys.argv[1]), int(sys.argv[2])
tok = load_tokenizer("smollm2-135m-instruct")
arch, h, _, heads, kv, inter, vocab, tied = SHAPES["qwen2.5-7b"]
SHAPES["qwen2.5-7b-ref"] = (arch, h, ref_layers, heads, kv, inter, vocab, tied)  # the 7B width, fewer layers
for name, shape in (("q7b", "qwen2.5-7b"), ("q7b_ref", "qwen2.5-7b-ref")):
    d = w / name
    if not (d / "config.json").exists():
        model_config(shape, 65536).save_pretrained(d)
        tok.save_pretrained(d)
if not (w / "verse16k.jsonl").exists():
    write_jsonl(w / "verse16k.jsonl", verse_lookup_records(240, 2000, 16000, seed=1))
if not (w / "verse64k.jsonl").exists():
    write_jsonl(w / "verse64k.jsonl", verse_lookup_records(160, 8000, 64000, long_fraction=0.9, seed=1))  # ≈ 2M tokens
EOF

# one monitored command: nvidia-smi samples memory.used per GPU every 0.5 s into $L/<name>.smi
mon() {  # mon NAME CAP_S CMD...
  local name=$1 cap=$2; shift 2
  local l; l=$(left); (( cap > l - 5 )) && cap=$((l - 5))
  if (( cap < 30 )); then note "SKIPPED (budget) $name"; echo "{\"skipped\": \"$name\"}" >> "$R"; return 1; fi
  nvidia-smi --query-gpu=index,memory.used --format=csv,noheader,nounits -lms 500 > "$L/$name.smi" 2>/dev/null &
  local smi=$!
  note "start $name (cap ${cap}s)"
  timeout -k 10 "$cap" "$@" > "$L/$name.log" 2>&1
  local rc=$?
  kill $smi 2>/dev/null; wait $smi 2>/dev/null
  note "end $name rc=$rc"
  return $rc
}
AL() { port=$((port + 1)); python3 -m accelerate.commands.launch --num_processes 2 --main_process_port $port "$@"; }
cli2() { local cfg=$1; shift; AL --config_file "configs/accelerate/$cfg" -m longalign_lib.cli train "$@"; }
cli1() { python3 -m longalign_lib.cli train "$@"; }

# summary of one run (+ its reference, + the resume check) as one JSON line
report() {  # report SHAPE COMBO RUN REF KILLED
  python3 - "$@" "$L" >> "$R" <<'EOF'
import json, statistics, sys
from pathlib import Path
shape, combo, run, ref, killed, logs = sys.argv[1:7]
def log(d):
    p = Path(d) / "train_log.jsonl"
    return [json.loads(x) for x in p.read_text().splitlines() if x.strip()] if p.exists() else []
out = {"shape": shape, "combo": combo, "run": run}
rows = log(run)
if rows:
    steady = rows[2:] or rows[1:] or rows
    med = lambda k: statistics.median(r.get(k, 0.0) for r in steady)
    out.update(steps=len(rows), engine=json.loads((Path(run) / "train_summary.json").read_text()).get("engine")
               if (Path(run) / "train_summary.json").exists() else None,
               tokens_per_s_per_gpu=round(med("tokens_per_s") / 2), mfu=round(med("mfu"), 4),
               step_s=round(med("step_s"), 3), peak_mem_gib_fullest=round(max(r.get("peak_mem_gib", 0) for r in rows), 2),
               kernels=rows[0].get("kernels"), ckpt=f"{rows[0].get('ckpt_layers')}/{rows[0].get('ckpt_of')} ({rows[0].get('ckpt_setting')})",
               loss=[round(r["loss"], 5) for r in rows])
smi = Path(logs) / (Path(run).name + ".smi")
if smi.exists():
    peak = {}
    for line in smi.read_text().splitlines():
        try:
            i, mib = (int(x) for x in line.split(","))
        except ValueError:
            continue
        peak[i] = max(peak.get(i, 0), mib)
    out["smi_peak_gib_per_gpu"] = [round(peak[i] / 1024, 1) for i in sorted(peak)]
if ref != "-":
    a, b = log(ref), log(run.replace("_perf", "_eq")) or rows
    if a and b:
        rel = [abs(x["loss"] - y["loss"]) / abs(x["loss"]) for x, y in zip(a[:2], b[:2])]
        out["vs_single"] = {"ref": ref, "ref_loss": [x["loss"] for x in a[:2]], "loss": [y["loss"] for y in b[:2]],
                            "rel_diff": rel, "within_bf16_tolerance": len(rel) == 2 and rel[0] <= 1e-3 and rel[1] <= 2e-3}
if killed != "-":
    k = log(killed)
    state = Path(killed) / "killed_state.txt"
    out["resume"] = {"killed_at": state.read_text().strip() if state.exists() else None, "steps": [len(rows), len(k)],
                     "loss_max_rel_diff": max((abs(x["loss"] - y["loss"]) / abs(x["loss"]) for x, y in zip(rows, k)),
                                              default=None),
                     "complete": len(k) == len(rows) and (Path(killed) / "model").exists()}
print(json.dumps(out))
EOF
  tail -1 "$R"
}

for shape in $SHAPES; do
  if [ "$shape" = small ]; then
    BASE="--preset gpu-small --set data.long_file=$W/verse16k.jsonl --set data.max_length=16384 --set batching.max_pack_tokens=16384"
    EQM=""; PERFM=""; CAP=150; N=$STEPS_SMALL
  else
    BASE="--preset gpu-small --set data.long_file=$W/verse64k.jsonl --set data.max_length=65536 --set batching.max_pack_tokens=65536 --set model.rope_base_factor=1 --set model.max_position_embeddings=65536"
    EQM="--set model.name=random:$W/q7b_ref"; PERFM="--set model.name=random:$W/q7b"; CAP=300; N=$STEPS
  fi
  C="$BASE --set batching.grad_accum=1 --set train.tensorboard=false --set train.warmup_ratio=0 --set train.lr=1e-4 --set train.epochs=1"
  for combo in $COMBOS; do
    case $combo in
      fsdp2) cfg=fsdp2.yaml; X="--set batching.world_size=2"; RX="$X" ;;
      lora)  cfg=fsdp2.yaml; X="--set batching.world_size=2 --set model.lora=true --set model.lora_dropout=0 --set train.lr=1e-3"; RX="$X" ;;
      sp2)   cfg=sequence_parallel.yaml; X="--set batching.world_size=1 --set train.sequence_parallel=2"; RX="--set batching.world_size=1" ;;
      zero3) cfg=zero3.yaml; X="--set batching.world_size=2"; RX="$X"
             if [ "$HAS_DS" != 1 ]; then note "zero3 skipped: no deepspeed"; echo "{\"skipped\": \"$shape zero3: deepspeed not importable\"}" >> "$R"; continue; fi ;;
      *) echo "unknown combo $combo"; continue ;;
    esac
    tag=${shape}_${combo}
    # 1. the single-process reference: 2 steps, one GPU running the plan's ranks one after another (cached per setting)
    refkey=${shape}_ref_$(echo "$RX" | md5sum | cut -c1-8)
    if [ ! -f "$W/$refkey/train_log.jsonl" ]; then
      if [ "$shape" = small ]; then M=""; else M=$EQM; fi
      CUDA_VISIBLE_DEVICES=0 mon "$refkey" $CAP cli1 $C $M $RX --run-dir "$W/$refkey" --set train.max_steps=2 --set train.save_steps=0 || true
    fi
    # 2. (7b) the same 2 steps on 2 GPUs with the reference's depth
    if [ "$shape" != small ]; then
      mon "${tag}_eq" $CAP cli2 $cfg $C $EQM $X --run-dir "$W/${tag}_eq" --set train.max_steps=2 --set train.save_steps=0 || true
    fi
    # 3. the uninterrupted run: throughput, MFU, memory (and, for small, the loss check on its first 2 steps)
    mon "${tag}_perf" $CAP cli2 $cfg $C $PERFM $X --run-dir "$W/${tag}_perf" --set train.max_steps=$N --set train.save_steps=0 || true
    # 4. kill -9 of the whole launch once checkpoint-2 exists, then --resume (checkpoints every 2 steps)
    K="$W/${tag}_kill"
    rm -rf "$K"
    if [ "$(left)" -gt $((CAP / 2 + 30)) ]; then
      port=$((port + 1))
      note "start ${tag}_kill"
      setsid python3 -m accelerate.commands.launch --num_processes 2 --main_process_port $port --config_file "configs/accelerate/$cfg" \
        -m longalign_lib.cli train $C $PERFM $X --run-dir "$K" --set train.max_steps=$N --set train.save_steps=2 \
        > "$L/${tag}_kill.log" 2>&1 &
      pid=$!
      for _ in $(seq $((CAP * 10))); do [ -f "$K/checkpoints/checkpoint-2/trainer_state.json" ] && break; sleep 0.1; done
      kill -9 -- -$pid 2>/dev/null; wait $pid 2>/dev/null
      echo "killed after $(ls "$K/checkpoints" 2>/dev/null | tr '\n' ' ')with $(wc -l < "$K/train_log.jsonl" 2>/dev/null) log rows" \
        | tee "$K/killed_state.txt"
      mon "${tag}_resume" $CAP cli2 $cfg $C $PERFM $X --run-dir "$K" --set train.max_steps=$N --set train.save_steps=2 --resume || true
      report "$shape" "$combo" "$W/${tag}_perf" "$W/$refkey" "$K"
    else
      report "$shape" "$combo" "$W/${tag}_perf" "$W/$refkey" -
    fi
  done
done

# OUT/table.md from every line so far
python3 - "$R" > "$OUT/table.md" <<'EOF'
import json, sys
rows = [json.loads(x) for x in open(sys.argv[1]) if x.strip()]
print("| shape | combination | engine | loss rel. diff vs 1 GPU (step 1, 2) | within bf16 tol. | tokens/s per GPU | MFU | "
      "peak GiB (fullest, log) | peak GiB per GPU (nvidia-smi) | kernels | checkpointing | resume after kill -9 |")
print("|---|---|---|---|---|---:|---:|---:|---|---|---|---|")
for r in rows:
    if "skipped" in r:
        print(f"| {r['skipped']} | skipped | | | | | | | | | | |")
        continue
    v, res = r.get("vs_single", {}), r.get("resume", {})
    rel = ", ".join(f"{x:.1e}" for x in v.get("rel_diff", []))
    rs = (f"{res.get('killed_at')}; resumed to {res['steps'][1]}/{res['steps'][0]} steps, max loss diff "
          f"{res.get('loss_max_rel_diff')}" if res else "not run")
    print(f"| {r['shape']} | {r['combo']} | {r.get('engine')} | {rel} | {v.get('within_bf16_tolerance')} | "
          f"{r.get('tokens_per_s_per_gpu')} | {100 * r.get('mfu', 0):.1f} % | {r.get('peak_mem_gib_fullest')} | "
          f"{r.get('smi_peak_gib_per_gpu')} | {r.get('kernels')} | {r.get('ckpt')} | {rs} |")
EOF
cat "$OUT/table.md"
tar czf "$OUT/logs.tgz" -C "$OUT" logs
note "total"
