"""Where does a structured mask's fwd+bwd time go?  One H200 probe for the issue-5 bf16 bar.

For each bench mask (B=4, S=4096, 16 heads, head dim 128, bf16, the bench's own masks and inputs)
and each variant (forced anymask backends and the hand-rolled calls, prepared exactly as
``anymask bench`` prepares them): pipelined ms per call (CUDA events over back-to-back calls, as
the bench's stage 1), host ms per call (enqueue time), and under the PyTorch profiler the kernels
of one call with their device time; ``gaps`` = pipelined ms - kernel ms.  ``cudnn@N`` is cuDNN with
contiguous inputs transposed to ``[B, S, H, D]`` first when a kv head has N+ query heads.  One JSON
line per (mask, variant) on stdout and in ``$OUT/mask_profile.jsonl``.
"""
import argparse
import cProfile
import io
import itertools
import json
import os
import pstats
import sys
from pathlib import Path

import torch

from anymask.backend import cudnn as cudnn_backend
from anymask.bench import variants
from anymask.bench.cases import bench_mask
from anymask.bench.inputs import InputSets, make_inputs
from anymask.bench.reference import rows_with_keys
from anymask.problem import describe
from anymask.tiles import visible_pairs

sys.path.insert(0, str(Path(__file__).parent))
from gpu_probe_common import cuda_and_host_ms  # noqa: E402


def kernels(fn, reps: int = 3) -> list[dict]:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for i in range(reps):
            fn(i % 3)
        torch.cuda.synchronize()
    rows = []
    for e in prof.key_averages():
        us = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        if us and e.device_type == torch.autograd.DeviceType.CUDA:
            rows.append({"kernel": e.key[:90], "us": round(us / reps, 1), "calls": e.count / reps})
    rows.sort(key=lambda r: -r["us"])
    return rows


def host_profile(fn, path: Path, n: int = 30) -> None:
    """cProfile of ``n`` calls (host side), cumulative times, written to ``path``."""
    torch.cuda.synchronize()
    prof = cProfile.Profile()
    prof.enable()
    for i in range(n):
        fn(i % 3)
    prof.disable()
    torch.cuda.synchronize()
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("cumulative").print_stats(45)
    path.write_text(text.getvalue())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--masks", default="documents,documents_causal,padding,sliding_window,prefix_lm,packed_prefix_lm")
    ap.add_argument("--variants", default="cudnn,triton,raw_flex")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--heads", default="16")
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--calls", type=int, default=30)
    ap.add_argument("--layout", choices=("bhsd", "bshd"), default="bhsd",
                    help="bshd: q, k, v, dO laid out [B, S, H, D] in memory (as a Llama layer makes them)")
    ap.add_argument("--cprofile", action="store_true", help="also a host-side cProfile per variant")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    a = ap.parse_args()
    hq, _, hk = a.heads.partition(":")
    hq, hk = int(hq), int(hk or hq)
    out = Path(a.out) / "mask_profile.jsonl"
    dev = torch.device("cuda")
    for name in a.masks.split(","):
        mask = bench_mask(name, a.batch, a.seq)
        has_key = rows_with_keys(mask, a.batch, hq, a.seq, a.seq, dev)
        inputs = make_inputs(a.batch, hq, hk, a.seq, a.seq, a.head_dim, torch.bfloat16, dev, row_has_key=has_key)
        if a.layout == "bshd":  # same values, [B, S, H, D] memory viewed as [B, H, S, D]
            tokens = lambda ts: tuple(t.transpose(1, 2).contiguous().transpose(1, 2) for t in ts)  # noqa: E731
            inputs = InputSets(tokens(inputs.q), tokens(inputs.k), tokens(inputs.v), tokens(inputs.dout))
        inputs = inputs.with_grad(True)
        pairs = visible_pairs(mask, a.batch, hq, a.seq, a.seq, device=dev)
        flops = 4 * a.head_dim * pairs * 3.5
        with torch.set_grad_enabled(True):
            p = describe(inputs.q[0], inputs.k[0], inputs.v[0], mask, None)
            for var in a.variants.split(","):
                base, _, group = var.partition("@")  # cudnn@N: contiguous inputs with N+ query heads
                if group:  # per kv head are transposed first (N = 99: never, 1: always)
                    cudnn_backend._TRANSPOSE_MIN_GROUP = int(group)
                prep = variants.prepare(base, mask, inputs, p)
                if isinstance(prep, str):
                    rec = {"mask": name, "variant": var, "layout": a.layout, "skipped": prep[:200]}
                else:
                    sets = itertools.count()
                    ms, host = cuda_and_host_ms(lambda: prep.fn(next(sets) % 3), a.calls)
                    ks = kernels(prep.fn)
                    if a.cprofile:
                        host_profile(prep.fn, Path(a.out) / f"host_{name}_{var}.txt")
                    kms = sum(k["us"] for k in ks) / 1e3
                    rec = {"mask": name, "variant": var, "layout": a.layout, "backend": prep.backend, "ms": round(ms, 4),
                           "tflops": round(flops / ms / 1e9, 1), "host_ms": round(host, 3),
                           "kernel_ms": round(kms, 4), "gaps_ms": round(ms - kms, 4), "kernels": ks[:12]}
                print(json.dumps(rec), flush=True)
                with out.open("a") as f:
                    f.write(json.dumps(rec) + "\n")
        del inputs
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
