#!/usr/bin/env bash
# jfig's speed benchmarks on one GPU, on a machine that has jax (CUDA), torch (CUDA) and transformers
# but neither the default model's GGUF file nor a package registry. Run from the repository root:
#
#   bash benchmarks/run_gpu.sh                                  # GPU sizes, at most BUDGET_S seconds
#   SIZES=tiny OUT=/tmp/gpu_out bash benchmarks/run_gpu.sh      # every step at toy sizes (a CPU check)
#
# Steps: install the wheels in .whl/ (jfig's dependencies that machine lacks: gguf, penzai, powerlaw,
# igraph, leidenalg, texttable, ordered-set) into $SITE without a registry; print the machine and
# versions; write a random-weight checkpoint of SmolLM2-135M's shape (benchmarks/random_checkpoint.py)
# to $CKPT; then bench_clamp (jfig against PyTorch hook loops on CUDA, answers checked equal),
# bench_forward, bench_atlas and, if time is left, bench_clamp again at exact float32 (no TF32) as
# the strict check of the answers. Every step runs under `timeout`, within what is left of BUDGET_S;
# everything printed goes to $OUT/gpu_bench.log (and each step's own output to $OUT/<step>.log), and
# a summary closes the log. Exit status: 0 when every step ran and passed, 1 otherwise.
#
# Environment: OUT (default /tmp/out), SIZES (gpu | tiny; default gpu), BUDGET_S (default 400),
# CKPT (default /tmp/ckpt), SITE (default /tmp/site), WHEELS (default .whl), SKIP_WHEELS=1 (use the
# packages already installed), ALLOW_CPU=1 (run the GPU sizes even when jax sees no GPU), PYTHON.
set -uo pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:-/tmp/out}
SIZES=${SIZES:-gpu}
BUDGET_S=${BUDGET_S:-400}
CKPT=${CKPT:-/tmp/ckpt}
SITE=${SITE:-/tmp/site}
WHEELS=${WHEELS:-.whl}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
LOG="$OUT/gpu_bench.log"

export XLA_PYTHON_CLIENT_PREALLOCATE=false      # jax allocates as it goes, so torch can share the GPU
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false MPLBACKEND=Agg
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore

case "$SIZES" in
  gpu)
    CLAMP=(--sources 128 --inputs 32 --seq 64 --d-sae 4096 --torch-budget 60)
    FORWARD=(--batch 32 --seq 128 --reps 5 --sources 32)
    ATLAS=(--batch 32 --seq 128 --batches 8 --methods dense,sparse)
    EXACT=(--sources 16 --inputs 8 --seq 64 --d-sae 4096 --precision highest)
    ;;
  tiny)
    CLAMP=(--sources 4 --inputs 2 --seq 16 --d-sae 512 --torch-budget 20)
    FORWARD=(--batch 2 --seq 16 --reps 2 --sources 4)
    ATLAS=(--batch 2 --seq 16 --batches 2 --d-sae 512 --methods dense,sparse)
    EXACT=(--sources 2 --inputs 2 --seq 16 --d-sae 512 --precision highest)
    ;;
  *) echo "SIZES must be gpu or tiny, got $SIZES" >&2; exit 2 ;;
esac

NAMES=(); STATUS=(); SECS=()

# step NAME CAP_SECONDS MIN_SECONDS COMMAND...: run COMMAND under timeout, for at most CAP_SECONDS and
# what is left of the budget; skipped when less than MIN_SECONDS are left.
step() {
  local name=$1 cap=$2 min=$3; shift 3
  local left=$((BUDGET_S - SECONDS - 5)) lim rc t0
  lim=$(( cap < left ? cap : left ))
  echo
  echo "=== $name ($(date -u +%H:%M:%S), ${SECONDS} s in, limit ${lim} s): $*"
  if (( lim < min )); then
    echo "skipped: ${left} s of the ${BUDGET_S} s budget left, the step needs at least ${min} s"
    NAMES+=("$name"); STATUS+=("skipped (out of time)"); SECS+=(0)
    return 0
  fi
  t0=$SECONDS
  timeout -k 5 "$lim" "$@" 2>&1 | tee "$OUT/$name.log"
  rc=${PIPESTATUS[0]}
  NAMES+=("$name"); SECS+=($((SECONDS - t0)))
  case $rc in
    0) STATUS+=("ok") ;;
    124|137) STATUS+=("TIMED OUT after ${lim} s") ;;
    *) STATUS+=("FAILED (exit $rc)") ;;
  esac
  return 0
}

main() {
  echo "jfig GPU benchmarks: sizes $SIZES, budget ${BUDGET_S} s, output $OUT, started $(date -u '+%Y-%m-%d %H:%M:%S') UTC"
  echo "commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo ' (with uncommitted changes)')"

  if [[ "${SKIP_WHEELS:-0}" != 1 ]] && compgen -G "$WHEELS/*.whl" >/dev/null; then
    echo "installing $(ls "$WHEELS"/*.whl | wc -l) wheels from $WHEELS into $SITE"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$WHEELS"/*.whl \
      || echo "WARNING: the wheel install failed; importing jfig may fail below"
    export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
  else
    echo "no wheel install (SKIP_WHEELS=${SKIP_WHEELS:-0}; wheels in $WHEELS: $(ls "$WHEELS"/*.whl 2>/dev/null | wc -l))"
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
  fi

  echo
  echo "=== machine"
  if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi -L
    nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv,noheader
  else
    echo "no nvidia-smi"
  fi
  echo "cpu cores: $(nproc); memory: $(free -g 2>/dev/null | awk '/^Mem:/ {print $2 " GiB"}')"
  local require_gpu=0
  [[ "$SIZES" == gpu && "${ALLOW_CPU:-0}" != 1 ]] && require_gpu=1
  REQUIRE_GPU=$require_gpu timeout -k 5 120 "$PY" - <<'EOF'
import os, platform, sys
import jax, jaxlib
print(f"python {platform.python_version()}; jax {jax.__version__} (jaxlib {jaxlib.__version__}); "
      f"backend {jax.default_backend()}; devices {jax.devices()}")
try:
    import torch
    cuda = torch.cuda.is_available()
    print(f"torch {torch.__version__}; cuda available {cuda}"
          + (f" ({torch.cuda.get_device_name(0)}, CUDA {torch.version.cuda})" if cuda else ""))
except Exception as e:  # the torch comparison will say the same; the jax benchmarks still run
    print(f"torch: {type(e).__name__}: {e}")
import transformers
print(f"transformers {transformers.__version__}")
import jfig
print(f"jfig {jfig.__version__} from {jfig.__file__}")
carried = ("gguf", "penzai", "powerlaw", "igraph", "leidenalg", "texttable", "ordered_set")
print("jfig's dependencies: " + ", ".join(f"{m} {getattr(sys.modules[m], '__file__', '?')}" for m in carried
                                          if m in sys.modules))
if os.environ.get("REQUIRE_GPU") == "1" and jax.default_backend() != "gpu":
    sys.exit(3)
EOF
  local rc=$?
  if (( rc == 3 )); then
    echo "ABORT: jax sees no GPU, so the GPU sizes would only time a CPU (ALLOW_CPU=1 runs them anyway)"
    return 1
  elif (( rc != 0 )); then
    echo "ABORT: the environment check failed (exit $rc): jax, transformers or jfig does not import"
    return 1
  fi

  step checkpoint 180 30 "$PY" benchmarks/random_checkpoint.py "$CKPT" --reuse
  if [[ "${STATUS[-1]}" != ok ]]; then
    echo "ABORT: no checkpoint in $CKPT"
    summary
    return 1
  fi
  step bench_clamp 210 60 "$PY" benchmarks/bench_clamp.py --model "$CKPT" "${CLAMP[@]}"
  step bench_forward 100 40 "$PY" benchmarks/bench_forward.py --model "$CKPT" "${FORWARD[@]}"
  step bench_atlas 150 50 "$PY" benchmarks/bench_atlas.py --model "$CKPT" "${ATLAS[@]}"
  step bench_clamp_exact 90 50 "$PY" benchmarks/bench_clamp.py --model "$CKPT" "${EXACT[@]}"
  summary
}

summary() {
  echo
  echo "=== summary (sizes $SIZES, ${SECONDS} s in all, budget ${BUDGET_S} s)"
  local i failed=0
  for i in "${!NAMES[@]}"; do
    printf '%-20s %-28s %5s s\n' "${NAMES[$i]}" "${STATUS[$i]}" "${SECS[$i]}"
    [[ "${STATUS[$i]}" == ok ]] || failed=1
  done
  for i in "${!NAMES[@]}"; do
    local f="$OUT/${NAMES[$i]}.log"
    [[ "${NAMES[$i]}" == checkpoint || ! -s "$f" ]] && continue
    echo
    echo "--- ${NAMES[$i]}: ${STATUS[$i]}"
    if grep -q '^machine:' "$f"; then
      sed -n '/^machine:/,$p' "$f"
    else
      tail -n 8 "$f"
    fi
    grep -E '^(check |PyTorch: )' "$f" || true
  done
  echo
  if (( failed )); then echo "RESULT: some steps did not pass (see above)"; else echo "RESULT: all steps passed"; fi
  return $failed
}

main 2>&1 | tee "$LOG"
exit "${PIPESTATUS[0]}"
