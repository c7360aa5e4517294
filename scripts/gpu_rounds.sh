#!/usr/bin/env bash
# The H200 checks in three device calls of under 10 minutes each (a session has 30 minutes):
#
#   bash scripts/gpu_rounds.sh 1   # backends vs eager on CUDA (issue 2) + HF LoRA step per mask (issue 3)
#   bash scripts/gpu_rounds.sh 2   # anymask bench, default GPU grid, --tune (issues 4, 5)
#   bash scripts/gpu_rounds.sh 3   # cuDNN graphs (issue 5) + fine-tuning throughput (issue 6)
#   bash scripts/gpu_rounds.sh 4   # what 2026-11-29 left unmeasured: the training shape's bench cases
#                                  # (GQA 32:8, hd 64, S 16k) and prefix_lm/embedding fine-tuning
#   bash scripts/gpu_rounds.sh 5   # the default grid's GQA 32:8 cases (cut by round 2's deadline)
#   bash scripts/gpu_rounds.sh 6   # fp32 dot precisions x tile configs; the Triton and cuDNN tests on CUDA
#   bash scripts/gpu_rounds.sh 7   # bf16x6 backward tiles; the Triton and cuDNN tests; fine-tuning memory
#                                  # with the Triton default (sft, diffusion vs transformers' flex_attention)
#   bash scripts/gpu_rounds.sh 8   # the default grid's fp32 cases again (bf16x6 Triton tiles) + HF LoRA check
#   bash scripts/gpu_rounds.sh 9   # round 8's two fp32 cases its deadline cut + the fp32 tiles' neighbours
#   bash scripts/gpu_rounds.sh 10  # Liger's fused kernels (--kernels): their tests on CUDA, then fine-tuning
#                                  # throughput of all four tasks with and without them, profiled per arm
#   bash scripts/gpu_rounds.sh 11  # round 10 again with the fused LoRA: anymask train as it runs (auto)
#                                  # vs Liger only vs none, and flex_attention with none and with auto
#   bash scripts/gpu_rounds.sh 12  # the same with the one-pass weighted fused cross-entropy (diffusion),
#                                  # then Liger's chunk budget x4 on sft and diffusion
#   bash scripts/gpu_rounds.sh 13  # the real CLI on one GPU with the default kernels (diffusion, sft; carry
#                                  # .gpu_assets for the tokenizer), and round 12's main comparison again
#   bash scripts/gpu_rounds.sh 14  # does cuDNN's ragged attention compute the padding of each entry?
#   bash scripts/gpu_rounds.sh 15  # every cuDNN plan for 8 x 2048 tokens: dense, dense + lengths, ragged
#   bash scripts/gpu_rounds.sh 16  # cuDNN ragged without per-call syncs or gathers: its GPU tests, the
#                                  # probe again, and the bf16 S 4096 padding/documents cases of the grid
#   bash scripts/gpu_rounds.sh 17  # round 15 for causal entries (cuDNN's band engine)
#   bash scripts/gpu_rounds.sh 18  # can cuDNN's ragged graphs read [B, H, S, D] in place, with empty entries?
#   bash scripts/gpu_rounds.sh 19  # cuDNN ragged read in place (one-head entries / THD views): its GPU tests,
#                                  # then the bf16 S 4096 documents/padding cases, 16 heads and GQA 32:8
#   bash scripts/gpu_rounds.sh 20  # round 19 with GQA in place too (one graph per query head of a group):
#                                  # the tests, GQA 32:8 S 4096 and 16 heads S 16384 documents/padding
#   bash scripts/gpu_rounds.sh 21  # why cuDNN's prefix-LM backward is slow (plans of the row-block graphs,
#                                  # profile of the backend); round 20's S 16384 cases again (a file was lost)
#   bash scripts/gpu_rounds.sh 22  # prefix-LM in place, trained through plain causal: cuDNN GPU tests, then
#                                  # the bf16 prefix-LM cases (S 4096 16 heads and GQA 32:8, S 16384)
#   bash scripts/gpu_rounds.sh 23  # packed prefix-LM through the mask's own mask_mod in FlexAttention: flex
#                                  # GPU tests, the packed prefix-LM cases, and the padding cases again
#   bash scripts/gpu_rounds.sh 24  # the FlexAttention GPU tests with room to compile (round 23's 120 s per
#                                  # test cut the catalogue test, now one test per mask)
#   bash scripts/gpu_rounds.sh 25  # fp32 through fp16x3 dots (ours): the default grid's fp32 cases, then the
#                                  # Triton tests on CUDA
#   bash scripts/gpu_rounds.sh 26  # the cuDNN GPU tests after the review fixes of 2026-12-04, then the training
#                                  # shape's document cases (hd 64) with cuDNN reading its inputs in place
#   bash scripts/gpu_rounds.sh 27  # all FlexAttention GPU tests, six at a time (carry pytest-xdist and execnet
#                                  # wheels in .whl/): compiling is what takes the time
#   bash scripts/gpu_rounds.sh 28  # fp16x3 against bf16x6 at head dim 64 (errors, tiles)
#   bash scripts/gpu_rounds.sh 29  # after the fp16x3 review fixes: the Triton tests on CUDA, errors and the
#                                  # default tiles' speed at head dim 128
#   bash scripts/gpu_rounds.sh 30  # where the bf16 structured masks' fwd+bwd time goes (kernels, gaps, host;
#                                  # scripts/gpu_mask_profile.py), then the Triton tests on CUDA
#   bash scripts/gpu_rounds.sh 31  # round 30's host side: cProfile of the calls that are host-bound
#   bash scripts/gpu_rounds.sh 32  # the cuDNN GPU tests and round 30's profile of padding and documents
#                                  # (on 2026-12-04 it also timed two changes since reverted: zeroing only
#                                  # padding's rows and the frontend's ordered execute; see
#                                  # benchmarks/results/nvidia-h200/checks/cudnn_host_2026-12-04/README.md)
#   bash scripts/gpu_rounds.sh 33  # the cuDNN GPU tests, then the fp32 cases last measured before the fp16x3
#                                  # review fixes (full, causal, causal documents, packed prefix-LM, window,
#                                  # custom) at the final code
#   bash scripts/gpu_rounds.sh 34  # round 30's profile with q, k, v, dO laid out [B, S, H, D] (a Llama layer's
#                                  # layout: cuDNN reads it as THD, one entry per segment)
#   bash scripts/gpu_rounds.sh 35  # the cuDNN GPU tests (padding zeroes runs of rows), then the bf16 S 4096
#                                  # 16-head cases with inputs in a Llama layer's layout (--layout bshd)
#   bash scripts/gpu_rounds.sh 36  # the same layout: GQA 32:8 S 4096 and 16 heads S 16384, fwd+bwd
#   bash scripts/gpu_rounds.sh 37  # nvidia-cudnn-frontend 1.26 (native execute; carry its wheel in .whl/old/)
#                                  # against 1.32 (execute in Python): host time per call side by side, the
#                                  # cuDNN GPU tests and round 36's S 4096 16-head cases with 1.26
#   bash scripts/gpu_rounds.sh 38  # padding with [B, S, H, D] inputs: the kernels once cuDNN's holes are
#                                  # zeroed run by run (round 34 profiled four whole fills)
#   bash scripts/gpu_rounds.sh 39  # which calls wait for the GPU (scripts/gpu_sync_probe.py), and the host cost
#                                  # of one cuDNN execute by call path (scripts/gpu_cudnn_execute_probe.py)
#   bash scripts/gpu_rounds.sh 40  # the raw-pointer launch: execute paths again, the cuDNN GPU tests, host time
#                                  # per call with and without it (scripts/gpu_host_breakdown.py), and the
#                                  # kernels of SDPA's own cuDNN call against ours on full and causal
#   bash scripts/gpu_rounds.sh 41  # the bf16 S 4096 16-head structured masks, fwd+bwd, after the raw-pointer
#                                  # launch, in a Llama layer's layout
#
# On an nvidia-h200-x2 machine:
#   bash scripts/gpu_rounds.sh 4x2 # round 4 in half the time: the bench on GPU 0, fine-tuning (all four
#                                  # tasks) on GPU 1
#   bash scripts/gpu_two_gpu.sh    # DDP / FSDP2 against one GPU (issue 7)
#
# Round 3 (and round 2, for the cudnn rows) wants nvidia-cudnn-frontend carried as a wheel in .whl/
# (see the device notes); without it the cudnn backend reports its reason and the rest still runs.
# Logs and results go to $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
export OUT="${OUT:-/tmp/anymask-gpu}" PYTHONUNBUFFERED=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1  # the x2 machine's rule
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}"

# device_pytest TOTAL_S PER_TEST_S LOG TAIL ARGS...: pytest for at most TOTAL_S seconds (PER_TEST_S per
# test where pytest-timeout is installed, so a slow test is named), logged to $OUT/LOG, last TAIL lines shown
device_pytest() {
  local total=$1 per=$2 log=$3 tail_n=$4 per_test=()
  shift 4
  python3 -c 'import pytest_timeout' 2>/dev/null && per_test=(--timeout "$per")
  timeout "$total" python3 -m pytest -q -rs -p no:cacheprovider "${per_test[@]}" "$@" 2>&1 | tee "$OUT/$log" \
    | tail -"$tail_n"
}
case "${1:-}" in
  1)
    CORE_TIMEOUT=400 bash scripts/gpu_core_check.sh  # 270 s reached 82% on 2026-11-29
    timeout 150 python3 scripts/gpu_hf_check.py 2>&1 | tee "$OUT/hf_check.log" | tail -20
    ;;
  2)
    bash scripts/gpu_bench.sh
    ;;
  3)
    timeout 300 python3 scripts/gpu_cudnn_check.py --budget 270 --correct-budget 150 2>&1 | tail -30
    timeout 250 python3 scripts/gpu_train_bench.py --budget-s 220 --out "$OUT" 2>&1 | tail -20
    ;;
  4)
    # the 1B training shape (S 16384, GQA 32:8, head dim 64): flex's new document / bare mask_mods,
    # packed prefix-LM, cudnn's cached plan, auto's remembered decision
    OUT="$OUT/bench" BENCH_TIMEOUT=300 bash scripts/gpu_bench.sh --masks documents,documents_causal,packed_prefix_lm,custom \
      --heads 32:8 --head-dims 64 --seqlens 16384 --dtypes bf16 --passes fwd,fwd+bwd --deadline 220 2>&1 | tail -12
    timeout 200 python3 scripts/gpu_train_bench.py --budget-s 170 --tasks prefix_lm,embedding --out "$OUT" 2>&1 | tail -8
    ;;
  4x2)
    (CUDA_VISIBLE_DEVICES=0 OUT="$OUT/bench" BENCH_TIMEOUT=330 bash scripts/gpu_bench.sh \
       --masks documents,documents_causal,packed_prefix_lm,custom --heads 32:8 --head-dims 64 --seqlens 16384 \
       --dtypes bf16 --passes fwd,fwd+bwd --deadline 250 >"$OUT/bench_stdout.log" 2>&1) &
    (CUDA_VISIBLE_DEVICES=1 timeout 420 python3 scripts/gpu_train_bench.py --budget-s 380 \
       --tasks prefix_lm,embedding,sft,diffusion --out "$OUT" >"$OUT/train_stdout.log" 2>&1) &
    wait
    tail -14 "$OUT/bench_stdout.log"
    tail -12 "$OUT/train_stdout.log"
    ;;
  5)
    # the default grid's GQA 32:8 cases, which round 2's deadline cut on 2026-11-29
    OUT="$OUT/gqa" bash scripts/gpu_bench.sh --heads 32:8 --seqlens 4096 --dtypes bf16 --passes fwd+bwd 2>&1 | tail -14
    ;;
  6)
    timeout 270 python3 scripts/gpu_triton_check.py --fp32-sweep --no-correctness --no-timing 2>&1 | tail -45
    device_pytest 270 60 triton_cudnn_tests.log 25 --durations 10 tests/test_triton.py tests/test_cudnn.py
    ;;
  7)
    timeout 200 python3 scripts/gpu_triton_check.py --fp32-sweep --fp32-precisions bf16x6 --no-correctness \
      --no-timing 2>&1 | tail -22
    device_pytest 180 60 triton_cudnn_tests.log 12 --durations 5 tests/test_triton.py tests/test_cudnn.py
    timeout 190 python3 scripts/gpu_train_bench.py --budget-s 170 --tasks sft,diffusion \
      --arms anymask:auto,flex_attention:none --out "$OUT" 2>&1 | tail -6
    ;;
  8)
    OUT="$OUT/fp32" BENCH_TIMEOUT=240 bash scripts/gpu_bench.sh --heads 16 --dtypes fp32 --seqlens 4096 \
      --passes fwd+bwd --deadline 190 2>&1 | tail -14
    timeout 150 python3 scripts/gpu_hf_check.py 2>&1 | tee "$OUT/hf_check.log" | tail -16
    ;;
  9)
    OUT="$OUT/fp32b" BENCH_TIMEOUT=200 bash scripts/gpu_bench.sh --heads 16 --dtypes fp32 --seqlens 4096 \
      --passes fwd+bwd --masks sliding_window,custom --deadline 150 2>&1 | tail -6
    timeout 170 python3 scripts/gpu_triton_check.py --fp32-sweep --fp32-precisions bf16x6 --no-correctness \
      --no-timing 2>&1 | tail -22
    ;;
  10)
    timeout 150 python3 -m pytest -q -rs -p no:cacheprovider tests/test_train_fused.py 2>&1 \
      | tee "$OUT/fused_tests.log" | tail -8
    timeout 400 python3 scripts/gpu_train_bench.py --budget-s 360 --profile --steps 5 \
      --arms anymask:liger,anymask:none,flex_attention:none,flex_attention:liger --out "$OUT" 2>&1 | tail -24
    ;;
  11)
    timeout 150 python3 -m pytest -q -rs -p no:cacheprovider tests/test_train_fused.py tests/test_train_fused_lora.py \
      2>&1 | tee "$OUT/fused_tests.log" | tail -8
    timeout 420 python3 scripts/gpu_train_bench.py --budget-s 380 --profile --steps 5 \
      --arms anymask:auto,anymask:liger,anymask:none,flex_attention:none,flex_attention:auto --out "$OUT" 2>&1 | tail -26
    ;;
  12)
    timeout 150 python3 -m pytest -q -rs -p no:cacheprovider tests/test_train_fused.py tests/test_train_fused_lora.py \
      2>&1 | tee "$OUT/fused_tests.log" | tail -8
    timeout 300 python3 scripts/gpu_train_bench.py --budget-s 270 --profile --steps 5 \
      --arms anymask:auto,anymask:none,flex_attention:none,flex_attention:auto --out "$OUT" 2>&1 | tail -20
    ANYMASK_CE_CHUNK_MEM=4 timeout 120 python3 scripts/gpu_train_bench.py --budget-s 100 --steps 5 \
      --tasks sft,diffusion --arms anymask:auto,flex_attention:auto --out "$OUT/chunk4" 2>&1 | tail -6
    ;;
  13)
    timeout 260 python3 scripts/gpu_two_gpu.py --tokenizer .gpu_assets/smollm2-tokenizer --modes single \
      --tasks diffusion,sft --steps 8 --out "$OUT/cli" 2>&1 | tail -6
    grep -h "kernels:\|trained" "$OUT"/cli/*.log | tail -6
    timeout 200 python3 scripts/gpu_train_bench.py --budget-s 170 --steps 5 --arms anymask:auto,flex_attention:none \
      --out "$OUT/repeat" 2>&1 | tail -11
    ;;
  14)
    timeout 400 python3 scripts/gpu_cudnn_ragged_probe.py --out "$OUT" 2>&1 | tail -12
    ;;
  15)
    timeout 400 python3 scripts/gpu_cudnn_ragged_probe.py --plans --out "$OUT" 2>&1 | tail -40
    ;;
  16)
    device_pytest 200 60 cudnn_tests.log 4 tests/test_cudnn.py
    timeout 120 python3 scripts/gpu_cudnn_ragged_probe.py --out "$OUT" 2>&1 | tail -8
    OUT="$OUT/bench" BENCH_TIMEOUT=220 bash scripts/gpu_bench.sh --heads 16 --dtypes bf16 --seqlens 4096 \
      --masks padding,documents,documents_causal --deadline 170 2>&1 | tail -12
    ;;
  17)
    timeout 200 python3 scripts/gpu_cudnn_ragged_probe.py --plans --causal --out "$OUT" 2>&1 | tail -30
    ;;
  19)
    device_pytest 220 60 cudnn_tests.log 6 tests/test_cudnn.py -m gpu
    OUT="$OUT/bench" BENCH_TIMEOUT=300 bash scripts/gpu_bench.sh --heads 16,32:8 --dtypes bf16 --seqlens 4096 \
      --masks padding,documents,documents_causal --passes fwd,fwd+bwd --deadline 240 2>&1 | tail -16
    ;;
  20)
    device_pytest 200 60 cudnn_tests.log 6 tests/test_cudnn.py -m gpu
    OUT="$OUT/gqa" BENCH_TIMEOUT=170 bash scripts/gpu_bench.sh --heads 32:8 --dtypes bf16 --seqlens 4096 \
      --masks padding,documents,documents_causal --passes fwd,fwd+bwd --deadline 130 2>&1 | tail -9
    OUT="$OUT/s16k" BENCH_TIMEOUT=170 bash scripts/gpu_bench.sh --heads 16 --dtypes bf16 --seqlens 16384 \
      --masks padding,documents,documents_causal --passes fwd,fwd+bwd --deadline 130 2>&1 | tail -9
    ;;
  21)
    timeout 200 python3 scripts/gpu_cudnn_prefix_probe.py --out "$OUT" 2>&1 | tail -40
    OUT="$OUT/s16k" BENCH_TIMEOUT=170 bash scripts/gpu_bench.sh --heads 16 --dtypes bf16 --seqlens 16384 \
      --masks padding,documents,documents_causal --passes fwd,fwd+bwd --deadline 130 2>&1 | tail -9
    ;;
  22)
    device_pytest 200 60 cudnn_tests.log 6 tests/test_cudnn.py -m gpu
    OUT="$OUT/prefix" BENCH_TIMEOUT=260 bash scripts/gpu_bench.sh --heads 16,32:8 --dtypes bf16 --seqlens 4096,16384 \
      --masks prefix_lm --passes fwd,fwd+bwd --deadline 200 2>&1 | tail -12
    ;;
  23)
    device_pytest 150 120 flex_tests.log 4 tests/test_flex.py -m gpu
    OUT="$OUT/pp" BENCH_TIMEOUT=220 bash scripts/gpu_bench.sh --heads 16,32:8 --dtypes bf16 --seqlens 4096 \
      --masks packed_prefix_lm,padding --passes fwd,fwd+bwd --deadline 170 2>&1 | tail -11
    OUT=/tmp/pp16 BENCH_TIMEOUT=100 bash scripts/gpu_bench.sh --heads 16 --dtypes bf16 --seqlens 16384 \
      --masks packed_prefix_lm --passes fwd,fwd+bwd --deadline 60 2>&1 | tail -5
    cp /tmp/pp16/gpu.json "$OUT/pp16.json"
    ;;
  24)
    device_pytest 420 200 flex_tests.log 30 --durations 12 tests/test_flex.py -m gpu
    ;;
  25)
    OUT="$OUT/fp32" BENCH_TIMEOUT=330 bash scripts/gpu_bench.sh --heads 16 --dtypes fp32 --seqlens 4096 \
      --passes fwd+bwd --deadline 290 2>&1 | tail -14
    device_pytest 220 60 triton_tests.log 12 --durations 5 tests/test_triton.py
    ;;
  26)
    device_pytest 220 60 cudnn_tests.log 8 tests/test_cudnn.py -m gpu
    OUT="$OUT/hd64" BENCH_TIMEOUT=260 bash scripts/gpu_bench.sh --masks documents,documents_causal \
      --heads 32:8 --head-dims 64 --seqlens 16384 --dtypes bf16 --passes fwd,fwd+bwd --deadline 200 2>&1 | tail -8
    ;;
  27)
    par=()
    python3 -c 'import xdist' 2>/dev/null && par=(-n 6)
    device_pytest 540 400 flex_tests.log 40 --durations 25 "${par[@]}" tests/test_flex.py -m gpu
    ;;
  28)
    timeout 300 python3 scripts/gpu_triton_check.py --fp32-sweep --fp32-head-dim 64 --fp32-precisions bf16x6,fp16x3 \
      --fp32-swept fp16x3 --no-correctness --no-timing 2>&1 | grep -v '^{' | tail -30
    ;;
  29)
    device_pytest 200 60 triton_tests.log 6 tests/test_triton.py
    timeout 150 python3 scripts/gpu_triton_check.py --fp32-sweep --fp32-precisions fp16x3 --fp32-swept none \
      --no-correctness --no-timing 2>&1 | grep -v '^{' | tail -8
    ;;
  30)
    timeout 300 python3 scripts/gpu_mask_profile.py --out "$OUT" 2>&1 | cut -c1-400 | tail -24
    device_pytest 200 60 triton_tests.log 6 tests/test_triton.py
    ;;
  31)
    timeout 200 python3 scripts/gpu_mask_profile.py --cprofile --masks sliding_window,documents_causal \
      --variants cudnn,triton,raw_flex --out "$OUT" 2>&1 | cut -c1-300 | grep '^{'
    timeout 100 python3 scripts/gpu_mask_profile.py --cprofile --masks full --variants sdpa --out "$OUT" 2>&1 \
      | cut -c1-300 | grep '^{'
    ;;
  32)
    device_pytest 200 60 cudnn_tests.log 4 tests/test_cudnn.py -m gpu
    timeout 150 python3 scripts/gpu_mask_profile.py --masks padding,documents --variants cudnn --out "$OUT" 2>&1 \
      | cut -c1-300 | grep '^{'
    ;;
  33)
    device_pytest 200 60 cudnn_tests.log 4 tests/test_cudnn.py -m gpu
    OUT="$OUT/fp32" BENCH_TIMEOUT=420 bash scripts/gpu_bench.sh --heads 16 --dtypes fp32 --seqlens 4096 \
      --passes fwd+bwd --masks full,causal,documents_causal,packed_prefix_lm,sliding_window,custom \
      --deadline 360 2>&1 | tail -12
    ;;
  34)
    timeout 300 python3 scripts/gpu_mask_profile.py --layout bshd --variants cudnn,raw_flex,triton \
      --masks documents,documents_causal,padding,sliding_window,prefix_lm --out "$OUT" 2>&1 | cut -c1-300 | grep '^{'
    ;;
  35)
    device_pytest 200 60 cudnn_tests.log 4 tests/test_cudnn.py -m gpu
    OUT="$OUT/bshd" BENCH_TIMEOUT=440 bash scripts/gpu_bench.sh --layout bshd --heads 16 --dtypes bf16 \
      --seqlens 4096 --masks full,causal,padding,documents,documents_causal,prefix_lm,packed_prefix_lm,sliding_window \
      --deadline 390 2>&1 | tail -20
    ;;
  36)
    OUT="$OUT/gqa" BENCH_TIMEOUT=250 bash scripts/gpu_bench.sh --layout bshd --heads 32:8 --dtypes bf16 \
      --seqlens 4096 --passes fwd+bwd --masks padding,documents,documents_causal,prefix_lm,sliding_window \
      --deadline 200 2>&1 | tail -8
    OUT="$OUT/s16k" BENCH_TIMEOUT=250 bash scripts/gpu_bench.sh --layout bshd --heads 16 --dtypes bf16 \
      --seqlens 16384 --passes fwd+bwd --masks padding,documents,documents_causal,prefix_lm,sliding_window \
      --deadline 200 2>&1 | tail -8
    ;;
  37)
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site126 .whl/old/*.whl
    (export PYTHONPATH="src:/tmp/site126:$PYTHONPATH"
     python3 -c 'import cudnn; print("frontend", cudnn.__version__, cudnn.__file__)'
     device_pytest 200 60 cudnn_tests_fe126.log 4 tests/test_cudnn.py -m gpu)
    for fe in 126 132; do
      (mkdir -p "$OUT/fe$fe"; [ "$fe" = 126 ] && export PYTHONPATH="src:/tmp/site126:$PYTHONPATH"
       timeout 120 python3 scripts/gpu_mask_profile.py --layout bshd --variants cudnn \
         --masks documents_causal,sliding_window,documents,padding,prefix_lm --out "$OUT/fe$fe" 2>&1 \
         | grep '^{' | python3 -c 'import json,sys
for l in sys.stdin:
    r = json.loads(l); print(sys.argv[1], r["mask"], r["ms"], "host", r["host_ms"], "kernels", r["kernel_ms"])' "fe$fe")
    done
    (export PYTHONPATH="src:/tmp/site126:$PYTHONPATH"
     OUT="$OUT/bench126" BENCH_TIMEOUT=200 bash scripts/gpu_bench.sh --layout bshd --heads 16 --dtypes bf16 \
       --seqlens 4096 --passes fwd+bwd --masks padding,documents,documents_causal,prefix_lm,sliding_window \
       --deadline 160 2>&1 | tail -8)
    ;;
  38)
    timeout 150 python3 scripts/gpu_mask_profile.py --layout bshd --variants cudnn,raw_flex --masks padding \
      --out "$OUT" 2>&1 | cut -c1-1500 | grep '^{'
    ;;
  39)
    timeout 120 python3 scripts/gpu_cudnn_execute_probe.py 2>&1 | tail -12
    timeout 200 python3 scripts/gpu_sync_probe.py --variants cudnn,triton,raw_flex 2>&1 | cut -c1-900 | grep '^{'
    timeout 100 python3 scripts/gpu_sync_probe.py --layout bshd --variants cudnn \
      --masks documents_causal,sliding_window,prefix_lm 2>&1 | cut -c1-900 | grep '^{'
    ;;
  40)
    timeout 100 python3 scripts/gpu_cudnn_execute_probe.py 2>&1 | tail -12
    device_pytest 200 60 cudnn_tests.log 4 tests/test_cudnn.py -m gpu
    timeout 100 python3 scripts/gpu_mask_profile.py --masks full,causal --variants sdpa,cudnn --out "$OUT" 2>&1 \
      | grep '^{' | cut -c1-1200
    for arm in "" --graph-execute; do
      BACKENDS=cudnn timeout 100 python3 scripts/gpu_host_breakdown.py $arm 2>&1 | grep '^{'
    done
    BACKENDS=flex timeout 120 python3 scripts/gpu_host_breakdown.py --masks documents_causal,prefix_lm 2>&1 | grep '^{'
    ;;
  41)
    timeout 60 python3 -m pytest -q -p no:cacheprovider tests/test_cudnn.py -m gpu -k raw_launch 2>&1 | tail -3
    OUT="$OUT/bshd" BENCH_TIMEOUT=170 bash scripts/gpu_bench.sh --layout bshd --heads 16 --dtypes bf16 \
      --seqlens 4096 --passes fwd+bwd --masks documents_causal,padding,sliding_window,documents,prefix_lm \
      --deadline 120 2>&1 | tail -8
    ;;
  18)
    for i in 0 1 2 3; do
      timeout 60 python3 scripts/gpu_cudnn_layout_probe.py --variant "$i" --out "$OUT" > "$OUT/variant$i.log" 2>&1
      echo "variant $i: rc $?"; grep -h '^{' "$OUT/variant$i.log"; grep -h "Error" "$OUT/variant$i.log" | tail -2
    done
    ;;
  *)
    echo "usage: $0 1|2|3|4|4x2|5|6|7|8|9" >&2
    exit 2
    ;;
esac
