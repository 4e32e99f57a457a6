#!/usr/bin/env bash
# The oldest Triton the package declares (3.6: what the GPU machines carry), next to the newest one that
# .venv holds (3.9): builds .venv-triton36 (git-ignored; reused while it matches the pins below and
# pyproject.toml/setup.py have not changed) with the on-disk CPU wheel of torch 2.13.0, triton 3.6.0 and
# numpy < 2.4 (triton 3.6's interpreter fails with numpy >= 2.4), installs this package into it without
# letting pip pull another torch build, then runs there:
#   1. python -m bagel_kernels.compile_check --report   every Triton kernel for sm_90 and sm_80, with the
#      resource checks (no spill inside a loop, shared memory within limits, tensor cores in attention loops)
#   2. the interpreter tests of the Triton kernels (attention, MoT ops, the dispatcher, the compile-check
#      unit tests; the model-level suites stay on the newest Triton to keep CI time in check)
# Run from anywhere; PYTHON picks the interpreter for the new environment (default python3).
# COMPILE_JSON_DIR: where compile_check writes its per-kernel JSON (for a merged report).
set -euo pipefail
cd "$(dirname "$0")/.."
TRITON_OLD=${TRITON_OLD:-3.6.0}
ENV=.venv-triton$(echo "${TRITON_OLD%.*}" | tr -d .)
PY=${PYTHON:-python3}
PINS=("torch==2.13.0" "triton==${TRITON_OLD}" "numpy<2.4")
key="${PINS[*]} $(cat pyproject.toml setup.py | sha1sum | cut -c1-16)"
t0=$(date +%s)
if [ ! -x "$ENV/bin/python" ] || [ "$(cat "$ENV/.bagel-kernels-env" 2>/dev/null)" != "$key" ]; then
  echo "triton_old: building $ENV (${PINS[*]})"
  rm -rf "$ENV"
  "$PY" -m venv "$ENV"
  "$ENV/bin/python" -m pip install -q --upgrade pip setuptools wheel >/dev/null
  cons=$(mktemp)
  printf '%s\n' "${PINS[@]}" > "$cons"
  # torch first, alone and pinned: pip takes the CPU wheel on disk, never a multi-GB CUDA build
  "$ENV/bin/python" -m pip install -q "torch==2.13.0"
  "$ENV/bin/python" -m pip install -q -c "$cons" "triton==${TRITON_OLD}" "numpy<2.4"
  # the package (editable; the compiled extension is optional and already built in place by .venv's
  # set-up, so it is not rebuilt here) with its test dependencies, under the same pins
  BAGEL_KERNELS_SKIP_EXT=1 "$ENV/bin/python" -m pip install -q -c "$cons" --no-build-isolation -e ".[test]"
  rm -f "$cons"
  echo "$key" > "$ENV/.bagel-kernels-env"
else
  echo "triton_old: reusing $ENV"
fi
"$ENV/bin/python" - <<'PY'
import numpy, torch, triton
print(f"triton_old: torch {torch.__version__}, triton {triton.__version__}, numpy {numpy.__version__}")
PY
echo "triton_old: environment ready in $(( $(date +%s) - t0 )) s"

t1=$(date +%s)
json=()
if [ -n "${COMPILE_JSON_DIR:-}" ]; then
  mkdir -p "$COMPILE_JSON_DIR"
  json=(--json "$COMPILE_JSON_DIR/compile_check_triton${TRITON_OLD}.json")
fi
env -u TRITON_INTERPRET TRITON_DEFAULT_FP_FUSION=1 "$ENV/bin/python" -m bagel_kernels.compile_check --report "${json[@]}"
echo "triton_old: compile check in $(( $(date +%s) - t1 )) s"

t2=$(date +%s)
"$ENV/bin/python" -m pytest -q -p no:cacheprovider \
  tests/test_attention_triton.py tests/test_mot.py tests/test_mot_triton.py tests/test_attention.py \
  tests/test_compile_sm90.py tests/test_linear_cross_entropy.py -m "not slow"
echo "triton_old: interpreter tests in $(( $(date +%s) - t2 )) s"
