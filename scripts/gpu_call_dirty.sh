#!/usr/bin/env bash
# One device call (carry .whl): is the order-dependent bf16 dQ mismatch a kernel reading freed
# memory?  gpu_dirty_memory_probe.py (each SDPA backend and anymask backend, clean vs dirty cached
# memory), then cuDNN's GPU tests and the core GPU checks with conftest's dirty_gpu_memory fixture.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:src || exit
nvidia-smi --query-gpu=name --format=csv,noheader | tee $OUT/gpu_name.txt
timeout ${PROBE_TIMEOUT:-170} python3 scripts/gpu_dirty_memory_probe.py ${PROBE_BACKENDS:-sdpa,cudnn,triton} 2>&1 | grep -v Warn > $OUT/dirty_probe.log
echo "probe rc $? wrong $(grep -c WRONG $OUT/dirty_probe.log) of $(grep -c out/dq $OUT/dirty_probe.log)"
grep WRONG $OUT/dirty_probe.log | head -60
timeout ${CUDNN_TIMEOUT:-170} python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_cudnn.py 2>&1 | tee $OUT/cudnn_gpu_tests.log | grep -E "^FAILED|passed|failed" | head -30
OUT=$OUT CORE_TIMEOUT=${CORE_TIMEOUT:-200} bash scripts/gpu_core_check.sh | grep -E "^FAILED|passed|failed" | head -30
