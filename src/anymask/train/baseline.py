"""Explicit 4-D masks for transformers' own attention implementations (the baselines anymask is
measured against): ``sdpa`` gets a dense bool ``[1, 1, S, S]`` mask, ``flex_attention`` a
BlockMask built from the anymask mask's ``mask_mod``, ``eager`` an additive float mask."""

from __future__ import annotations

import torch

from ..masks import Mask


def explicit_mask(mask: Mask, seq: int, attn: str, device) -> object:
    """The row's mask in the form transformers' ``attn`` implementation accepts as ``attention_mask``."""
    mask = mask.to(device)
    if attn == "flex_attention":
        from torch.nn.attention.flex_attention import create_block_mask

        last = seq - 1

        def mask_mod(b, h, q, kv):  # indices clamped: padded blocks may ask past the end
            return mask.mask_mod(b, h, q.clamp(max=last), kv.clamp(max=last))

        return create_block_mask(mask_mod, 1, None, seq, seq, device=device)
    dense = mask.to_dense(1, 1, seq, seq, device=device)  # [1, 1, S, S] bool
    if attn == "sdpa":
        return dense
    return torch.zeros(dense.shape, device=device).masked_fill(~dense, torch.finfo(torch.float32).min)
