"""Our block-sparse flash-attention kernels (Triton), forward and backward.

The mask is lowered in O(S) to per-row key intervals (:mod:`anymask.kernels.mask_bounds`); the
kernels skip empty tiles, run full tiles without mask math, and order tiles by descending work.
Runs on CUDA, or on the CPU under Triton's interpreter (``TRITON_INTERPRET=1``, for tests; bf16
is computed in fp32 there because the interpreter's bf16 dots are wrong).
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from .._optional import probe
from .base import Backend


def _interpreting() -> bool:
    from ..kernels.config import interpreting

    return interpreting()


class _TritonAttention(torch.autograd.Function):
    """Autograd over the Triton forward and backward; saves q, k, v, o, the base-2 LSE and (fp16x3
    dots) the forward's q, k, v scales."""

    @staticmethod
    def forward(ctx, q, k, v, bounds, scale):
        from ..kernels import config, triton_fwd

        o, lse, qkv_scales = triton_fwd.forward(q, k, v, bounds, scale, config.get("fwd", q.shape[-1], q.dtype))
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.bounds, ctx.scale, ctx.qkv_scales = bounds, scale, qkv_scales
        return o

    @staticmethod
    @once_differentiable
    def backward(ctx, do):
        from ..kernels import config, triton_bwd

        q, k, v, o, lse = ctx.saved_tensors
        d, dt = q.shape[-1], q.dtype
        dq, dk, dv = triton_bwd.backward(do, q, k, v, o, lse, ctx.bounds, ctx.scale,
                                         config.get("dkdv", d, dt), config.get("dq", d, dt), ctx.qkv_scales)
        return dq, dk, dv, None, None


# The kernels widen batch and head offsets to 64 bits but step along rows in 32 bits.
_INT32_OFFSETS = 2 ** 31


class TritonBackend(Backend):
    name = "triton"
    summary = "our Triton block-sparse flash attention: skips empty tiles, no mask math on full tiles"

    @property
    def machine_reasons(self) -> tuple[str, ...]:
        """Not cached: reads ``TRITON_INTERPRET``, which takes effect only when set before Triton is
        first imported (importing torch or anymask may import it)."""
        return tuple(self._machine_reasons())

    def _machine_reasons(self) -> list[str]:
        found = probe("triton")
        if isinstance(found, str):
            return [found]
        if not torch.cuda.is_available() and not _interpreting():
            return ["no CUDA device (set TRITON_INTERPRET=1 to run the kernels on the CPU interpreter)"]
        return []

    def problem_reasons(self, p) -> list[str]:
        from ..kernels import mask_bounds
        from ..kernels.config import HEAD_DIMS

        out = []
        if p.head_dim not in HEAD_DIMS:
            out.append(f"head dim {p.head_dim} not supported (supported: {', '.join(map(str, HEAD_DIMS))})")
        if p.dtype == torch.float64:
            out.append("float64 is not supported (float32, float16, bfloat16 are)")
        if p.device_type == "cpu" and not _interpreting():
            out.append("tensors are on the CPU; the kernels need CUDA (or TRITON_INTERPRET=1)")
        elif p.device_type not in ("cpu", "cuda"):
            out.append(f"device {p.device} is not supported (CUDA only)")
        elif p.device_type == "cuda" and _interpreting():
            out.append("TRITON_INTERPRET=1 is set: the interpreter only runs CPU tensors")
        out.extend(mask_bounds.cached(p.mask, ("reasons",), lambda: mask_bounds.reasons(p.structure)))
        return out

    def run(self, q, k, v, p):
        from ..kernels import mask_bounds

        bounds = mask_bounds.cached(p.mask, ("bounds", p.q_len, p.kv_len, q.device),
                                    lambda: mask_bounds.build(p.structure, p.q_len, p.kv_len, q.device))
        work = torch.float32 if (q.dtype == torch.bfloat16 and _interpreting()) else q.dtype
        q, k, v = (t.to(work) if t.stride(-1) == 1 else t.to(work).contiguous() for t in (q, k, v))
        for name, t in (("q", q), ("k", k), ("v", v)):
            if (t.shape[2] - 1) * t.stride(2) + t.shape[3] >= _INT32_OFFSETS:
                raise RuntimeError(f"triton: {name}'s rows lie {t.stride(2)} elements apart over {t.shape[2]} "
                                   "positions, past the kernels' 32-bit row offsets; use another backend")
        out = _TritonAttention.apply(q, k, v, bounds, p.scale)  # [B, Hq, Sq, D]
        return out.to(p.dtype)
