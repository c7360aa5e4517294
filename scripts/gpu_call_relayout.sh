# One device call (carry .fa4a and .whl; see scripts/gpu_fa4.sh): keeps FA4 part 1 for the next call, then
# times layout copies (gpu_relayout_probe.py), profiles cuDNN in place vs copied against flex at 32:8,
# 16:8 and 16 heads (gpu_mask_profile.py), and runs the cuDNN/relayout GPU tests.  Results:
# benchmarks/results/nvidia-h100/cudnn-wide-copies/.
mkdir -p /tmp/fa4keep && cp .fa4a/part1 /tmp/fa4keep/ && python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:src || exit
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 60 python3 scripts/gpu_relayout_probe.py 2>&1 | tail -16
for h in 32:8 16:8 16; do mkdir -p $OUT/h${h/:/_}; timeout 150 python3 scripts/gpu_mask_profile.py --masks documents,documents_causal,padding --variants cudnn@99,cudnn@2,raw_flex --heads $h --out $OUT/h${h/:/_} 2>&1 | grep -v Warn | python3 -c "
import sys,json
for l in sys.stdin:
  try: r=json.loads(l); print(r.get('mask'),r.get('variant'),r.get('heads',''),r.get('ms'),r.get('kernel_ms',''),[(k['kernel'][:40],k['us']) for k in r.get('kernels',[])[:3]])
  except Exception: print(l.rstrip()[:300])
"; done
timeout 200 python3 -m pytest -q -p no:cacheprovider -x tests/test_relayout.py tests/test_cudnn.py -m gpu 2>&1 | tail -4
