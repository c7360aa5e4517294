"""Max error of a call's output (and gradients) against the float64 reference, and eligibility:
a backend may win a measurement only when its error is within the tolerance of
:func:`anymask.tuning.tolerance` relative to SDPA's own error at that dtype (or to the typical
error of the backends measured, where SDPA's is an outlier)."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

import torch

from ..tuning import tolerance
from .reference import Reference


@dataclass(frozen=True)
class Errors:
    out: float  # max |out - reference|
    grad: float | None  # max over dq, dk, dv; None without a backward pass


def _max_abs(a: torch.Tensor, b: torch.Tensor, rows: torch.Tensor | None = None) -> float:
    diff = (a.detach().double() - b).abs()
    if rows is not None:
        diff = torch.where(rows, diff, torch.zeros((), dtype=diff.dtype, device=diff.device))
    return diff.max().item()  # NaN anywhere gives NaN


def errors(result: tuple, ref: Reference, *, raw: bool = False) -> Errors:
    """``result`` = ``(out, grads or None)`` as a timed call returned it.  ``raw``: compare only
    rows that see a key (raw calls promise nothing on the others)."""
    out, grads = result
    rows = ref.row_has_key[..., None] if raw else None  # [B, H|1, Sq, 1]
    out_err = _max_abs(out, ref.out, rows)
    if grads is None or ref.grads is None:
        return Errors(out_err, None)
    return Errors(out_err, max(_max_abs(g, r) for g, r in zip(grads, ref.grads)))


def magnitudes(ref: Reference) -> tuple[float, float | None]:
    out = ref.out.abs().max().item()
    grad = None if ref.grads is None else max(g.abs().max().item() for g in ref.grads)
    return out, grad


_OUTLIER = {"out": 2.0, "grad": 10.0}  # SDPA's error beyond this many bounds of the typical one: SDPA is wrong


def _peer_error(values: list[float], peer: float | None, bound, outlier: float) -> float | None:
    """The error the bound scales with: the peer's (SDPA's), unless it is NaN or an outlier, more
    than ``outlier`` times ``bound(typical)`` (typical: the lower median of the finite errors, the
    smallest of fewer than three).  Then the typical error: a wrong SDPA must not widen the bound
    that would catch it (outputs: 2 bounds, which a bf16 SDPA 5% off exceeds), while a correct one,
    less precise than eager in bf16 gradients (7x at S 4096 on CPU; 10 bounds there), keeps its
    bound.  Without a peer, the smallest finite error; None when none is finite."""
    finite = [x for x in values if x is not None and math.isfinite(x)]
    if not finite:
        return None
    if peer is None:
        return min(finite)
    typical = statistics.median_low(finite) if len(finite) >= 3 else min(finite)
    return peer if math.isfinite(peer) and peer <= outlier * bound(typical) else typical


def rejections(errs: dict[str, Errors], ref: Reference, dtype: torch.dtype, peer: str = "sdpa",
               also: dict[str, Errors] | None = None) -> dict[str, str | None]:
    """Per backend of ``errs`` (and of ``also``, hand-rolled calls held to the same bound but not
    setting it): ``None`` when it agrees with the reference, else why not.

    The bound scales with SDPA's error (see :func:`_peer_error`)."""
    if not errs:
        return {name: None for name in also or {}}
    base = errs.get(peer)
    out_mag, grad_mag = magnitudes(ref)
    peer_out = _peer_error([e.out for e in errs.values()], None if base is None else base.out,
                           lambda x: tolerance(x, dtype, out_mag), _OUTLIER["out"])
    peer_grad = _peer_error([e.grad for e in errs.values()], None if base is None else base.grad,
                            lambda x: tolerance(x, dtype, grad_mag or 1.0), _OUTLIER["grad"])
    out_bound = tolerance(peer_out, dtype, out_mag) if peer_out is not None else math.nan  # NaN: none pass
    grad_bound = None
    if any(e.grad is not None for e in errs.values()):
        grad_bound = tolerance(peer_grad, dtype, grad_mag) if peer_grad is not None else math.nan
    verdict = {}
    for name, e in {**errs, **(also or {})}.items():
        if not e.out <= out_bound:  # NaN fails too
            verdict[name] = f"output error {e.out:.3g} > bound {out_bound:.3g}"
        elif e.grad is not None and grad_bound is not None and not e.grad <= grad_bound:
            verdict[name] = f"gradient error {e.grad:.3g} > bound {grad_bound:.3g}"
        else:
            verdict[name] = None
    return verdict
