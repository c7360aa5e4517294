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


def test_resume_with_another_lora_rank_is_refused(tiny_model_dir, tmp_path):  # noqa: F811
    data = _data(tmp_path, "sft", 20)
    train(config(tiny_model_dir, "sft", data, tmp_path / "a", max_steps=2, save_every=1))
    with pytest.raises(ConfigError, match=r"cannot resume .*lora_r 8 -> 4"):
        train(config(tiny_model_dir, "sft", data, tmp_path / "b", max_steps=3, lora_r=4,
                     resume=str(tmp_path / "a" / "checkpoint-000001")))
    relative = train(config(os.path.relpath(tiny_model_dir), "sft", data, tmp_path / "d", max_steps=2,
                            resume=str(tmp_path / "a" / "checkpoint-000001")))  # the same model, spelled otherwise
    assert [h["step"] for h in relative.history] == [2]
    with pytest.warns(UserWarning, match=r"lr 0.005 -> 0.5\).*schedule .* stays the checkpoint's"):
        train(config(tiny_model_dir, "sft", data, tmp_path / "e", max_steps=2, lr=0.5,
                     resume=str(tmp_path / "a" / "checkpoint-000001")))
    with pytest.warns(UserWarning, match=r"changed settings \(lora_alpha 16 -> 32\)"):
        train(config(tiny_model_dir, "sft", data, tmp_path / "c", max_steps=2, lora_alpha=32,
                     resume=str(tmp_path / "a" / "checkpoint-000001")))
