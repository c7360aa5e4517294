"""xformers ``memory_efficient_attention`` when it imports and its kernels actually run.

Masks compile to xformers ``AttentionBias`` classes (:func:`compile_xformers_bias`, pure and
testable without the library), never to a dense bias tensor:

    no documents/padding   full            no bias
                           causal          LowerTriangularFromBottomRightMask
                           window(l, 0)    LowerTriangularFromBottomRightLocalAttentionMask(l + 1)
                           window(l, r)    LocalAttentionFromBottomRightMask(l, r)
    documents/padding      full            BlockDiagonalMask.from_seqlens
    (packed, [1, T, H, K]) causal          BlockDiagonalCausalMask (BlockDiagonalCausalFromBottomRightMask
                                           when queries are fewer than keys)
                           window(l, 0)    BlockDiagonalCausalLocalAttentionMask(l + 1) (...FromBottomRight...)

Layout ``[B, M, H, K]``; GQA through the 5-D ``[B, M, G, H, K]`` form with stride-0 expanded k/v.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

from .. import segments as seg
from .._optional import probe
from ..structure import Structure
from .base import Backend
from .common import nothing_visible


@dataclass(frozen=True, eq=False)
class XformersBias:
    """Which ``xformers.ops.fmha.attn_bias`` class, with which arguments (``cls=None``: no bias)."""

    cls: str | None
    packed: bool  # inputs packed to [1, T, H, K] along ``layout``
    window_left: int | None = None  # LocalAttentionFromBottomRightMask
    window_right: int | None = None
    window_size: int | None = None  # causal local classes: key j visible when i - window_size < j <= i
    layout: seg.Layout | None = None

    @property
    def q_seqlen(self) -> list[int] | None:
        return None if self.layout is None else list(self.layout.q_lengths)

    @property
    def kv_seqlen(self) -> list[int] | None:
        return None if self.layout is None else list(self.layout.k_lengths)


def xformers_reasons(s: Structure, batch: int, q_len: int, kv_len: int) -> list[str]:
    """Why no xformers bias class expresses ``s`` exactly (empty when one does)."""
    out = seg.reasons(s, batch, q_len, kv_len)
    packed = s.documents is not None or s.valid is not None
    if not out and packed and s.base == "window" and s.right != 0:
        out.append(f"window(left={s.left}, right={s.right}) over documents/padding: xformers has no "
                   "unpadded block-diagonal two-sided local mask (only causal local ones)")
    return out


def compile_xformers_bias(s: Structure, batch: int, q_len: int, kv_len: int, device=None) -> XformersBias:
    """Compile a structured mask to an xformers bias description; ``ValueError`` with the reason if none fits."""
    problems = xformers_reasons(s, batch, q_len, kv_len)
    if problems:
        raise ValueError("; ".join(problems))
    if s.documents is None and s.valid is None:
        if s.base == "full":
            return XformersBias(None, False)
        if s.base == "causal":
            return XformersBias("LowerTriangularFromBottomRightMask", False)
        if s.right == 0:
            return XformersBias("LowerTriangularFromBottomRightLocalAttentionMask", False, window_size=s.left + 1)
        left = kv_len if s.left is None else s.left
        right = kv_len if s.right is None else s.right
        return XformersBias("LocalAttentionFromBottomRightMask", False, window_left=left, window_right=right)
    lay = seg.layout(s, batch, q_len, kv_len, device=device)
    square = lay.q_lengths == lay.k_lengths
    if s.base == "full":
        return XformersBias("BlockDiagonalMask", True, layout=lay)
    if s.base == "causal":
        name = "BlockDiagonalCausalMask" if square else "BlockDiagonalCausalFromBottomRightMask"
        return XformersBias(name, True, layout=lay)
    name = "BlockDiagonalCausalLocalAttentionMask" if square else "BlockDiagonalCausalLocalAttentionFromBottomRightMask"
    return XformersBias(name, True, window_size=s.left + 1, layout=lay)


def build_bias(desc: XformersBias, attn_bias):
    """The xformers object for ``desc``; ``attn_bias`` is ``xformers.ops.fmha.attn_bias``."""
    if desc.cls is None:
        return None
    if desc.cls == "LowerTriangularFromBottomRightMask":
        return attn_bias.LowerTriangularFromBottomRightMask()
    if desc.cls == "LowerTriangularFromBottomRightLocalAttentionMask":
        return attn_bias.LowerTriangularFromBottomRightMask().make_local_attention(desc.window_size)
    if desc.cls == "LocalAttentionFromBottomRightMask":
        return attn_bias.LocalAttentionFromBottomRightMask(window_left=desc.window_left,
                                                           window_right=desc.window_right)
    block = attn_bias.BlockDiagonalMask.from_seqlens(desc.q_seqlen, desc.kv_seqlen)
    if desc.cls == "BlockDiagonalMask":
        return block
    if desc.cls == "BlockDiagonalCausalMask":
        return block.make_causal()
    if desc.cls == "BlockDiagonalCausalFromBottomRightMask":
        return block.make_causal_from_bottomright()
    if desc.cls == "BlockDiagonalCausalLocalAttentionMask":
        return block.make_local_attention(desc.window_size)
    if desc.cls == "BlockDiagonalCausalLocalAttentionFromBottomRightMask":
        return block.make_local_attention_from_bottomright(desc.window_size)
    raise ValueError(f"unknown xformers bias class {desc.cls!r}")


@lru_cache(maxsize=None)
def _kernel_check() -> str | None:
    """Run ``memory_efficient_attention`` once on a tiny CUDA input; the failure, or None."""
    try:
        xops = probe("xformers.ops")
        x = torch.zeros(1, 8, 1, 64, dtype=torch.float16, device="cuda")  # [B, M, H, K]
        xops.memory_efficient_attention(x, x, x)
        torch.cuda.synchronize()
    except Exception as exc:  # kernels built for another torch/CUDA are the usual cause
        msg = str(exc).splitlines()[0] if str(exc) else ""
        return (f"xformers imports but memory_efficient_attention does not run ({type(exc).__name__}: "
                f"{msg}); install the xformers build that matches this torch")
    return None


class Xformers(Backend):
    name = "xformers"
    summary = "xformers memory_efficient_attention with AttentionBias classes (block-diagonal, bottom-right causal/local)"

    def _machine_reasons(self):
        for module in ("xformers", "xformers.ops"):  # the first carries the install hint
            found = probe(module)
            if isinstance(found, str):
                return [found]
        try:
            if not torch.cuda.is_available():
                return ["xformers' fused kernels need a CUDA GPU; none is available"]
        except Exception as exc:
            return [f"CUDA is not usable ({type(exc).__name__}: {exc})"]
        failure = _kernel_check()
        return [failure] if failure else []

    def problem_reasons(self, p):
        out = []
        if p.device_type != "cuda":
            out.append(f"xformers runs on CUDA tensors only, got {p.device}")
        if p.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            out.append(f"xformers takes float16/bfloat16/float32, got {p.dtype}")
        return out + xformers_reasons(p.structure, p.batch, p.q_len, p.kv_len)

    def run(self, q, k, v, p):
        xops = probe("xformers.ops")
        desc = compile_xformers_bias(p.structure, p.batch, p.q_len, p.kv_len, device=p.device)
        bias = build_bias(desc, xops.fmha.attn_bias)
        if not desc.packed:
            out = _call(xops, q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), bias, p)  # [B, Sq, Hq, D]
            return out.transpose(1, 2)
        lay = desc.layout
        if lay.num_segments == 0:  # every query padded
            return nothing_visible(q, k, v)
        qp, kp, vp = (seg.unpad(t, i)[None] for t, i in ((q, lay.q_index), (k, lay.k_index), (v, lay.k_index)))
        out = _call(xops, qp, kp, vp, bias, p)  # [1, Tq, Hq, D]
        return seg.repad(out[0], lay.q_index, p.batch, p.q_len)


def _call(xops, q, k, v, bias, p):
    """memory_efficient_attention on ``[B, M, H, K]``; GQA via the 5-D form with expanded k/v."""
    if not p.is_gqa:
        return xops.memory_efficient_attention(q, k, v, attn_bias=bias, scale=p.scale)
    B, Mq, Hq, D = q.shape
    Mk, Hkv = k.shape[1], k.shape[2]
    g = Hq // Hkv
    q5 = q.reshape(B, Mq, Hkv, g, D)  # head h = kv_head * g + j, as repeat_interleave
    k5 = k[:, :, :, None, :].expand(B, Mk, Hkv, g, D)
    v5 = v[:, :, :, None, :].expand(B, Mk, Hkv, g, D)
    out = xops.memory_efficient_attention(q5, k5, v5, attn_bias=bias, scale=p.scale)
    return out.reshape(B, Mq, Hq, D)
