"""Timing done right: the first call (compilation, caches) apart, warm-up, then round-robin
samples over all variants of a case, each call on the next of several input sets.

On CUDA every call is bracketed by ``torch.cuda.Event`` s and the stream is synchronised once per
round; on CPU ``time.perf_counter`` brackets each call.  Round-robin means slow drift (clocks,
other load) hits every variant alike.  Peak memory is measured on one extra call per variant:
CUDA's ``max_memory_allocated`` minus what was allocated before the call (the call's workspace,
output and saved tensors, on top of its inputs).  On CPU there is no allocator statistic to read,
so peak memory is ``None`` rather than a guess.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch


@dataclass(frozen=True)
class Timing:
    first_call_s: float  # the first call alone: compilation, autotuning, caches
    samples_ms: tuple[float, ...]  # steady state, one per timed call
    peak_mem_mb: float | None

    @property
    def median_ms(self) -> float:
        return statistics.median(self.samples_ms)

    def quantile_ms(self, q: float) -> float:
        s = sorted(self.samples_ms)
        pos = q * (len(s) - 1)
        lo, hi = math.floor(pos), math.ceil(pos)
        return s[lo] + (s[hi] - s[lo]) * (pos - lo)

    @property
    def p20_ms(self) -> float:
        return self.quantile_ms(0.2)

    @property
    def p80_ms(self) -> float:
        return self.quantile_ms(0.8)


@dataclass(frozen=True)
class Settings:
    warmup: int = 2  # calls after the first, untimed
    rounds: int = 5  # round-robin rounds
    budget_s: float = 0.5  # steady-state seconds per variant (spread over the rounds)
    max_iters: int = 100  # timed calls per variant at most
    min_iters: int = 5
    interleave: bool = False  # one call per variant per round, order alternating, equal counts (A/B pairs)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _failure(exc: BaseException, device: torch.device) -> str:
    if isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower():
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return "out of memory"
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {first[:300]}"


def _timed_calls(fn, sets: list[int], device: torch.device, keep: dict, name: str) -> list[float]:
    if device.type == "cuda":
        events = []
        for s in sets:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = fn(s)
            end.record()
            events.append((start, end))
            if s == 0:
                keep[name] = out
        events[-1][1].synchronize()
        return [a.elapsed_time(b) for a, b in events]
    samples = []
    for s in sets:
        t0 = time.perf_counter()
        out = fn(s)
        samples.append((time.perf_counter() - t0) * 1e3)
        if s == 0:
            keep[name] = out
    return samples


def _peak_mb(fn, device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    _sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    out = fn(0)
    _sync(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    del out
    return peak / 2 ** 20


def measure(fns: dict[str, Callable[[int], Any]], n_sets: int, device, settings: Settings = Settings()):
    """Time each ``fn(set_index)``; returns ``(timings, outputs)``.

    ``timings[name]`` is a :class:`Timing` or, when the variant failed, a reason string.
    ``outputs[name]`` is what the last timed call on input set 0 returned (check it for errors:
    it is the output of a timed call, not of a separate one).
    """
    device = torch.device(device)
    timings: dict[str, Timing | str] = {}
    keep: dict[str, Any] = {}
    first: dict[str, float] = {}
    estimate: dict[str, float] = {}
    for name, fn in fns.items():
        try:
            _sync(device)
            t0 = time.perf_counter()
            keep[name] = fn(0)
            _sync(device)
            first[name] = time.perf_counter() - t0
            estimate[name] = first[name]
            for i in range(settings.warmup):
                t0 = time.perf_counter()
                fn((i + 1) % n_sets)
                _sync(device)
                estimate[name] = time.perf_counter() - t0
        except Exception as exc:  # a variant that fails is a result, not a crash
            timings[name] = _failure(exc, device)
            keep.pop(name, None)
    live = [n for n in fns if n not in timings]
    totals = {n: min(settings.max_iters, max(settings.min_iters, int(settings.budget_s / max(estimate[n], 1e-6))))
              for n in live}
    if settings.interleave and totals:  # equal counts: sample i of every variant forms one pair
        totals = dict.fromkeys(live, min(totals.values()))
    rounds = max(totals.values(), default=0) if settings.interleave else settings.rounds

    def calls(name: str, r: int) -> int:
        if settings.interleave:
            return 1 if r < totals[name] else 0
        return max(1, math.ceil(totals[name] / settings.rounds))

    samples: dict[str, list[float]] = {n: [] for n in live}
    counter = dict.fromkeys(live, 0)
    for r in range(rounds):
        order = live[::-1] if settings.interleave and r % 2 else live  # no variant always goes first
        for name in [n for n in order if n not in timings and calls(n, r)]:
            sets = [(counter[name] + j) % n_sets for j in range(calls(name, r))]
            counter[name] += len(sets)
            try:
                samples[name] += _timed_calls(fns[name], sets, device, keep, name)
            except Exception as exc:
                timings[name] = _failure(exc, device)
                keep.pop(name, None)
    for name in live:
        if name in timings:
            continue
        try:
            peak = _peak_mb(fns[name], device)
        except Exception as exc:
            peak = None
            _failure(exc, device)
        timings[name] = Timing(first[name], tuple(samples[name]), peak)
    return timings, keep


def paired_ratio(a: Timing, b: Timing, q: float = 0.2) -> float:
    """``a``'s time over ``b``'s, for two interleaved measurements, at quantile ``q`` (p20).

    A low quantile, not the median: on a loaded machine a call is often preempted (whole
    scheduler ticks of 4 ms get added to a random subset of calls), which moves medians by tens of
    percent; the p20 is the time most calls manage, and on a quiet machine it sits within noise of
    the median.  Interleaving makes slow drift hit both alike.
    """
    tb = b.quantile_ms(q)
    return a.quantile_ms(q) / tb if tb > 0 else float("nan")
