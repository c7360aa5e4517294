"""FlashAttention 4 (``pip install flash-attn-4``, Dao-AILab's CuTe DSL kernels) when it imports.

Full, causal and sliding-window masks compile to one ``flash_attn_func(window_size=(left, right))``
call, as for flash-attn 2 (:mod:`.flash_attn`)::

    full                 window_size=(None, None)
    causal               window_size=(None, 0)
    window(3) & causal   window_size=(3, 0)        # . . . # # # #   <- query row 6 sees keys 3..6

FA4's ``window_size`` takes ``None`` for an unbounded side, so causal is ``(None, 0)``; it aligns
windows bottom-right (``q_len < kv_len`` = decoding), anymask's semantics.  fp16/bf16 on Hopper or
newer (sm90+), head dim a multiple of 8 up to 256; GQA is native.  Each new mask form, dtype or
head dim JIT-compiles its kernels on first use (6-8 s for fwd+bwd on an H100), then they are cached.

Prefix-LM (``q_len == kv_len``) runs as a ``mask_mod`` reading each row's prefix length from a
tensor (:mod:`.fa4_prefix`).  Every other structured mask -- packed documents, padding, packed
prefix-LM, windows or prefixes inside documents, decoding -- runs as one ``mask_mod`` over per-row
key intervals (:mod:`.fa4_intervals`); both with FA4's block sparsity.  Rows that see no key are
zeroed.  Not offered: masks with opaque (custom) terms, documents that are not contiguous, fp32.
FA4's ``flash_attn_varlen_func`` is not used: its backward returned wrong dQ on short packed
segments in our tests (flash-attn-4 4.0.0b40 on an H100, 37-token rows, head dim 16).  The bench's
hand-rolled FA4 peer (:mod:`anymask.bench.fa4_peer`) calls it anyway, as a user would, or FA4's
document-id ``mask_mod`` where that is faster.
"""

from __future__ import annotations

import torch

from .. import segments as seg
from .. import tiles
from .._optional import probe
from ..kernels import mask_bounds
from ..problem import Problem
from . import fa4_intervals, fa4_prefix
from .base import Backend
from .common import zero_rows

DTYPES = (torch.float16, torch.bfloat16)


def window_size(p: Problem) -> tuple[int | None, int | None]:
    """FA4's ``window_size`` for a full/causal/window base: ``None`` = unbounded side."""
    return tuple(None if side < 0 else side for side in seg.flash_window(p.structure))


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, p: Problem) -> torch.Tensor:
    """One FA4 call: q ``[B, Hq, Sq, D]``, k/v ``[B, Hkv, Skv, D]`` -> ``[B, Hq, Sq, D]``."""
    row_has_key = None
    if uses_window_size(p):
        mask_args = dict(window_size=window_size(p))
    elif p.structure.base == "prefix_lm" and p.structure.documents is None and p.structure.valid is None \
            and p.q_len == p.kv_len:
        mask_args = fa4_prefix.call_kwargs(p)
    else:
        plan = fa4_intervals.plan(p)
        mask_args, row_has_key = fa4_intervals.call_kwargs(plan), plan.row_has_key
    out = probe("flash_attn.cute").flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                   softmax_scale=p.scale, **mask_args)  # [B, S, H, D] in and out
    out = first_output(out).transpose(1, 2)  # [B, Hq, Sq, D]
    return out if row_has_key is None else zero_rows(out, row_has_key)


def uses_window_size(p: Problem) -> bool:
    """Full, causal and windows with nothing else: FA4's own ``window_size``, no ``mask_mod``."""
    s = p.structure
    return s.base in ("full", "causal", "window") and s.documents is None and s.valid is None


def first_output(out):
    """FA4 returns ``out`` or ``(out, lse)`` depending on version and ``return_lse``."""
    return out[0] if isinstance(out, tuple) else out


class Fa4(Backend):
    name = "fa4"
    summary = ("FlashAttention 4 (CuTe DSL): causal/window flags, other structured masks as block-sparse "
               "interval mask_mods (CUDA sm90+, fp16/bf16)")

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
        s = p.structure
        if s.general:
            out.append("fa4 takes structured masks only (base, documents, padding), not opaque (custom) terms")
        elif not mask_bounds.cached(p.mask, ("fa4", "structured"), lambda: tiles.is_structured(s)):  # a host sync
            out.append("fa4 takes documents and prefix groups only when each is one contiguous run of tokens")
        return out

    def run(self, q, k, v, p):
        return attend(q, k, v, p)
