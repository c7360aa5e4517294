"""``attention(q, k, v, mask)``: exact attention with any mask, on the backend that fits."""

from __future__ import annotations

import contextlib
import sys
import traceback
import warnings

import torch

from . import backend as B
from .dispatch import candidates, choose, remember
from .masks import Mask, MaskModOutputError, _held
from .problem import autocast_device, autocast_inputs, describe


@torch.compiler.disable(recursive=True)
def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Mask, *,
              backend: str = "auto", scale: float | None = None) -> torch.Tensor:
    """Scaled dot-product attention where ``mask`` says what may attend to what.

    q: ``[B, Hq, Sq, D]``; k, v: ``[B, Hkv, Skv, D]`` with ``Hq`` a multiple of ``Hkv`` (GQA).
    Returns ``[B, Hq, Sq, D]`` in q's dtype.  Under ``torch.autocast`` inputs are taken as
    ``F.scaled_dot_product_attention`` takes them there (float16/bfloat16/float32 cast to autocast's
    dtype, which the output then has) and the backend runs with autocast off.  ``mask`` is
    required: there is no default, because "no mask means causal" is exactly the silent bug this
    library exists to end.  Queries are the last ``Sq`` of the ``Skv`` positions.  Rows that see no
    key output 0.

    ``backend="auto"`` picks the fastest backend that can run the call (measured where
    ``anymask tune`` has run, else a static preference); a named backend that cannot run the call
    raises :class:`anymask.BackendUnavailable` listing why.

    Under ``torch.compile`` the call is opaque (one graph break): its validation, dispatch and
    caches read host values, and the backends bring their own compiled kernels (FlexAttention is
    compiled inside, Triton kernels are kernels).  Tracing into it gave a tiny Llama 23 graphs and
    an 8x slower compiled step than one break per call.
    """
    autocast = autocast_device(q, k, v)
    if autocast is not None:  # cast as autocast casts SDPA's inputs; backends then run without it
        q, k, v = autocast_inputs(q, k, v)
    with torch.autocast(autocast, enabled=False) if autocast else contextlib.nullcontext():
        p = describe(q, k, v, mask, scale)
        chosen = choose(p, backend)
        if backend != "auto":
            return chosen.run(q, k, v, p)
        tried, transient = [], False
        while True:
            try:
                out = chosen.run(q, k, v, p)
            except _fallback_errors() as exc:
                if isinstance(exc, MaskModOutputError) or (  # a mask_mod's output, or the user's code run
                        not chosen.traces_mask_mod and _raised_in_mask_mod(exc, mask)):  # on plain tensors:
                    raise  # every backend that evaluates it so fails alike
                transient = transient or isinstance(exc, torch.OutOfMemoryError)
                tried.append(chosen.name)
                rest = [n for n in candidates(p) if n not in tried]
                if not rest:
                    raise
                warnings.warn(f"anymask: backend {chosen.name!r} failed on this call ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else ''}); falling back to {rest[0]!r}. "
                              f"Force a backend with backend=... to see the full error.", RuntimeWarning,
                              stacklevel=3)  # the caller's line: past torch.compiler.disable's wrapper
                chosen = B.get(rest[0])
                continue
            if tried and not transient:  # out of memory may pass: do not pin the fallback for it
                remember(p, chosen.name)
            return out


def _raised_in_mask_mod(exc: BaseException, mask: Mask) -> bool:
    """Whether ``exc`` came out of one of ``mask``'s custom ``mask_mod`` functions."""
    fns = _held(mask)[1]  # functions, methods, callables
    codes = [getattr(f, "__code__", None) or getattr(type(f).__call__, "__code__", None) for f in fns]
    return any(frame.f_code is code for frame, _ in traceback.walk_tb(exc.__traceback__) for code in codes
               if code is not None)  # by identity: compiled frames' code objects may not hash


def _fallback_errors() -> tuple[type[BaseException], ...]:
    """Failures after which ``auto`` tries the next backend (inputs are validated by ``describe``,
    so these come from the backend): run-time errors, a library's API drift (``TypeError``,
    ``AttributeError``), and (when Triton is loaded) Triton's compile and out-of-resources errors.
    Not ``ValueError``: a setting the user got wrong (``ANYMASK_TRITON_FP32=fp16x33``) is said, not
    worked around; not every ``Exception``: non-reentrant checkpointing stops its recomputation by
    raising one through the backend's ops."""
    base = getattr(sys.modules.get("triton.errors"), "TritonError", None)
    errors = (RuntimeError, NotImplementedError, ImportError, TypeError, AttributeError)
    return (*errors, base) if isinstance(base, type) else errors


def which_backend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Mask, *,
                  backend: str = "auto", scale: float | None = None) -> str:
    """The name of the backend ``attention`` would use for these inputs.  Nothing is computed,
    unless ``ANYMASK_AUTOTUNE=1`` and this signature has no cached choice: then, as ``attention``
    would, every eligible backend is timed first and the winner stored (see :func:`tune`)."""
    q, k, v = autocast_inputs(q, k, v)
    return choose(describe(q, k, v, mask, scale), backend).name


def backends(q: torch.Tensor | None = None, k: torch.Tensor | None = None, v: torch.Tensor | None = None,
             mask: Mask | None = None) -> dict[str, dict]:
    """Every backend: ``{"available": bool, "reasons": [...], "summary": str}``.

    Without arguments, reasons are about this machine (missing libraries, no GPU); with a call's
    inputs (all four of ``q, k, v, mask``), about that call too.
    """
    given = [x is not None for x in (q, k, v, mask)]
    if any(given) and not all(given):
        raise TypeError("backends() takes no arguments, or all of q, k, v and mask")
    p = describe(*autocast_inputs(q, k, v), mask, None) if q is not None else None
    out = {}
    for name in B._MODULES:
        backend = B.get(name, missing_ok=True)
        if backend is None:
            continue
        reasons = list(backend.machine_reasons) if p is None else backend.not_supported_reasons(p)
        out[name] = {"available": not reasons, "reasons": reasons, "summary": backend.summary}
    return out
