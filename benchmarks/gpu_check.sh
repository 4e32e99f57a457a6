#!/usr/bin/env bash
# One GPU session's worth of checks: install offline, run the GPU tests, the equivalence report and the
# benchmarks, and write everything under OUTDIR:
#     bash benchmarks/gpu_check.sh OUTDIR [--full]
# OUTDIR gets: gpu_check.log (everything printed), results.md (all benchmark tables + versions + commit),
# and one PNG per benchmark. Made for one H100/H200 with torch and triton preinstalled and no network;
# every step has its own time limit so one failure cannot eat the session. --full runs the long variants.
set -u
OUT=${1:?usage: bash benchmarks/gpu_check.sh OUTDIR [--full]}
QUICK=--quick
[ "${2:-}" = "--full" ] && QUICK=
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
LOG="$OUT/gpu_check.log"
exec > >(tee -a "$LOG") 2>&1
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
WORK=$(mktemp -d)
t0=$(date +%s)
step() { echo; echo "=== [$(( $(date +%s) - t0 ))s] $*"; }

step "machine"
nvidia-smi -L || true
$PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, torch.cuda.get_device_name())"
COMMIT=${BAGEL_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}
echo "commit $COMMIT"

if [ -z "${SKIP_INSTALL:-}" ]; then
step "install (offline, builds the CUDA extension)"
if MAX_JOBS=${MAX_JOBS:-16} timeout 300 $PY -m pip install --no-deps --no-build-isolation --no-index -e . >"$WORK/pip.log" 2>&1; then
  grep -i -E "bagel-kernels|extension|cuda" "$WORK/pip.log" | tail -n 15
else
  tail -n 40 "$WORK/pip.log"
  echo "pip install failed: building the extension in place and running from the source tree"
  MAX_JOBS=${MAX_JOBS:-16} timeout 300 $PY setup.py build_ext --inplace 2>&1 | tail -n 5
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
fi
$PY - <<'PY'
try:
    from bagel_kernels import patch_embed
    print("patch_embed extension:", getattr(patch_embed, "extension_status", lambda: getattr(patch_embed, "EXTENSION_STATUS", "?"))())
except Exception as exc:
    print("patch_embed import failed:", exc)
PY

if [ -z "${SKIP_COMPILE_CHECK:-}" ]; then
  step "compile check (sm_90, no launch)"
  timeout 120 $PY -m bagel_kernels.compile_check || echo "compile check FAILED"
fi

mkdir -p "$WORK/bench"
run_bench() {
  if [ -f "benchmarks/bench_$1.py" ]; then
    step "bench_$1"
    timeout ${BENCH_TIMEOUT:-150} $PY "benchmarks/bench_$1.py" $QUICK --out "$WORK/bench" || echo "bench_$1 FAILED (or timed out)"
    # keep what is done so far, in case a later step is cut off
    cp "$WORK"/bench/*.png "$OUT"/ 2>/dev/null || true
    cat "$WORK"/bench/*.md > "$OUT/results_partial.md" 2>/dev/null || true
  fi
}

for b in ${BENCHES-attention mot}; do run_bench "$b"; done

step "GPU tests"
timeout ${GPU_TEST_TIMEOUT:-240} $PY -m pytest -m gpu -q -rfE -p no:cacheprovider tests || echo "GPU tests FAILED (or timed out)"

step "equivalence report on the GPU"
timeout 120 $PY -m bagel_kernels.check --device cuda --dtype bf16 || echo "check reported failures"

for b in ${LATE_BENCHES-patch_embed model mask}; do run_bench "$b"; done

step "collect"
{
  echo "# GPU check results"
  echo
  echo "- card: $($PY -c 'import torch; print(torch.cuda.get_device_name())' 2>/dev/null)"
  echo "- commit: $COMMIT"
  echo "- versions: $($PY -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)' 2>/dev/null)"
  echo "- command: bash benchmarks/gpu_check.sh OUTDIR ${2:-}"
  echo
  for f in "$WORK"/bench/*.md; do [ -f "$f" ] && cat "$f" && echo; done
} > "$OUT/results.md"
cp "$WORK"/bench/*.png "$OUT"/ 2>/dev/null || true
rm -f "$OUT/results_partial.md"
echo "done in $(( $(date +%s) - t0 )) s; results in $OUT"
