"""``scripts/gpu_two_gpu.py`` (the two-GPU run of ``anymask train``) end to end on the CPU: a tiny
model, one process against two gloo ranks with DDP, the same losses, and the files it writes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from .test_train_helpers import GGUF, smollm2_dir

transformers = pytest.importorskip("transformers")
ROOT = Path(__file__).resolve().parent.parent


def test_two_gpu_script_on_cpu(tmp_path):
    tok = transformers.AutoTokenizer.from_pretrained(smollm2_dir(), gguf_file=GGUF)
    tok.save_pretrained(tmp_path / "tokenizer")
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(ROOT / "scripts" / "gpu_two_gpu.py"), "--tokenizer", str(tmp_path / "tokenizer"),
           "--tiny", "--device", "cpu", "--tasks", "sft", "--modes", "single,ddp", "--tokens", "256", "--steps", "3",
           "--warmup", "1", "--docs", "40", "--dtype", "fp32", "--lr", "1e-2", "--out", str(out),
           "--work", str(tmp_path / "work")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    doc = json.loads((out / "two_gpu.json").read_text())
    single, ddp = doc["rows"]
    assert (single["mode"], ddp["mode"]) == ("single", "ddp") and single["rc"] == ddp["rc"] == 0
    assert len(single["losses"]) == 3 and ddp["losses_match"] and ddp["max_rel_loss_diff"] < 1e-5
    assert single["tokens_per_step"] == ddp["tokens_per_step"] > 0  # the same micro-batches
    assert 0 < ddp["scaling_efficiency"] and ddp["tokens_per_s_per_gpu"] * 2 == pytest.approx(ddp["tokens_per_s"], abs=2)
    assert (out / "two_gpu.csv").read_text().startswith("task,mode,gpus")
    assert json.loads(proc.stdout.strip().splitlines()[-1])["two_gpu"][1]["losses_match"] is True
