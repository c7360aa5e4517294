"""Each task trains on a tiny random Llama (real SmolLM2 tokenizer) and lowers its eval loss; the
anymask path computes the same loss as transformers' own sdpa given the task's explicit 4-D mask."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from anymask.train import train
from anymask.train.data import Doc, Example
from anymask.train.packing import pack
from anymask.train.tasks import PrefixLM, SFT

from .test_train_helpers import config, tiny_model_dir, write_jsonl  # noqa: F401  (fixture)

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "data"
TASKS = ("sft", "prefix_lm", "embedding", "diffusion")


def subset(task: str, tmp_path, n: int = 48) -> str:
    lines = (EXAMPLES / f"{task}.jsonl").read_text().splitlines()[:n]
    return write_jsonl(tmp_path / f"{task}.jsonl", lines)


@pytest.mark.parametrize("task", TASKS)
def test_task_lowers_eval_loss(task, tiny_model_dir, tmp_path):  # noqa: F811
    data = subset(task, tmp_path)
    result = train(config(tiny_model_dir, task, data, tmp_path / "out", eval_data=data, max_steps=6,
                          eval_every=3, lr=1e-2))
    before, after = result.evals[0]["eval_loss"], result.evals[-1]["eval_loss"]
    losses = [x if x is None else round(x, 3) for x in result.losses]  # None: a step with no loss unit
    print(f"{task}: eval loss {before:.4f} -> {after:.4f}; train losses {losses}")
    assert [e["step"] for e in result.evals] == [0, 3, 6]
    assert after < before - (0.05 if task != "diffusion" else 0.0)
    assert (tmp_path / "out" / "adapter" / "adapter_config.json").exists()
    assert len((tmp_path / "out" / "metrics.jsonl").read_text().splitlines()) == 6 + 3


@pytest.mark.parametrize("task", TASKS)
def test_anymask_matches_sdpa_with_explicit_mask(task, tiny_model_dir, tmp_path):  # noqa: F811
    data = subset(task, tmp_path, 16)
    losses = {}
    for attn in ("anymask", "sdpa"):
        result = train(config(tiny_model_dir, task, data, tmp_path / attn, attn=attn, max_steps=2, tokens_per_batch=128))
        losses[attn] = result.losses
    assert losses["anymask"] == pytest.approx(losses["sdpa"], rel=1e-4, abs=1e-5)


def test_bf16_trains(tiny_model_dir, tmp_path):  # noqa: F811
    data = subset("sft", tmp_path)
    result = train(config(tiny_model_dir, "sft", data, tmp_path / "out", dtype="bf16", eval_data=data,
                          max_steps=4, lr=1e-2))
    assert result.evals[-1]["eval_loss"] < result.evals[0]["eval_loss"]


def _packed_prompts():
    docs = [Example((Doc(tuple(range(5)), 3),), 1), Example((Doc(tuple(range(4)), 1),), 2),
            Example((Doc(tuple(range(3)), 2),), 3)]
    return pack(docs, 64, shuffle=False)[0]


def test_prefix_lm_mask_is_per_document():
    row = _packed_prompts()
    S = row.num_tokens
    got = PrefixLM().mask(row).to_dense(1, 1, S, S)[0, 0]
    doc, prompt = row.doc_ids[0].tolist(), row.prompt[0].tolist()
    for q, kv in itertools.product(range(S), range(S)):
        want = doc[q] == doc[kv] and (kv <= q or (prompt[q] and prompt[kv]))
        assert bool(got[q, kv]) == want, (q, kv)


def test_sft_targets_stay_inside_completions():
    row = _packed_prompts()
    pos = SFT.positions(row).tolist()
    # targets: completion tokens of the same document (doc lengths 5, 4, 3; prompts 3, 1, 2)
    assert pos == [2, 3, 5, 6, 7, 10]
