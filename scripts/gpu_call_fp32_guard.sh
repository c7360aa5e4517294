# One device call (carry .whl) after the fp16x3 change (live-slot scales, clamp in partial tiles):
# 1. tests/test_triton.py on the GPU (the new kernel code compiled for real, huge values in padded slots);
# 2. fp32 fwd+bwd bench, triton beside sdpa and hand-rolled flex, on padding and causal documents (the
#    clamp's cost: compare triton/peer with the committed nvidia-h200 fp32 rows, 4.44x and 9.70x);
# 3. whatever time is left: the GPU checks of gpu_call_layouts.sh (CHECKS only).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:src || exit
nvidia-smi --query-gpu=name --format=csv,noheader | tee $OUT/gpu_name.txt
timeout ${TRITON_TIMEOUT:-170} python3 -m pytest -q -p no:cacheprovider -n 4 tests/test_triton.py 2>&1 | tee $OUT/triton_gpu_tests.log | tail -4
OUT=$OUT/fp32 BENCH_TIMEOUT=${BENCH_TIMEOUT:-200} bash scripts/gpu_bench.sh --dtypes fp32 --seqlens 4096 --heads 16 \
  --passes fwd+bwd --masks padding,documents_causal --backends triton,sdpa,raw_flex --deadline ${DEADLINE:-150} 2>&1 | tail -8
source <(sed -n '/^checks() {/,/^}/p' scripts/gpu_call_layouts.sh)
CHECK_TIMEOUT=${CHECK_TIMEOUT:-90} checks
