#!/usr/bin/env bash
# One device call (carry .whl) on the order-dependent bf16 dQ mismatch: tests/test_sdpa_gpu.py with
# anymask's guard (masked SDPA kept off PyTorch's cuDNN kernel) and with it undone;
# gpu_dirty_memory_probe.py (each SDPA kernel and anymask backend, clean vs dirty cached memory);
# then cuDNN's GPU tests and the core GPU checks, with conftest's dirty_gpu_memory fixture.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:src || exit
nvidia-smi --query-gpu=name --format=csv,noheader | tee $OUT/gpu_name.txt
echo "== sdpa with a mask tensor: anymask's guard, then the guard undone (must fail where cuDNN is wrong)"
timeout 60 python3 -m pytest -q -p no:cacheprovider tests/test_sdpa_gpu.py 2>&1 | tee $OUT/sdpa_gpu_tests.log | tail -3
timeout 60 python3 scripts/gpu_sdpa_cudnn_mutation.py 2>&1 | tee $OUT/sdpa_gpu_tests_cudnn_allowed.log | grep -E "^E .*(off by|error|non-finite)|passed|failed" | head -8
timeout ${PROBE_TIMEOUT:-90} python3 scripts/gpu_dirty_memory_probe.py ${PROBE_BACKENDS:-sdpa,cudnn,triton} 2>&1 | grep -v Warn > $OUT/dirty_probe.log
echo "probe rc $? wrong $(grep -c WRONG $OUT/dirty_probe.log) of $(grep -c out/dq $OUT/dirty_probe.log)"
grep WRONG $OUT/dirty_probe.log | head -60
timeout ${CUDNN_TIMEOUT:-120} python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_cudnn.py 2>&1 | tee $OUT/cudnn_gpu_tests.log | grep -E "^FAILED|passed|failed" | head -30
OUT=$OUT CORE_TIMEOUT=${CORE_TIMEOUT:-120} bash scripts/gpu_core_check.sh | grep -E "^FAILED|passed|failed" | head -30
