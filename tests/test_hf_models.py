"""anymask inside real transformers models == transformers' eager attention with the equivalent
explicit 4-D mask: logits and peft LoRA gradients, fp32 and bf16, for every family and mask mode."""

from __future__ import annotations

import copy

import pytest
import torch

from .test_hf_common import (FAMILIES, VOCAB, as_eager_mask, lora, lora_grads, low_precision_close,
                            reference_mask, tiny_model, twin)

import anymask.hf

B, S = 2, 12
MODES = ("causal", "bidirectional", "prefix_lm", "packed_causal", "packed_bidirectional")
DOC_LENGTHS = ([4, 5, 3], [7, 5])


def _case(mode: str):
    """Inputs for both implementations: (anymask kwargs, eager-mask builder, valid [B, S], position_ids)."""
    torch.manual_seed(1)
    ids = torch.randint(0, VOCAB, (B, S))
    if mode.startswith("packed"):
        docs = torch.stack([torch.repeat_interleave(torch.arange(len(r)), torch.tensor(r)) for r in DOC_LENGTHS])
        pos = torch.cat([torch.cat([torch.arange(n) for n in r]) for r in DOC_LENGTHS]).view(B, S)
        valid = torch.ones(B, S, dtype=torch.long)
        base = mode.split("_", 1)[1]
        ours = dict(input_ids=ids, position_ids=pos)
        dense = lambda w: reference_mask(base, B, S, docs=docs, window=w)  # noqa: E731
        return ours, dense, valid, dict(input_ids=ids, position_ids=pos), base
    valid = torch.ones(B, S, dtype=torch.long)
    valid[1, :3] = 0  # left padding
    prefix = torch.tensor([5, 7])
    ours = dict(input_ids=ids, attention_mask=valid)
    if mode == "prefix_lm":
        ours["prefix_lengths"] = prefix
    dense = lambda w: reference_mask(mode, B, S, valid=valid, prefix=prefix, window=w)  # noqa: E731
    return ours, dense, valid, dict(input_ids=ids), mode


def _run(model, dtype, inputs, valid):
    m = lora(copy.deepcopy(model)).to(dtype)
    # a label counts only when it and the position predicting it (one to the left) are real tokens
    seen = valid.clone()
    seen[:, 1:] &= valid[:, :-1]
    labels = inputs["input_ids"].masked_fill(seen == 0, -100)
    out = m(**inputs, labels=labels)
    out.loss.backward()
    keep = valid.bool()
    return out.logits.detach()[keep].float(), lora_grads(m)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("family", FAMILIES)
def test_logits_and_lora_grads_match_eager(family, mode, dtype):
    ours_in, dense, valid, eager_in, spec = _case(mode)
    model = tiny_model(family)
    anymask.hf.set_mask(model, spec)
    eager = twin(model, "eager")

    def eager_run(dt, reference=eager):
        return _run(reference, dt, {**eager_in, "attention_mask": as_eager_mask(reference, dense, dt)}, valid)

    logits, grads = _run(model, dtype, ours_in, valid)
    ref_logits, ref_grads = eager_run(torch.float32)
    assert grads.keys() == ref_grads.keys() and grads
    if dtype == torch.float32:
        torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=1e-4)
        for name in grads:
            torch.testing.assert_close(grads[name], ref_grads[name], atol=1e-4, rtol=1e-3, msg=name)
        return
    # transformers' own low-precision error: the worse of eager (fp32 softmax) and sdpa at this dtype
    peers = [eager_run(dtype), eager_run(dtype, twin(model, "sdpa"))]
    low_precision_close(logits, ref_logits, [l for l, _ in peers])
    for name in grads:
        low_precision_close(grads[name], ref_grads[name], [g[name] for _, g in peers], floor=2e-2)
