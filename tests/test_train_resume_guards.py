"""Resuming where it would silently mix runs, go past the end, or read a damaged checkpoint: refused
with one line, or done without duplicates."""

from __future__ import annotations

import json
import os
import re
import shutil
import warnings
from pathlib import Path

import pytest

from anymask.train import train
from anymask.train.config import ConfigError

from .test_train_helpers import config, tiny_model_dir  # noqa: F401  (fixture)
from .test_train_resume import _first_step_checkpoint


def _records(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_a_checkpoint_past_the_runs_end_is_refused(tiny_model_dir, tmp_path):  # noqa: F811
    """It trained nothing and logged the step-2 weights' eval as step 1's."""
    data, _ = _first_step_checkpoint(tiny_model_dir, tmp_path)
    before = (tmp_path / "a" / "metrics.jsonl").read_text()
    with pytest.raises(ConfigError, match=r"checkpoint-000002 is at step 2, past this run's last step 1"):
        train(config(tiny_model_dir, "sft", data, tmp_path / "a", max_steps=1, resume="auto"))
    assert (tmp_path / "a" / "metrics.jsonl").read_text() == before


def test_resuming_a_finished_run_evaluates_once(tiny_model_dir, tmp_path, capsys):  # noqa: F811
    from anymask.train.cli import main

    data, _ = _first_step_checkpoint(tiny_model_dir, tmp_path)
    args = ["--model", tiny_model_dir, "--task", "sft", "--data", data, "--output-dir", str(tmp_path / "a"),
            "--dtype", "fp32", "--tokens-per-batch", "256", "--max-steps", "2", "--lr", "5e-3", "--lora-r", "8", "--lora-alpha", "16",
            "--no-progress"]
    before = _records(tmp_path / "a")
    assert main(args + ["--resume", "auto"]) == 0
    assert "nothing left to train" in capsys.readouterr().out
    assert _records(tmp_path / "a") == before  # the closing eval again, not a second one


def test_resuming_an_earlier_checkpoint_beside_later_ones_is_refused(tiny_model_dir, tmp_path):  # noqa: F811
    """A later --resume auto would go on from the old run's newer checkpoint: steps 1-3 then 7-8."""
    data, saved = _first_step_checkpoint(tiny_model_dir, tmp_path)
    with pytest.raises(ConfigError, match=r"holds checkpoints after checkpoint-000001 \(checkpoint-000002\)"):
        train(config(tiny_model_dir, "sft", data, tmp_path / "a", max_steps=3, resume=saved))
    shutil.rmtree(tmp_path / "a" / "checkpoint-000002")
    resumed = train(config(tiny_model_dir, "sft", data, tmp_path / "a", max_steps=3, resume=saved))
    assert [h["step"] for h in resumed.history] == [2, 3]


def test_resuming_into_another_runs_directory_is_refused(tiny_model_dir, tmp_path):  # noqa: F811
    """Its metrics up to the step would have been kept as this run's."""
    data, saved = _first_step_checkpoint(tiny_model_dir, tmp_path)
    train(config(tiny_model_dir, "sft", data, tmp_path / "other", max_steps=1))
    with pytest.raises(ConfigError, match=r"'.*other' holds an earlier run's adapter and metrics.jsonl"):
        train(config(tiny_model_dir, "sft", data, tmp_path / "other", max_steps=2, resume=saved))


@pytest.mark.parametrize("damage", ["optimizer", "state", "adapter"])
def test_a_damaged_checkpoint_is_one_line_naming_an_earlier_one(tiny_model_dir, tmp_path, capsys, damage):  # noqa: F811
    from anymask.train.cli import main

    data, saved = _first_step_checkpoint(tiny_model_dir, tmp_path)
    newest = tmp_path / "a" / "checkpoint-000002"
    if damage == "optimizer":
        os.truncate(newest / "optimizer.pt", 100)
    elif damage == "state":
        (newest / "state.json").write_text('{"step": 2, "con')
    else:
        os.remove(newest / "adapter" / "adapter_model.safetensors")
    code = main(["--model", tiny_model_dir, "--task", "sft", "--data", data, "--output-dir", str(tmp_path / "a"),
                 "--dtype", "fp32", "--tokens-per-batch", "256", "--max-steps", "3", "--resume", "auto",
                 "--lora-r", "8", "--lora-alpha", "16", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    assert re.search(r"damaged; delete \(or move\) .*checkpoint-000002, then --resume auto goes on from the one "
                     r"before it \(checkpoint-000001\)", err), err
    shutil.move(newest, tmp_path / "damaged")  # as the error says
    resumed = train(config(tiny_model_dir, "sft", data, tmp_path / "a", max_steps=3, resume="auto"))
    assert [h["step"] for h in resumed.history] == [2, 3]


def test_resuming_with_fewer_processes_says_the_data_shards_change(tiny_model_dir, tmp_path):  # noqa: F811
    """A checkpoint of 2 processes (data_shards unset: 2 shards) resumed by 1 process splits the data
    otherwise: each step's batch changes, which the warning now says."""
    data, saved = _first_step_checkpoint(tiny_model_dir, tmp_path)
    state = json.loads((tmp_path / "a" / "checkpoint-000001" / "state.json").read_text())
    state["world"] = 2
    (tmp_path / "a" / "checkpoint-000001" / "state.json").write_text(json.dumps(state))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(config(tiny_model_dir, "sft", data, tmp_path / "b", max_steps=2, resume=saved))
    assert any("data_shards 2 -> 1" in str(w.message) for w in caught), [str(w.message) for w in caught]


def test_the_model_is_compared_by_its_files_not_how_it_is_spelled(tiny_model_dir, tmp_path, monkeypatch):  # noqa: F811
    """Relative paths from another directory name the same model, and so does a copy of it in a moved
    project; one spelling from two directories (a link to another model) names two models."""
    data, _ = _first_step_checkpoint(tiny_model_dir, tmp_path)
    for node in ("node_a", "node_b"):
        shutil.copytree(tiny_model_dir, tmp_path / node / "model")
    monkeypatch.chdir(tmp_path / "node_a")
    train(config("model", "sft", data, tmp_path / "moved", max_steps=1, save_every=1))
    monkeypatch.chdir(tmp_path / "node_b")
    moved = train(config("model", "sft", data, tmp_path / "moved", max_steps=2, resume="auto"))
    assert [h["step"] for h in moved.history] == [2]
    (tmp_path / "x").mkdir()
    monkeypatch.chdir(tmp_path / "x")
    train(config(os.path.relpath(tiny_model_dir), "sft", data, tmp_path / "r", max_steps=1, save_every=1))
    (tmp_path / "x" / "sub").mkdir()
    monkeypatch.chdir(tmp_path / "x" / "sub")
    resumed = train(config(os.path.relpath(tiny_model_dir), "sft", data, tmp_path / "r", max_steps=2, resume="auto"))
    assert [h["step"] for h in resumed.history] == [2]
    os.symlink(tiny_model_dir, tmp_path / "x" / "sub" / "m")
    (tmp_path / "y").mkdir()
    os.symlink(tmp_path / "a" / "adapter", tmp_path / "y" / "m")  # another directory under the same spelling
    monkeypatch.chdir(tmp_path / "y")
    with pytest.raises(ConfigError, match=r"saved with other settings \(model .* \(other files\)"):
        train(config("./m", "sft", data, tmp_path / "r", max_steps=3, resume="auto"))


def test_a_same_shaped_model_with_other_weights_is_refused(tiny_model_dir, tmp_path):  # noqa: F811
    """Same config.json, same weight file names and sizes, one weight changed: it resumed silently."""
    import torch
    import transformers

    data, _ = _first_step_checkpoint(tiny_model_dir, tmp_path)
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight[0, 0] += 1.0
    other = tmp_path / "tuned"
    shutil.copytree(tiny_model_dir, other)
    model.save_pretrained(other)
    assert [f.stat().st_size for f in sorted(other.glob("*.safetensors"))] == \
        [f.stat().st_size for f in sorted(Path(tiny_model_dir).glob("*.safetensors"))]
    with pytest.raises(ConfigError, match=r"saved with other settings \(model .* \(other files\)"):
        train(config(str(other), "sft", data, tmp_path / "a", max_steps=3, resume="auto"))


def test_a_checkpoint_that_recorded_no_weight_samples_still_resumes(tiny_model_dir, tmp_path):  # noqa: F811
    """Checkpoints saved before the sampled hash existed compare what they recorded."""
    data, _ = _first_step_checkpoint(tiny_model_dir, tmp_path)
    state_file = tmp_path / "a" / "checkpoint-000002" / "state.json"
    state = json.loads(state_file.read_text())
    del state["model_files"]["weights_sampled_sha256"]
    state_file.write_text(json.dumps(state))
    resumed = train(config(tiny_model_dir, "sft", data, tmp_path / "a", max_steps=3, resume="auto"))
    assert [h["step"] for h in resumed.history] == [3]


def test_the_sampled_hash_sees_the_first_and_last_byte_of_a_large_file(tmp_path, monkeypatch):
    from anymask.train import checkpoint

    monkeypatch.setattr(checkpoint, "_SAMPLES", 4)
    monkeypatch.setattr(checkpoint, "_WINDOW", 8)
    f = tmp_path / "model.safetensors"
    base = bytes(range(100))
    f.write_bytes(base)
    first = checkpoint._sampled_sha256([f])
    for where in (0, 33, 99):
        changed = bytearray(base)
        changed[where] ^= 1
        f.write_bytes(bytes(changed))
        assert checkpoint._sampled_sha256([f]) != first, where
    changed = bytearray(base)
    changed[20] ^= 1  # between the windows at 0..7 and 30..37: not read, by design
    f.write_bytes(bytes(changed))
    assert checkpoint._sampled_sha256([f]) == first


def test_ctrl_c_is_one_line_saying_where_to_go_on(tiny_model_dir, tmp_path, capsys, monkeypatch):  # noqa: F811
    """It printed a 129-line traceback."""
    from anymask.train import loop
    from anymask.train.cli import main

    data, _ = _first_step_checkpoint(tiny_model_dir, tmp_path)
    capsys.readouterr()

    def interrupted(cfg):
        raise KeyboardInterrupt

    monkeypatch.setattr(loop, "train", interrupted)
    for out, says in ((tmp_path / "a", "the newest checkpoint is .*checkpoint-000002: go on with --resume auto"),
                      (tmp_path / "none", r"no checkpoint was saved \(--save-every N saves them\); to start "
                                          r"again, run the same command$")):
        assert main(["--model", tiny_model_dir, "--task", "sft", "--data", data, "--output-dir", str(out),
                     "--no-progress"]) == 130
        err = capsys.readouterr().err
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
        assert re.search(says, err.strip()), err
    (tmp_path / "none" / "metrics.jsonl").parent.mkdir(exist_ok=True)
    (tmp_path / "none" / "metrics.jsonl").write_text("")  # a run that got to log something
    main(["--model", tiny_model_dir, "--task", "sft", "--data", data, "--output-dir", str(tmp_path / "none"),
          "--no-progress"])
    assert "delete --output-dir's metrics.jsonl or choose another --output-dir" in capsys.readouterr().err
