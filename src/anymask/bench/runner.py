"""The bench loop: for each problem, inputs and the float64 reference once; for each pass, every
variant timed side by side, then ``auto`` timed against the fastest correct forced backend.

Stage 1 times every forced backend and raw call round-robin.  The fastest forced backend whose
error agrees with the reference is the case's *best*; with ``tune=True`` it is stored as the
measured choice for the problem's signature (so ``auto`` picks it).  Stage 2 times ``auto`` and
*best* again, alternating call by call, so their ratio (``auto_vs_best``, at the p20 quantile: see
:func:`~anymask.bench.timing.paired_ratio`) compares calls made side by side, not minutes apart.
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass, replace
from itertools import groupby

import torch

from .. import tuning
from ..problem import describe
from ..tiles import visible_pairs
from . import variants
from .cases import Case, bench_mask
from .choose import Choice, describe_problem
from .errors import errors, rejections
from .inputs import InputSets, make_inputs
from .reference import Reference, reference, rows_with_keys
from .timing import Settings, Timing, measure, paired_ratio

BWD_FACTOR = 3.5  # forward + backward FLOPs = 3.5 x forward


@dataclass(frozen=True)
class Row:
    mask: str
    kind: str  # Structure.kind(), e.g. documents+causal
    batch: int
    seq: int
    heads: int
    kv_heads: int
    head_dim: int
    dtype: str
    mode: str  # "fwd" | "fwd+bwd" (the CSV column "pass")
    variant: str  # backend name, "auto", "raw_sdpa_dense", "raw_flex" or "raw_fa4"
    backend: str  # what ran (auto: its choice)
    status: str  # "ok" | "skipped" | "failed"
    reason: str = ""
    median_ms: float | None = None
    p20_ms: float | None = None
    p80_ms: float | None = None
    tflops: float | None = None  # over visible pairs only
    first_call_s: float | None = None  # first call alone (compile, caches)
    setup_s: float | None = None  # one-time preparation outside the timed calls
    peak_mem_mb: float | None = None  # CUDA: extra memory of one call; CPU: None
    max_err: float | None = None  # output vs float64 reference
    grad_err: float | None = None  # max over dq, dk, dv vs float64 reference
    eligible: bool | None = None  # agrees with the reference (forced backends)
    samples: int = 0
    pairs: int = 0  # visible (b, h, q, kv) pairs
    density: float = 0.0
    gflop: float = 0.0
    auto_vs_best: float | None = None  # auto row: p20 time of auto / of best, interleaved calls
    best: str = ""  # auto row: the best forced backend it was paired with

    def as_dict(self) -> dict:
        d = asdict(self)
        d["pass"] = d.pop("mode")
        return d


COLUMNS = [("pass" if f == "mode" else f) for f in Row.__dataclass_fields__]


def _row(case: Case, kind: str, variant: str, backend: str, status: str, *, reason: str = "",
         timing: Timing | None = None, setup_s: float | None = None, err=None, eligible=None,
         pairs: int = 0, flops: float = 0.0, **extra) -> Row:
    dens = pairs / (case.batch * case.heads * case.seq * case.seq)
    fields = {}
    if timing is not None:
        med = timing.median_ms
        fields = dict(median_ms=med, p20_ms=timing.p20_ms, p80_ms=timing.p80_ms,
                      tflops=flops / (med * 1e-3) / 1e12 if med > 0 else None,
                      first_call_s=timing.first_call_s, peak_mem_mb=timing.peak_mem_mb,
                      samples=len(timing.samples_ms))
    if err is not None:
        fields.update(max_err=err.out, grad_err=err.grad)
    return Row(case.mask, kind, case.batch, case.seq, case.heads, case.kv_heads, case.head_dim, case.dtype,
               case.mode, variant, backend, status, reason, setup_s=setup_s, eligible=eligible, pairs=pairs,
               density=dens, gflop=flops / 1e9, **fields, **extra)


def run_case(case: Case, mask, base: InputSets, ref: Reference, pairs: int, names: list[str],
             settings: Settings, *, tune: bool = False, forced: bool = False) -> list[Row]:
    """Every variant of one case; see the module docstring for the two stages."""
    inputs = base.with_grad(case.grad)
    with torch.set_grad_enabled(case.grad):
        p = describe(inputs.q[0], inputs.k[0], inputs.v[0], mask, None)
        kind = p.structure.kind()
        flops = 4 * case.head_dim * pairs * (BWD_FACTOR if case.grad else 1.0)
        common = dict(pairs=pairs, flops=flops)
        rows, prepared = [], {}
        for name in [n for n in names if n != "auto"]:
            prep = variants.prepare(name, mask, inputs, p, forced=forced)
            if isinstance(prep, str):
                rows.append(_row(case, kind, name, name, "skipped", reason=prep, **common))
            else:
                prepared[name] = prep
        timings, outputs = measure({n: pr.fn for n, pr in prepared.items()}, len(inputs), p.device, settings)
        errs = {n: errors(outputs[n], ref, raw=prepared[n].raw) for n, t in timings.items() if isinstance(t, Timing)}
        del outputs
        contenders = {n: e for n, e in errs.items() if not prepared[n].raw}  # forced anymask backends
        raws = {n: e for n, e in errs.items() if prepared[n].raw}  # hand-rolled: held to their bound too
        verdict = rejections(contenders, ref, p.dtype, also=raws)
        for name, pr in prepared.items():
            t = timings[name]
            if not isinstance(t, Timing):
                rows.append(_row(case, kind, name, pr.backend, "failed", reason=t, setup_s=pr.setup_s, **common))
                continue
            ok = None if pr.raw and not contenders else verdict[name] is None  # None: no bound to judge by
            rows.append(_row(case, kind, name, pr.backend, "ok", reason=verdict.get(name) or "", timing=t,
                             setup_s=pr.setup_s, err=errs[name], eligible=ok, **common))
        eligible = [n for n in contenders if verdict[n] is None]
        best = min(eligible, key=lambda n: timings[n].median_ms) if eligible else None
        if tune and best is not None:
            choice = Choice(best, {n: timings[n].median_ms for n in contenders},
                            {n: why for n, why in verdict.items() if why}, {n: e.out for n, e in contenders.items()},
                            describe_problem(p))
            tuning.remember(p, dict(choice.entry(), source="anymask bench --tune"))
        if "auto" in names:
            rows.append(_auto_row(case, kind, mask, inputs, ref, p, prepared.get(best), best, settings, common,
                                  contenders))
    return rows


def _auto_row(case, kind, mask, inputs, ref, p, best_prep, best, settings, common, contenders) -> Row:
    """auto timed beside the best forced backend, and its error held to the forced backends' bound
    (``eligible`` False and the reason when it is off; None when no forced backend set a bound)."""
    auto = variants.prepare("auto", mask, inputs, p)
    fns = {"auto": auto.fn}
    if best_prep is not None:
        fns["best"] = best_prep.fn
    timings, outputs = measure(fns, len(inputs), p.device, replace(settings, interleave=True))
    t = timings["auto"]
    if not isinstance(t, Timing):
        return _row(case, kind, "auto", auto.backend, "failed", reason=t, **common)
    err = errors(outputs["auto"], ref)
    # auto's own error sets nothing: a wrong auto must not widen the bound it is held to
    why = rejections(contenders, ref, p.dtype, also={"auto": err})["auto"] if contenders else None
    tb = timings.get("best")
    ratio = paired_ratio(t, tb) if isinstance(tb, Timing) else None
    return _row(case, kind, "auto", auto.backend, "ok", reason=why or "", timing=t, setup_s=0.0, err=err,
                eligible=(why is None) if contenders else None, auto_vs_best=ratio, best=best or "", **common)


def run(cases: list[Case], *, device, names: list[str], settings: Settings, tune: bool = False,
        sets: int = 3, progress: bool = True, deadline_s: float | None = None, forced: bool = False,
        layout: str = "bhsd") -> list[Row]:
    """Run ``cases`` (passes of one problem share inputs and the reference); a tqdm bar on stderr.

    After ``deadline_s`` seconds no new problem is started, and on ``KeyboardInterrupt`` (the CLI
    turns SIGTERM into one) the run stops: cases not done get one row each with variant ``*``.
    ``forced``: the variants were named by the user (no size limits on eager).  ``layout``: the
    inputs' memory layout (:func:`~anymask.bench.inputs.make_inputs`).
    """
    from tqdm import tqdm

    device = torch.device(device)
    start = time.perf_counter()
    rows: list[Row] = []
    done: set[Case] = set()
    bar = tqdm(total=len(cases), desc="anymask bench", unit="case", file=sys.stderr, disable=not progress,
               dynamic_ncols=True)
    why = f"time budget of {deadline_s} s spent"
    try:
        for _, group in groupby(cases, key=lambda c: c.problem_key):
            group = list(group)
            c = group[0]
            if deadline_s is not None and time.perf_counter() - start > deadline_s:
                break
            bar.set_postfix_str(c.label().rsplit(" ", 1)[0], refresh=True)
            mask = bench_mask(c.mask, c.batch, c.seq)
            has_key = rows_with_keys(mask, c.batch, c.heads, c.seq, c.seq, device)
            base = make_inputs(c.batch, c.heads, c.kv_heads, c.seq, c.seq, c.head_dim, c.torch_dtype, device,
                               sets=sets, row_has_key=has_key, layout=layout)
            grad = any(x.grad for x in group)
            ref = reference(base.q[0], base.k[0], base.v[0], mask, None, base.dout[0] if grad else None)
            pairs = visible_pairs(mask, c.batch, c.heads, c.seq, c.seq, device=device)
            for case in group:
                t0 = time.perf_counter()
                rows.extend(run_case(case, mask, base, ref, pairs, names, settings, tune=tune, forced=forced))
                done.add(case)
                bar.update(1)
                if progress:
                    bar.write(f"  {case.label()}: {time.perf_counter() - t0:.1f} s", file=sys.stderr)
            del base, ref
            if device.type == "cuda":
                torch.cuda.empty_cache()
    except KeyboardInterrupt:
        why = "interrupted"
    finally:
        bar.close()
    rows.extend(_row(x, "", "*", "-", "skipped", reason=f"not started: {why}") for x in cases if x not in done)
    return rows
