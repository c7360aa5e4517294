"""fp32 dots as three fp16 tensor-core products (``fp16x3``), with scaling that keeps fp16 in range.

An fp32 value ``x`` is written ``hi + lo`` with ``hi = fp16(x)`` and ``lo = fp16(x - hi)``: 11 + 11
significant bits, so ``hi + lo`` is ``x`` to ~2**-24 relative, as fp32 itself.  A dot then takes
three fp16 products accumulated in fp32 (``lo*hi + hi*lo + hi*hi``; ``lo*lo`` is below fp32's
rounding).  That is the scheme of ``tf32x3`` (tf32 has the same 11 bits), at twice its tensor-core
rate, and half the products of ``bf16x6`` (bf16 has 8 bits, so it needs three parts).

fp16 has a narrow exponent range (normal from 2**-14, at most 65504), so every operand is scaled
into ``[2**13, 2**14)`` at its largest before it is split, and the product scaled back:

- q, k, v and dO by one power of two per (batch row, kv head) (:func:`scales`, from the largest
  finite ``|x|`` over the live slots: query rows that see a key, keys that some row sees; one
  Triton pass before the kernels; exact; up to 2**+-126, so the kernels divide by one scale at a
  time);
- probabilities in the forward (at most 1) by ``2**14``;
- dS, and P in the dK/dV kernel, by one factor per row of the tile (its largest entry), taken back on
  the product's rows.

Entries far below their group's largest lose relative precision in ``lo``, but their absolute error
stays below ``2**-38`` of that largest entry, far under fp32's rounding of the sums they are part of.
Only entries more than ~2**17 below their group's largest lose bits: a packed document whose v is a
million times smaller than its neighbours' gets ~3e-6 relative error where fp32 gives ~3e-7.  The
scales ignore NaN and inf, so a non-finite entry (say, garbage in a padded row) stays as local as in
fp32.  A finite value in a slot no result reads (an uninitialised padded row may hold 1e12) is
not part of the scales either, and is clamped to ``+-2**15`` (once scaled) when split
(:func:`split_operand`, in the tiles that can hold such slots): it stays finite, and a zero
probability times it stays zero, as in fp32.  Gradients accumulate in true units, never in scaled
ones that could overflow.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_TOP = 14  # operands are scaled so their largest magnitude is at most 2**14 (fp16 max: 65504)


@triton.jit
def split(x):
    """fp32 ``x`` (already scaled, ``|x| <= 2**15``) as fp16 ``hi, lo`` with ``hi + lo == x`` to ~2**-24."""
    hi = x.to(tl.float16)
    lo = (x - hi.to(tl.float32)).to(tl.float16)
    return hi, lo


@triton.jit
def split_operand(x, scale, MAY_HOLD_DEAD: tl.constexpr, SPLIT: tl.constexpr):
    """:func:`split` of a q, k, v or dO tile ``x`` times its ``scale``.  ``SPLIT`` is 1 when every
    slot of the problem is live (its value set the scale), 2 when some are dead (padded rows, keys no
    row sees); with 2 and ``MAY_HOLD_DEAD`` (partial tiles, once-per-program loads) finite values are
    first clamped to ``+-2**15 / scale``, so they stay finite, scaled and in fp16.  NaN and inf are
    kept, as fp32 keeps them."""
    if MAY_HOLD_DEAD:
        if SPLIT == 2:
            top = 32768.0 / scale  # inf for scales of 2**-113 and below: nothing finite can overflow then
            x = tl.where(tl.abs(x) < float("inf"), tl.minimum(tl.maximum(x, -top), top), x)
    return split(x * scale)


@triton.jit
def dot3(a_hi, a_lo, b_hi, b_lo):
    """``a @ b`` in fp32 from the split parts: the two small cross products first, then ``hi @ hi``."""
    acc = tl.dot(a_lo, b_hi)
    acc = tl.dot(a_hi, b_lo, acc)
    return tl.dot(a_hi, b_hi, acc)


@triton.jit
def load_scales(SCALES, row_kv_head):
    """The q, k, v and dO scales of one (batch row, kv head): ``SCALES`` is :func:`scales`' output."""
    sc = SCALES + row_kv_head * 4
    return tl.load(sc), tl.load(sc + 1), tl.load(sc + 2), tl.load(sc + 3)


@triton.jit
def split_rows(x):
    """Split ``x`` [R, C] with each row scaled to at most 2**14; returns ``hi, lo`` and the factor
    [R] that takes a product's rows back (rows that are all zero keep factor 2**-100 * 2**-14)."""
    top = tl.maximum(tl.max(tl.abs(x), 1), 7.888609052210118e-31)  # [R], floor 2**-100
    hi, lo = split(x * (16384.0 / top)[:, None])
    return hi, lo, top * (1.0 / 16384.0)


def scales(tensors: list[torch.Tensor | None], kv_heads: int, live: list[torch.Tensor | None],
           into: torch.Tensor | None = None) -> torch.Tensor:
    """Powers of two ``[B, kv_heads, len(tensors)]`` (fp32) that scale each tensor's largest magnitude
    per (batch row, kv head group) into ``[2**13, 2**14)``; 1 for an all-zero group, and for a
    ``None`` entry 1 or, given ``into`` (earlier scales, not modified), its value there.

    tensors: ``[B, H, S, D]`` each, H a multiple of ``kv_heads`` (the q heads of a group share one).
    live: per tensor, ``[Bm, S]`` int8 (Bm 1 or B): only positions marked 1 count (see
    :func:`~anymask.kernels.mask_bounds.live`).
    """
    first = next(t for t in tensors if t is not None)
    B = first.shape[0]
    out = (torch.ones(B, kv_heads, len(tensors), dtype=torch.float32, device=first.device) if into is None
           else into.clone())
    for i, t in enumerate(tensors):
        if t is None:
            continue
        top = _finite_absmax(t, kv_heads, live[i])  # [B, Hkv]
        _, exp = torch.frexp(top)  # top < 2**exp
        exp = torch.where(top > 0, exp, torch.full_like(exp, _TOP)).clamp(_TOP - 126, _TOP + 126)
        out[:, :, i] = torch.ldexp(torch.ones_like(top, dtype=torch.float32), _TOP - exp)
    return out


@triton.jit
def _finite_absmax_kernel(X, LIVE, OUT, HKV, G, S, sxb, sxh, sxs, s_live,
                          BLOCK_R: tl.constexpr, HEAD_DIM: tl.constexpr):
    """``OUT[b * HKV + hk] = max |x|`` over the finite entries of the live positions (``LIVE``
    ``[Bm, S]``) of one block of (q head, row) pairs of kv group ``hk``; the rest count as 0."""
    bh = tl.program_id(0)
    b = bh // HKV
    hk = bh % HKV
    r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)  # [R] over (head of the group, row)
    h = hk * G + r // S
    s = r % S
    offs_d = tl.arange(0, HEAD_DIM)
    ptrs = X + b.to(tl.int64) * sxb + h.to(tl.int64)[:, None] * sxh + s.to(tl.int64)[:, None] * sxs + offs_d[None, :]
    in_rows = r < G * S
    a = tl.abs(tl.load(ptrs, mask=in_rows[:, None], other=0.0).to(tl.float32))  # [R, D]
    is_live = tl.load(LIVE + b * s_live + s, mask=in_rows, other=0) != 0  # [R]
    a = tl.where(is_live[:, None] & (a < float("inf")), a, 0.0)  # NaN compares false
    tl.atomic_max(OUT + bh, tl.max(tl.max(a, 1), 0))


def _finite_absmax(t: torch.Tensor, kv_heads: int, live: torch.Tensor) -> torch.Tensor:
    """``max |x|`` over the finite entries of ``t`` [B, H, S, D] at the positions ``live`` [Bm, S]
    (int8, Bm 1 or B) marks, per (B, kv head group): [B, Hkv] fp32.

    One read, no copy.  A NaN or inf, or a huge finite value in a slot no result reads (say,
    garbage in a padded row), must not set the scale of its whole group.
    """
    B, H, S, D = t.shape
    out = torch.zeros(B, kv_heads, dtype=torch.float32, device=t.device)
    G = H // kv_heads
    rows = 64
    _finite_absmax_kernel[(B * kv_heads, triton.cdiv(G * S, rows))](
        t, live, out, kv_heads, G, S, t.stride(0), t.stride(1), t.stride(2),
        live.stride(0) if live.shape[0] > 1 else 0, BLOCK_R=rows, HEAD_DIM=D)
    return out
