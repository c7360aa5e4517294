"""Saved adapters reload and reproduce the logits; a resumed run continues with the same losses;
checkpoints are never half-written."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import anymask.hf
from anymask.train import load_adapter, train
from anymask.train.checkpoint import atomic_dir, clean_partial, latest
from anymask.train.distributed import Dist

from .test_train_helpers import config, tiny_model_dir, write_jsonl  # noqa: F401  (fixture)

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "data"


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
