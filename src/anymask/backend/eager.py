"""Plain PyTorch math in float32/float64: any mask, the test oracle."""

from __future__ import annotations

import torch

from .base import Backend
from .common import dense_mask, expand_kv


class Eager(Backend):
    name = "eager"
    summary = "plain PyTorch math in fp32/fp64; any mask; the reference"
    runs_under_transforms = True

    def run(self, q, k, v, p):
        work = torch.float64 if q.dtype == torch.float64 else torch.float32
        mask = dense_mask(p).mask  # [B, H|1, Sq, Skv]
        k = expand_kv(k, p.q_heads).to(work)  # [B, Hq, Skv, D]
        v = expand_kv(v, p.q_heads).to(work)
        scores = (q.to(work) @ k.transpose(-1, -2)) * p.scale  # [B, Hq, Sq, Skv]
        scores = scores.masked_fill(~mask, float("-inf"))
        row_has_key = mask.any(dim=-1, keepdim=True)  # [B, H|1, Sq, 1]
        scores = torch.where(row_has_key, scores, torch.zeros((), dtype=work, device=q.device))
        probs = torch.where(row_has_key, scores.softmax(dim=-1), torch.zeros((), dtype=work, device=q.device))
        return (probs @ v).to(q.dtype)  # [B, Hq, Sq, D]
