"""Dot operands for the Triton kernels: plain, or fp32 split into three bf16 parts before the kernel.

With ``SPLIT`` (the ``presplit`` fp32 precision) every fp32 operand the kernels read from memory
arrives as three bf16 tensors ``hi, mid, lo`` (:func:`split_parts`, one elementwise pass per call),
so the tiles go straight from global memory to the tensor cores; operands computed in the kernel
(probabilities, ``dS``) are split in registers (:func:`split3`).  Each product ``a @ b`` is then
six bf16 products (:func:`dot6`), as Triton's own ``bf16x6`` dots do it, but without splitting a
loaded tile again on every use::

    x  =  hi + mid + lo          hi = bf16(x), mid = bf16(x - hi), lo = bf16(x - hi - mid)
    a @ b  ~  a1 b3 + a3 b1 + a2 b2 + a1 b2 + a2 b1 + a1 b1      (smallest first; terms < 2^-24 dropped)

Without ``SPLIT`` the helpers are one load, one ``tl.dot`` and one cast, as before.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .config import interpreting

PARTS = 3


def split_parts(x: torch.Tensor) -> torch.Tensor:
    """fp32 ``x`` as ``[3, *x.shape]`` parts ``hi, mid, lo`` with ``hi + mid + lo == x`` to fp32
    rounding; bf16 on the GPU, the same values in fp32 under the interpreter (its bf16 dots are wrong)."""
    hi = x.to(torch.bfloat16)
    rest = x - hi.float()
    mid = rest.to(torch.bfloat16)
    lo = (rest - mid.float()).to(torch.bfloat16)
    parts = torch.stack((hi, mid, lo))  # [3, *x.shape]
    return parts.float() if interpreting() else parts


@triton.jit
def split3(x, PART: tl.constexpr):
    """fp32 ``x`` (a register tile) as bf16-valued parts ``hi, mid, lo`` stored as ``PART``."""
    hi = x.to(tl.bfloat16)
    rest = x - hi.to(tl.float32)
    mid = rest.to(tl.bfloat16)
    lo = (rest - mid.to(tl.float32)).to(tl.bfloat16)
    return hi.to(PART), mid.to(PART), lo.to(PART)


@triton.jit
def dot6(a1, a2, a3, b1, b2, b3, acc, PRECISION: tl.constexpr):
    """``acc + (a1 + a2 + a3) @ (b1 + b2 + b3)`` keeping the six products above 2^-24, smallest first."""
    acc = tl.dot(a1, b3, acc, input_precision=PRECISION)
    acc = tl.dot(a3, b1, acc, input_precision=PRECISION)
    acc = tl.dot(a2, b2, acc, input_precision=PRECISION)
    acc = tl.dot(a1, b2, acc, input_precision=PRECISION)
    acc = tl.dot(a2, b1, acc, input_precision=PRECISION)
    return tl.dot(a1, b1, acc, input_precision=PRECISION)


@triton.jit
def mma(a1, a2, a3, b1, b2, b3, acc, SPLIT: tl.constexpr, PRECISION: tl.constexpr):
    """``acc + a @ b``: six part products with ``SPLIT``, else one ``tl.dot`` of ``a1`` and ``b1``."""
    if SPLIT:
        acc = dot6(a1, a2, a3, b1, b2, b3, acc, PRECISION)
    else:
        acc = tl.dot(a1, b1, acc, input_precision=PRECISION)
    return acc


@triton.jit
def load(ptrs, s_part, mask, MASKED: tl.constexpr, SPLIT: tl.constexpr):
    """A tile and (``SPLIT``) its two other parts, ``s_part`` elements further on; without ``SPLIT``
    the one tile three times.  ``MASKED``: rows outside ``mask`` read 0."""
    if MASKED:
        x1 = tl.load(ptrs, mask=mask, other=0.0)
    else:
        x1 = tl.load(ptrs)
    x2 = x1
    x3 = x1
    if SPLIT:
        if MASKED:
            x2 = tl.load(ptrs + s_part, mask=mask, other=0.0)
            x3 = tl.load(ptrs + s_part + s_part, mask=mask, other=0.0)  # two adds: no int32 overflow
        else:
            x2 = tl.load(ptrs + s_part)
            x3 = tl.load(ptrs + s_part + s_part)
    return x1, x2, x3


@triton.jit
def operand(x, DTYPE: tl.constexpr, SPLIT: tl.constexpr):
    """A computed fp32 tile as a dot operand: its three parts with ``SPLIT``, else ``x`` cast to ``DTYPE``."""
    if SPLIT:
        x1, x2, x3 = split3(x, DTYPE)
    else:
        x1 = x.to(DTYPE)
        x2 = x1
        x3 = x1
    return x1, x2, x3
