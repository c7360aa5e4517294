"""``scripts/gpu_train_bench.py`` (fine-tuning throughput per task and arm) end to end on the CPU:
a tiny model, arms with and without the fused kernels, the files and ratios it writes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("peft")
ROOT = Path(__file__).resolve().parent.parent


def test_train_bench_script_on_cpu(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(ROOT / "scripts" / "gpu_train_bench.py"), "--device", "cpu", "--tiny",
           "--tokens", "512", "--steps", "2", "--warmup", "1", "--tasks", "sft,embedding",
           "--arms", "anymask:auto,anymask:none,sdpa:none,sdpa:lora", "--commit", "abc123", "--out", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    saved = json.loads((out / "train_bench.json").read_text())
    assert saved["env"]["commit"] == "abc123"
    rows = {(r["task"], r["arm"]): r for r in saved["results"]}
    assert len(rows) == 8 and not any("error" in r for r in rows.values())
    for task in ("sft", "embedding"):
        auto, none = rows[task, "anymask:auto"], rows[task, "anymask:none"]
        assert auto["kernels"] == "lora" and none["kernels"] == "none"  # no Liger without CUDA
        plain, same = rows[task, "sdpa:none"], rows[task, "sdpa:lora"]
        assert auto["speedup_vs_best"] == pytest.approx(auto["tokens_per_s"] / plain["tokens_per_s"], abs=1e-3)
        assert auto["speedup_same_kernels"] == pytest.approx(auto["tokens_per_s"] / same["tokens_per_s"], abs=1e-3)
        assert auto["loss_first"] == pytest.approx(none["loss_first"], rel=1e-4)  # same model, same first step
    assert (out / "train_bench.csv").read_text().count("\n") == 9
    assert (out / "train_bench.png").stat().st_size > 10_000
