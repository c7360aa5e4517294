#!/usr/bin/env bash
# anymask bench on one H200: the default GPU grid (bf16 and fp32), results under $OUT.
#
#   bash scripts/gpu_bench.sh                    # ~8 minutes; one command under the 10-minute limit
#   bash scripts/gpu_bench.sh --masks causal     # extra options go to `anymask bench`
#
# The grid (anymask.bench.cases.GRIDS["gpu"], in this order): 16k tokens per step, head dim 128, every
# catalogue mask; bf16 S 4096 (16 heads) forward and forward+backward; fp32 S 4096 forward+backward;
# bf16 S 16384 both passes; bf16 GQA 32:8 S 4096 forward+backward.  Side by side: every available
# backend forced, auto, SDPA with a dense mask, compiled FlexAttention.  No new problem starts after
# 400 s (--deadline): what that cuts is counted as "not_started" in the summary line.  --tune stores each case's fastest correct backend (cache in $OUT)
# before auto is timed, so auto's ratio to the best is the measured-dispatch claim.
#
# Files back (at most 8): gpu.json, gpu.csv, choices.json, bench.log.  No plots there (no
# matplotlib on the image): afterwards, here, `anymask bench --plot-only <dir with gpu.json>`.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/nvidia-h200}
mkdir -p "$OUT"
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export ANYMASK_CACHE_DIR="${ANYMASK_CACHE_DIR:-/tmp/anymask-cache}"

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | tee "$OUT/bench.log"
python3 -m anymask info 2>&1 | tee -a "$OUT/bench.log"

# No new problem starts after 400 s; at 540 s `timeout` stops the run (SIGTERM) and what is done is
# written: either way the files come back inside the 10-minute limit.
timeout -s TERM "${BENCH_TIMEOUT:-540}" python3 -m anymask.bench bench --grid gpu --tune --no-plot --out "$OUT" --tag gpu --deadline 400 "$@" \
  >"$OUT/table.txt" 2> >(tee -a "$OUT/bench.log" >&2)
rc=$?
cp "$ANYMASK_CACHE_DIR/choices.json" "$OUT/choices.json" 2>/dev/null
# The full table, then the summary table and the JSON summary line, last.
cat "$OUT/table.txt"
rm -f "$OUT/table.txt"
exit $rc
