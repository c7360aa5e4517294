"""A short peft LoRA run on a tiny model lowers the loss under every mask mode, fp32 and bf16, and the
trained model still attends as its mode says (what the loss alone would not show)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from .test_hf_common import ATTN_PROJ, VOCAB, lora, tiny_model

import anymask.hf

STEPS = 10
MASK_ID = 0


def _counting(start: torch.Tensor, n: int) -> torch.Tensor:
    """Rows that count up by 3 from a random start: learnable from either side."""
    return (start[:, None] + 3 * torch.arange(n)) % (VOCAB - 1) + 1


def _batch(mode: str):
    torch.manual_seed(11)
    if mode.startswith("packed"):
        lengths = [6, 10, 8, 8]
        starts = torch.randint(1, VOCAB, (len(lengths),))
        ids = torch.cat([_counting(s[None], n)[0] for s, n in zip(starts, lengths)]).unsqueeze(0)
        pos = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)
        return {"input_ids": ids, "position_ids": pos}
    return {"input_ids": _counting(torch.randint(1, VOCAB, (4,)), 16)}


def _loss(model, batch, bidirectional: bool) -> torch.Tensor:
    ids = batch["input_ids"]
    if not bidirectional:  # next-token prediction
        return model(**batch, labels=ids).loss
    # bidirectional: reconstruct every 4th token from both sides (seeing it would be trivial)
    hidden = ids.clone()
    hidden[:, 1::4] = MASK_ID
    logits = model(**{**batch, "input_ids": hidden}).logits
    return F.cross_entropy(logits[:, 1::4].float().reshape(-1, VOCAB), ids[:, 1::4].reshape(-1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("mode", ["causal", "bidirectional", "packed_causal", "packed_bidirectional"])
def test_short_lora_run_lowers_the_loss(mode, dtype):
    spec = mode.rsplit("_", 1)[-1]
    model = anymask.hf.set_mask(tiny_model("llama"), spec)
    model = lora(model, targets=[*ATTN_PROJ, "gate_proj", "up_proj", "down_proj"], init_lora_weights=True, r=8)
    model = model.to(dtype)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch = _batch(mode)
    losses = []
    for _ in range(STEPS):
        loss = _loss(model, batch, spec == "bidirectional")
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0], losses
    _assert_attends_as(model.eval(), batch, spec, packed=mode.startswith("packed"))


def _assert_attends_as(model, batch, spec, packed):
    """Changing token t moves earlier positions only when bidirectional, and never another document."""
    ids = batch["input_ids"]
    t = 5 if packed else ids.shape[1] - 1  # packed: the first document's last token (documents of 6, 10, ...)
    edited = ids.clone()
    edited[:, t] = edited[:, t] % (VOCAB - 1) + 1
    with torch.no_grad():
        a = model(**batch).logits.float()
        b = model(**{**batch, "input_ids": edited}).logits.float()
    earlier = (a[:, :t] - b[:, :t]).abs().max().item()
    if spec == "causal":
        assert earlier < 1e-5, f"causal: position < {t} moved by {earlier:.3g} when token {t} changed"
    else:
        assert earlier > 1e-3, f"bidirectional: positions < {t} did not see token {t} change"
    if packed:
        later_docs = (a[:, t + 1:] - b[:, t + 1:]).abs().max().item()
        assert later_docs < 1e-5, f"packed: other documents moved by {later_docs:.3g}"
