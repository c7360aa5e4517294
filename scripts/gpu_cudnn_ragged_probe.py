"""Does cuDNN's ragged (THD) attention skip the padded part of each batch entry?  A probe on the GPU.

Packed documents, bf16, 16 heads, head dim 128, B rows of S tokens, bidirectional inside each
document.  For several document-length mixes it times anymask's ``cudnn`` backend (one ragged graph,
every document a batch entry, the graph's S_max the longest document) against ``triton``, forward
and forward+backward, in TFLOP/s over unmasked pairs.  If cuDNN's time follows (documents x S_max^2)
rather than the real pairs, it computes the padding, and grouping documents by length into several
graphs (``bucketed``: one call per power-of-two length class, timed back to back) pays.

    PYTHONPATH=src python3 scripts/gpu_cudnn_ragged_probe.py --out $OUT
    PYTHONPATH=src python3 scripts/gpu_cudnn_ragged_probe.py --plans --out $OUT

``--plans`` instead times every execution plan cuDNN offers (heuristics A, B and fallback, all
built) for the same work, 8 documents of 2048 tokens per 16k: as a dense graph ``[8, H, 2048, D]``,
the same with per-entry lengths (padding mask), and ragged (THD) as anymask runs it.
"""

from __future__ import annotations

import argparse
from contextlib import contextmanager
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


def _graph_all_plans(G):
    """A ``_finish`` that ranks the plans of heuristics A, B and fallback and builds all of them."""
    def finish(c, g, spec, what):
        g.validate()
        g.build_operation_graph()
        modes = [getattr(c.heur_mode, m) for m in ("A", "B", "FALLBACK") if hasattr(c.heur_mode, m)]
        g.create_execution_plans(modes)
        g.check_support()
        g.build_plans(c.build_plan_policy.ALL)
        return G._Built(g, int(g.get_workspace_size()))
    return finish


@contextmanager
def all_plans_captured(G):
    """Inside: graphs are built with every plan, and each execution is recorded as
    ``(built, spec, pack, what)`` in the yielded list (relabel ``what`` as you go)."""
    captured: list[tuple] = []
    real_finish, real_execute = G._finish, G._execute

    def capture(built, spec, pack, what, device):
        captured.append((built, spec, dict(pack), what))
        return real_execute(built, spec, pack, what, device)

    G._finish, G._execute = _graph_all_plans(G), capture
    try:
        yield captured
    finally:
        G._finish, G._execute = real_finish, real_execute


def time_every_plan(G, built, spec, pack, what: str, flop: float) -> list[dict]:
    """One JSON line per plan of a captured graph: its name, p20 ms and TFLOP/s for ``flop``."""
    graph, out = built.graph, []
    for i in range(graph.get_execution_plan_count()):
        line = {"graph": what, "plan": i}
        try:
            line["name"] = str(graph.get_plan_name_at_index(i))
            ws = torch.empty(max(int(graph.get_workspace_size_plan_at_index(i)), 1), dtype=torch.uint8,
                             device="cuda")
            ms = timed(lambda: graph.execute_plan_at_index(pack, ws, index=i, handle=G.handle(spec.device)))
            line.update(ms=round(ms, 3), tflops=round(flop / ms / 1e9, 1))
        except Exception as exc:  # a plan that does not build or run: say so, go on
            line["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
        out.append(line)
        print(json.dumps(line), flush=True)
    return out


def plan_sweep(heads: int, dim: int, causal: bool = False) -> list[dict]:
    """p20 ms of every plan of the forward and backward graphs, three ways of running the same work
    (``causal``: causal inside each entry, as cuDNN's band with right bound 0)."""
    from anymask.kernels import cudnn_graphs as G

    n, s = 8, 2048
    pairs = n * s * (s + 1) // 2 if causal else n * s * s
    flop = {"fwd": 4 * pairs * heads * dim, "bwd": 10 * pairs * heads * dim}
    with all_plans_captured(G) as captured:
        g = torch.Generator(device="cuda").manual_seed(0)
        x = [torch.randn(n, heads, s, dim, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(4)]
        for way in ("dense", "dense+lengths"):
            spec = G.Spec(torch.bfloat16, n, heads, heads, s, s, dim, dim ** -0.5, lengths=way != "dense",
                          q_stride=x[0].stride(), k_stride=x[1].stride(), v_stride=x[2].stride(),
                          right_bound=0 if causal else None)
            lengths = torch.full((n, 1, 1, 1), s, dtype=torch.int32, device="cuda")
            meta = G.Meta(lengths, lengths) if spec.lengths else G.Meta()
            o, stats = G.forward(spec, x[0], x[1], x[2], meta, True)
            G.backward(spec, x[0], x[1], x[2], o, x[3], stats, meta)
            captured[-2:] = [(b, sp, pk, f"{way} {what}") for b, sp, pk, what in captured[-2:]]
        q, k, v = (t.detach().transpose(1, 2).reshape(1, n * s, heads, dim).transpose(1, 2).requires_grad_()
                   for t in x[:3])
        docs = M.documents(lengths=[[s] * n])
        o = anymask.attention(q, k, v, docs & M.causal() if causal else docs, backend="cudnn")
        torch.autograd.grad(o, (q, k, v), torch.randn_like(o))
        captured[-2:] = [(b, sp, pk, f"ragged {what}") for b, sp, pk, what in captured[-2:]]
    out = [line for built, spec, pack, what in captured
           for line in time_every_plan(G, built, spec, pack, what, flop["fwd" if what.endswith("forward") else "bwd"])]
    G.clear_cache()
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    p.add_argument("--plans", action="store_true", help="time every cuDNN plan (see above)")
    p.add_argument("--causal", action="store_true", help="with --plans: causal inside each entry")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    if args.plans:
        rows = plan_sweep(args.heads, args.dim, args.causal)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / ("cudnn_plans_causal.json" if args.causal else "cudnn_plans.json")).write_text(json.dumps({"gpu": torch.cuda.get_device_name(),
                                                          "torch": torch.__version__, "plans": rows}, indent=1))
        return 0
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
