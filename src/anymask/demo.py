"""``anymask demo``: every catalogue mask, its picture, auto's choice, each backend's error and time."""

from __future__ import annotations

import statistics
import sys
import time

import torch

from . import masks as M
from .attention import attention, backends, which_backend


def _median_ms(fn, repeats: int = 3) -> float:
    fn()  # warm-up (compilation, caches)
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _indent(text: str, pad: str = "    ") -> str:
    return "\n".join(pad + line for line in text.splitlines())


def catalogue_picture(name: str, seq: int) -> str:
    """The catalogue mask ``name`` for ``seq`` tokens, drawn on the last of two batch rows: the
    padding example's first row is all tokens (no padding to see), its last row is 35% tokens."""
    return M.CATALOGUE[name](2, seq).picture(seq, batch=1)


def run_demo(seq: int = 512, batch: int = 2, heads: int = 4, head_dim: int = 64, model: bool = True) -> int:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    print(f"anymask demo: batch {batch}, {heads} heads, seq {seq}, head dim {head_dim}, {dtype}, {device}")
    machine = {name: entry["reasons"][0] for name, entry in backends().items() if not entry["available"]}
    for name, reason in machine.items():
        print(f"  not on this machine: {name:<11} {reason}")
    print("error = max |backend - eager float64|; time = median forward ms\n")
    for name, make in M.CATALOGUE.items():
        mask = make(batch, seq)
        print(f"== {name}: {mask!r}  (at {seq} tokens; drawn below at 12, last batch row)")
        print(_indent(catalogue_picture(name, 12)))
        q, k, v = (torch.randn(batch, heads, seq, head_dim, device=device, dtype=torch.float64) for _ in range(3))
        ref = attention(q, k, v, mask, backend="eager")
        q, k, v = (t.to(dtype) for t in (q, k, v))
        chosen = which_backend(q, k, v, mask)
        print(f"    auto -> {chosen}")
        for backend, entry in backends(q, k, v, mask).items():
            if backend in machine:
                continue
            if not entry["available"]:
                print(f"    {backend:<11} -  ({entry['reasons'][0]})")
                continue
            out = attention(q, k, v, mask, backend=backend)
            err = (out.double() - ref).abs().max().item()
            ms = _median_ms(lambda: attention(q, k, v, mask, backend=backend))
            star = "  <- auto" if backend == chosen else ""
            print(f"    {backend:<11} error {err:9.2e}   {ms:8.2f} ms{star}")
        print()
    if model:
        from ._optional import MissingDependency
        from .demo_model import run_model_demo

        try:
            run_model_demo()
        except MissingDependency as exc:  # a core install: the masks above ran, the model part needs [hf]
            print(f"anymask demo: model part skipped: {exc}", file=sys.stderr)
    return 0
