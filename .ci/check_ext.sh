#!/usr/bin/env bash
# Compile the CUDA sources of csrc/ with `nvcc -c` against torch's headers, for sm_90, so CUDA syntax
# and type errors fail CI on machines without a GPU (a CPU torch has the headers but no CUDA
# libraries: the objects compile, they cannot be linked or run). Run from the repository root with
# the project's Python environment active (or PYTHON=/path/to/python). Exits 0 with a message when
# nvcc is absent.
#
# Environment: PYTHON (default: python), NVCC (default: nvcc on PATH), CHECK_EXT_ARCH (default: sm_90),
# CHECK_EXT_STD (default: c++17), CHECK_EXT_VERBOSE=1 prints ptxas register/spill usage.
set -euo pipefail

PYTHON="${PYTHON:-python}"
NVCC="${NVCC:-$(command -v nvcc || true)}"
ARCH="${CHECK_EXT_ARCH:-sm_90}"
STD="${CHECK_EXT_STD:-c++17}"

if [[ -z "${NVCC}" ]]; then
    echo "check_ext: SKIP: nvcc not found on PATH; the CUDA sources of csrc/ were not compiled"
    exit 0
fi

mapfile -t SOURCES < <(find csrc -name '*.cu' | sort)
if [[ ${#SOURCES[@]} -eq 0 ]]; then
    echo "check_ext: no .cu sources under csrc/"
    exit 1
fi

# Torch's include directories and C++ ABI flag, as torch.utils.cpp_extension would pass them.
mapfile -t TORCH_FLAGS < <("${PYTHON}" - <<'EOF'
import torch
from torch.utils import cpp_extension

for path in cpp_extension.include_paths():
    print(f"-I{path}")
abi = getattr(torch._C, "_GLIBCXX_USE_CXX11_ABI", None)
if abi is not None:
    print(f"-D_GLIBCXX_USE_CXX11_ABI={int(abi)}")
EOF
)

CUDA_ROOT="$(dirname "$(dirname "$(readlink -f "${NVCC}")")")"
OUT_DIR="$(mktemp -d)"
trap 'rm -rf "${OUT_DIR}"' EXIT

FLAGS=(
    -c -std="${STD}" -arch="${ARCH}" -O2
    "${TORCH_FLAGS[@]}" -I"${CUDA_ROOT}/include" -Icsrc
    # The defines torch.utils.cpp_extension adds to every CUDA extension.
    -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__
    -D__CUDA_NO_HALF2_OPERATORS__ --expt-relaxed-constexpr
    -DTORCH_API_INCLUDE_EXTENSION_H -DTORCH_EXTENSION_NAME=_C
    # A CPU torch lacks the generated c10/cuda/impl/cuda_cmake_macros.h; a CUDA torch has it.
    -DC10_CUDA_NO_CMAKE_CONFIGURE_FILE
    -Xcompiler -fPIC
    # torch 2.13's headers use a few C++20 extensions (default bit-field initialisers) that C++17
    # compilers accept with a warning; torch's own extension builds use C++20 there.
    -Xcompiler -Wno-c++20-extensions -diag-suppress=3306
)
if [[ "${CHECK_EXT_VERBOSE:-0}" == "1" ]]; then
    FLAGS+=(--resource-usage)
fi

echo "check_ext: $("${NVCC}" --version | tail -n 1)"
status=0
for src in "${SOURCES[@]}"; do
    obj="${OUT_DIR}/$(basename "${src}").o"
    echo "check_ext: nvcc -c ${src} (-arch=${ARCH} -std=${STD})"
    if ! "${NVCC}" "${FLAGS[@]}" "${src}" -o "${obj}"; then
        echo "check_ext: FAIL: ${src}"
        status=1
    fi
done
if [[ ${status} -eq 0 ]]; then
    echo "check_ext: OK: ${#SOURCES[@]} CUDA source(s) compiled for ${ARCH}"
fi
exit ${status}
