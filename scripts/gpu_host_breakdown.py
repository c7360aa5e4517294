"""Where the host time of one cuDNN fwd+bwd call goes (H200 probe; no profiler, GPU asleep).

Each piece is timed on its own (``n`` calls enqueued while the GPU sleeps, so nothing waits):

    fwd+bwd        torch.autograd.grad(attention(q, k, v, mask, backend=B), (q, k, v), dO)
    fwd (grad)     the forward alone, building the autograd graph
    fwd (no grad)  inference
    describe       describe(q, k, v, mask) + choose(p, B)
    floor          autograd.grad through a do-nothing autograd.Function (allocations only)
    sdpa causal    the same fwd+bwd through SDPA's C++ cuDNN path, for reference

With ``--graph-execute`` the cuDNN graphs run through the frontend's public ``graph.execute``
instead of anymask's raw-pointer launch (A/B of that path).

Cases: causal packed documents, a sliding window, prefix-LM and padding (B=4, S=4096, 16 heads, head dim 128, bf16),
``[B, H, S, D]`` and ``[B, S, H, D]`` inputs.  JSON lines on stdout and ``$OUT/host_breakdown.jsonl``.
"""
import argparse
import json
import os
import time
from pathlib import Path

import torch

import anymask
from anymask.bench.cases import bench_mask
from anymask.dispatch import choose
from anymask.kernels import cudnn_graphs
from anymask.problem import describe


def host_us(fn, n: int = 40) -> float:
    fn(); fn(); torch.cuda.synchronize()
    torch.cuda._sleep(600_000_000)
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    dt = (time.perf_counter() - t0) / n * 1e6
    torch.cuda.synchronize()
    return round(dt, 1)


class _Nothing(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v):
        return torch.empty_like(q)

    @staticmethod
    def backward(ctx, do):
        return torch.empty_like(do), torch.empty_like(do), torch.empty_like(do)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--graph-execute", action="store_true", help="cuDNN through graph.execute (A/B)")
    ap.add_argument("--masks", default="documents_causal,sliding_window,prefix_lm,padding")
    a = ap.parse_args()
    if a.graph_execute:
        cudnn_graphs._raw_launch = lambda g: None
    out = Path(os.environ.get("OUT", ".")) / "host_breakdown.jsonl"
    B, H, S, D = 4, 16, 4096, 128
    backends = os.environ.get("BACKENDS", "cudnn,triton,flex").split(",")
    for layout in ("bhsd", "bshd"):
        for name in a.masks.split(","):
            mask = bench_mask(name, B, S)
            shape = (B, H, S, D) if layout == "bhsd" else (B, S, H, D)
            q, k, v, do = (torch.randn(shape, device="cuda", dtype=torch.bfloat16) for _ in range(4))
            if layout == "bshd":
                q, k, v, do = (t.transpose(1, 2) for t in (q, k, v, do))
            for t in (q, k, v):
                t.requires_grad_(True)
            for be in backends:
                rec = {"mask": name, "layout": layout, "backend": be, "graph_execute": a.graph_execute}
                try:
                    rec["fwd+bwd"] = host_us(lambda: torch.autograd.grad(
                        anymask.attention(q, k, v, mask, backend=be), (q, k, v), do))
                    rec["fwd (grad)"] = host_us(lambda: anymask.attention(q, k, v, mask, backend=be))
                    with torch.no_grad():
                        rec["fwd (no grad)"] = host_us(lambda: anymask.attention(q, k, v, mask, backend=be))
                    rec["describe"] = host_us(lambda: choose(describe(q, k, v, mask, None), be))
                except Exception as exc:  # noqa: BLE001 - a probe reports and goes on
                    rec["error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
                print(json.dumps(rec), flush=True)
                with out.open("a") as f:
                    f.write(json.dumps(rec) + "\n")
            if name == "documents_causal":
                rec = {"mask": "-", "layout": layout,
                       "floor": host_us(lambda: torch.autograd.grad(_Nothing.apply(q, k, v), (q, k, v), do)),
                       "sdpa causal": host_us(lambda: torch.autograd.grad(
                           torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True), (q, k, v), do))}
                print(json.dumps(rec), flush=True)
                with out.open("a") as f:
                    f.write(json.dumps(rec) + "\n")
            del q, k, v, do
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
