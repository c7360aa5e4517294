#!/usr/bin/env bash
# On a CUDA machine: every backend vs eager float64 on the GPU (the cuda-parametrised cases and the
# `gpu`-marked tests of the core backends), logged to $OUT/core_check.log.
set -uo pipefail
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}src"
log="${OUT:-.}/core_check.log"
python3 -c 'import torch; print(torch.__version__, torch.cuda.get_device_name())' | tee "$log"
python3 -m anymask info | tee -a "$log"
# Per-test limit (pytest-timeout, on the device image) so one slow test is named instead of the whole
# run being cut: on 2026-11-29 two runs stopped at 82-83% with no failure and no name.
per_test=()
python3 -c 'import pytest_timeout' 2>/dev/null && per_test=(--timeout "${TEST_TIMEOUT:-200}")  # fp32 flex compiles: 77 s
# Worker processes (pytest-xdist, on the device image): FlexAttention's compiles are CPU-bound and
# dominate (fp32 padding alone took 77 s on an H100); one process was cut by its limit at 49% on
# 2026-12-07 (nvidia-h100/checks-2026-12-07c). WORKERS=0 runs in one process.
python3 -c 'import xdist' 2>/dev/null && [[ ${WORKERS:-4} != 0 ]] && per_test+=(-n "${WORKERS:-4}")
timeout "${CORE_TIMEOUT:-300}" python3 -m pytest -q -rs -p no:cacheprovider --durations 15 "${per_test[@]}" \
  tests/test_backends_agree.py tests/test_flex.py tests/test_varlen.py tests/test_flash_xformers.py \
  -k "cuda or gpu" 2>&1 | tee -a "$log" | tail -40
