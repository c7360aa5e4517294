#!/usr/bin/env bash
# A/B of the triton backend across source trees, one device call: `anymask bench` (triton only) on the
# same cases, ROUNDS rounds of every tree in turn, so drift hits all trees alike.
#
#   bash scripts/gpu_ab_triton.sh . build/ab_old     # "." is this tree; others: dirs holding src/
#                                                    # (git archive <commit> src | tar -x -C DIR), carried
# PYTHONPATH may name extra wheels' site dir (not src: each tree's own comes first).
# Env: ROUNDS (2), CASE_TIMEOUT (60 s per bench), BENCH_ARGS (fp32 fwd+bwd, padding and causal documents).
# Files back: $OUT/ab/<tree>_<round>.txt (the bench tables); a summary table on stdout.
set -uo pipefail
cd "$(dirname "$0")/.."
root=$PWD
args=${BENCH_ARGS:---dtypes fp32 --seqlens 4096 --heads 16 --passes fwd+bwd --masks padding,documents_causal}
mkdir -p "$OUT/ab"
for round in $(seq "${ROUNDS:-2}"); do
  for tree in "$@"; do
    name=$(basename "$(realpath "$tree")"); [[ $tree == . ]] && name=head
    tag=${name}_$round
    (cd "$tree" && ANYMASK_CACHE_DIR=/tmp/ab-$tag PYTHONPATH="$(realpath src)${PYTHONPATH:+:$PYTHONPATH}" \
      timeout "${CASE_TIMEOUT:-60}" python3 -m anymask.bench bench --grid gpu --no-plot --out "/tmp/ab/$tag" \
      --tag gpu --backends triton --deadline 40 $args >"$OUT/ab/$tag.txt" 2>&1)
    grep -E "^\S+ B[0-9]+ S[0-9]+ .* triton +[0-9.]+ " "$OUT/ab/$tag.txt" | awk -v t="$tag" '{print t, $1, $(NF-7)}'
  done
done
