"""Saved adapters reload and reproduce the logits; a resumed run continues with the same losses;
checkpoints are never half-written."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import anymask.hf
from anymask.train import load_adapter, train
from anymask.train.checkpoint import atomic_dir, clean_partial, latest
from anymask.train.distributed import Dist

from .test_train_helpers import config, tiny_model_dir, write_jsonl  # noqa: F401  (fixture)

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples" / "data"


def _data(tmp_path, task="sft", n=40):
    return write_jsonl(tmp_path / f"{task}.jsonl", (EXAMPLES / f"{task}.jsonl").read_text().splitlines()[:n])


@pytest.mark.parametrize("task", ["sft", "embedding"])
def test_saved_adapter_reproduces_logits(task, tiny_model_dir, tmp_path):  # noqa: F811
    result = train(config(tiny_model_dir, task, _data(tmp_path, task), tmp_path / "out", max_steps=2, lr=1e-2))
    trained = result.model.eval()
    reloaded = load_adapter(tiny_model_dir, result.adapter_dir, task=task, dtype="fp32")
    ids = torch.randint(0, 1000, (2, 12))
    pos = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 0, 1, 2, 3]] * 2)  # packed documents
    with torch.no_grad():
        a = trained(input_ids=ids, position_ids=pos).logits
        b = reloaded(input_ids=ids, position_ids=pos).logits
    assert anymask.hf.get_mask(reloaded)[0] == anymask.hf.get_mask(trained)[0]
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    base = load_adapter(tiny_model_dir, result.adapter_dir, task=task).get_base_model()
    with torch.no_grad(), reloaded.disable_adapter():  # the adapter changed something
        c = reloaded(input_ids=ids, position_ids=pos).logits
    assert base is not None and not torch.allclose(a, c, atol=1e-4)


@pytest.mark.parametrize("task", ["sft", "diffusion"])
def test_resume_gives_the_same_next_losses(task, tiny_model_dir, tmp_path):  # noqa: F811
    data = _data(tmp_path, task, 60)
    full = train(config(tiny_model_dir, task, data, tmp_path / "a", max_steps=4, save_every=2, grad_accum=2,
                        tokens_per_batch=128))
    ckpt = latest(tmp_path / "a")
    assert ckpt is not None and ckpt.name == "checkpoint-000004"
    resumed = train(config(tiny_model_dir, task, data, tmp_path / "b", max_steps=4, grad_accum=2,
                           tokens_per_batch=128, resume=str(tmp_path / "a" / "checkpoint-000002")))
    assert [h["step"] for h in resumed.history] == [3, 4]
    assert resumed.losses == pytest.approx(full.losses[2:], rel=1e-5, abs=1e-6)


def test_checkpoint_dirs_are_atomic(tmp_path):
    d = Dist(0, 1, torch.device("cpu"), "none")
    final = tmp_path / "checkpoint-000001"
    with atomic_dir(final, d) as tmp:
        (tmp / "state.json").write_text("{}")
    with pytest.raises(KeyboardInterrupt):
        with atomic_dir(final, d) as tmp:
            (tmp / "state.json").write_text("half")
            raise KeyboardInterrupt
    assert (final / "state.json").read_text() == "{}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-000001"]
    (tmp_path / ".tmp-checkpoint-000002").mkdir()  # what a killed process leaves behind
    clean_partial(tmp_path)
    assert latest(tmp_path) == final and not (tmp_path / ".tmp-checkpoint-000002").exists()


def test_sigterm_mid_run_leaves_only_complete_checkpoints(tiny_model_dir, tmp_path):  # noqa: F811
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "anymask.train", "--model", tiny_model_dir, "--task", "sft", "--data",
           _data(tmp_path, "sft", 200), "--output-dir", str(out), "--tokens-per-batch", "64", "--dtype", "fp32",
           "--save-every", "1", "--max-steps", "400", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while latest(out) is None or latest(out).name < "checkpoint-000002":
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()[-2000:] if proc.poll() else "slow"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0  # interrupted, not finished
    assert not list(out.glob(".tmp-*")) and not (out / "adapter").exists()
    for ckpt in out.glob("checkpoint-*"):  # every checkpoint that exists is complete
        assert (ckpt / "state.json").exists() and (ckpt / "optimizer.pt").exists()
        assert (ckpt / "adapter" / "adapter_model.safetensors").exists()
    step = int(latest(out).name.split("-")[1])
    resumed = train(config(tiny_model_dir, "sft", _data(tmp_path, "sft", 200), out, tokens_per_batch=64,
                           max_steps=step + 1, resume="auto", lora_r=16, lora_alpha=32))  # the CLI defaults
    assert [h["step"] for h in resumed.history] == [step + 1]
