"""Which backend runs a problem: reasons first, then a measured choice, then a static preference.

Static preference (used until ``anymask tune`` has measured this machine), first that can run:

    device  dtype      mask                                        order
    cuda    bf16, hd 128, q_len >= 2048:
                          full or causal (no documents/padding)    fa4, sdpa, flash_attn, cudnn, triton, flex
    cuda    bf16/fp16  full or causal (no documents/padding)       sdpa, flash_attn, cudnn, triton, flex, fa4
    cuda    bf16, hd 128, q_len >= 2048:
                          sliding window (no documents/padding)    fa4, cudnn, triton, flex, flash_attn, varlen,
                                                                   sdpa
    cuda    bf16/fp16  sliding window (no documents/padding)       cudnn, triton, flex, flash_attn, varlen, sdpa,
                                                                   fa4
    cuda    bf16, hd 128, q_len >= 2048:
                          prefix-LM (no documents/padding)         fa4, cudnn, triton, flex, varlen, flash_attn,
                                                                   sdpa
    cuda    bf16/fp16  other structured (documents/padding/        bf16, head dim 128: cudnn, triton, flex,
                       window/prefix-LM)                           varlen, flash_attn, sdpa, fa4; else: triton,
                                                                   flex, cudnn, varlen, flash_attn, sdpa, fa4
    cuda    bf16/fp16  opaque terms (custom)                       flex, sdpa
    cuda    fp32       full or causal                              triton, sdpa, varlen, flex
    cuda    fp32       documents or padding                        triton, varlen, sdpa, flex
    cuda    fp32       other structured / opaque                   triton, sdpa, flex
    cpu     any        full or causal                              sdpa, flex
    cpu     any        documents or padding, kv_len >= 512         varlen, flex, sdpa
    cpu     any        documents or padding, kv_len < 512          sdpa, varlen, flex
    cpu     any        anything else (window, prefix-LM...),       flex, sdpa
                       kv_len >= 512
    cpu     any        anything else, kv_len < 512                 sdpa, flex
    any     any        (last resort)                               eager

The order is what won on an H200 (torch 2.11, Triton 3.6; ``benchmarks/results/nvidia-h200``,
61 grid cases + 8 at the training shape, every backend checked against float64) and on a 2-core
CPU: without FlashAttention 4, SDPA's cuDNN / flash kernels win plain causal and full; at head dim
128 cuDNN (documents and padding read in place, prefix-LM by row blocks) wins every structured mask it
takes in bf16 but one forward (causal packed documents at S 4096: Triton), and it wins causal sliding
windows; at head dim 64 (measured before cuDNN read its inputs in place) our Triton kernel beat
FlexAttention by up to 1.6x and cuDNN;
in fp32 Triton (fp16x3 dots) wins every mask it can express, full and causal included (2.3x SDPA's
fp32 kernel, 2.4-2.9x unpadded ``varlen`` on documents and padding).
FlashAttention 4 (``fa4``, where installed) leads at bf16 head dim 128 for full, causal, windows and
prefix-LM without documents or padding, on query rows of 2048 and more (decoding and short calls
keep SDPA/cuDNN: FA4's launch costs 0.5-0.8 ms of host time per forward+backward).  On the H200
(bf16 forward+backward, B 4, S 4096, 16 heads; ``benchmarks/results/nvidia-h200/fa4``) it ran full
at 605 TFLOP/s against SDPA's 532 and cuDNN's 541, causal at 560 against 466-467, windows at 454
against cuDNN's 401, prefix-LM at 521 against 448.  cuDNN stays ahead on packed documents (438 vs
346) and padding (506 vs 420); elsewhere ``fa4`` comes last, and ``anymask tune`` ranks it by
measurement.
Backends that decline a problem (e.g. Triton and cuDNN for opaque masks) are skipped by their
reasons.  On CPU, FlexAttention runs only forward (training falls through to sdpa/varlen), and
below 512 keys SDPA goes first: flex's steady-state lead there (2.8 against 3.9 ms at S 256) does not
repay its compile, several seconds for every new shape.

Unknown or uninstalled backends in these lists are skipped; ``eager`` can always run.  ``auto``
remembers its decision per mask object and call shape until the measured choices change.  When a
backend chosen by ``auto`` fails at run time, :func:`anymask.attention` warns and moves on to the
next candidate; a named backend fails loudly.
"""

from __future__ import annotations

import functools
import os

import torch

from . import backend as B
from . import masks as M
from ._identity_cache import IdentityLRU
from .problem import Problem

_CUDA_DENSE = ("sdpa", "flash_attn", "cudnn", "triton", "flex", "fa4")
_CUDA_WINDOW = ("cudnn", "triton", "flex", "flash_attn", "varlen", "sdpa", "fa4")
_CUDA_STRUCTURED = ("triton", "flex", "cudnn", "varlen", "flash_attn", "sdpa", "fa4")
_CUDA_STRUCTURED_128 = ("cudnn", "triton", "flex", "varlen", "flash_attn", "sdpa", "fa4")  # where cuDNN was measured
_FA4_MIN_Q_LEN = 2048  # measured at 4096; below, FA4's host launch (0.5-0.8 ms per fwd+bwd) can dominate
_CUDA_OPAQUE = ("flex", "sdpa")  # the others decline opaque terms
_CUDA_FP32_DENSE = ("triton", "sdpa", "varlen", "flex")
_CUDA_FP32_PACKED = ("triton", "varlen", "sdpa", "flex")
_CUDA_FP32_OTHER = ("triton", "sdpa", "flex")
_CPU_PACKED = ("varlen", "flex", "sdpa")
_CPU_PACKED_SHORT = ("sdpa", "varlen", "flex")  # below ~512 tokens per-segment calls cost more than they save
_CPU_SHORT = 512
_CPU_PLAIN = ("sdpa", "flex")
_CPU_STRUCTURED = ("flex", "sdpa")
_CPU_STRUCTURED_SHORT = ("sdpa", "flex")  # below _CPU_SHORT keys flex's compile costs more than it saves


def static_preference(p: Problem) -> tuple[str, ...]:
    s = p.structure
    packed = s.documents is not None or s.valid is not None
    plain = s.is_structured and not packed and s.base in ("full", "causal")
    bf16_128 = p.head_dim == 128 and p.dtype == torch.bfloat16
    if p.device_type == "cuda":
        if p.dtype in (torch.float16, torch.bfloat16):
            if plain:
                order = _CUDA_DENSE
            elif not s.is_structured:
                order = _CUDA_OPAQUE
            elif s.base == "window" and not packed:
                order = _CUDA_WINDOW
            else:
                order = _CUDA_STRUCTURED_128 if bf16_128 else _CUDA_STRUCTURED
            fa4_won = s.is_structured and not packed and s.base in ("full", "causal", "window", "prefix_lm")
            if fa4_won and bf16_128 and p.q_len >= _FA4_MIN_Q_LEN:  # where it won on the H200
                order = ("fa4", *(name for name in order if name != "fa4"))
        elif plain:
            order = _CUDA_FP32_DENSE
        elif packed:
            order = _CUDA_FP32_PACKED
        else:
            order = _CUDA_FP32_OTHER
    else:
        if packed:
            order = _CPU_PACKED if p.kv_len >= _CPU_SHORT else _CPU_PACKED_SHORT
        else:
            order = _CPU_PLAIN if plain else _CPU_STRUCTURED if p.kv_len >= _CPU_SHORT else _CPU_STRUCTURED_SHORT
    return (*order, "eager")


def _runnable(p: Problem):
    """Backends that can run ``p``, in static preference order (lazily: reasons cost host time)."""
    for name in static_preference(p):
        if name not in B._MODULES:
            continue
        backend = B.get(name, missing_ok=True)
        if backend is not None and not backend.not_supported_reasons(p):
            yield name


def candidates(p: Problem) -> list[str]:
    """Backends that can run ``p``, in static preference order."""
    return list(_runnable(p))


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
    name = _AUTO.get((p.mask,), _auto_key(p),  # nothing is timed or read from measurements in a transform
                     lambda: (None if p.transformed else _measured_choice(p)) or next(_runnable(p)))
    return B.get(name)


# auto's decision per (mask object, shapes, dtype, device, grad, layout, transforms, tuning state),
# holding the mask weakly (a dense mask can be large).  Every layer of a model calls with the same
# mask, and a decision costs ~0.1 ms of host time on a GPU machine (H200 host: 0.39 ms against
# 0.24 ms for a forced flex call), which short calls cannot hide.
_AUTO = IdentityLRU(64, weak=True)


def _auto_key(p: Problem) -> tuple:
    """Shapes, dtype, device, grad, layout, torch.func transforms, tuning state, and the mask's
    :func:`~anymask.masks.stamp`: an in-place edit of a tensor the mask holds can take a backend's
    support away (padding holes under a window: varlen), so the decision is made again."""
    tuning = _tuning()
    state = None if tuning is None else (tuning.generation(), os.environ.get(tuning.ENV_DIR),
                                         tuning.autotune_enabled())
    return (p.batch, p.q_heads, p.kv_heads, p.q_len, p.kv_len, p.head_dim, p.dtype, p.device,
            p.requires_grad, p.strides, p.transformed, state, M.stamp(p.mask))


def remember(p: Problem, name: str) -> None:
    """Make ``name`` auto's decision for ``p`` (after the chosen backend failed and ``name`` ran), so
    later calls (every layer, every step) neither retry the failing backend nor report it."""
    _AUTO.put((p.mask,), _auto_key(p), name)


def forget_choices() -> None:
    """Drop auto's remembered decisions (after backends were installed or patched at run time)."""
    _AUTO.clear()


@functools.lru_cache(maxsize=1)
def _tuning():
    """``anymask.tuning``, or None in a partial install without it (imported once: host time)."""
    try:
        from . import tuning
    except ImportError:
        return None
    return tuning


def _measured_choice(p: Problem) -> str | None:
    """The cached measured winner for this problem's signature, if any (see ``anymask.tuning``)."""
    tuning = _tuning()
    if tuning is None:
        return None
    name = tuning.lookup(p)
    if name not in B.names():  # none measured, or a name another anymask version stored
        return None
    backend = B.get(name, missing_ok=True)
    if backend is None or backend.not_supported_reasons(p):
        return None
    if name == "eager" and _beyond_eager_limit(p):  # signatures leave out batch and heads: a win at B=1,
        return None  # H=1 would materialise [B, H, Sq, Skv] scores at any size (measurement stops there)
    return name


def _beyond_eager_limit(p: Problem) -> bool:
    from .bench.variants import EAGER_LIMIT

    return p.batch * p.q_heads * p.q_len * p.kv_len > EAGER_LIMIT.get(p.device_type, EAGER_LIMIT["cuda"])
