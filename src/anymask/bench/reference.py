"""The float64 reference: output and (optionally) gradients, chunked over query rows.

The full float64 score tensor of a bench case (``[B, H, S, S]``, 34 GB at 16 heads x 16k tokens)
does not fit, so the reference walks one batch row and a block of query rows at a time: each
block sees its whole key range, so its softmax is exact, and the backward pass is the textbook
one (``dS = P * (dP - rowsum(dO * O))``) accumulated into ``dK``/``dV``.  Rows that see no key
output 0 and pass back zero gradient.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import masks as M
from ..tiles import is_head_invariant

_CHUNK = {"cpu": 1 << 22, "cuda": 1 << 25}  # score elements per block


@dataclass(frozen=True)
class Reference:
    out: torch.Tensor  # [B, Hq, Sq, D] float64
    row_has_key: torch.Tensor  # [B, Hq|1, Sq] bool
    grads: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None  # dq, dk, dv in float64


def _mask_rows(mask: M.Mask, b: int, heads: int, q0: int, q1: int, q_len: int, kv_len: int, device):
    """Visibility of query rows ``q0:q1`` (indices into the call) of batch row ``b``: ``[H|1, R, Skv]``."""
    offset = kv_len - q_len
    bi = torch.full((1, 1, 1, 1), b, device=device)
    h = torch.arange(heads, device=device).view(1, -1, 1, 1)  # [1, H, 1, 1]
    q = torch.arange(offset + q0, offset + q1, device=device).view(1, 1, -1, 1)  # [1, 1, R, 1]
    kv = torch.arange(kv_len, device=device).view(1, 1, 1, -1)  # [1, 1, 1, Skv]
    return mask.mask_mod(bi, h, q, kv).expand(1, heads, q1 - q0, kv_len)[0]


def rows_with_keys(mask: M.Mask, batch: int, heads: int, q_len: int, kv_len: int, device) -> torch.Tensor:
    """Bool ``[B, H|1, Sq]``: which query rows see at least one key."""
    m = mask.to(device)
    hm = 1 if is_head_invariant(mask) else heads
    step = max(1, _CHUNK.get(torch.device(device).type, 1 << 22) // (hm * kv_len))
    out = torch.empty(batch, hm, q_len, dtype=torch.bool, device=device)
    for b in range(batch):
        for r0 in range(0, q_len, step):
            r1 = min(q_len, r0 + step)
            out[b, :, r0:r1] = _mask_rows(m, b, hm, r0, r1, q_len, kv_len, device).any(dim=-1)
    return out


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: M.Mask, scale: float | None = None,
              dout: torch.Tensor | None = None) -> Reference:
    """Exact attention in float64.  q ``[B, Hq, Sq, D]``; k, v ``[B, Hkv, Skv, D]``; with ``dout``
    (``[B, Hq, Sq, D]``) also the gradients ``dq, dk, dv`` (shapes of q, k, v)."""
    B, Hq, Sq, D = q.shape
    Hkv, Skv = k.shape[1], k.shape[2]
    groups = Hq // Hkv
    scale = D ** -0.5 if scale is None else scale
    device = q.device
    m = mask.to(device)
    hm = 1 if is_head_invariant(mask) else Hq
    q64 = q.detach().double()
    k64 = k.detach().double().repeat_interleave(groups, dim=1)  # [B, Hq, Skv, D]
    v64 = v.detach().double().repeat_interleave(groups, dim=1)
    do64 = None if dout is None else dout.detach().double()
    out = torch.zeros_like(q64)
    has_key = torch.empty(B, hm, Sq, dtype=torch.bool, device=device)
    dq, dk, dv = (torch.zeros_like(q64), torch.zeros_like(k64), torch.zeros_like(v64)) if dout is not None else (None,) * 3
    step = max(1, _CHUNK.get(device.type, 1 << 22) // (Hq * Skv))
    for b in range(B):
        for r0 in range(0, Sq, step):
            r1 = min(Sq, r0 + step)
            allowed = _mask_rows(m, b, hm, r0, r1, Sq, Skv, device)  # [H|1, R, Skv]
            rows = allowed.any(dim=-1, keepdim=True)  # [H|1, R, 1]
            has_key[b, :, r0:r1] = rows[..., 0]
            s = (q64[b, :, r0:r1] @ k64[b].transpose(-1, -2)) * scale  # [Hq, R, Skv]
            p = s.masked_fill(~allowed, float("-inf")).softmax(dim=-1)
            p = torch.where(rows, p, torch.zeros((), dtype=p.dtype, device=device))  # no NaN rows
            o = p @ v64[b]  # [Hq, R, D]
            out[b, :, r0:r1] = o
            if do64 is None:
                continue
            g = do64[b, :, r0:r1]  # [Hq, R, D]
            dv[b] += p.transpose(-1, -2) @ g
            ds = p * (g @ v64[b].transpose(-1, -2) - (g * o).sum(dim=-1, keepdim=True))  # [Hq, R, Skv]
            dq[b, :, r0:r1] = (ds @ k64[b]) * scale
            dk[b] += (ds.transpose(-1, -2) @ q64[b, :, r0:r1]) * scale
    grads = None
    if dout is not None:
        fold = (lambda t: t.view(B, Hkv, groups, Skv, D).sum(dim=2))  # GQA: sum over the group
        grads = (dq, fold(dk), fold(dv))
    return Reference(out, has_key, grads)
