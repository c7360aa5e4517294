"""Measure every backend that can run one problem and pick the fastest that is correct.

Used by :mod:`anymask.tuning` (``anymask.tune``, ``ANYMASK_AUTOTUNE=1``, ``anymask tune``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .. import backend as B
from ..dispatch import candidates
from ..problem import Problem
from . import variants
from .errors import errors, rejections
from .inputs import make_inputs
from .reference import reference, rows_with_keys
from .timing import Settings, Timing, measure

TUNE_SETTINGS = Settings(warmup=2, rounds=3, budget_s=0.3, max_iters=30, min_iters=3)


@dataclass(frozen=True)
class Choice:
    winner: str | None
    ms: dict[str, float] = field(default_factory=dict)  # median per backend that ran
    rejected: dict[str, str] = field(default_factory=dict)  # backend -> why it may not win
    errors: dict[str, float] = field(default_factory=dict)  # max output error per backend
    problem: str = ""

    def entry(self) -> dict:
        """The cache entry (JSON-friendly)."""
        return {"backend": self.winner, "ms": {k: round(v, 4) for k, v in self.ms.items()},
                "errors": {k: float(f"{v:.3g}") for k, v in self.errors.items()},
                "rejected": self.rejected, "problem": self.problem}


def describe_problem(p: Problem) -> str:
    return (f"B{p.batch} Hq{p.q_heads} Hkv{p.kv_heads} Sq{p.q_len} Skv{p.kv_len} D{p.head_dim} "
            f"{str(p.dtype).replace('torch.', '')} {'fwd+bwd' if p.requires_grad else 'fwd'} "
            f"{p.structure.kind()} on {p.device}")


def measure_problem(p: Problem, *, first=None, settings: Settings = TUNE_SETTINGS, sets: int = 3) -> Choice:
    """Time the backends that can run ``p`` on ``sets`` input sets (``first`` = the caller's
    ``(q, k, v)`` as set 0, else random), check each against the float64 reference, pick."""
    names = candidates(p)  # static order first, then any other registered backend that can run
    names += [n for n in B.names() if n not in names and not B.get(n).not_supported_reasons(p)]
    has_key = rows_with_keys(p.mask, p.batch, p.q_heads, p.q_len, p.kv_len, p.device)
    inputs = make_inputs(p.batch, p.q_heads, p.kv_heads, p.q_len, p.kv_len, p.head_dim, p.dtype, p.device,
                         sets=sets, row_has_key=has_key, first=first).with_grad(p.requires_grad)
    ref = reference(inputs.q[0], inputs.k[0], inputs.v[0], p.mask, p.scale,
                    inputs.dout[0] if p.requires_grad else None)
    rejected, fns = {}, {}
    for name in names:
        prepared = variants.prepare(name, p.mask, inputs, p)
        if isinstance(prepared, str):
            rejected[name] = prepared
        else:
            fns[name] = prepared.fn
    with torch.set_grad_enabled(p.requires_grad):
        timings, outputs = measure(fns, len(inputs), p.device, settings)
    ms, errs = {}, {}
    for name, t in timings.items():
        if isinstance(t, Timing):
            ms[name] = t.median_ms
            errs[name] = errors(outputs[name], ref)
        else:
            rejected[name] = t
    verdict = rejections(errs, ref, p.dtype)
    rejected.update({n: why for n, why in verdict.items() if why})
    eligible = [n for n in ms if verdict.get(n) is None]
    winner = min(eligible, key=ms.__getitem__) if eligible else None
    return Choice(winner, ms, rejected, {n: e.out for n, e in errs.items()}, describe_problem(p))
