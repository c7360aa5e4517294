"""Which backend runs a problem: reasons first, then a measured choice, then a static preference.

Static preference (used until ``anymask tune`` has measured this machine), first that can run:

    device  dtype        mask                                   order
    cuda    bf16/fp16    full or causal (no documents/padding)  cudnn, sdpa, flash_attn, triton, flex
    cuda    bf16/fp16    structured (documents/padding/window/  cudnn, triton, flex, varlen, flash_attn,
                         prefix-LM)                             sdpa
    cuda    fp32         anything                               triton, sdpa, flex
    cpu     any          documents or padding                   varlen, sdpa, flex
    cpu     any          anything else                          sdpa, flex
    any     any          (last resort)                          eager

Unknown or uninstalled backends in these lists are skipped; ``eager`` can always run.
"""

from __future__ import annotations

import torch

from . import backend as B
from .problem import Problem

_CUDA_DENSE = ("cudnn", "sdpa", "flash_attn", "triton", "flex")
_CUDA_STRUCTURED = ("cudnn", "triton", "flex", "varlen", "flash_attn", "sdpa")
_CUDA_FP32 = ("triton", "sdpa", "flex")
_CPU_PACKED = ("varlen", "sdpa", "flex")
_CPU = ("sdpa", "flex")


def static_preference(p: Problem) -> tuple[str, ...]:
    s = p.structure
    plain = s.is_structured and s.documents is None and s.valid is None and s.base in ("full", "causal")
    if p.device_type == "cuda":
        if p.dtype in (torch.float16, torch.bfloat16):
            order = _CUDA_DENSE if plain else _CUDA_STRUCTURED
        else:
            order = _CUDA_FP32
    else:
        order = _CPU_PACKED if (s.documents is not None or s.valid is not None) else _CPU
    return (*order, "eager")


def candidates(p: Problem) -> list[str]:
    """Backends that can run ``p``, in static preference order."""
    out = []
    for name in static_preference(p):
        if name not in B._MODULES:
            continue
        backend = B.get(name, missing_ok=True)
        if backend is not None and not backend.not_supported_reasons(p):
            out.append(name)
    return out


def choose(p: Problem, requested: str = "auto") -> B.Backend:
    """The backend that will run ``p``: the requested one (or an error listing its reasons)."""
    if not isinstance(requested, str):
        raise TypeError(f"backend must be a string, got {type(requested).__name__}")
    if requested != "auto":
        backend = B.get(requested)
        if backend is None:
            raise ValueError(f"backend {requested!r} is not part of this install")
        reasons = backend.not_supported_reasons(p)
        if reasons:
            raise B.BackendUnavailable(
                f"backend {requested!r} cannot run this call "
                f"(mask {p.structure.kind()}, {p.dtype}, {p.device}, grad={p.requires_grad}):\n  - "
                + "\n  - ".join(reasons))
        return backend
    measured = _measured_choice(p)
    if measured is not None:
        return B.get(measured)
    return B.get(candidates(p)[0])


def _measured_choice(p: Problem) -> str | None:
    """The cached measured winner for this problem's signature, if any (see ``anymask.tuning``)."""
    try:
        from . import tuning
    except ImportError:  # tuning is optional in partial installs
        return None
    name = tuning.lookup(p)
    if name is None:
        return None
    backend = B.get(name, missing_ok=True)
    if backend is None or backend.not_supported_reasons(p):
        return None
    return name
