"""Block-sparse flash-attention forward in Triton: online softmax over the row view's tile ranges.

One program per (batch * q head, q tile); q tiles are visited in the row view's ``order`` so the
heaviest start first.  Empty kv tiles are never loaded; full tiles run without mask math or
bounds checks; partial tiles test ``lo <= kv <= hi`` (and the key flag for scattered padding).
Softmax runs in base 2 with fp32 statistics; rows that see no key store 0 and ``lse = +inf``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import mask_bounds, split16
from .config import Config, interpreting

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
def _fwd_tile(acc, m_i, l_i, q, q_lo, k_ptrs, v_ptrs, kv0, lo, hi, KVALID, Skv, qk_scale, k_scale, v_scale,
              MASKED: tl.constexpr, KPAD: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
              SPLIT: tl.constexpr):
    """One kv tile of online softmax; ``k_ptrs``/``v_ptrs`` point at the tile's first key.

    SPLIT (fp32 as fp16x3): ``q, q_lo`` are q's scaled fp16 parts, k and v are scaled by
    ``k_scale``/``v_scale`` here, ``qk_scale`` already divides by both scales, and ``acc`` is in
    units of ``P_SCALE * v_scale`` (the caller takes them back).
    """
    offs_n = kv0 + tl.arange(0, BLOCK_N)
    if MASKED:
        in_kv = offs_n < Skv
        k = tl.load(k_ptrs, mask=in_kv[:, None], other=0.0)  # [BN, D]
        v = tl.load(v_ptrs, mask=in_kv[:, None], other=0.0)
    else:
        k = tl.load(k_ptrs)
        v = tl.load(v_ptrs)
    if SPLIT:
        k_hi, k_lo = split16.split_operand(k, k_scale, MASKED, SPLIT)
        s = split16.dot3(q, q_lo, tl.trans(k_hi), tl.trans(k_lo)) * qk_scale  # [BM, BN], log2 units
    else:
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
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
    if SPLIT:
        p_hi, p_lo = split16.split(p * 16384.0)  # probabilities <= 1, scaled by 2**14
        v_hi, v_lo = split16.split_operand(v, v_scale, MASKED, SPLIT)
        acc = acc * alpha[:, None] + split16.dot3(p_hi, p_lo, v_hi, v_lo)
    else:
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return acc, m_new, l_i


@triton.jit
def _fwd_kernel(Q, K, V, O, LSE, LO, HI, KVALID, TILES, ORDER, SCALES,
                sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sob, soh, som,
                s_bnd, s_kvalid, s_tiles, s_order,
                H, GROUPS, Sq, Skv, n_m, qk_scale,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
                KPAD: tl.constexpr, PRECISION: tl.constexpr, MERGED: tl.constexpr, SPLIT: tl.constexpr):
    bh = tl.program_id(0)
    b = bh // H
    h = bh % H
    hk = h // GROUPS
    m = tl.load(ORDER + b * s_order + tl.program_id(1))
    q_scale = 1.0
    k_scale = 1.0
    v_scale = 1.0
    if SPLIT:
        q_scale, k_scale, v_scale, _ = split16.load_scales(SCALES, b * (H // GROUPS) + hk)
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
    q = tl.load(q_ptrs, mask=in_q[:, None], other=0.0)  # [BM, D]
    q_lo = q
    if SPLIT:
        q, q_lo = split16.split_operand(q, q_scale, True, SPLIT)
        qk_scale = qk_scale / q_scale / k_scale  # one at a time: each scale may be up to 2**126
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
        acc, m_i, l_i = _fwd_tile(acc, m_i, l_i, q, q_lo, k_base + (kv0 + offs_n)[:, None] * skn + offs_d[None, :],
                                  v_base + (kv0 + offs_n)[:, None] * svn + offs_d[None, :], kv0, lo, hi,
                                  kvalid, Skv, qk_scale, k_scale, v_scale, True, KPAD, BLOCK_N, PRECISION, SPLIT)
    for n in range(full_first, full_end):  # full tiles: no mask math, no bounds checks
        kv0 = n * BLOCK_N
        acc, m_i, l_i = _fwd_tile(acc, m_i, l_i, q, q_lo, k_base + (kv0 + offs_n)[:, None] * skn + offs_d[None, :],
                                  v_base + (kv0 + offs_n)[:, None] * svn + offs_d[None, :], kv0, lo, hi,
                                  kvalid, Skv, qk_scale, k_scale, v_scale, False, KPAD, BLOCK_N, PRECISION,
                                  SPLIT)
    if not MERGED:
        for n in range(full_end, end):
            kv0 = n * BLOCK_N
            acc, m_i, l_i = _fwd_tile(acc, m_i, l_i, q, q_lo, k_base + (kv0 + offs_n)[:, None] * skn + offs_d[None, :],
                                      v_base + (kv0 + offs_n)[:, None] * svn + offs_d[None, :], kv0, lo, hi,
                                      kvalid, Skv, qk_scale, k_scale, v_scale, True, KPAD, BLOCK_N, PRECISION,
                                      SPLIT)
    seen = l_i > 0
    if SPLIT:
        acc = acc * (1.0 / 16384.0 / v_scale)
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


def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bounds: mask_bounds.MaskBounds,
            scale: float, cfg: Config):
    """Attention output ``[B, Hq, Sq, D]`` (q's dtype), base-2 LSE ``[B, Hq, Sq]`` (fp32), and with
    fp16x3 dots the q, k, v scales (:func:`split16.scales` ``[B, Hkv, 4]``, dO's slot left at 1)
    for the backward to reuse, else None.

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
    split = cfg.precision == "fp16x3"
    scales = None
    if split:
        rows, keys = mask_bounds.live(bounds)  # [Bm, Sq], [Bm, Skv]
        scales = split16.scales([q, k, v, None], Hkv, [rows, keys, keys, None])  # [B, Hkv, 4]
    _fwd_kernel[(B * H, n_m)](
        q, k, v, o, lse, bounds.lo, bounds.hi, kvalid, tiles, order, lse if scales is None else scales,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), o.stride(0), o.stride(1), o.stride(2),
        Sq if per_b else 0, Skv if per_b else 0, n_m * 4 if per_b else 0, n_m if per_b else 0,
        H, H // Hkv, Sq, Skv, n_m, scale * LOG2E,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, HEAD_DIM=D, KPAD=bounds.kvalid is not None,
        PRECISION=cfg.precision, MERGED=cfg.merged, SPLIT=mask_bounds.split_level(bounds) if split else 0,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return o, lse, scales
