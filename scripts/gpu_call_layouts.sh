# One device call (carry .whl): on an H200, re-measures what the GQA transpose mode and the 8-byte
# layout copies changed: `anymask bench` at GQA 32:8, contiguous [B, H, S, D], on documents, causal
# documents and padding (cudnn, triton, sdpa, auto beside hand-rolled flex; FA4, not best on those,
# left out) and gpu_mask_profile.py at 32:8 on causal documents.  On any other card, runs the GPU
# correctness checks of the tree instead (the 16-head layout profile is committed for the H100).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:src || exit
name=$(nvidia-smi --query-gpu=name --format=csv,noheader | tee $OUT/gpu_name.txt)
echo "$name"
show() { grep -v Warn | python3 -c "
import sys,json
for l in sys.stdin:
  try: r=json.loads(l); print(r.get('mask'),r.get('variant'),r.get('layout'),r.get('ms'),r.get('kernel_ms',''),[(k['kernel'][:34],k['us']) for k in r.get('kernels',[])[:6]])
  except Exception: print(l.rstrip()[:300])
"; }
M=documents_causal,documents,padding
checks() {  # masked SDPA's guard (and the tests with it undone), every backend vs float64 on cuda, cuDNN's gpu tests
  timeout 60 python3 -m pytest -q -p no:cacheprovider tests/test_sdpa_gpu.py 2>&1 | tee $OUT/sdpa_gpu_tests.log | tail -1
  timeout 60 python3 scripts/gpu_sdpa_cudnn_mutation.py 2>&1 | tee $OUT/sdpa_gpu_tests_cudnn_allowed.log | tail -1
  OUT=$OUT CORE_TIMEOUT=${CHECK_TIMEOUT:-300} bash scripts/gpu_core_check.sh | tail -5
  timeout ${CHECK_TIMEOUT:-200} python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_cudnn.py 2>&1 | tee $OUT/cudnn_gpu_tests.log | tail -3
}
gqa_bench() {  # GQA 32:8, contiguous [B, H, S, D], bf16 fwd+bwd on the masks short of the bar
  OUT=$OUT/gqa_bhsd BENCH_TIMEOUT=${BENCH_TIMEOUT:-250} bash scripts/gpu_bench.sh --layout bhsd --heads 32:8 --dtypes bf16 --seqlens 4096 \
    --passes fwd+bwd --masks $M --backends sdpa,cudnn,triton,auto,raw_flex --deadline ${DEADLINE:-190} 2>&1 | tail -12
}
if [[ $name == *H200* ]]; then
  gqa_bench
  [[ ${CHECKS:-0} == 1 ]] && checks  # CHECKS=1: the correctness checks after the bench
  [[ ${PROFILE:-1} == 1 ]] || exit 0  # PROFILE=0: the bench alone, when little device time is left
  mkdir -p $OUT/h32_8
  timeout 70 python3 scripts/gpu_mask_profile.py --masks documents_causal --variants cudnn@99,cudnn@2,raw_flex --heads 32:8 --out $OUT/h32_8 2>&1 | show
else
  # The 16-head layout profile is already committed (nvidia-h100/cudnn-layouts-16h): check the tree on
  # this GPU instead.
  checks
fi
