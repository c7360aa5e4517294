"""Packed documents / padding: unpad, attend per segment, repad.

The mask ``base & documents & padding`` (base full, causal or window) is split into segments
(:mod:`anymask.segments`); attention runs inside each segment only, so the work is
``sum(L_i^2)`` instead of ``S^2`` and no ``S x S`` mask is ever built.  Padded queries are in no
segment and come back as exact zeros with zero gradient.

Kernels, first that fits (see :func:`kernel`):

    torch      ``torch.nn.attention.varlen.varlen_attn`` (CUDA, fp16/bf16, sm80+, head dim <= 256
               and a multiple of 8).  Its signature moved between releases: 2.9 takes
               ``is_causal`` (no window, no scale); 2.10/2.11 take ``scale`` and
               ``window_size=(left, right)``; 2.12+ add ``enable_gqa``.  Read at run time.
    flash_attn ``flash_attn.flash_attn_varlen_func`` when flash-attn imports (same limits).
    sdpa       segments of equal (query, key) length batched into one SDPA call each: any device,
               any float dtype, GQA via ``enable_gqa`` (repeated K/V for windowed segments on CUDA,
               which stay off PyTorch's cuDNN kernel: ``common.masked_sdpa``); backward through autograd.
"""

from __future__ import annotations

import inspect
from functools import lru_cache

import torch
import torch.nn.functional as F

from .. import segments as seg
from .._optional import probe
from .base import Backend
from .common import PerMaskCache, masked_sdpa, nothing_visible


@lru_cache(maxsize=None)
def torch_varlen():
    """``(varlen_attn, parameter names)`` of this torch, or ``None`` when it has none."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except Exception:
        return None
    return varlen_attn, frozenset(inspect.signature(varlen_attn).parameters)


def _fused_ok(p) -> bool:
    """A FlashAttention-2 class kernel can take these inputs at all."""
    if p.device_type != "cuda" or p.dtype not in (torch.float16, torch.bfloat16):
        return False
    if p.head_dim > 256 or p.head_dim % 8:
        return False
    return torch.cuda.get_device_capability(p.device) >= (8, 0)


def kernel(p) -> str:
    """``'torch'``, ``'flash_attn'`` or ``'sdpa'``: what :class:`Varlen` will run ``p`` with."""
    if not _fused_ok(p):
        return "sdpa"
    found = torch_varlen()
    if found is not None:
        _, params = found
        if "window_size" in params or p.structure.base in ("full", "causal"):
            return "torch"
    if _flash_attn_runs(p):
        return "flash_attn"
    return "sdpa"


def _flash_attn_runs(p) -> bool:
    """flash-attn 2 works on this machine (not flash-attn-4's bare package, not a broken or pre-2.1
    build: the ``flash_attn`` backend's own checks) and has ``window_size`` where ``p`` needs it."""
    from . import get
    from .flash_attn import _version

    if get("flash_attn").machine_reasons:
        return False
    return p.structure.base != "window" or _version(probe("flash_attn")) >= (2, 3)


_LAYOUTS = PerMaskCache()  # the packed layout costs host syncs: once per mask, not once per layer


class Varlen(Backend):
    name = "varlen"
    summary = "packed documents/padding (unpad, per-segment attention, repad); torch varlen or flash-attn on CUDA, batched SDPA elsewhere"

    def problem_reasons(self, p):
        return seg.reasons(p.structure, p.batch, p.q_len, p.kv_len)

    def run(self, q, k, v, p):
        lay = _LAYOUTS.get(p, lambda: seg.layout(p.structure, p.batch, p.q_len, p.kv_len, device=p.device))
        if lay.num_segments == 0:  # every query padded
            return nothing_visible(q, k, v)
        which = kernel(p)
        if which == "sdpa":
            if lay.contiguous and sum(lay.q_lengths) >= _SPLIT_MIN_MEAN * lay.num_segments:
                return split_segments(q, k, v, p, lay)
            return sdpa_segments(q, k, v, p, lay)
        qp, kp, vp = seg.unpad(q, lay.q_index), seg.unpad(k, lay.k_index), seg.unpad(v, lay.k_index)
        if which == "torch":
            out = _torch_packed(qp, kp, vp, p, lay)  # [Tq, Hq, D]
        else:
            out = _flash_packed(qp, kp, vp, p, lay)
        return seg.repad(out, lay.q_index, p.batch, p.q_len)


def _torch_packed(qp, kp, vp, p, lay):
    """``varlen_attn`` on packed ``[T, H, D]`` tensors, adapting to this torch's signature."""
    fn, params = torch_varlen()
    kwargs = {}
    window = seg.flash_window(p.structure)
    if "window_size" in params:
        kwargs["window_size"] = tuple(window)  # a tuple: (-1, 0) is how it recognises causal
    else:
        kwargs["is_causal"] = window == (-1, 0)
    if "scale" in params:
        kwargs["scale"] = p.scale
    else:
        qp = qp * (p.scale * p.head_dim ** 0.5)  # its default scale is head_dim ** -0.5
    if p.is_gqa:
        if "enable_gqa" in params:
            kwargs["enable_gqa"] = True
        else:
            groups = p.q_heads // p.kv_heads
            kp, vp = kp.repeat_interleave(groups, dim=1), vp.repeat_interleave(groups, dim=1)
    return fn(qp, kp, vp, lay.cu_seqlens_q, lay.cu_seqlens_k, lay.max_seqlen_q, lay.max_seqlen_k, **kwargs)


def _flash_packed(qp, kp, vp, p, lay):
    """flash-attn's ``flash_attn_varlen_func`` (GQA native; causal is bottom-right since 2.1)."""
    fa = probe("flash_attn")
    window = seg.flash_window(p.structure)
    return fa.flash_attn_varlen_func(qp, kp, vp, lay.cu_seqlens_q, lay.cu_seqlens_k, lay.max_seqlen_q,
                                     lay.max_seqlen_k, dropout_p=0.0, softmax_scale=p.scale,
                                     causal=window == (-1, 0), window_size=window)


# Mean query length per segment from which one SDPA call per segment beats gathering equal-length
# segments into batched calls (2-core CPU, fp32, fwd+bwd: 64-token documents 10.8 vs 11.7 ms,
# 32-token ones 10.9 vs 9.8 ms).
_SPLIT_MIN_MEAN = 48


def split_segments(q, k, v, p, lay):
    """Per-segment SDPA on views, for layouts whose segments are runs of consecutive positions.

    Each batch row is split along the sequence into segments and the gaps between them (padded
    or unread positions); every segment is one SDPA call on views, gaps output zeros, and the
    pieces are concatenated back.  Backward is split/cat only, where the gathering path
    (:func:`sdpa_segments`) spends most of a CPU fwd+bwd in ``index`` / ``index_put`` and the
    zero fills behind them (~60% of the time in a profile at B=2, S=1024, fp32).

    q: [B, Hq, Sq, D]; k, v: [B, Hkv, Skv, D]; returns [B, Hq, Sq, D].
    """
    B, Hq, Sq, D = q.shape
    Skv = k.shape[2]
    q_first = lay.q_index[lay.cu_seqlens_q[:-1].long()].tolist()  # flat b * Sq + s of each segment
    k_first = lay.k_index[lay.cu_seqlens_k[:-1].long()].tolist()  # flat b * Skv + s
    spans: list[list[tuple[int, int, int, int]]] = [[] for _ in range(B)]
    for qf, kf, lq, lk in zip(q_first, k_first, lay.q_lengths, lay.k_lengths):
        spans[qf // Sq].append((qf % Sq, lq, kf % Skv, lk))  # left to right within the row
    rows = []
    for b, (q_row, k_row, v_row) in enumerate(zip(q.unbind(0), k.unbind(0), v.unbind(0))):  # [H, S, D]
        q_sizes, q_seg = _chunks([(qs, lq) for qs, lq, _, _ in spans[b]], Sq)
        k_sizes, k_seg = _chunks([(ks, lk) for _, _, ks, lk in spans[b]], Skv)
        qc, kc, vc = q_row.split(q_sizes, dim=1), k_row.split(k_sizes, dim=1), v_row.split(k_sizes, dim=1)
        pieces: list[torch.Tensor | None] = [None] * len(q_sizes)
        for i, (_, lq, _, lk) in enumerate(spans[b]):
            qi, ki = q_seg[i], k_seg[i]
            pieces[qi] = _attend(qc[qi][None], kc[ki][None], vc[ki][None], p, lq, lk)[0]  # [Hq, lq, D]
        pieces = [x if x is not None else q.new_zeros(Hq, n, D) for x, n in zip(pieces, q_sizes)]  # gaps: 0
        rows.append(torch.cat(pieces, dim=1))  # [Hq, Sq, D]
    return torch.stack(rows)


def _chunks(ranges: list[tuple[int, int]], total: int) -> tuple[list[int], list[int]]:
    """Split sizes covering ``[0, total)`` for sorted disjoint ``(start, length)`` ranges and the
    gaps between them, and the chunk index of each range."""
    sizes, where, at = [], [], 0
    for start, n in ranges:
        if start > at:
            sizes.append(start - at)
        where.append(len(sizes))
        sizes.append(n)
        at = start + n
    if at < total:
        sizes.append(total - at)
    return sizes, where


def sdpa_segments(q, k, v, p, lay):
    """Per-segment attention through SDPA, one batched call per distinct (query, key) length.

    q: [B, Hq, Sq, D]; k, v: [B, Hkv, Skv, D]; returns [B, Hq, Sq, D] with zeros at padded queries.
    """
    B, Hq, Sq, D = q.shape
    Hkv, Skv = k.shape[1], k.shape[2]
    qf = q.transpose(1, 2).reshape(B * Sq, Hq, D)  # [B*Sq, Hq, D]
    kf = k.transpose(1, 2).reshape(B * Skv, Hkv, D)  # [B*Skv, Hkv, D]
    vf = v.transpose(1, 2).reshape(B * Skv, Hkv, D)
    groups: dict[tuple[int, int], list[int]] = {}
    for i, key in enumerate(zip(lay.q_lengths, lay.k_lengths)):
        groups.setdefault(key, []).append(i)
    cu_q, cu_k = lay.cu_seqlens_q.long(), lay.cu_seqlens_k.long()
    outs, rows = [], []
    for (lq, lk), members in groups.items():
        ids = torch.tensor(members, device=q.device)
        q_rows = lay.q_index[cu_q[ids][:, None] + torch.arange(lq, device=q.device)]  # [n, lq]
        k_rows = lay.k_index[cu_k[ids][:, None] + torch.arange(lk, device=q.device)]  # [n, lk]
        qs = qf[q_rows].transpose(1, 2)  # [n, Hq, lq, D]
        ks, vs = kf[k_rows].transpose(1, 2), vf[k_rows].transpose(1, 2)  # [n, Hkv, lk, D]
        o = _attend(qs, ks, vs, p, lq, lk)  # [n, Hq, lq, D]
        outs.append(o.transpose(1, 2).reshape(-1, Hq, D))
        rows.append(q_rows.reshape(-1))
    y = torch.cat(outs) if len(outs) > 1 else outs[0]  # [Tq, Hq, D]
    return seg.repad(y, torch.cat(rows) if len(rows) > 1 else rows[0], B, Sq)


def _attend(qs, ks, vs, p, lq, lk):
    """SDPA over ``n`` equal-length segments; the base mask in local, bottom-right coordinates."""
    gqa = {"enable_gqa": True} if p.is_gqa else {}
    left, right = seg.flash_window(p.structure)
    if (left, right) == (-1, -1):
        return F.scaled_dot_product_attention(qs, ks, vs, scale=p.scale, **gqa)
    if (left, right) == (-1, 0) and lq == lk:
        return F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=p.scale, **gqa)
    i = torch.arange(lq, device=qs.device)[:, None] + (lk - lq)  # [lq, 1] query, in key coordinates
    j = torch.arange(lk, device=qs.device)[None, :]  # [1, lk]
    mask = torch.ones(lq, lk, dtype=torch.bool, device=qs.device)
    if left >= 0:
        mask &= j >= i - left
    if right >= 0:
        mask &= j <= i + right
    return masked_sdpa(qs, ks, vs, mask, scale=p.scale, **gqa)
