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


def test_embedding_leaves_out_duplicates_of_the_positive():
    """A positive with the same tokens as a query's own positive, or whose query has the same
    tokens, is not its negative (the example data repeats positives: 88% of queries had such a
    duplicate in their row)."""
    import torch
    import torch.nn.functional as F

    from anymask.train.tasks import Embedding

    texts = [(1, 2, 3), (7, 8), (4, 5), (9,), (6, 1), (7, 8), (4, 5), (2, 2)]  # positives 0, 2 and queries 1, 3 match
    row = pack([Example((Doc(texts[i], len(texts[i])), Doc(texts[i + 1])), i) for i in range(0, 8, 2)], 64,
               shuffle=False)[0]
    assert row.same_as == (0, 1, 2, 3, 4, 1, 2, 7)
    emb = torch.randn(8, 8, dtype=torch.float64)

    class Fixed(Embedding):
        def embed(self, model, batch, attn_kwargs):
            return emb

    got = Fixed(temperature=0.1).loss_sum(None, row, {})
    e = F.normalize(emb, dim=-1)
    logits = e[0::2] @ e[1::2].T / 0.1  # [4, 4]
    left_out = ({0, 2}, {1, 3})
    want = sum(-logits[i, i] + torch.logsumexp(logits[i, [j for j in range(4) if {i, j} not in left_out]], 0)
               for i in range(4))
    torch.testing.assert_close(got, want)
    assert not torch.isclose(got, F.cross_entropy(logits, torch.arange(4), reduction="sum"))


def test_diffusion_never_masks_with_the_eos_token(tiny_model_dir):  # noqa: F811
    """Every diffusion document ends with EOS: a mask token equal to it would make a masked position
    and a real end of document the same input.  SmolLM2's pad is its EOS (as Qwen 2.5's)."""
    import transformers

    from anymask.train.config import ConfigError
    from anymask.train.tasks import resolve_mask_token

    tok = transformers.AutoTokenizer.from_pretrained(tiny_model_dir)
    assert resolve_mask_token(tok) == tok.unk_token_id != tok.eos_token_id
    with pytest.raises(ConfigError, match="is the EOS token"):
        resolve_mask_token(tok, mask_token=tok.eos_token)
    with pytest.raises(ConfigError, match="is the EOS token"):
        resolve_mask_token(tok, mask_token_id=tok.eos_token_id)
    tok.unk_token = None
    assert tok.pad_token_id == tok.eos_token_id
    with pytest.raises(ConfigError, match="no mask, unk or pad token other than its EOS"):
        resolve_mask_token(tok)
