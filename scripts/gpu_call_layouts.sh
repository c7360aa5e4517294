# One device call (carry .fa4a and .whl; see scripts/gpu_fa4.sh): keeps FA4 part 1 for the next call, then
# profiles cuDNN's kernels per layout (gpu_mask_profile.py) on causal documents, documents and padding:
# 16 heads in place (heads mode), transposed first (cudnn@1) and in a Llama layer's layout (tokens mode),
# each beside hand-rolled flex; 32:8 in place / transposed / flex; then the cuDNN and relayout GPU tests.
mkdir -p /tmp/fa4keep && cp .fa4a/part1 /tmp/fa4keep/ && python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:src || exit
nvidia-smi --query-gpu=name --format=csv,noheader | tee $OUT/gpu_name.txt
show() { grep -v Warn | python3 -c "
import sys,json
for l in sys.stdin:
  try: r=json.loads(l); print(r.get('mask'),r.get('variant'),r.get('layout'),r.get('ms'),r.get('kernel_ms',''),[(k['kernel'][:34],k['us']) for k in r.get('kernels',[])[:6]])
  except Exception: print(l.rstrip()[:300])
"; }
M=documents_causal,documents,padding
mkdir -p $OUT/h16_bhsd $OUT/h16_bshd $OUT/h32_8
timeout 150 python3 scripts/gpu_mask_profile.py --masks $M --variants cudnn@99,cudnn@1,raw_flex --heads 16 --out $OUT/h16_bhsd 2>&1 | show
timeout 100 python3 scripts/gpu_mask_profile.py --masks $M --variants cudnn,raw_flex --heads 16 --layout bshd --out $OUT/h16_bshd 2>&1 | show
timeout 120 python3 scripts/gpu_mask_profile.py --masks $M --variants cudnn@99,cudnn@2,raw_flex --heads 32:8 --out $OUT/h32_8 2>&1 | show
timeout 150 python3 -m pytest -q -p no:cacheprovider -x tests/test_relayout.py tests/test_cudnn.py -m gpu 2>&1 | tail -3
