"""What the GPU probe scripts share: the packed-document lengths they all use and CUDA timers."""

import random
import time

import torch


def packed_lengths(total: int, seed: int = 0, lo: int = 256, hi: int = 4096) -> list[int]:
    """Document lengths drawn from [lo, hi] (the last one cut) that sum to ``total``."""
    rng, out, rem = random.Random(seed), [], total
    while rem > 0:
        n = min(rem, rng.randint(lo, hi))
        out.append(n)
        rem -= n
    return out


def cuda_ms(fn, n: int = 10) -> float:
    """Mean ms per call of ``fn`` over ``n`` back-to-back calls (CUDA events), after two warm-ups."""
    fn(); fn(); torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(n):
        fn()
    end.record(); torch.cuda.synchronize()
    return round(start.elapsed_time(end) / n, 3)


def cuda_and_host_ms(fn, n: int = 10) -> tuple[float, float]:
    """``(GPU ms, host ms)`` per call of ``fn`` over ``n`` back-to-back calls after two warm-ups: CUDA
    events around the calls, and the host's time to enqueue them (host >= GPU: host-bound)."""
    fn(); fn(); torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    t0 = time.perf_counter()
    start.record()
    for _ in range(n):
        fn()
    end.record()
    host = (time.perf_counter() - t0) / n
    torch.cuda.synchronize()
    return start.elapsed_time(end) / n, host * 1e3
