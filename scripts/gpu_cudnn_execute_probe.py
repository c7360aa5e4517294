"""Host cost of one cuDNN graph execute, by call path (H200 probe for the cuDNN backend's host time).

Builds anymask's forward (training) and backward graphs for dense causal attention (bf16, B=4,
S=4096, 16 heads, head dim 128) and runs each through:

    dict      ``graph.execute({uid: tensor}, workspace, handle=h)``   (what anymask does today)
    ordered   ``graph.execute([tensors], workspace, handle=h, tensor_uids=uids)``
    ints      ``graph.execute({uid: data_ptr}, workspace_ptr, handle=h)``
    raw       the lowered graph's ``_execute_with_raw_ptrs`` on a CPU array of pointers sorted by uid
    anymask   ``cudnn_graphs._execute`` as shipped (the raw path where the frontend has it)

Host microseconds per execute are timed while the GPU sleeps (nothing waits), and every path's
outputs are compared with the dict path's (bit for bit, and the largest difference: cuDNN's
backward accumulates dQ with atomics, so two runs of one path differ in the last bits).  JSON on stdout and ``$OUT/execute_probe.json``.
"""
import json
import os
import time
from pathlib import Path

import torch

from anymask.kernels import cudnn_graphs as G


def host_us(fn, n: int = 200) -> float:
    fn(); torch.cuda.synchronize()
    torch.cuda._sleep(400_000_000)  # ~200 ms of GPU sleep: enqueue never waits on the GPU
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    dt = (time.perf_counter() - t0) / n * 1e6
    torch.cuda.synchronize()
    return round(dt, 1)


def paths(built, pack: dict, spec):
    from cudnn._handle import to_backend_handle

    g, h = built.graph, G.handle(spec.device)
    ws = torch.empty(max(built.workspace, 1), dtype=torch.uint8, device="cuda")
    uids = sorted(pack)
    order = g._variant_pack_uids()
    assert list(order) == uids, (order, uids)
    cfg = g._materialize_backend_plan(g._plan_index) if g._plans else None
    index = -1 if cfg is None or cfg.cpp_index is None else cfg.cpp_index
    lowered, hb = g._lowered_graph, to_backend_handle(h) or 0

    def dict_path():
        g.execute(pack, ws, handle=h)

    def ordered():
        g.execute([pack[u] for u in uids], ws, handle=h, tensor_uids=uids)

    def ints():
        g.execute({u: pack[u].data_ptr() for u in uids}, ws.data_ptr(), handle=h)

    def raw():
        ptrs = torch.tensor([pack[u].data_ptr() for u in uids], dtype=torch.int64)
        lowered._execute_with_raw_ptrs(ptrs.data_ptr(), len(uids), ws.data_ptr(), hb, index)

    def anymask():
        G._execute(built, spec, pack, "probe", q_device)

    q_device = pack[G._Q].device
    return {"dict": dict_path, "ordered": ordered, "ints": ints, "raw": raw, "anymask": anymask}


def main() -> int:
    out = Path(os.environ.get("OUT", "."))
    B, H, S, D = 4, 16, 4096, 128
    torch.manual_seed(0)
    q, k, v, do = (torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16) for _ in range(4))
    st = q.stride()
    spec = G.Spec(torch.bfloat16, B, H, H, S, S, D, D ** -0.5, right_bound=0, q_stride=st, k_stride=st, v_stride=st)
    o, stats = G.forward(spec, q, k, v, G.Meta(), True)
    G.backward(spec, q, k, v, o, do, stats, G.Meta())
    torch.cuda.synchronize()
    fwd = G._cache[(spec.forward_key(), "fwd", True)]
    bwd = G._cache[(spec, "bwd")]
    res = {"cudnn": G.version(), "torch": torch.__version__,
           "raw_launch": [fwd.launch is not None, bwd.launch is not None]}
    o2, st2 = torch.empty_like(o), torch.empty_like(stats)
    dq, dk, dv = (torch.empty_like(t) for t in (q, k, v))
    fpack = {G._Q: q, G._K: k, G._V: v, G._O: o2, G._STATS: st2}
    bpack = {G._Q: q, G._K: k, G._V: v, G._O: o, G._DO: do, G._STATS: stats, G._DQ: dq, G._DK: dk, G._DV: dv}
    for name, built, pack, outs in (("forward", fwd, fpack, (o2, st2)), ("backward", bwd, bpack, (dq, dk, dv))):
        fns = paths(built, pack, spec)
        fns["dict"]()
        torch.cuda.synchronize()
        want = [t.clone() for t in outs]
        for path, fn in fns.items():
            for t in outs:
                t.fill_(float("nan"))
            fn()
            torch.cuda.synchronize()
            same = all(torch.equal(a, b) for a, b in zip(outs, want))
            diff = max((a.float() - b.float()).abs().max().item() for a, b in zip(outs, want))
            res[f"{name}/{path}"] = {"host_us": host_us(fn), "bitwise_equal": same, "max_abs_diff": diff}
            print(name, path, res[f"{name}/{path}"], flush=True)
    (out / "execute_probe.json").write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
