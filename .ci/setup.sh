#!/usr/bin/env bash
# One-step set-up on a fresh machine with only Python >= 3.10 and pip: a virtual environment in .venv,
# PyTorch (the CPU wheel where there is no NVIDIA driver; see DESIGN.md section 9), and this package with its
# test and bench extras, built in place (the optional C++/CUDA extension of csrc/ is compiled when a compiler is
# present; the package works without it). Safe to rerun: it only installs what is missing or outdated.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
VPY=.venv/bin/python
$VPY -m pip install -q --upgrade pip setuptools wheel >/dev/null
if ! $VPY -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    $VPY -m pip install -q "torch>=2.6"
  else
    # pinned so that pip takes the CPU build, never a multi-GB CUDA build
    $VPY -m pip install -q "torch==2.13.0"
  fi
fi
# reinstall (and rebuild the extension) only when the build inputs changed since the last set-up
stamp=.venv/.bagel-kernels-installed
if [ ! -f "$stamp" ] || [ -n "$(find pyproject.toml setup.py csrc -newer "$stamp" 2>/dev/null | head -n 1)" ]; then
  $VPY -m pip install -q --no-build-isolation -e ".[model,data,train,lora,tensorboard,demo,test,bench]"
  touch "$stamp"
fi
$VPY - <<'PY'
import torch, triton, bagel_kernels
print(f"set-up done: torch {torch.__version__}, triton {triton.__version__}, bagel_kernels {bagel_kernels.__version__}")
PY
