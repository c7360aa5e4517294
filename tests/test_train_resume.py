"""Resuming where epochs pack to different step counts, into the same output dir (metrics not
logged twice), and checkpoints refused when the run's settings no longer fit them."""

from __future__ import annotations

import json
import os
import re
import shutil
import warnings
from pathlib import Path

import pytest

from anymask.train import checkpoint, packing, train
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
    state = json.loads((tmp_path / "a" / "checkpoint-000004" / "state.json").read_text())
    assert state["schedule"] == {"lr": 5e-3, "warmup_steps": 1, "total_steps": 4}
    shutil.rmtree(tmp_path / "a" / "checkpoint-000004")  # going on from step 2 beside it is refused (two runs' steps)
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


def test_resumed_run_says_weight_decay_stays_the_checkpoints(tiny_model_dir, tmp_path):  # noqa: F811
    data, saved = _first_step_checkpoint(tiny_model_dir, tmp_path)
    with pytest.warns(UserWarning, match=r"weight_decay stays the checkpoint's 0.0 \(the optimizer state keeps it\)"):
        train(config(tiny_model_dir, "sft", data, tmp_path / "b", max_steps=3, weight_decay=0.1, resume=saved,
                     save_every=1))
    # its checkpoints record the weight decay in effect (0.0), not the ignored 0.1: resuming with 0.0 says nothing
    again = str(tmp_path / "b" / "checkpoint-000002")
    assert checkpoint.read_state(Path(again))["config"]["weight_decay"] == 0.0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(config(tiny_model_dir, "sft", data, tmp_path / "c", max_steps=3, resume=again))
    assert not [w for w in caught if "weight_decay" in str(w.message)]


def test_fresh_run_into_an_earlier_runs_checkpoints_is_refused(tiny_model_dir, tmp_path, capsys):  # noqa: F811
    """A fresh run would leave them beside its own, and --resume auto would later pick the newest step,
    whichever run wrote it: refused, before anything is written; resuming there still works."""
    from anymask.train.cli import main

    data, _ = _first_step_checkpoint(tiny_model_dir, tmp_path)
    metrics = (tmp_path / "a" / "metrics.jsonl").read_text()
    with pytest.raises(ConfigError, match=r"'.*a' holds checkpoints of an earlier run \(checkpoint-000001, "
                       r"checkpoint-000002\): pass --resume auto .* choose another --output-dir"):
        train(config(tiny_model_dir, "sft", data, tmp_path / "a", max_steps=2))
    assert main(["--model", tiny_model_dir, "--task", "sft", "--data", data, "--output-dir", str(tmp_path / "a"),
                 "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "anymask train: error: --output-dir" in err and "Traceback" not in err
    assert (tmp_path / "a" / "metrics.jsonl").read_text() == metrics
    with pytest.warns(UserWarning, match=r"checkpoint-000002 with changed settings \(max_steps 2 -> 3\)"):
        resumed = train(config(tiny_model_dir, "sft", data, tmp_path / "a", max_steps=3, resume="auto"))
    assert [h["step"] for h in resumed.history] == [3]


def _resume_warnings(tiny_model_dir, data, out, saved) -> list[str]:
    """The resume warnings of a run from checkpoint ``saved`` on ``data`` into ``out``."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(config(tiny_model_dir, "sft", data, out, max_steps=2, resume=saved))
    return [str(w.message) for w in caught if "resuming from" in str(w.message)]


def test_resume_tells_data_edited_in_place_from_a_copy(tiny_model_dir, tmp_path):  # noqa: F811
    """Checkpoints record the data file's size and sha256: the same contents elsewhere resume quietly, the
    same path with other contents warns; a checkpoint saved before the fingerprint compares the path."""
    data, saved = _first_step_checkpoint(tiny_model_dir, tmp_path)
    assert json.loads((Path(saved) / "state.json").read_text())["data_fingerprint"]["size"] == Path(data).stat().st_size
    copy = str(shutil.copy(data, tmp_path / "copy.jsonl"))
    assert _resume_warnings(tiny_model_dir, copy, tmp_path / "b", saved) == []
    lines = Path(data).read_text().splitlines()
    Path(data).write_text("\n".join(lines[1:] + lines[:1]) + "\n")  # reordered: the same size
    assert any(re.search(r"changed settings \(data '.*sft.jsonl' changed since the checkpoint \((\d+) -> \1 bytes, "
                         r"sha256 \w+\.\.\. -> \w+\.\.\.\)\)", w)
               for w in _resume_warnings(tiny_model_dir, data, tmp_path / "c", saved))
    old = shutil.copytree(saved, tmp_path / "old" / "checkpoint-000001")
    state = json.loads((old / "state.json").read_text())
    del state["data_fingerprint"]
    (old / "state.json").write_text(json.dumps(state))
    assert _resume_warnings(tiny_model_dir, data, tmp_path / "d", str(old)) == []


def _sft_examples(tiny_model_dir, tmp_path):
    """The first 30 sft examples, tokenized to at most 96 tokens, and their tokenizer."""
    from transformers import AutoTokenizer

    from anymask.train import data as D

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    return D.tokenize(D.read_records(_data(tmp_path, "sft", 30), "sft"), tok, "sft", 96, truncate=True), tok


def _stream(examples, grad_accum: int, seed: int):
    from anymask.train.distributed import Dist
    from anymask.train.stream import Stream

    import torch

    return Stream({0: examples}, 96, grad_accum, seed, Dist(0, 1, torch.device("cpu"), "none"))


def test_a_later_epoch_too_small_for_a_step_is_skipped(tiny_model_dir, tmp_path, monkeypatch, capsys):  # noqa: F811
    """--grad-accum as large as epoch 0's micro-batch count: a later epoch that packs into fewer has no step,
    and the run (and a resumed one) goes on with the next epoch that has one."""
    monkeypatch.setattr(packing, "WINDOW", 8)  # small packing windows: epochs pack to different row counts
    examples, tok = _sft_examples(tiny_model_dir, tmp_path)
    seed = next(s for s in range(50) if min(len(_stream(examples, 1, s).rows(e)) for e in (1, 2, 3)) <
                len(_stream(examples, 1, s).rows(0)))
    rows = len(_stream(examples, 1, seed).rows(0))
    kw = dict(tokens_per_batch=96, truncate=True, grad_accum=rows, max_steps=4, seed=seed, save_every=3)
    full = train(config(tiny_model_dir, "sft", "unused", tmp_path / "a", **kw), examples=examples, tokenizer=tok)
    assert [h["step"] for h in full.history] == [1, 2, 3, 4]
    assert "packed into too few micro-batches for a step (--grad-accum" in capsys.readouterr().err
    resumed = train(config(tiny_model_dir, "sft", "unused", tmp_path / "a", resume="auto", **kw), examples=examples,
                    tokenizer=tok)
    assert resumed.losses == pytest.approx(full.losses[3:], rel=1e-5, abs=1e-6)


def test_epochs_run_every_step_of_each_epoch(tiny_model_dir, tmp_path, monkeypatch):  # noqa: F811
    """--epochs 2 runs epoch 0's steps and then epoch 1's, however many each packs to."""
    monkeypatch.setattr(packing, "WINDOW", 8)  # epochs pack to 5 and 6 steps
    examples, tok = _sft_examples(tiny_model_dir, tmp_path)
    stream = _stream(examples, 1, 0)
    steps = [stream.steps_in_epoch(e) for e in (0, 1)]
    assert steps[0] != steps[1], "precondition: the epochs pack to different step counts"
    result = train(config(tiny_model_dir, "sft", "unused", tmp_path / "out", tokens_per_batch=96, truncate=True,
                          max_steps=None, epochs=2), examples=examples, tokenizer=tok)
    assert len(result.history) == sum(steps)


def test_fractional_epochs_round_like_the_decimal_they_name():
    """--epochs 1.6 over epochs of 5 steps is 8 steps: 1.6 - 1 is 0.6000000000000001 in floats,
    whose ceil(x * 5) gave 9."""
    from anymask.train import loop

    class FiveStepEpochs:  # what the step count reads of a Stream
        def steps_in_epoch(self, epoch):
            return 5

    assert [loop._steps_for_epochs(FiveStepEpochs(), e) for e in (1.6, 2.2, 3.6, 1.5, 0.01, 2.0)] == [8, 11, 18, 8, 1, 10]
