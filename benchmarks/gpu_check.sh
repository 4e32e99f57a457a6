#!/usr/bin/env bash
# One GPU lend in two phases, each one command of about 5 minutes (benchmarks/gpu_check.py does the work):
#     bash benchmarks/gpu_check.sh --phase correct OUT    install (CUDA kernel required), GPU tests, equivalence
#                                                         report, quick attention rows
#     bash benchmarks/gpu_check.sh --phase fast OUT       tuning, model MFU, MoT, attention, patch embedding, mask
#                                                         (reuses the install of a still-warm machine)
#     ... --dry-run        the same sequence with CPU stand-ins, to check the script without a GPU
#     ... --plan           the time plan and the file rule; nothing runs (no OUT needed)
#     ... --compile-check  (correct) also compile every Triton kernel for this GPU
# OUT receives at most 6 files: {phase}_results.md, {phase}_steps.tsv, {phase}_log.txt, {phase}_raw.json,
# {phase}_plots.png, and (fast) attention_tuned.json. Set BAGEL_COMMIT=<sha> where the tree has no .git.
# PYTHON picks the interpreter (default python3); GPU_TEST_WORKERS the pytest-xdist workers (default 4).
exec "${PYTHON:-python3}" "$(dirname "$0")/gpu_check.py" "$@"
