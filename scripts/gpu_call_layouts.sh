# One device call (carry .whl): on an H200, re-measures what the GQA transpose mode and the 8-byte
# layout copies changed: `anymask bench` at GQA 32:8, contiguous [B, H, S, D], on documents, causal
# documents and padding (cudnn, triton, sdpa, auto beside hand-rolled flex; FA4, not best on those,
# left out) and gpu_mask_profile.py at 32:8 on causal documents.  On any other card, profiles cuDNN's kernels at 16 heads
# per layout instead: in place (heads mode), transposed first (cudnn@1) and a Llama layer's [B, S, H, D].
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
if [[ $name == *H200* ]]; then
  OUT=$OUT/gqa_bhsd BENCH_TIMEOUT=250 bash scripts/gpu_bench.sh --layout bhsd --heads 32:8 --dtypes bf16 --seqlens 4096 \
    --passes fwd+bwd --masks $M --backends sdpa,cudnn,triton,auto,raw_flex --deadline 190 2>&1 | tail -12
  mkdir -p $OUT/h32_8
  timeout 70 python3 scripts/gpu_mask_profile.py --masks documents_causal --variants cudnn@99,cudnn@2,raw_flex --heads 32:8 --out $OUT/h32_8 2>&1 | show
else
  mkdir -p $OUT/h16_bhsd $OUT/h16_bshd
  timeout 140 python3 scripts/gpu_mask_profile.py --masks $M --variants cudnn@99,cudnn@1,raw_flex --heads 16 --out $OUT/h16_bhsd 2>&1 | show
  timeout 90 python3 scripts/gpu_mask_profile.py --masks $M --variants cudnn,raw_flex --heads 16 --layout bshd --out $OUT/h16_bshd 2>&1 | show
fi
