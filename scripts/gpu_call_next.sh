# One device call (carry .whl and build/ab_prev) for what 2026-12-08 could not run (no device was lent):
# 1. (first) the CUDA tests of the 2026-12-07/08 changes that never ran on a GPU: autocast, torch.func
#    transforms, SDPA's one-query decoding step (every backend against eager at q_len 1), plus the
#    cuDNN / Triton / fused-training GPU tests;
# 2. decoding speed, sdpa against anymask, on a 1B-shaped Llama (bf16, 16 layers): scripts/decode_probe.py
#    on build/ab_prev/src (2a2a230, before the host-time cuts of 3527548) and on this tree;
# 3. auto's host cost per call, both trees (gpu_auto_host_probe.py);
# 4. on an H200 only: the GQA 32:8 re-bench of gpu_call_layouts.sh (owed since the transpose change).
# SKIP_DECODE=1, SKIP_GQA=1 leave out 2, 4.  Make the old tree first:
#   mkdir -p build/ab_prev && git archive 2a2a230 src | tar -x -C build/ab_prev
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit
name=$(nvidia-smi --query-gpu=name --format=csv,noheader | tee $OUT/gpu_name.txt)
echo "$name"
echo "== GPU tests: autocast, transforms, decoding step, cuDNN, Triton, fused training"
PYTHONPATH=/tmp/site:src timeout ${TEST_TIMEOUT:-200} python3 -m pytest -q -p no:cacheprovider tests/test_autocast.py \
  tests/test_func_transforms.py tests/test_dispatch_preference.py tests/test_backends_agree.py tests/test_cudnn.py \
  tests/test_triton.py tests/test_train_fused.py -k "cuda or gpu or decoding or q1" 2>&1 | tee $OUT/gpu_tests.log | tail -4
if [[ -d build/ab_prev/src && -z ${SKIP_DECODE:-} ]]; then
  for round in 1 2; do
    for tree in build/ab_prev/src src; do
      tag=$([[ $tree == src ]] && echo head || echo prev)
      echo "== decoding, $tag, round $round"
      PYTHONPATH=/tmp/site:$tree timeout 90 python3 scripts/decode_probe.py --device cuda --dtype bf16 --layers 16 \
        --hidden 2048 --heads 32 --kv-heads 8 --prompt 256 --new-tokens 64 --rounds 3 2>&1 \
        | tee -a $OUT/decode_$tag.jsonl | tail -1 | cut -c1-300
    done
  done
fi
if [[ -d build/ab_prev/src ]]; then
  for tree in build/ab_prev/src src; do
    tag=$([[ $tree == src ]] && echo head || echo prev)
    echo "== auto host cost, $tag"
    PYTHONPATH=/tmp/site:$tree timeout 60 python3 scripts/gpu_auto_host_probe.py 2>&1 | tee $OUT/auto_host_$tag.jsonl | cut -c1-300
  done
fi
export PYTHONPATH=/tmp/site:src
if [[ $name == *H200* && -z ${SKIP_GQA:-} ]]; then
  source <(sed -n '/^M=/p;/^gqa_bench() {/,/^}/p' scripts/gpu_call_layouts.sh)
  BENCH_TIMEOUT=${GQA_TIMEOUT:-200} DEADLINE=${GQA_DEADLINE:-150} gqa_bench
fi
