"""Tile sizes and launch settings per kernel, head dim and dtype (Hopper-tuned; small in the interpreter).

The block sizes are fixed per entry (the mask lowering depends on them); ``ANYMASK_TRITON_FP32``
picks the fp32 dot precision: ``fp16x3`` by default (ours, :mod:`.split16`: each operand scaled
and split into two fp16 parts, three fp16 products; fp32-level error at 1.8x the speed of
``bf16x6``), or Triton's own ``bf16x6`` (three bf16 parts, six products), ``tf32x3`` or ``ieee``;
partial tiles on both sides of the full run are visited in one loop (``ANYMASK_TRITON_MERGED=0``:
one loop per side, as first measured).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

import torch

HEAD_DIMS = (16, 32, 64, 128)


@dataclass(frozen=True)
class Config:
    block_m: int  # query rows per tile
    block_n: int  # keys per tile
    num_warps: int
    num_stages: int
    precision: str  # tl.dot input_precision for fp32 inputs
    merged: bool = True  # one loop over both partial runs (fewer pipeline fills) instead of two


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


FP32_PRECISIONS = ("fp16x3", "bf16x6", "tf32x3", "ieee")


def fp32_precision() -> str:
    """The fp32 dot precision: ``$ANYMASK_TRITON_FP32`` or ``fp16x3`` (the interpreter too, so CPU
    tests run the GPU's path)."""
    chosen = os.environ.get("ANYMASK_TRITON_FP32") or "fp16x3"
    if chosen not in FP32_PRECISIONS:
        raise ValueError(f"ANYMASK_TRITON_FP32={chosen!r}: expected one of {', '.join(FP32_PRECISIONS)}")
    return chosen


# (kernel, head dim bucket, dtype bucket) -> (block_m, block_n, warps, stages).  bf16 hd 128 entries
# are the fastest of a small sweep on an H200 (causal and packed causal documents, 16k tokens);
# fp32 hd 128 entries the fastest with bf16x6 (here) and fp16x3 (`_GPU_FP16X3`) dots in
# `scripts/gpu_triton_check.py --fp32-sweep` (packed documents; larger tiles run out of Hopper's
# 227 KB of shared memory); fp16x3 at hd 64 was swept too and its best tiles are the hd 128 ones.
_GPU = {
    ("fwd", 64, "half"): (128, 64, 8, 3),
    ("fwd", 128, "half"): (128, 64, 8, 3),
    ("fwd", 64, "fp32"): (64, 64, 4, 2),
    ("fwd", 128, "fp32"): (128, 64, 8, 1),
    ("dkdv", 64, "half"): (64, 128, 8, 3),
    ("dkdv", 128, "half"): (64, 128, 8, 3),
    ("dkdv", 64, "fp32"): (32, 64, 4, 2),
    ("dkdv", 128, "fp32"): (32, 128, 8, 1),
    ("dq", 64, "half"): (128, 64, 8, 3),
    ("dq", 128, "half"): (128, 64, 8, 3),
    ("dq", 64, "fp32"): (64, 32, 4, 2),
    ("dq", 128, "fp32"): (128, 32, 8, 1),
}

_GPU_FP16X3 = {
    ("fwd", 64): (128, 64, 8, 3),
    ("fwd", 128): (128, 64, 8, 3),
    ("dkdv", 64): (64, 128, 8, 1),
    ("dkdv", 128): (64, 128, 8, 1),
    ("dq", 64): (128, 64, 8, 1),
    ("dq", 128): (128, 64, 8, 1),
}

_INTERPRET = {"fwd": (16, 16), "dkdv": (16, 32), "dq": (32, 16)}

_OVERRIDES: dict[tuple[str, int, str], Config] = {}


def _buckets(head_dim: int, dtype: torch.dtype):
    return (64 if head_dim <= 64 else 128), ("fp32" if dtype == torch.float32 else "half")


def get(kernel: str, head_dim: int, dtype: torch.dtype, precision: str | None = None) -> Config:
    """Launch settings for ``kernel`` in ``("fwd", "dkdv", "dq")``; ``precision`` (fp32 only) picks
    the dots and their tiles instead of the default."""
    d, t = _buckets(head_dim, dtype)
    if (kernel, d, t) in _OVERRIDES and precision is None:
        return _OVERRIDES[(kernel, d, t)]
    if dtype != torch.float32:
        precision = "tf32"
    elif precision is None:
        precision = fp32_precision()
    merged = os.environ.get("ANYMASK_TRITON_MERGED", "1") not in ("", "0")
    if interpreting():
        bm, bn = _INTERPRET[kernel]
        return Config(bm, bn, 4, 1, precision, merged)
    if t == "fp32" and precision == "fp16x3":
        bm, bn, warps, stages = _GPU_FP16X3[(kernel, d)]
    else:
        bm, bn, warps, stages = _GPU[(kernel, d, t)]
    return Config(bm, bn, warps, stages, precision, merged)


def override(kernel: str, head_dim: int, dtype: torch.dtype, **changes) -> Config:
    """Replace settings for one entry (benchmark sweeps and tests); returns the new config.  A new
    ``precision`` without tile sizes takes that precision's default tiles."""
    d, t = _buckets(head_dim, dtype)
    _OVERRIDES.pop((kernel, d, t), None)
    cfg = replace(get(kernel, head_dim, dtype, changes.get("precision")), **changes)
    _OVERRIDES[(kernel, d, t)] = cfg
    return cfg


def reset() -> None:
    """Forget every :func:`override`."""
    _OVERRIDES.clear()
