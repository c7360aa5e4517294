"""Block-sparse flash-attention forward in Triton: online softmax over the row view's tile ranges.

One program per (batch * q head, q tile); q tiles are visited in the row view's ``order`` so the
heaviest start first.  Empty kv tiles are never loaded; full tiles run without mask math or
bounds checks; partial tiles test ``lo <= kv <= hi`` (and the key flag for scattered padding).
Softmax runs in base 2 with fp32 statistics; rows that see no key store 0 and ``lse = +inf``.
With the ``presplit`` fp32 precision q, k, v arrive as bf16 parts (:mod:`.operands`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import mask_bounds
from .config import Config, interpreting
from .operands import load, mma, operand, split_parts

if interpreting():
    from . import _interpreter_compat

    _interpreter_compat.apply()


@triton.jit
def partial_count(first, full_first, full_end, end, MERGED: tl.constexpr):
    """Partial tiles of the first loop: the ones before the full run, and (MERGED) those after it."""
    n = full_first - first
    if MERGED:
        n = (end - first) - (full_end - full_first)
    return n


@triton.jit
def partial_tile(i, first, full_first, full_end):
    """The ``i``-th partial tile: ``first, ..., full_first - 1``, then on from ``full_end``."""
    return first + i + (i >= full_first - first).to(tl.int32) * (full_end - full_first)


@triton.jit
def _fwd_tile(acc, m_i, l_i, q1, q2, q3, k_ptrs, v_ptrs, s_kp, s_vp, kv0, lo, hi, KVALID, Skv, qk_scale,
              MASKED: tl.constexpr, KPAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              PRECISION: tl.constexpr, SPLIT: tl.constexpr):
    """One kv tile of online softmax; ``k_ptrs``/``v_ptrs`` point at the tile's first key (part)."""
    offs_n = kv0 + tl.arange(0, BLOCK_N)
    in_kv = offs_n < Skv
    k1, k2, k3 = load(k_ptrs, s_kp, in_kv[:, None], MASKED, SPLIT)  # [BN, D] each
    v1, v2, v3 = load(v_ptrs, s_vp, in_kv[:, None], MASKED, SPLIT)
    s = mma(q1, q2, q3, tl.trans(k1), tl.trans(k2), tl.trans(k3), tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32),
            SPLIT, PRECISION) * qk_scale  # [BM, BN], log2 units
    if MASKED:
        ok = (offs_n[None, :] >= lo[:, None]) & (offs_n[None, :] <= hi[:, None])
        if KPAD:
            ok = ok & (tl.load(KVALID + offs_n, mask=in_kv, other=0) != 0)[None, :]
        s = tl.where(ok, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(s - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    p1, p2, p3 = operand(p, v1.dtype, SPLIT)
    acc = mma(p1, p2, p3, v1, v2, v3, acc * alpha[:, None], SPLIT, PRECISION)
    return acc, m_new, l_i


@triton.jit
def _fwd_kernel(Q, K, V, O, LSE, LO, HI, KVALID, TILES, ORDER,
                sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sob, soh, som, s_qp, s_kp, s_vp,
                s_bnd, s_kvalid, s_tiles, s_order,
                H, GROUPS, Sq, Skv, n_m, qk_scale,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
                KPAD: tl.constexpr, PRECISION: tl.constexpr, MERGED: tl.constexpr, SPLIT: tl.constexpr):
    bh = tl.program_id(0)
    b = bh // H
    h = bh % H
    hk = h // GROUPS
    m = tl.load(ORDER + b * s_order + tl.program_id(1))
    tile = TILES + b * s_tiles + m * 4
    first = tl.load(tile)
    full_first = tl.load(tile + 1)
    full_end = tl.load(tile + 2)
    end = tl.load(tile + 3)

    offs_m = m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    in_q = offs_m < Sq
    lo = tl.load(LO + b * s_bnd + offs_m, mask=in_q, other=1)
    hi = tl.load(HI + b * s_bnd + offs_m, mask=in_q, other=0)
    q_ptrs = Q + b.to(tl.int64) * sqb + h.to(tl.int64) * sqh + offs_m[:, None] * sqm + offs_d[None, :]
    q1, q2, q3 = load(q_ptrs, s_qp, in_q[:, None], True, SPLIT)  # [BM, D] each
    k_base = K + b.to(tl.int64) * skb + hk.to(tl.int64) * skh
    v_base = V + b.to(tl.int64) * svb + hk.to(tl.int64) * svh
    kvalid = KVALID + b * s_kvalid
    offs_n = tl.arange(0, BLOCK_N)

    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    for i in range(0, partial_count(first, full_first, full_end, end, MERGED)):
        n = partial_tile(i, first, full_first, full_end)
        kv0 = n * BLOCK_N
        acc, m_i, l_i = _fwd_tile(acc, m_i, l_i, q1, q2, q3, k_base + (kv0 + offs_n)[:, None] * skn + offs_d[None, :],
                                  v_base + (kv0 + offs_n)[:, None] * svn + offs_d[None, :], s_kp, s_vp, kv0, lo,
                                  hi, kvalid, Skv, qk_scale, True, KPAD, BLOCK_M, BLOCK_N, PRECISION, SPLIT)
    for n in range(full_first, full_end):  # full tiles: no mask math, no bounds checks
        kv0 = n * BLOCK_N
        acc, m_i, l_i = _fwd_tile(acc, m_i, l_i, q1, q2, q3, k_base + (kv0 + offs_n)[:, None] * skn + offs_d[None, :],
                                  v_base + (kv0 + offs_n)[:, None] * svn + offs_d[None, :], s_kp, s_vp, kv0, lo,
                                  hi, kvalid, Skv, qk_scale, False, KPAD, BLOCK_M, BLOCK_N, PRECISION, SPLIT)
    if not MERGED:
        for n in range(full_end, end):
            kv0 = n * BLOCK_N
            acc, m_i, l_i = _fwd_tile(acc, m_i, l_i, q1, q2, q3,
                                      k_base + (kv0 + offs_n)[:, None] * skn + offs_d[None, :],
                                      v_base + (kv0 + offs_n)[:, None] * svn + offs_d[None, :], s_kp, s_vp, kv0,
                                      lo, hi, kvalid, Skv, qk_scale, True, KPAD, BLOCK_M, BLOCK_N, PRECISION, SPLIT)
    seen = l_i > 0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    lse = tl.where(seen, m_i + tl.log2(tl.where(seen, l_i, 1.0)), float("inf"))
    o_ptrs = O + b.to(tl.int64) * sob + h.to(tl.int64) * soh + offs_m[:, None] * som + offs_d[None, :]
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=in_q[:, None])
    tl.store(LSE + bh.to(tl.int64) * Sq + offs_m, lse, mask=in_q)


LOG2E = 1.4426950408889634


def empty_in_layout(t: torch.Tensor) -> torch.Tensor:
    """An empty tensor like ``t`` in ``t``'s memory layout (last dim dense), else contiguous.  Outputs
    and gradients of ``[B, S, H, D]`` views (the Hugging Face layout) stay such views, so the caller's
    transpose back copies nothing."""
    out = torch.empty_like(t)
    return out if out.stride(-1) == 1 else torch.empty_like(t, memory_format=torch.contiguous_format)


def presplit(cfg: Config) -> bool:
    """Whether ``cfg`` runs fp32 as bf16 parts split before the kernels (:mod:`.operands`)."""
    return cfg.precision == "presplit"


def dot_precision(cfg: Config) -> str:
    """``tl.dot``'s input precision: the part products are bf16 (fp32 values in the interpreter)."""
    if presplit(cfg):
        return "ieee" if interpreting() else "tf32"
    return cfg.precision


def operand_view(t: torch.Tensor, split: bool):
    """``(tensor for the kernel, elements between parts)``: ``t`` itself, or its bf16 parts' first
    part (strides of a contiguous ``t``) and the part stride."""
    if not split:
        return t, 0
    parts = split_parts(t)  # [3, *t.shape]
    return parts[0], parts.stride(0)


def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bounds: mask_bounds.MaskBounds,
            scale: float, cfg: Config):
    """Attention output ``[B, Hq, Sq, D]`` (q's dtype) and base-2 LSE ``[B, Hq, Sq]`` (fp32).

    q: [B, Hq, Sq, D]; k, v: [B, Hkv, Skv, D]; last dims contiguous.
    """
    B, H, Sq, D = q.shape
    Hkv, Skv = k.shape[1], k.shape[2]
    tiles, order = mask_bounds.row_tiles(bounds, cfg.block_m, cfg.block_n)  # [Bm, nM, 4], [Bm, nM]
    o = empty_in_layout(q)  # [B, Hq, Sq, D]
    lse = torch.empty(B, H, Sq, dtype=torch.float32, device=q.device)
    kvalid = bounds.kvalid if bounds.kvalid is not None else bounds.lo
    per_b = bounds.batch > 1
    n_m = tiles.shape[1]
    split = presplit(cfg)
    (qs, s_qp), (ks, s_kp), (vs, s_vp) = (operand_view(t, split) for t in (q, k, v))
    _fwd_kernel[(B * H, n_m)](
        qs, ks, vs, o, lse, bounds.lo, bounds.hi, kvalid, tiles, order,
        qs.stride(0), qs.stride(1), qs.stride(2), ks.stride(0), ks.stride(1), ks.stride(2),
        vs.stride(0), vs.stride(1), vs.stride(2), o.stride(0), o.stride(1), o.stride(2), s_qp, s_kp, s_vp,
        Sq if per_b else 0, Skv if per_b else 0, n_m * 4 if per_b else 0, n_m if per_b else 0,
        H, H // Hkv, Sq, Skv, n_m, scale * LOG2E,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, HEAD_DIM=D, KPAD=bounds.kvalid is not None,
        PRECISION=dot_precision(cfg), MERGED=cfg.merged, SPLIT=split, num_warps=cfg.num_warps,
        num_stages=cfg.num_stages)
    return o, lse
