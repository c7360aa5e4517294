#!/usr/bin/env bash
# FlashAttention 4 (flash-attn-4, CuTe DSL) as a bench peer on one H200, beside anymask's backends.
#
# FA4 needs nvidia-cutlass-dsl-libs-cu13 (a 92 MB wheel), more than one device call may carry, so
# its files travel in two calls to the same warm machine (see the device README's 64 MiB limit):
#
#   here:   xz -9 the unzipped cu13 wheel, split it in two: .fa4a/part1, .fa4b/part2
#           .fa4b/ also holds flash_attn_4, quack_kernels, apache_tvm_ffi, torch_c_dlpack_ext and
#           nvidia_cutlass_dsl{,_libs_base,_libs_core} 4.8.1 wheels; .whl/ the usual ones
#   call 1: mkdir -p /tmp/fa4keep && cp .fa4a/part1 /tmp/fa4keep/ && ...   (carry .fa4a, .whl)
#   call 2: ANYMASK_COMMIT=<sha> bash scripts/gpu_fa4.sh                    (carry .fa4b, .whl)
#           (the device copies the working tree: the variable records the commit in gpu.json)
#
# Call 2 then runs the FA4 GPU tests (the fa4 backend against float64, the raw_fa4 peer) and times
# causal and the structured masks of the bf16 S 4096 16-head fwd+bwd grid in a Llama layer's
# layout, anymask's backends (fa4 among them) beside raw flex and raw FA4, under $OUT/bshd.
# Later calls to the same warm machine reuse the install.  TESTS=backend (or peer, or none) runs
# fewer tests; BENCH=0 skips the timing; MASKS=causal,prefix_lm times fewer masks; PROBE=1 first
# runs scripts/gpu_fa4_forms.py (where the backend loses time against a direct FA4 call);
# LAYOUT=bhsd (or bhsd,bshd: one run each), SEQLENS=16384, HEADS=32:8 and RUN=name (the folder
# under $OUT; one layout only) change the grid.
# PACK=1 packs everything under $OUT into one fa4.tgz at the end (the device returns at most 8 files).
set -uo pipefail
cd "$(dirname "$0")/.."
keep=/tmp/fa4keep
if [ ! -f "$keep/part1" ]; then
  echo "no $keep/part1: this is a fresh machine, not the one call 1 left it on" >&2
  exit 3
fi
if [ ! -f /tmp/site/.fa4-installed ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl .fa4b/*.whl || exit
  cat "$keep/part1" .fa4b/part2 > /tmp/cu13.tar.xz
  python3 -c "import tarfile; tarfile.open('/tmp/cu13.tar.xz').extractall('/tmp/site')" || exit
  touch /tmp/site/.fa4-installed
fi
export PYTHONPATH=/tmp/site:/tmp/site/nvidia_cutlass_dsl/dsl_packages:src  # the second: what its .pth file would add
python3 -c "import flash_attn.cute, cutlass; print('flash_attn.cute', flash_attn.cute.__file__, 'cutlass', getattr(cutlass, '__version__', '?'))" \
  2>&1 | tail -3
tests=${TESTS:-backend,peer}
if [[ $tests == *backend* ]]; then  # 4 workers: FA4's JIT compiles are CPU-bound
  timeout "${TEST_TIMEOUT:-300}" python3 -m pytest -q -p no:cacheprovider -n 4 tests/test_backends_agree.py \
    -k "fa4 and cuda" 2>&1 | tee "$OUT/fa4_backend_tests.log" | tail -6
fi
if [[ $tests == *peer* ]]; then
  timeout 200 python3 -m pytest -q -p no:cacheprovider -n 2 tests/test_fa4.py -m gpu -rA 2>&1 \
    | tee "$OUT/fa4_peer_tests.log" | tail -4
fi
[ -n "${PROBE:-}" ] && timeout 240 python3 scripts/gpu_fa4_forms.py 2>&1 | grep -v Warning | tail -30
[ "${BENCH:-1}" = 0 ] && exit 0
LAYOUT=${LAYOUT:-bshd}
for layout in ${LAYOUT//,/ }; do  # LAYOUT=bhsd,bshd times both, one folder each
  OUT="$OUT/${RUN:-$layout}" BENCH_TIMEOUT=${BENCH_TIMEOUT:-300} bash scripts/gpu_bench.sh --layout "$layout" \
    --heads "${HEADS:-16}" --dtypes bf16 --seqlens "${SEQLENS:-4096}" --passes fwd+bwd \
    --masks "${MASKS:-causal,documents_causal,padding,sliding_window,documents,prefix_lm,packed_prefix_lm}" \
    --backends sdpa,cudnn,triton,fa4,auto,raw_flex,raw_fa4 --deadline 240 2>&1 | tail -14
done
if [ -n "${PACK:-}" ]; then
  (cd "$OUT" && tar czf /tmp/fa4.tgz . && find . -mindepth 1 -delete && mv /tmp/fa4.tgz .)
fi
