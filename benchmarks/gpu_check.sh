#!/usr/bin/env bash
# One GPU session's worth of checks, within a fixed time budget (default 8 minutes on one H100/H200):
#     bash benchmarks/gpu_check.sh OUTDIR [--full] [--dry-run]
# Steps, in this order, each under its own time limit (and never past the overall budget TOTAL_S;
# a step that would start too late is skipped and recorded so):
#   1. machine            GPU, torch, triton, commit
#   2. install            offline `pip install -v -e .` with BAGEL_KERNELS_REQUIRE_EXT=1 and
#                         BAGEL_KERNELS_REQUIRE_CUDA=1 (a failed CUDA kernel fails the step; the log is
#                         OUTDIR/pip_install.log; extension_status() with the build record is printed)
#   3. compile check      every Triton kernel for this GPU's architecture, resource table
#   4. tune               benchmarks/tune_attention.py: tile sweep for the forward, the two-program and the
#                         one-pass backward at the LLM and SigLIP pack shapes (the forward also with TMA on
#                         the SigLIP layout); each entry records which backward was faster and sets
#                         onepass=1 where the one-pass one wins (the default backward of deterministic=False,
#                         decided by this measurement); the table goes to OUTDIR/attention_tuned.json (commit
#                         it as bagel_kernels/attention_tuned.json) and every later step uses it
#                         (BAGEL_KERNELS_ATTN_TABLE)
#   5. benchmarks         bench_attention (both backward variants timed alone and with the forward, TMA, the
#                         SigLIP head-dim split against the padded kernel of before, flex with prebuilt and
#                         per-pack masks, and the goals of issue 15 next to the measured numbers),
#                         bench_model (with the MFU run), then the GPU tests, bench_mot, the equivalence
#                         report, bench_patch_embed, bench_mask
# OUTDIR gets, as it goes: gpu_check.log (everything printed), steps.tsv (status and seconds of every
# step), pip_install.log, compile_check.json, attention_tuned.json, results_partial.md; at the end
# results.md (all tables + versions + commit + the step table) and one PNG per benchmark.
# No network is needed (torch and triton preinstalled). --full runs the long benchmark variants.
# --dry-run (or DRY_RUN=1): on a machine without a GPU, the same sequence with CPU stand-ins (no
# install, a one-kernel compile check, tuning with --dry-run under the Triton interpreter) to check
# the script itself. Knobs: TOTAL_S (480), SKIP_INSTALL=1, SKIP_COMPILE_CHECK=1, BENCHES, LATE_BENCHES,
# PYTHON, MAX_JOBS.
set -u
OUT=${1:?usage: bash benchmarks/gpu_check.sh OUTDIR [--full] [--dry-run]}
shift
QUICK=--quick
DRY=${DRY_RUN:-}
for a in "$@"; do
  case "$a" in
    --full) QUICK= ;;
    --dry-run) DRY=1 ;;
    *) echo "unknown option $a"; exit 2 ;;
  esac
done
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
LOG="$OUT/gpu_check.log"
exec > >(tee -a "$LOG") 2>&1
export PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=${TRITON_DEFAULT_FP_FUSION:-1}
PY=${PYTHON:-python3}
WORK=$(mktemp -d)
mkdir -p "$WORK/bench"
TOTAL_S=${TOTAL_S:-480}
t0=$(date +%s)
FAILED=0
printf 'step\tstatus\tseconds\tlimit_s\n' > "$OUT/steps.tsv"
[ -n "$DRY" ] && echo "gpu_check: DRY RUN (CPU stand-ins; no number from this run is a GPU measurement)"

elapsed() { echo $(( $(date +%s) - t0 )); }
# run_step NAME CAP_S CMD...: runs CMD under min(CAP_S, time left - 10 s); records status and time
run_step() {
  local name=$1 cap=$2
  shift 2
  local left=$(( TOTAL_S - $(elapsed) - 10 ))
  local limit=$(( cap < left ? cap : left ))
  echo
  echo "=== [$(elapsed)s] $name (limit ${limit}s)"
  if [ "$limit" -lt 15 ]; then
    echo "$name: SKIPPED (time budget of ${TOTAL_S}s spent)"
    printf '%s\tskipped (budget)\t0\t%s\n' "$name" "$limit" >> "$OUT/steps.tsv"
    return 0
  fi
  local s=$(date +%s) rc=0 status=ok
  # through bash -c, so that CMD may be one of the functions below (exported)
  timeout "$limit" bash -c '"$@"' _ "$@" || rc=$?
  if [ $rc -eq 124 ]; then status="TIMEOUT"; FAILED=1; elif [ $rc -ne 0 ]; then status="FAILED (exit $rc)"; FAILED=1; fi
  echo "$name: $status in $(( $(date +%s) - s ))s"
  printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$(( $(date +%s) - s ))" "$limit" >> "$OUT/steps.tsv"
  # keep what is done so far, in case a later step is cut off
  cp "$WORK"/bench/*.png "$OUT"/ 2>/dev/null || true
  cat "$WORK"/bench/*.md > "$OUT/results_partial.md" 2>/dev/null || true
  return 0
}

echo "=== [$(elapsed)s] machine"
nvidia-smi -L 2>/dev/null || echo "no nvidia-smi"
$PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"
COMMIT=${BAGEL_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}
export BAGEL_COMMIT=$COMMIT
echo "commit $COMMIT"
ARCH=$($PY -c "import torch; c = torch.cuda.get_device_capability() if torch.cuda.is_available() else (9, 0); print(90 if c[0] >= 9 else 80)")

install() {
  if BAGEL_KERNELS_REQUIRE_EXT=1 BAGEL_KERNELS_REQUIRE_CUDA=1 MAX_JOBS=${MAX_JOBS:-16} \
      $PY -m pip install -v --no-deps --no-build-isolation --no-index -e . >"$OUT/pip_install.log" 2>&1; then
    grep -E "\[bagel-kernels setup\]" "$OUT/pip_install.log" | tail -n 12
  else
    echo "INSTALL FAILED (the CUDA kernel is required); the build's messages:"
    grep -E "\[bagel-kernels setup\]|error|Error" "$OUT/pip_install.log" | tail -n 40
    echo "building the CPU kernel in place so that the remaining steps run from the source tree"
    MAX_JOBS=${MAX_JOBS:-16} $PY setup.py build_ext --inplace >>"$OUT/pip_install.log" 2>&1 | tail -n 3
    return 1
  fi
}
ext_status() {
  $PY - <<'PY'
from bagel_kernels import patch_embed
st = patch_embed.extension_status()
print("patch_embed extension:", st)
raise SystemExit(0 if st.cuda else 1)
PY
}
bench() {
  [ -f "benchmarks/bench_$1.py" ] || { echo "no benchmarks/bench_$1.py"; return 0; }
  local extra=()
  [ -n "$DRY" ] && [ "$1" = mask ] && extra=(--sizes 1024 --no-compile)  # the CPU stand-in stays short
  $PY "benchmarks/bench_$1.py" $QUICK --out "$WORK/bench" "${extra[@]}"
}
export -f install ext_status bench
export PY OUT WORK QUICK DRY

if [ -n "$DRY" ] || [ -n "${SKIP_INSTALL:-}" ]; then
  echo; echo "=== [$(elapsed)s] install: skipped (${DRY:+dry run}${SKIP_INSTALL:+SKIP_INSTALL})"
  printf 'install\tskipped\t0\t0\n' >> "$OUT/steps.tsv"
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
  $PY -c "from bagel_kernels import patch_embed; print('patch_embed extension:', patch_embed.extension_status())"
else
  run_step install 180 install
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
  run_step "CUDA extension present" 30 ext_status
fi

if [ -z "${SKIP_COMPILE_CHECK:-}" ]; then
  if [ -n "$DRY" ]; then
    run_step "compile check" 120 env -u TRITON_INTERPRET $PY -m bagel_kernels.compile_check --arch 90 \
      --module bagel_kernels.attention_triton --only attn_fwd_bf16_d72 --report --json "$OUT/compile_check.json"
  else
    run_step "compile check (sm_$ARCH)" 60 env -u TRITON_INTERPRET $PY -m bagel_kernels.compile_check \
      --arch "$ARCH" --report --json "$OUT/compile_check.json"
  fi
fi

# tuning first; everything after it runs with the tuned table
TUNE_S=${TUNE_S:-150}
run_step "tune attention tiles" "$TUNE_S" $PY benchmarks/tune_attention.py ${DRY:+--dry-run} \
  --out "$OUT/attention_tuned.json" --md "$WORK/bench/tune_attention.md" --budget-s $(( TUNE_S - 35 ))
if [ -f "$OUT/attention_tuned.json" ]; then
  export BAGEL_KERNELS_ATTN_TABLE="$OUT/attention_tuned.json"
  echo "later steps read the tile table $BAGEL_KERNELS_ATTN_TABLE"
fi

cap_of() { case "$1" in attention) echo 130;; model) echo 170;; mot|mask) echo 60;; *) echo 40;; esac; }

for b in ${BENCHES-attention model}; do run_step "bench_$b" "$(cap_of "$b")" bench "$b"; done

if [ -n "$DRY" ]; then
  printf 'GPU tests\tskipped (dry run)\t0\t0\n' >> "$OUT/steps.tsv"
  printf 'equivalence report\tskipped (dry run)\t0\t0\n' >> "$OUT/steps.tsv"
  echo; echo "=== [$(elapsed)s] GPU tests and the equivalence report: skipped (dry run: they need CUDA)"
else
  run_step "GPU tests" "${GPU_TEST_TIMEOUT:-100}" $PY -m pytest -m gpu -q -rfE -p no:cacheprovider tests
fi
for b in ${LATE_BENCHES-mot}; do run_step "bench_$b" "$(cap_of "$b")" bench "$b"; done
[ -z "$DRY" ] && run_step "equivalence report" 40 $PY -m bagel_kernels.check --device cuda --dtype bf16
for b in ${LAST_BENCHES-patch_embed mask}; do run_step "bench_$b" "$(cap_of "$b")" bench "$b"; done

echo; echo "=== [$(elapsed)s] collect"
{
  echo "# GPU check results${DRY:+ (DRY RUN on CPU: not GPU measurements)}"
  echo
  echo "- card: $($PY -c 'import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU")' 2>/dev/null)"
  echo "- commit: $COMMIT"
  echo "- versions: $($PY -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)' 2>/dev/null)"
  echo "- command: bash benchmarks/gpu_check.sh OUTDIR $*"
  echo "- attention tiles: ${BAGEL_KERNELS_ATTN_TABLE:-package table} (tuned table copied to OUTDIR/attention_tuned.json)"
  echo
  echo "| step | status | seconds | limit s |"
  echo "|---|---|---|---|"
  tail -n +2 "$OUT/steps.tsv" | awk -F'\t' '{print "| " $1 " | " $2 " | " $3 " | " $4 " |"}'
  echo
  for f in "$WORK"/bench/tune_attention.md "$WORK"/bench/bench_*.md; do [ -f "$f" ] && cat "$f" && echo; done
} > "$OUT/results.md"
cp "$WORK"/bench/*.png "$OUT"/ 2>/dev/null || true
rm -f "$OUT/results_partial.md"
echo "done in $(elapsed) s (budget ${TOTAL_S} s); results in $OUT; $([ $FAILED -eq 0 ] && echo 'every step ok' || echo 'SOME STEPS FAILED: see steps.tsv')"
exit $FAILED
