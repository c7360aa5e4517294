"""Small tensor helpers shared by backends."""

from __future__ import annotations

import torch


def expand_kv(t: torch.Tensor, q_heads: int) -> torch.Tensor:
    """Repeat k/v heads for grouped-query attention: ``[B, Hkv, S, D] -> [B, Hq, S, D]``."""
    groups = q_heads // t.shape[1]
    return t if groups == 1 else t.repeat_interleave(groups, dim=1)


def zero_rows(out: torch.Tensor, row_has_key: torch.Tensor) -> torch.Tensor:
    """Zero the output of query rows that see no key (zero gradient flows back through them).

    out: [B, H, Sq, D]; row_has_key: bool broadcastable to [B, H, Sq, 1].
    """
    return torch.where(row_has_key, out, torch.zeros((), dtype=out.dtype, device=out.device))


def dense_mask(p, heads: int | None = None) -> torch.Tensor:
    """The problem's mask as bool ``[B, H|1, Sq, Skv]`` (one head when the mask cannot vary by head)."""
    if heads is None:
        heads = 1 if p.structure.is_structured else p.q_heads
    return p.mask.to_dense(p.batch, heads, p.q_len, p.kv_len, device=p.device)
