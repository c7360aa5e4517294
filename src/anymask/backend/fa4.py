"""FlashAttention 4 (``pip install flash-attn-4``, Dao-AILab's CuTe DSL kernels) when it imports.

Masks compile to FA4's own call forms, exactly as for flash-attn 2 (:mod:`.flash_attn`)::

    full / causal / window, no documents or padding   flash_attn_func(window_size=(left, right))
    with documents and/or padding                      flash_attn_varlen_func over segments

FA4's ``window_size`` takes ``None`` for an unbounded side, so causal is ``(None, 0)``; it aligns
windows bottom-right (``q_len < kv_len`` = decoding), anymask's semantics.  fp16/bf16 on Hopper or
newer (sm90+), head dim a multiple of 8 up to 256; GQA is native.  Each new mask form, dtype or
head dim JIT-compiles its kernels on first use (tens of seconds), then they are cached.

Prefix-LM is not offered: FA4 takes it only as a ``mask_mod`` whose prefix length is a compile-time
constant (one JIT compile per length) -- the bench's hand-rolled FA4 peer does that for its one
length (:mod:`anymask.bench.fa4_peer`).
"""

from __future__ import annotations

import torch

from .. import segments as seg
from .._optional import probe
from ..problem import Problem
from .base import Backend
from .common import PerMaskCache

DTYPES = (torch.float16, torch.bfloat16)
_LAYOUTS = PerMaskCache()


def window_size(p: Problem) -> tuple[int | None, int | None]:
    """FA4's ``window_size`` for a full/causal/window base: ``None`` = unbounded side."""
    return tuple(None if side < 0 else side for side in seg.flash_window(p.structure))


def packed_layout(p: Problem) -> seg.Layout | None:
    """The segment layout of a documents/padding mask (host syncs: build it once per mask), else None."""
    s = p.structure
    if s.documents is None and s.valid is None:
        return None
    return seg.layout(s, p.batch, p.q_len, p.kv_len, device=p.device)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, p: Problem, lay: seg.Layout | None) -> torch.Tensor:
    """One FA4 call: q ``[B, Hq, Sq, D]``, k/v ``[B, Hkv, Skv, D]`` -> ``[B, Hq, Sq, D]``."""
    fa4 = probe("flash_attn.cute")
    window = window_size(p)
    if lay is None:
        out = fa4.flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),  # [B, S, H, D]
                                  softmax_scale=p.scale, window_size=window)
        return first_output(out).transpose(1, 2)
    if lay.num_segments == 0:  # every query padded
        return q.new_zeros(q.shape) + 0 * (q.sum() + k.sum() + v.sum())
    out = fa4.flash_attn_varlen_func(
        seg.unpad(q, lay.q_index), seg.unpad(k, lay.k_index), seg.unpad(v, lay.k_index),  # [T, H, D]
        cu_seqlens_q=lay.cu_seqlens_q, cu_seqlens_k=lay.cu_seqlens_k, max_seqlen_q=lay.max_seqlen_q,
        max_seqlen_k=lay.max_seqlen_k, softmax_scale=p.scale, window_size=window)
    return seg.repad(first_output(out), lay.q_index, p.batch, p.q_len)


def first_output(out):
    """FA4 returns ``out`` or ``(out, lse)`` depending on version and ``return_lse``."""
    return out[0] if isinstance(out, tuple) else out


class Fa4(Backend):
    name = "fa4"
    summary = "FlashAttention 4 (CuTe DSL): window flags, varlen cu_seqlens for documents/padding (CUDA sm90+, fp16/bf16)"

    def _machine_reasons(self):
        fa4 = probe("flash_attn.cute")
        if isinstance(fa4, str):
            return [fa4]
        if not torch.cuda.is_available():
            return ["FlashAttention 4 needs a CUDA GPU; none is available"]
        if torch.cuda.get_device_capability() < (9, 0):
            return ["FlashAttention 4 is used here on sm90+ GPUs (Hopper, Blackwell) only"]
        return []

    def problem_reasons(self, p):
        out = []
        if p.device_type != "cuda":
            out.append(f"fa4 runs on CUDA tensors only, got {p.device}")
        if p.dtype not in DTYPES:
            out.append(f"fa4 takes float16/bfloat16 only, got {p.dtype}")
        if p.head_dim % 8 or p.head_dim > 256:
            out.append(f"fa4 takes head dims that are multiples of 8 up to 256, got {p.head_dim}")
        if p.structure.base in ("prefix_lm", "prefix_groups") and not p.structure.general:
            out.append("prefix-LM would be an FA4 mask_mod compiled once per prefix length; use cudnn, triton or flex")
        else:
            out += seg.reasons(p.structure, p.batch, p.q_len, p.kv_len)
        return out

    def run(self, q, k, v, p):
        return attend(q, k, v, p, _LAYOUTS.get(p, lambda: packed_layout(p)))
