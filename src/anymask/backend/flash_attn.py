"""flash-attn (Dao-AILab FlashAttention 2) when it imports and its CUDA kernels load.

Masks compile to flash-attn's own arguments (:func:`flash_args`, pure and testable without the
library):

    full / causal / window, no documents or padding   ``flash_attn_func(causal=, window_size=)``
    with documents and/or padding                      ``flash_attn_varlen_func`` over segments

flash-attn >= 2.1 aligns causal masks bottom-right (``q_len < kv_len`` = decoding), which is
anymask's semantics; ``window_size=(left, right)`` needs >= 2.3.  fp16/bf16, CUDA sm80+, head dim
<= 256.  GQA is native.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import segments as seg
from .._optional import probe
from ..structure import Structure
from .base import Backend
from .common import nothing_visible


@dataclass(frozen=True, eq=False)
class FlashArgs:
    """What flash-attn receives: ``varlen`` (with ``layout``) or batched, ``causal``, ``window_size``."""

    varlen: bool
    causal: bool
    window_size: tuple[int, int]  # (left, right), -1 = unbounded
    layout: seg.Layout | None = None


def flash_args(s: Structure, batch: int, q_len: int, kv_len: int, device=None) -> FlashArgs:
    """Compile a structured mask to flash-attn arguments; ``ValueError`` with the reason if it can't."""
    problems = seg.reasons(s, batch, q_len, kv_len)
    if problems:
        raise ValueError("; ".join(problems))
    left, right = seg.flash_window(s)
    causal = (left, right) == (-1, 0)
    window = (-1, -1) if causal else (left, right)
    if s.documents is None and s.valid is None:
        return FlashArgs(False, causal, window)
    return FlashArgs(True, causal, window, seg.layout(s, batch, q_len, kv_len, device=device))


def _version(mod) -> tuple[int, ...]:
    out = []
    for part in str(getattr(mod, "__version__", "0")).split(".")[:3]:
        digits = "".join(ch for ch in part if ch.isdigit())
        out.append(int(digits or 0))
    return tuple(out)


class FlashAttn(Backend):
    name = "flash_attn"
    summary = "flash-attn 2: causal/window flags, varlen cu_seqlens for documents/padding (CUDA, fp16/bf16)"

    def _machine_reasons(self):
        fa = probe("flash_attn")
        if isinstance(fa, str):
            return [fa]
        if not hasattr(fa, "flash_attn_func"):  # flash-attn-4 alone installs a bare flash_attn package
            return ["flash-attn 2 is not installed (this flash_attn package has no flash_attn_func: flash-attn-4's "
                    "flash_attn.cute alone?); pip install flash-attn --no-build-isolation"]
        out = []
        if _version(fa) < (2, 1):
            out.append(f"flash_attn {getattr(fa, '__version__', '?')} aligns causal masks top-left; "
                       "anymask needs >= 2.1 (bottom-right)")
        try:
            if not torch.cuda.is_available():
                return out + ["flash_attn needs a CUDA GPU; none is available"]
            if torch.cuda.get_device_capability() < (8, 0):
                return out + ["flash_attn 2 needs an sm80+ GPU (Ampere or newer)"]
            x = torch.zeros(1, 8, 1, 64, dtype=torch.float16, device="cuda")  # [B, S, H, D]
            fa.flash_attn_func(x, x, x, causal=True)
        except Exception as exc:  # kernels built for another torch/CUDA, or a broken install
            out.append(f"flash_attn imports but its CUDA kernels do not run ({type(exc).__name__}: "
                       f"{str(exc).splitlines()[0] if str(exc) else ''}); rebuild it against this torch")
        return out

    def problem_reasons(self, p):
        out = []
        if p.device_type != "cuda":
            out.append(f"flash_attn runs on CUDA tensors only, got {p.device}")
        elif torch.cuda.get_device_capability(p.device) < (8, 0):
            out.append("flash_attn 2 needs an sm80+ GPU (Ampere or newer)")
        if p.dtype not in (torch.float16, torch.bfloat16):
            out.append(f"flash_attn takes float16/bfloat16 only, got {p.dtype}")
        if p.head_dim > 256:
            out.append(f"flash_attn takes head dim <= 256, got {p.head_dim}")
        out += seg.reasons(p.structure, p.batch, p.q_len, p.kv_len)
        if p.structure.base == "window" and _version(probe("flash_attn")) < (2, 3):
            out.append("sliding windows need flash_attn >= 2.3 (window_size)")
        return out

    def run(self, q, k, v, p):
        fa = probe("flash_attn")
        args = flash_args(p.structure, p.batch, p.q_len, p.kv_len, device=p.device)
        if not args.varlen:
            out = fa.flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),  # [B, S, H, D]
                                     dropout_p=0.0, softmax_scale=p.scale, causal=args.causal,
                                     window_size=args.window_size)
            return out.transpose(1, 2)  # [B, Hq, Sq, D]
        lay = args.layout
        if lay.num_segments == 0:  # every query padded
            return nothing_visible(q, k, v)
        qp, kp, vp = seg.unpad(q, lay.q_index), seg.unpad(k, lay.k_index), seg.unpad(v, lay.k_index)
        out = fa.flash_attn_varlen_func(qp, kp, vp, lay.cu_seqlens_q, lay.cu_seqlens_k, lay.max_seqlen_q,
                                        lay.max_seqlen_k, dropout_p=0.0, softmax_scale=p.scale,
                                        causal=args.causal, window_size=args.window_size)  # [Tq, Hq, D]
        return seg.repad(out, lay.q_index, p.batch, p.q_len)
