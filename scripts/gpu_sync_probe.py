"""Does a variant's fwd+bwd call wait for the GPU?  One H200 probe of host time per call.

``gpu_mask_profile.py`` found cuDNN calls whose host time equals their pipelined time (a wait, or a
host that cannot keep up).  Here the GPU is first given a long ``torch.cuda._sleep``; then ``n``
calls are enqueued under cProfile.  A call that never waits enqueues while the GPU still sleeps
(host ms per call = pure enqueue cost); a call that waits absorbs the sleep, and the function that
waited carries it as its own time in the profile.  ``torch.cuda.set_sync_debug_mode('warn')`` names
PyTorch-side waits too.  One JSON line per (mask, variant) in ``$OUT/sync_probe.jsonl``.
"""
import argparse
import cProfile
import io
import json
import os
import pstats
import time
import warnings
from pathlib import Path

import torch

from anymask.bench import variants
from anymask.bench.cases import bench_mask
from anymask.bench.inputs import InputSets, make_inputs
from anymask.bench.reference import rows_with_keys
from anymask.problem import describe


def sleep_cycles_per_ms() -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    torch.cuda._sleep(10_000_000)
    end.record()
    torch.cuda.synchronize()
    return 10_000_000 / start.elapsed_time(end)


def probe(fn, n: int, sleep_ms: float, per_ms: float) -> dict:
    fn(0); fn(1); torch.cuda.synchronize()
    torch.cuda._sleep(int(sleep_ms * per_ms))
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    for i in range(n):
        fn(i % 3)
    prof.disable()
    host_ms = (time.perf_counter() - t0) * 1e3
    torch.cuda.synchronize()
    stats = pstats.Stats(prof)
    top = sorted(((v[2], f"{k[0].split('/')[-1]}:{k[1]}({k[2]})") for k, v in stats.stats.items()), reverse=True)[:8]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn(0)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize()
    return {"host_ms_total": round(host_ms, 2), "waited": host_ms > 0.8 * sleep_ms,
            "host_ms_per_call": round(host_ms / n, 3),
            "top_tottime_ms": [[round(t * 1e3, 2), name] for t, name in top],
            "sync_warnings": sorted({str(w.message)[:160] for w in caught})}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--masks", default="documents,documents_causal,padding,sliding_window,prefix_lm")
    ap.add_argument("--variants", default="cudnn,triton,raw_flex")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("--sleep-ms", type=float, default=300.0)
    ap.add_argument("--layout", choices=("bhsd", "bshd"), default="bhsd")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    a = ap.parse_args()
    out = Path(a.out) / "sync_probe.jsonl"
    dev = torch.device("cuda")
    per_ms = sleep_cycles_per_ms()
    for name in a.masks.split(","):
        mask = bench_mask(name, a.batch, a.seq)
        has_key = rows_with_keys(mask, a.batch, a.heads, a.seq, a.seq, dev)
        inputs = make_inputs(a.batch, a.heads, a.heads, a.seq, a.seq, 128, torch.bfloat16, dev, row_has_key=has_key)
        if a.layout == "bshd":
            tokens = lambda ts: tuple(t.transpose(1, 2).contiguous().transpose(1, 2) for t in ts)  # noqa: E731
            inputs = InputSets(tokens(inputs.q), tokens(inputs.k), tokens(inputs.v), tokens(inputs.dout))
        inputs = inputs.with_grad(True)
        with torch.set_grad_enabled(True):
            p = describe(inputs.q[0], inputs.k[0], inputs.v[0], mask, None)
            for var in a.variants.split(","):
                prep = variants.prepare(var, mask, inputs, p)
                rec = {"mask": name, "variant": var, "layout": a.layout}
                if isinstance(prep, str):
                    rec["skipped"] = prep[:200]
                else:
                    rec.update(probe(prep.fn, a.calls, a.sleep_ms, per_ms))
                print(json.dumps(rec), flush=True)
                with out.open("a") as f:
                    f.write(json.dumps(rec) + "\n")
        del inputs
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
