# One device call (carry .whl) after the fp16x3 change (live-slot scales, clamp in partial tiles):
# 1. tests/test_triton.py on the GPU (the new kernel code compiled for real, huge values in padded slots);
# 2. fp32 fwd+bwd bench, triton beside sdpa and hand-rolled flex, on padding and causal documents (the
#    clamp's cost: compare triton/peer with the committed nvidia-h200 fp32 rows, 4.44x and 9.70x);
# 2b. with build/ab_old carried (an older tree's src): that tree's triton on the same cases, for the A/B;
# 3. on an H200 (GQA=1, the default): the GQA 32:8 re-bench of gpu_call_layouts.sh;
# 4. CHECKS=1 (the default): the GPU checks of gpu_call_layouts.sh with whatever time is left.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:src || exit
name=$(nvidia-smi --query-gpu=name --format=csv,noheader | tee $OUT/gpu_name.txt)
echo "$name"
timeout ${TRITON_TIMEOUT:-170} python3 -m pytest -q -p no:cacheprovider -n 4 tests/test_triton.py 2>&1 | tee $OUT/triton_gpu_tests.log | tail -4
OUT=$OUT/fp32 BENCH_TIMEOUT=${BENCH_TIMEOUT:-200} bash scripts/gpu_bench.sh --dtypes fp32 --seqlens 4096 --heads 16 \
  --passes fwd+bwd --masks padding,documents_causal --backends triton,sdpa,raw_flex --deadline ${DEADLINE:-150} 2>&1 | tail -8
[[ -d build/ab_old/src ]] && ROUNDS=1 CASE_TIMEOUT=${OLD_TIMEOUT:-100} bash scripts/gpu_ab_triton.sh build/ab_old
source <(sed -n '/^M=/p;/^checks() {/,/^}/p;/^gqa_bench() {/,/^}/p' scripts/gpu_call_layouts.sh)
if [[ $name == *H200* && ${GQA:-1} == 1 ]]; then BENCH_TIMEOUT=${GQA_TIMEOUT:-220} DEADLINE=${GQA_DEADLINE:-170} gqa_bench; fi
[[ ${CHECKS:-1} == 1 ]] && CHECK_TIMEOUT=${CHECK_TIMEOUT:-90} checks
