# One device call (carry .whl and build/ab_prev) for what 2026-12-07 could not measure:
# 1. fine-tuning throughput before/after fp32 master LoRA adapters (d686132): gpu_train_bench.py,
#    sft and embedding, anymask:auto beside sdpa:none, build/ab_prev/src (e943b14, bf16 adapters) then
#    this tree's src, twice in turn;
# 2. bf16 fwd+bwd padding at S=16384, B=1 (the catalogue's one-row padding padded nothing before):
#    every backend beside hand-rolled SDPA and flex;
# 3. auto's host cost per call (its decision keyed on the mask's stamp since 96cf21a):
#    gpu_auto_host_probe.py on both trees;
# 4. on an H200 only: the GQA 32:8 re-bench of gpu_call_layouts.sh (owed since the transpose change);
# 5. (first) gpu_nan_memory_probe.py on both trees: what cuDNN leaves unwritten or reads past its buffers.
# SKIP_TRAIN=1, SKIP_PAD=1, SKIP_GQA=1 leave out 1, 2, 4.  Make the old tree first:  mkdir -p build/ab_prev && git archive e943b14 src | tar -x -C build/ab_prev
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit
name=$(nvidia-smi --query-gpu=name --format=csv,noheader | tee $OUT/gpu_name.txt)
echo "$name"
for tree in build/ab_prev/src src; do  # 5. cuDNN on NaN-filled memory: before/after c1a98e3's zeroed block-A gradients
  [[ -d $tree ]] || continue
  tag=$([[ $tree == src ]] && echo head || echo prev)
  echo "== NaN-memory probe, $tag"
  dir=$OUT/nan_$tag; mkdir -p $dir
  PYTHONPATH=/tmp/site:$tree OUT=$dir timeout 90 python3 scripts/gpu_nan_memory_probe.py 2>&1 | tee $dir/log.txt | cut -c1-200
done
echo "== inference-mode cache test, cuDNN and Liger GPU tests"
PYTHONPATH=/tmp/site:src timeout ${TEST_TIMEOUT:-150} python3 -m pytest -q -p no:cacheprovider -x tests/test_cudnn.py tests/test_triton.py \
  tests/test_train_fused.py tests/test_backends_agree.py -k "gpu or (inference_mode and cuda)" 2>&1 \
  | tee $OUT/gpu_tests.log | tail -3
if [[ -d build/ab_prev/src && -z ${SKIP_TRAIN:-} ]]; then
  for round in $(seq ${TRAIN_ROUNDS:-2}); do
    for tree in build/ab_prev/src src; do
      tag=$([[ $tree == src ]] && echo head || echo prev)_$round
      mkdir -p $OUT/train/$tag
      PYTHONPATH=/tmp/site:$tree timeout ${TRAIN_TIMEOUT:-75} python3 scripts/gpu_train_bench.py --tasks sft,embedding \
        --arms anymask:auto,sdpa:none --steps 4 --warmup 2 --budget-s 60 --out $OUT/train/$tag --commit $tag \
        >$OUT/train/$tag/log.txt 2>&1
      echo "== $tag"; tail -1 $OUT/train/$tag/log.txt | cut -c1-600
    done
  done
  for tree in build/ab_prev/src src; do
    tag=$([[ $tree == src ]] && echo head || echo prev)
    echo "== auto host cost, $tag"
    PYTHONPATH=/tmp/site:$tree timeout 60 python3 scripts/gpu_auto_host_probe.py 2>&1 | tee $OUT/auto_host_$tag.jsonl | cut -c1-300
  done
fi
export PYTHONPATH=/tmp/site:src
[[ -n ${SKIP_PAD:-} ]] || OUT=$OUT/padding16k BENCH_TIMEOUT=${PAD_TIMEOUT:-120} bash scripts/gpu_bench.sh --seqlens 16384 --heads 16 --dtypes bf16 \
  --passes fwd+bwd --masks padding --deadline 60 2>&1 | tail -4
if [[ $name == *H200* && -z ${SKIP_GQA:-} ]]; then
  source <(sed -n '/^M=/p;/^gqa_bench() {/,/^}/p' scripts/gpu_call_layouts.sh)
  BENCH_TIMEOUT=${GQA_TIMEOUT:-200} DEADLINE=${GQA_DEADLINE:-150} gqa_bench
fi
