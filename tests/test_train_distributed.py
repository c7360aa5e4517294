"""Two gloo processes under torchrun (DDP and FSDP2) give the losses of one process that runs the
same global batch (same data shards, gradient accumulation instead of ranks)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from anymask.train import train

from .test_train_helpers import config, tiny_model_dir, write_jsonl  # noqa: F401  (fixture)

ROOT = Path(__file__).resolve().parent.parent
STEPS = 3


@pytest.fixture(scope="module")
def reference(tiny_model_dir, tmp_path_factory):  # noqa: F811
    tmp = tmp_path_factory.mktemp("dist-ref")
    data = write_jsonl(tmp / "sft.jsonl", (ROOT / "examples" / "data" / "sft.jsonl").read_text().splitlines()[:48])
    result = train(config(tiny_model_dir, "sft", data, tmp / "single", max_steps=STEPS, tokens_per_batch=128,
                          data_shards=2, grad_accum=2, lr=1e-2))
    return data, result


@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_two_gloo_ranks_match_one_process(mode, reference, tiny_model_dir, tmp_path):  # noqa: F811
    data, single = reference
    out = tmp_path / mode
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "anymask.train", "--model", tiny_model_dir, "--task", "sft", "--data", data, "--output-dir",
           str(out), "--max-steps", str(STEPS), "--tokens-per-batch", "128", "--dtype", "fp32", "--lr", "1e-2",
           "--lora-r", "8", "--lora-alpha", "16", "--parallel", mode, "--no-progress"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        _, stderr = proc.communicate(timeout=150)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun and both workers
        proc.communicate()
        raise
    assert proc.returncode == 0, stderr[-3000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert losses == pytest.approx(single.losses, rel=1e-5, abs=1e-6)
    assert [r["tokens"] for r in records if "tokens" in r] == [h["tokens"] for h in single.history]
    ours = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    theirs = load_file(str(Path(single.adapter_dir) / "adapter_model.safetensors"))
    assert ours.keys() == theirs.keys()
    for k in ours:
        torch.testing.assert_close(ours[k], theirs[k], rtol=1e-3, atol=2e-5)  # Adam amplifies reduction-order noise
