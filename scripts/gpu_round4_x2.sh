#!/usr/bin/env bash
# Round 4 split over the two GPUs of an nvidia-h200-x2 machine (the same work as `gpu_rounds.sh 4`,
# in half the time): GPU 0 runs the bench cases at the training shape, GPU 1 the fine-tuning
# throughput of all four tasks.  Results under $OUT/bench and $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
export OUT="${OUT:-/tmp/anymask-gpu}" PYTHONUNBUFFERED=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
mkdir -p "$OUT/bench"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader
(CUDA_VISIBLE_DEVICES=0 OUT="$OUT/bench" BENCH_TIMEOUT=330 bash scripts/gpu_bench.sh \
   --masks documents,documents_causal,packed_prefix_lm,custom --heads 32:8 --head-dims 64 --seqlens 16384 \
   --dtypes bf16 --passes fwd,fwd+bwd --deadline 250 >"$OUT/bench_stdout.log" 2>&1) &
(CUDA_VISIBLE_DEVICES=1 timeout 420 python3 scripts/gpu_train_bench.py --budget-s 380 \
   --tasks prefix_lm,embedding,sft,diffusion --out "$OUT" >"$OUT/train_stdout.log" 2>&1) &
wait
tail -14 "$OUT/bench_stdout.log"
tail -12 "$OUT/train_stdout.log"
