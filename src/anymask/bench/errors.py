"""Max error of a call's output (and gradients) against the float64 reference, and eligibility:
a backend may win a measurement only when its error is within the tolerance of
:func:`anymask.tuning.tolerance` relative to SDPA's own error at that dtype."""

from __future__ import annotations

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


def rejections(errs: dict[str, Errors], ref: Reference, dtype: torch.dtype, peer: str = "sdpa") -> dict[str, str | None]:
    """Per backend: ``None`` when it agrees with the reference, else why not.

    The peer error is SDPA's (the smallest measured error when SDPA did not run)."""
    if not errs:
        return {}
    base = errs.get(peer) or min(errs.values(), key=lambda e: e.out)
    grad_peers = [e.grad for e in errs.values() if e.grad is not None]
    peer_grad = base.grad if base.grad is not None else (min(grad_peers) if grad_peers else None)
    out_mag, grad_mag = magnitudes(ref)
    out_bound = tolerance(base.out, dtype, out_mag)
    verdict = {}
    for name, e in errs.items():
        if not e.out <= out_bound:  # NaN fails too
            verdict[name] = f"output error {e.out:.3g} > bound {out_bound:.3g}"
            continue
        if e.grad is not None and peer_grad is not None:
            grad_bound = tolerance(peer_grad, dtype, grad_mag)
            if not e.grad <= grad_bound:
                verdict[name] = f"gradient error {e.grad:.3g} > bound {grad_bound:.3g}"
                continue
        verdict[name] = None
    return verdict
