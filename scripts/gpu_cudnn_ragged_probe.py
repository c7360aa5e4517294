"""Does cuDNN's ragged (THD) attention skip the padded part of each batch entry?  A probe on the GPU.

Packed documents, bf16, 16 heads, head dim 128, B rows of S tokens, bidirectional inside each
document.  For several document-length mixes it times anymask's ``cudnn`` backend (one ragged graph,
every document a batch entry, the graph's S_max the longest document) against ``triton``, forward
and forward+backward, in TFLOP/s over unmasked pairs.  If cuDNN's time follows (documents x S_max^2)
rather than the real pairs, it computes the padding, and grouping documents by length into several
graphs (``bucketed``: one call per power-of-two length class, timed back to back) pays.

    PYTHONPATH=src python3 scripts/gpu_cudnn_ragged_probe.py --out $OUT
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

import anymask
from anymask import masks as M
from anymask.bench.cases import doc_lengths


def mixes(seq: int, batch: int) -> dict[str, list[list[int]]]:
    return {
        "bench 256-2048": [doc_lengths(seq, seed=row) for row in range(batch)],
        "all 2048": [[2048] * (seq // 2048) for _ in range(batch)],
        "all 512": [[512] * (seq // 512) for _ in range(batch)],
        "one 2048 + 256s": [[2048] + [256] * ((seq - 2048) // 256) for _ in range(batch)],
    }


def timed(fn, reps: int = 10) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 5]  # p20, ms


def run(rows: list[list[int]], backend: str, heads: int, dim: int, grad: bool) -> float:
    """p20 ms of one call (+ backward) on packed rows with these document lengths."""
    batch, seq = len(rows), sum(rows[0])
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(batch, heads, seq, dim, device="cuda", dtype=torch.bfloat16, generator=g,
                           requires_grad=grad) for _ in range(3))
    mask = M.documents(lengths=rows)
    do = torch.randn_like(q)

    def call():
        o = anymask.attention(q, k, v, mask, backend=backend)
        if grad:
            torch.autograd.grad(o, (q, k, v), do)
    return timed(call)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    results = []
    for name, rows in mixes(args.seq, args.batch).items():
        pairs = sum(n * n for row in rows for n in row)
        flop = {False: 4 * pairs * args.heads * args.dim, True: 14 * pairs * args.heads * args.dim}
        for grad in (False, True):
            line = {"mix": name, "pass": "fwd+bwd" if grad else "fwd", "docs": sum(map(len, rows)),
                    "max_len": max(max(r) for r in rows)}
            for backend in ("cudnn", "triton"):
                ms = run(rows, backend, args.heads, args.dim, grad)
                line[backend] = {"ms": round(ms, 3), "tflops": round(flop[grad] / ms / 1e9, 1)}
            classes: dict[int, list[int]] = {}
            for row in rows:
                for n in row:
                    classes.setdefault(1 << max(n - 1, 1).bit_length(), []).append(n)
            ms = sum(run([lengths], "cudnn", args.heads, args.dim, grad) for lengths in classes.values())
            line["cudnn bucketed"] = {"ms": round(ms, 3), "tflops": round(flop[grad] / ms / 1e9, 1),
                                      "classes": {c: len(v) for c, v in sorted(classes.items())}}
            results.append(line)
            print(json.dumps(line), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "cudnn_ragged_probe.json").write_text(json.dumps({"gpu": torch.cuda.get_device_name(),
                                                             "torch": torch.__version__, "args": vars(args),
                                                             "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
