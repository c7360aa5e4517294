"""``attention(q, k, v, mask)``: exact attention with any mask, on the backend that fits."""

from __future__ import annotations

import torch

from . import backend as B
from .dispatch import choose
from .masks import Mask
from .problem import describe


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Mask, *,
              backend: str = "auto", scale: float | None = None) -> torch.Tensor:
    """Scaled dot-product attention where ``mask`` says what may attend to what.

    q: ``[B, Hq, Sq, D]``; k, v: ``[B, Hkv, Skv, D]`` with ``Hq`` a multiple of ``Hkv`` (GQA).
    Returns ``[B, Hq, Sq, D]`` in q's dtype.  ``mask`` is required: there is no default, because
    "no mask means causal" is exactly the silent bug this library exists to end.  Queries are the
    last ``Sq`` of the ``Skv`` positions.  Rows that see no key output 0.

    ``backend="auto"`` picks the fastest backend that can run the call (measured where
    ``anymask tune`` has run, else a static preference); a named backend that cannot run the call
    raises :class:`anymask.BackendUnavailable` listing why.
    """
    p = describe(q, k, v, mask, scale)
    return choose(p, backend).run(q, k, v, p)


def which_backend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Mask, *,
                  backend: str = "auto", scale: float | None = None) -> str:
    """The name of the backend ``attention`` would use for these inputs (nothing is computed)."""
    return choose(describe(q, k, v, mask, scale), backend).name


def backends(q: torch.Tensor | None = None, k: torch.Tensor | None = None, v: torch.Tensor | None = None,
             mask: Mask | None = None) -> dict[str, dict]:
    """Every backend: ``{"available": bool, "reasons": [...], "summary": str}``.

    Without arguments, reasons are about this machine (missing libraries, no GPU); with a call's
    inputs, about that call too.
    """
    p = describe(q, k, v, mask, None) if q is not None else None
    out = {}
    for name in B._MODULES:
        backend = B.get(name, missing_ok=True)
        if backend is None:
            continue
        reasons = list(backend.machine_reasons) if p is None else backend.not_supported_reasons(p)
        out[name] = {"available": not reasons, "reasons": reasons, "summary": backend.summary}
    return out
