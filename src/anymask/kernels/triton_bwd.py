"""Block-sparse flash-attention backward in Triton, deterministic (no atomics).

Three launches:

    delta   = rowsum(dO * O)                      one program per (q tile, batch * q head)
    dK, dV  over the column view                  one program per (batch * kv head, kv tile); it
                                                  sums over the q heads of its GQA group in order
    dQ      over the row view                     one program per (batch * q head, q tile)

Probabilities are recomputed from the forward's base-2 LSE; partial tiles mask with the row
intervals, so rows that see no key (``lse = +inf``) get exactly zero gradient.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import mask_bounds, split16
from .config import Config
from .triton_fwd import LOG2E, empty_in_layout, partial_count, partial_tile


@triton.jit
def _delta_kernel(O, DO, DELTA, Sq, H, sob, soh, som, sdb, sdh, sdm,
                  BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr):
    bh = tl.program_id(0)  # grid axis 0 (up to 2**31 - 1 programs): batch x heads can pass 65535
    b = bh // H
    h = bh % H
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    in_q = offs_m < Sq
    o = tl.load(O + b.to(tl.int64) * sob + h.to(tl.int64) * soh + offs_m[:, None] * som + offs_d[None, :],
                mask=in_q[:, None], other=0.0).to(tl.float32)
    do = tl.load(DO + b.to(tl.int64) * sdb + h.to(tl.int64) * sdh + offs_m[:, None] * sdm + offs_d[None, :],
                 mask=in_q[:, None], other=0.0).to(tl.float32)
    tl.store(DELTA + bh.to(tl.int64) * Sq + offs_m, tl.sum(o * do, 1), mask=in_q)


@triton.jit
def _dkdv_step(dk, dv, k, k_lo, v, v_lo, offs_n, k_ok, m, q_base, do_base, lse_base, delta_base, lo_base,
               hi_base, sqm, sdm, Sq, qk_scale, q_scale, do_scale, dp_scale,
               MASKED: tl.constexpr, KPAD: tl.constexpr, BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr,
               PRECISION: tl.constexpr, SPLIT: tl.constexpr):
    """Add one q tile's contribution to a kv tile's dK (unscaled) and dV accumulators.

    SPLIT (fp32 as fp16x3): ``k, k_lo`` and ``v, v_lo`` are the scaled fp16 parts, q and dO are
    scaled here, ``qk_scale``/``dp_scale`` undo the scales of s and dP; the products' row factors
    undo the rest, so dK and dV accumulate in true units (a scaled accumulator could overflow fp32
    where the gradient does not).
    """
    offs_m = m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    q_ptrs = q_base + offs_m[:, None] * sqm + offs_d[None, :]
    do_ptrs = do_base + offs_m[:, None] * sdm + offs_d[None, :]
    if MASKED:
        in_q = offs_m < Sq
        q = tl.load(q_ptrs, mask=in_q[:, None], other=0.0)  # [BM, D]
        do = tl.load(do_ptrs, mask=in_q[:, None], other=0.0)
        lse = tl.load(lse_base + offs_m, mask=in_q, other=0.0)  # [BM]
        delta = tl.load(delta_base + offs_m, mask=in_q, other=0.0)
        lo = tl.load(lo_base + offs_m, mask=in_q, other=1)
        hi = tl.load(hi_base + offs_m, mask=in_q, other=0)
    else:
        q = tl.load(q_ptrs)
        do = tl.load(do_ptrs)
        lse = tl.load(lse_base + offs_m)
        delta = tl.load(delta_base + offs_m)
    if SPLIT:
        q, q_lo = split16.split_operand(q, q_scale, MASKED, SPLIT)
        do, do_lo = split16.split_operand(do, do_scale, MASKED, SPLIT)
        s_t = split16.dot3(k, k_lo, tl.trans(q), tl.trans(q_lo)) * qk_scale  # [BN, BM]
    else:
        s_t = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale
    p_t = tl.exp2(s_t - lse[None, :])
    if MASKED:
        ok = (offs_n[:, None] >= lo[None, :]) & (offs_n[:, None] <= hi[None, :])
        if KPAD:
            ok = ok & k_ok[:, None]
        p_t = tl.where(ok, p_t, 0.0)
    if SPLIT:
        p_hi, p_lo, p_back = split16.split_rows(p_t)
        dv += split16.dot3(p_hi, p_lo, do, do_lo) * (p_back / do_scale)[:, None]  # [BN, D], true units
        dp_t = split16.dot3(v, v_lo, tl.trans(do), tl.trans(do_lo)) * dp_scale  # [BN, BM]
        ds_t = p_t * (dp_t - delta[None, :])
        ds_hi, ds_lo, ds_back = split16.split_rows(ds_t)
        dk += split16.dot3(ds_hi, ds_lo, q, q_lo) * (ds_back / q_scale)[:, None]  # [BN, D], true units
    else:
        dv += tl.dot(p_t.to(do.dtype), do, input_precision=PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += tl.dot(ds_t.to(q.dtype), q, input_precision=PRECISION)
    return dk, dv


@triton.jit
def _dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, LO, HI, KVALID, TILES, ORDER, SCALES,
                 sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sdb, sdh, sdm, sdkb, sdkh, sdkn,
                 s_bnd, s_kvalid, s_tiles, s_order,
                 HKV, GROUPS, Sq, Skv, scale, qk_scale,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
                 KPAD: tl.constexpr, PRECISION: tl.constexpr, MERGED: tl.constexpr, SPLIT: tl.constexpr):
    bhk = tl.program_id(0)
    b = bhk // HKV
    hk = bhk % HKV
    n = tl.load(ORDER + b * s_order + tl.program_id(1))
    tile = TILES + b * s_tiles + n * 4
    first = tl.load(tile)
    full_first = tl.load(tile + 1)
    full_end = tl.load(tile + 2)
    end = tl.load(tile + 3)

    offs_n = n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    in_kv = offs_n < Skv
    k = tl.load(K + b.to(tl.int64) * skb + hk.to(tl.int64) * skh + offs_n[:, None] * skn + offs_d[None, :],
                mask=in_kv[:, None], other=0.0)  # [BN, D]
    v = tl.load(V + b.to(tl.int64) * svb + hk.to(tl.int64) * svh + offs_n[:, None] * svn + offs_d[None, :],
                mask=in_kv[:, None], other=0.0)
    k_lo = k
    v_lo = v
    q_scale = 1.0
    do_scale = 1.0
    dp_scale = 1.0
    if SPLIT:
        q_scale, k_scale, v_scale, do_scale = split16.load_scales(SCALES, bhk)
        k, k_lo = split16.split_operand(k, k_scale, True, SPLIT)
        v, v_lo = split16.split_operand(v, v_scale, True, SPLIT)
        qk_scale = qk_scale / q_scale / k_scale  # one at a time: each scale may be up to 2**126
        dp_scale = 1.0 / do_scale / v_scale
    k_ok = in_kv
    if KPAD:
        k_ok = tl.load(KVALID + b * s_kvalid + offs_n, mask=in_kv, other=0) != 0  # [BN]
    lo_base = LO + b * s_bnd
    hi_base = HI + b * s_bnd
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    for g in range(GROUPS):
        h = hk * GROUPS + g
        bh = b * (HKV * GROUPS) + h
        q_base = Q + b.to(tl.int64) * sqb + h.to(tl.int64) * sqh
        do_base = DO + b.to(tl.int64) * sdb + h.to(tl.int64) * sdh
        lse_base = LSE + bh.to(tl.int64) * Sq
        delta_base = DELTA + bh.to(tl.int64) * Sq
        for i in range(0, partial_count(first, full_first, full_end, end, MERGED)):
            m = partial_tile(i, first, full_first, full_end)
            dk, dv = _dkdv_step(dk, dv, k, k_lo, v, v_lo, offs_n, k_ok, m, q_base, do_base, lse_base,
                                delta_base, lo_base, hi_base, sqm, sdm, Sq, qk_scale, q_scale, do_scale,
                                dp_scale, True, KPAD, BLOCK_M, HEAD_DIM, PRECISION, SPLIT)
        for m in range(full_first, full_end):
            dk, dv = _dkdv_step(dk, dv, k, k_lo, v, v_lo, offs_n, k_ok, m, q_base, do_base, lse_base,
                                delta_base, lo_base, hi_base, sqm, sdm, Sq, qk_scale, q_scale, do_scale,
                                dp_scale, False, KPAD, BLOCK_M, HEAD_DIM, PRECISION, SPLIT)
        if not MERGED:
            for m in range(full_end, end):
                dk, dv = _dkdv_step(dk, dv, k, k_lo, v, v_lo, offs_n, k_ok, m, q_base, do_base, lse_base,
                                    delta_base, lo_base, hi_base, sqm, sdm, Sq, qk_scale, q_scale, do_scale,
                                    dp_scale, True, KPAD, BLOCK_M, HEAD_DIM, PRECISION, SPLIT)
    dk_ptrs = DK + b.to(tl.int64) * sdkb + hk.to(tl.int64) * sdkh + offs_n[:, None] * sdkn + offs_d[None, :]
    dv_ptrs = DV + b.to(tl.int64) * sdkb + hk.to(tl.int64) * sdkh + offs_n[:, None] * sdkn + offs_d[None, :]
    tl.store(dk_ptrs, (dk * scale).to(DK.dtype.element_ty), mask=in_kv[:, None])
    tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=in_kv[:, None])


@triton.jit
def _dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, LO, HI, KVALID, TILES, ORDER, SCALES,
               sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sdb, sdh, sdm, sdqb, sdqh, sdqm,
               s_bnd, s_kvalid, s_tiles, s_order,
               H, GROUPS, Sq, Skv, scale, qk_scale,
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
    q = tl.load(Q + b.to(tl.int64) * sqb + h.to(tl.int64) * sqh + offs_m[:, None] * sqm + offs_d[None, :],
                mask=in_q[:, None], other=0.0)  # [BM, D]
    do = tl.load(DO + b.to(tl.int64) * sdb + h.to(tl.int64) * sdh + offs_m[:, None] * sdm + offs_d[None, :],
                 mask=in_q[:, None], other=0.0)
    lse = tl.load(LSE + bh.to(tl.int64) * Sq + offs_m, mask=in_q, other=0.0)  # [BM]
    delta = tl.load(DELTA + bh.to(tl.int64) * Sq + offs_m, mask=in_q, other=0.0)
    lo = tl.load(LO + b * s_bnd + offs_m, mask=in_q, other=1)
    hi = tl.load(HI + b * s_bnd + offs_m, mask=in_q, other=0)
    q_lo = q
    do_lo = do
    k_scale = 1.0
    v_scale = 1.0
    dp_scale = 1.0
    if SPLIT:
        q_scale, k_scale, v_scale, do_scale = split16.load_scales(SCALES, b * (H // GROUPS) + hk)
        q, q_lo = split16.split_operand(q, q_scale, True, SPLIT)
        do, do_lo = split16.split_operand(do, do_scale, True, SPLIT)
        qk_scale = qk_scale / q_scale / k_scale  # one at a time: each scale may be up to 2**126
        dp_scale = 1.0 / do_scale / v_scale
    k_base = K + b.to(tl.int64) * skb + hk.to(tl.int64) * skh
    v_base = V + b.to(tl.int64) * svb + hk.to(tl.int64) * svh
    kvalid = KVALID + b * s_kvalid
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    for i in range(0, partial_count(first, full_first, full_end, end, MERGED)):
        n = partial_tile(i, first, full_first, full_end)
        dq = _dq_step(dq, q, q_lo, do, do_lo, lse, delta, lo, hi, n, k_base, v_base, kvalid, skn, svn, Skv,
                      qk_scale, k_scale, v_scale, dp_scale, True, KPAD, BLOCK_N, HEAD_DIM, PRECISION, SPLIT)
    for n in range(full_first, full_end):
        dq = _dq_step(dq, q, q_lo, do, do_lo, lse, delta, lo, hi, n, k_base, v_base, kvalid, skn, svn, Skv,
                      qk_scale, k_scale, v_scale, dp_scale, False, KPAD, BLOCK_N, HEAD_DIM, PRECISION, SPLIT)
    if not MERGED:
        for n in range(full_end, end):
            dq = _dq_step(dq, q, q_lo, do, do_lo, lse, delta, lo, hi, n, k_base, v_base, kvalid, skn, svn,
                          Skv, qk_scale, k_scale, v_scale, dp_scale, True, KPAD, BLOCK_N, HEAD_DIM,
                          PRECISION, SPLIT)
    dq_ptrs = DQ + b.to(tl.int64) * sdqb + h.to(tl.int64) * sdqh + offs_m[:, None] * sdqm + offs_d[None, :]
    tl.store(dq_ptrs, (dq * scale).to(DQ.dtype.element_ty), mask=in_q[:, None])


@triton.jit
def _dq_step(dq, q, q_lo, do, do_lo, lse, delta, lo, hi, n, k_base, v_base, kvalid, skn, svn, Skv, qk_scale,
             k_scale, v_scale, dp_scale,
             MASKED: tl.constexpr, KPAD: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
             PRECISION: tl.constexpr, SPLIT: tl.constexpr):
    """Add one kv tile's contribution to a q tile's dQ (unscaled).

    SPLIT (fp32 as fp16x3): ``q, q_lo`` and ``do, do_lo`` are the scaled fp16 parts, k and v are
    scaled here, ``qk_scale``/``dp_scale`` undo the scales of s and dP; the product's row factor
    undoes the rest, so dQ accumulates in true units.
    """
    offs_n = n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    k_ptrs = k_base + offs_n[:, None] * skn + offs_d[None, :]
    v_ptrs = v_base + offs_n[:, None] * svn + offs_d[None, :]
    if MASKED:
        in_kv = offs_n < Skv
        k = tl.load(k_ptrs, mask=in_kv[:, None], other=0.0)  # [BN, D]
        v = tl.load(v_ptrs, mask=in_kv[:, None], other=0.0)
    else:
        k = tl.load(k_ptrs)
        v = tl.load(v_ptrs)
    if SPLIT:
        k, k_lo = split16.split_operand(k, k_scale, MASKED, SPLIT)
        s = split16.dot3(q, q_lo, tl.trans(k), tl.trans(k_lo)) * qk_scale  # [BM, BN]
    else:
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
    p = tl.exp2(s - lse[:, None])
    if MASKED:
        ok = (offs_n[None, :] >= lo[:, None]) & (offs_n[None, :] <= hi[:, None])
        if KPAD:
            ok = ok & (tl.load(kvalid + offs_n, mask=in_kv, other=0) != 0)[None, :]
        p = tl.where(ok, p, 0.0)
    if SPLIT:
        v_hi, v_lo = split16.split_operand(v, v_scale, MASKED, SPLIT)
        dp = split16.dot3(do, do_lo, tl.trans(v_hi), tl.trans(v_lo)) * dp_scale  # [BM, BN]
        ds = p * (dp - delta[:, None])
        ds_hi, ds_lo, ds_back = split16.split_rows(ds)
        dq += split16.dot3(ds_hi, ds_lo, k, k_lo) * (ds_back / k_scale)[:, None]  # [BM, D], true units
    else:
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
    return dq


def backward(do, q, k, v, o, lse, bounds: mask_bounds.MaskBounds, scale: float,
             cfg_dkdv: Config, cfg_dq: Config, qkv_scales: torch.Tensor | None = None):
    """Gradients ``dq [B, Hq, Sq, D]``, ``dk, dv [B, Hkv, Skv, D]`` in the inputs' dtypes.

    do, o: [B, Hq, Sq, D]; lse: [B, Hq, Sq] base-2; qkv_scales: the forward's fp16x3 scales (all
    from :func:`triton_fwd.forward`), computed again when None.
    """
    B, H, Sq, D = q.shape
    Hkv, Skv = k.shape[1], k.shape[2]
    do = do if do.stride(-1) == 1 else do.contiguous()  # the kernels take strides; only D must be dense
    if (Sq - 1) * do.stride(2) + D >= 2 ** 31:  # rows are stepped in 32 bits
        do = do.contiguous()
    delta = torch.empty_like(lse)  # [B, Hq, Sq] fp32
    _delta_kernel[(B * H, triton.cdiv(Sq, 64))](
        o, do, delta, Sq, H, o.stride(0), o.stride(1), o.stride(2), do.stride(0), do.stride(1), do.stride(2),
        BLOCK_M=64, HEAD_DIM=D)
    kvalid = bounds.kvalid if bounds.kvalid is not None else bounds.lo
    per_b = bounds.batch > 1
    kpad = bounds.kvalid is not None
    common = (bounds.lo, bounds.hi, kvalid)
    split = cfg_dkdv.precision == "fp16x3"
    if split != (cfg_dq.precision == "fp16x3"):
        raise ValueError("the dK/dV and dQ kernels must both use fp16x3 dots or neither")
    scales = delta  # unread unless split
    if split:  # [B, Hkv, 4]: q, k, v from the forward when it gave them, dO's here
        rows, keys = mask_bounds.live(bounds)  # [Bm, Sq], [Bm, Skv]
        scales = split16.scales([None, None, None, do] if qkv_scales is not None else [q, k, v, do], Hkv,
                                [rows, keys, keys, rows], into=qkv_scales)

    level = mask_bounds.split_level(bounds) if split else 0  # SPLIT: 0 none, 1 all slots live, 2 clamp
    dk = empty_in_layout(k)  # gradients in the inputs' layouts, so autograd copies nothing on the way back
    dv = torch.empty_like(dk)  # the dk/dv kernel writes both with dk's strides
    tiles, order = mask_bounds.col_tiles(bounds, cfg_dkdv.block_m, cfg_dkdv.block_n)  # [Bm, nN, 4]
    n_n = tiles.shape[1]
    _dkdv_kernel[(B * Hkv, n_n)](
        q, k, v, do, lse, delta, dk, dv, *common, tiles, order, scales,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), do.stride(0), do.stride(1), do.stride(2),
        dk.stride(0), dk.stride(1), dk.stride(2),
        Sq if per_b else 0, Skv if per_b else 0, n_n * 4 if per_b else 0, n_n if per_b else 0,
        Hkv, H // Hkv, Sq, Skv, scale, scale * LOG2E,
        BLOCK_M=cfg_dkdv.block_m, BLOCK_N=cfg_dkdv.block_n, HEAD_DIM=D, KPAD=kpad,
        PRECISION=cfg_dkdv.precision, MERGED=cfg_dkdv.merged, SPLIT=level,
        num_warps=cfg_dkdv.num_warps, num_stages=cfg_dkdv.num_stages)

    dq = empty_in_layout(q)
    tiles, order = mask_bounds.row_tiles(bounds, cfg_dq.block_m, cfg_dq.block_n)  # [Bm, nM, 4]
    n_m = tiles.shape[1]
    _dq_kernel[(B * H, n_m)](
        q, k, v, do, lse, delta, dq, *common, tiles, order, scales,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), do.stride(0), do.stride(1), do.stride(2),
        dq.stride(0), dq.stride(1), dq.stride(2),
        Sq if per_b else 0, Skv if per_b else 0, n_m * 4 if per_b else 0, n_m if per_b else 0,
        H, H // Hkv, Sq, Skv, scale, scale * LOG2E,
        BLOCK_M=cfg_dq.block_m, BLOCK_N=cfg_dq.block_n, HEAD_DIM=D, KPAD=kpad,
        PRECISION=cfg_dq.precision, MERGED=cfg_dq.merged, SPLIT=level,
        num_warps=cfg_dq.num_warps, num_stages=cfg_dq.num_stages)
    return dq, dk, dv
