"""Resuming where epochs pack to different step counts, into the same output dir (metrics not
logged twice), and checkpoints refused when the run's settings no longer fit them."""

from __future__ import annotations

import json
import os

import pytest

from anymask.train import packing, train
from anymask.train.config import ConfigError

from .test_train_helpers import config, tiny_model_dir  # noqa: F401  (fixture)
from .test_train_checkpoint import _data


def test_resume_in_a_later_epoch_with_a_different_step_count(tiny_model_dir, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setattr(packing, "WINDOW", 8)  # small packing windows: epochs pack to 5 and 6 steps
    data = _data(tmp_path, "sft", 30)
    kw = dict(tokens_per_batch=96, truncate=True, max_steps=12)
    full = train(config(tiny_model_dir, "sft", data, tmp_path / "a", save_every=7, **kw))
    tokens = [h["tokens"] for h in full.history]
    assert len(set(tokens[5:11])) > 1, "precondition: epoch 1 holds rows of several sizes"
    resumed = train(config(tiny_model_dir, "sft", data, tmp_path / "a", resume="auto", **kw))
    assert [h["step"] for h in resumed.history] == list(range(8, 13))
    assert [h["tokens"] for h in resumed.history] == tokens[7:]
    assert resumed.losses == pytest.approx(full.losses[7:], rel=1e-5, abs=1e-6)
    logged = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in logged if "loss" in r]
    assert steps == list(range(1, 13))  # steps 8-12 of the first run are not kept twice


def test_epoch_step_counts_differ_under_the_small_window(tiny_model_dir, tmp_path, monkeypatch):  # noqa: F811
    """The precondition of the test above, checked directly: epoch 0 packs to fewer steps than epoch 1."""
    from transformers import AutoTokenizer

    from anymask.train import data as D
    from anymask.train.distributed import Dist
    from anymask.train.stream import Stream

    import torch

    monkeypatch.setattr(packing, "WINDOW", 8)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    examples = D.tokenize(D.read_records(_data(tmp_path, "sft", 30), "sft"), tok, "sft", 96, truncate=True)
    stream = Stream({0: examples}, 96, 1, 0, Dist(0, 1, torch.device("cpu"), "none"))
    assert stream.steps_in_epoch(0) < stream.steps_in_epoch(1)


def _first_step_checkpoint(tiny_model_dir, tmp_path):
    """A 2-step sft run under ``tmp_path / "a"`` saving every step: its data and step-1 checkpoint."""
    data = _data(tmp_path, "sft", 20)
    train(config(tiny_model_dir, "sft", data, tmp_path / "a", max_steps=2, save_every=1))
    return data, str(tmp_path / "a" / "checkpoint-000001")


def test_resume_with_another_lora_rank_is_refused(tiny_model_dir, tmp_path):  # noqa: F811
    data, saved = _first_step_checkpoint(tiny_model_dir, tmp_path)
    with pytest.raises(ConfigError, match=r"cannot resume .*lora_r 8 -> 4"):
        train(config(tiny_model_dir, "sft", data, tmp_path / "b", max_steps=3, lora_r=4, resume=saved))
    relative = train(config(os.path.relpath(tiny_model_dir), "sft", data, tmp_path / "d", max_steps=2,
                            resume=saved))  # the same model, spelled otherwise
    assert [h["step"] for h in relative.history] == [2]
    with pytest.warns(UserWarning, match=r"lr 0.005 -> 0.5\).*schedule .* stays the checkpoint's"):
        train(config(tiny_model_dir, "sft", data, tmp_path / "e", max_steps=2, lr=0.5, resume=saved))
    with pytest.warns(UserWarning, match=r"changed settings \(lora_alpha 16 -> 32\)"):
        train(config(tiny_model_dir, "sft", data, tmp_path / "c", max_steps=2, lora_alpha=32, resume=saved))


def _logged_lrs(out) -> dict[int, float]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["lr"] for r in records if "lr" in r}


def test_resumed_run_keeps_the_checkpoints_lr_schedule(tiny_model_dir, tmp_path):  # noqa: F811
    """LambdaLR's state has no lambda: a run resumed with another length and warm-up still follows
    the checkpoint's schedule, step for step, then holds its final lr (10% of the peak)."""
    data = _data(tmp_path, "sft", 20)
    full = train(config(tiny_model_dir, "sft", data, tmp_path / "a", max_steps=4, warmup_steps=1, save_every=2))
    lrs = _logged_lrs(tmp_path / "a")
    assert [h["lr"] for h in full.history] == [lrs[s] for s in range(1, 5)]
    with pytest.warns(UserWarning, match=r"warmup_steps 1 -> 3; max_steps 4 -> 7\).*\(peak lr 0.005, 1 warm-up "
                      r"step, cosine decay to 10% of the peak over 4 steps\) stays the checkpoint's: steps 5-7 of "
                      r"this run stay at its final lr 0.0005"):
        train(config(tiny_model_dir, "sft", data, tmp_path / "a", max_steps=7, warmup_steps=3,
                     resume=str(tmp_path / "a" / "checkpoint-000002")))
    resumed = _logged_lrs(tmp_path / "a")
    assert sorted(resumed) == list(range(1, 8))
    assert [resumed[s] for s in range(1, 5)] == pytest.approx([lrs[s] for s in range(1, 5)], rel=1e-12)
    assert [resumed[s] for s in range(5, 8)] == pytest.approx([5e-4] * 3, rel=1e-12)
    after_warmup = [resumed[s] for s in range(2, 8)]
    assert after_warmup == sorted(after_warmup, reverse=True)  # no jump back up
    state = json.loads((tmp_path / "a" / "checkpoint-000004" / "state.json").read_text())
    assert state["schedule"] == {"lr": 5e-3, "warmup_steps": 1, "total_steps": 4}


def test_resumed_run_says_weight_decay_stays_the_checkpoints(tiny_model_dir, tmp_path):  # noqa: F811
    data, saved = _first_step_checkpoint(tiny_model_dir, tmp_path)
    with pytest.warns(UserWarning, match=r"weight_decay stays the checkpoint's 0.0 \(the optimizer state keeps it\)"):
        train(config(tiny_model_dir, "sft", data, tmp_path / "b", max_steps=2, weight_decay=0.1, resume=saved))
