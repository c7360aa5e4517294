"""Tile sizes and launch settings per kernel, head dim and dtype (Hopper-tuned; small in the interpreter).

The block sizes are fixed per entry (the mask lowering depends on them); ``ANYMASK_TRITON_FP32``
picks the fp32 dot precision (``bf16x6`` by default on the GPU where Triton has it: each fp32
operand split into three bf16 parts, six bf16 products, fp32-level error at ~2x the speed of
``tf32x3``, the default on older Triton; ``ieee`` for exact fp32 products);
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


def _default_fp32() -> str:
    """``bf16x6`` where this Triton has it (recent releases; 3.6 does), else ``tf32x3``."""
    try:
        from triton.backends.nvidia.compiler import CUDAOptions
    except ImportError:
        return "tf32x3"
    return "bf16x6" if "bf16x6" in getattr(CUDAOptions, "allowed_dot_input_precisions", ()) else "tf32x3"


def fp32_precision() -> str:
    if interpreting():
        return "ieee"
    return os.environ.get("ANYMASK_TRITON_FP32") or _default_fp32()


# (kernel, head dim bucket, dtype bucket) -> (block_m, block_n, warps, stages).  bf16 hd 128 entries
# are the fastest of a small sweep on an H200 (causal and packed causal documents, 16k tokens);
# fp32 hd 128 entries the fastest with bf16x6 dots in `scripts/gpu_triton_check.py --fp32-sweep`
# (packed documents; larger tiles run out of Hopper's 227 KB of shared memory).
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

_INTERPRET = {"fwd": (16, 16), "dkdv": (16, 32), "dq": (32, 16)}

_OVERRIDES: dict[tuple[str, int, str], Config] = {}


def _buckets(head_dim: int, dtype: torch.dtype):
    return (64 if head_dim <= 64 else 128), ("fp32" if dtype == torch.float32 else "half")


def get(kernel: str, head_dim: int, dtype: torch.dtype) -> Config:
    """Launch settings for ``kernel`` in ``("fwd", "dkdv", "dq")``."""
    d, t = _buckets(head_dim, dtype)
    if (kernel, d, t) in _OVERRIDES:
        return _OVERRIDES[(kernel, d, t)]
    precision = fp32_precision() if dtype == torch.float32 else "tf32"
    merged = os.environ.get("ANYMASK_TRITON_MERGED", "1") not in ("", "0")
    if interpreting():
        bm, bn = _INTERPRET[kernel]
        return Config(bm, bn, 4, 1, precision, merged)
    bm, bn, warps, stages = _GPU[(kernel, d, t)]
    return Config(bm, bn, warps, stages, precision, merged)


def override(kernel: str, head_dim: int, dtype: torch.dtype, **changes) -> Config:
    """Replace settings for one entry (benchmark sweeps and tests); returns the new config."""
    d, t = _buckets(head_dim, dtype)
    _OVERRIDES.pop((kernel, d, t), None)
    cfg = replace(get(kernel, head_dim, dtype), **changes)
    _OVERRIDES[(kernel, d, t)] = cfg
    return cfg


def reset() -> None:
    """Forget every :func:`override`."""
    _OVERRIDES.clear()
