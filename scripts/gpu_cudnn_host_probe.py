"""Host time of the cuDNN backend per fwd+bwd call: the frontend's dict execute against its
ordered form (``tensor_uids``), side by side, outputs compared bit for bit.  One H200 probe.

For each bench mask (B=4, S=4096, 16 heads, head dim 128, bf16): host ms per call (enqueue time
over back-to-back calls), GPU ms per call (events), alternating the two forms over several
rounds; then one call of each form on the same inputs, outputs and gradients compared exactly.
One JSON line per mask on stdout and in ``$OUT/cudnn_host.jsonl``.
"""
import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

import anymask
from anymask.bench.cases import bench_mask
from anymask.kernels import cudnn_graphs as G


def call(q, k, v, do, mask):
    o = anymask.attention(q, k, v, mask, backend="cudnn")
    return (o, *torch.autograd.grad(o, (q, k, v), do))


def timed(fn, n: int) -> tuple[float, float]:
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    t0 = time.perf_counter()
    start.record()
    for _ in range(n):
        fn()
    end.record()
    host = (time.perf_counter() - t0) / n * 1e3
    torch.cuda.synchronize()
    return host, start.elapsed_time(end) / n


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--masks", default="sliding_window,documents_causal,padding,documents,prefix_lm")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    a = ap.parse_args()
    B, S, H, D = 4, 4096, 16, 128
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, do = (torch.randn(B, H, S, D, device="cuda", generator=g).bfloat16() for _ in range(4))
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    for name in a.masks.split(","):
        mask = bench_mask(name, B, S)
        fn = lambda: call(q, k, v, do, mask)  # noqa: E731
        outs, times = {}, {"ordered": [], "dict": []}
        for form in ("ordered", "dict"):
            G._ORDERED.clear()
            fn()
            kind = next(iter(G._ORDERED), None)
            if form == "dict" and kind is not None:
                G._ORDERED[kind] = False
            outs[form] = fn()
        for r in range(a.rounds):
            for form in (("ordered", "dict") if r % 2 == 0 else ("dict", "ordered")):
                G._ORDERED.clear()
                fn()
                kind = next(iter(G._ORDERED), None)
                if form == "dict" and kind is not None:
                    G._ORDERED[kind] = False
                times[form].append(timed(fn, a.calls))
        same = all(torch.equal(x, y) for x, y in zip(outs["ordered"], outs["dict"]))
        rec = {"mask": name, "ordered_supported": bool(kind is not None and _supported(kind)), "bitwise_same": same}
        for form, ts in times.items():
            rec[f"{form}_host_ms"] = round(statistics.median(t[0] for t in ts), 3)
            rec[f"{form}_gpu_ms"] = round(statistics.median(t[1] for t in ts), 3)
        print(json.dumps(rec), flush=True)
        with (Path(a.out) / "cudnn_host.jsonl").open("a") as f:
            f.write(json.dumps(rec) + "\n")
    return 0


def _supported(kind) -> bool:
    import inspect
    return "tensor_uids" in inspect.signature(kind.execute).parameters


if __name__ == "__main__":
    raise SystemExit(main())
