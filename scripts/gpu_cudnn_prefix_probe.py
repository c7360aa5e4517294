"""Why is cuDNN's prefix-LM backward slow?  A probe on the GPU (bench shape: B 4, S 4096, 16 heads,
head dim 128, bf16, prefix P = S / 4).

1. Every cuDNN plan, forward and backward, for the rows ``>= P`` block three ways that see the same
   keys, and plain causal attention over all S rows for reference:

       bottom-right   q rows [P, S) x keys [0, S), causal aligned bottom-right (what the backend runs)
       top-left + P   the same band as top-left alignment with right bound P
       causal S       rows [0, S) x keys [0, S), causal (the reference rate)

2. anymask's ``cudnn`` backend on ``prefix_lm(P)``, forward+backward, under the PyTorch profiler:
   GPU time per kernel name (top 14), so copies and merges show next to the cuDNN kernels.

    PYTHONPATH=src python3 scripts/gpu_cudnn_prefix_probe.py --out $OUT
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from gpu_cudnn_ragged_probe import all_plans_captured, time_every_plan, timed  # noqa: E402

B, S, H, D = 4, 4096, 16, 128
P = S // 4


def band_pairs(rows: int, keys: int, shift: int) -> int:
    """Visible pairs when row i (0-based in the block) sees keys j <= i + shift."""
    return sum(min(keys, i + shift + 1) for i in range(rows))


def plan_times() -> list[dict]:
    from anymask.kernels import cudnn_graphs as G

    ways = {
        "bottom-right": (S - P, dict(bottom_right=True, right_bound=0), band_pairs(S - P, S, P)),
        "top-left + P": (S - P, dict(bottom_right=False, right_bound=P), band_pairs(S - P, S, P)),
        "causal S": (S, dict(right_bound=0), band_pairs(S, S, 0)),
    }
    flops = {}
    with all_plans_captured(G) as captured:
        g = torch.Generator(device="cuda").manual_seed(0)
        k, v = (torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(2))
        for name, (rows, band, pairs) in ways.items():
            q, do = (torch.randn(B, H, rows, D, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(2))
            spec = G.Spec(torch.bfloat16, B, H, H, rows, S, D, D ** -0.5, q_stride=q.stride(), k_stride=k.stride(),
                          v_stride=v.stride(), keep_layout=True, **band)
            o, stats = G.forward(spec, q, k, v, G.Meta(), True)
            G.backward(spec, q, k, v, o, do, stats, G.Meta())
            captured[-2:] = [(b, sp, pk, f"{name} {what}") for b, sp, pk, what in captured[-2:]]
            flops[name] = 4 * pairs * B * H * D
    out = [line for built, spec, pack, what in captured
           for line in time_every_plan(G, built, spec, pack, what,
                                       flops[what.rsplit(" ", 1)[0]] * (1 if what.endswith("forward") else 2.5))]
    G.clear_cache()
    return out


def profile_backend() -> list[dict]:
    import anymask
    from anymask import masks as M

    g = torch.Generator(device="cuda").manual_seed(1)
    q, k, v = (torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16, generator=g, requires_grad=True)
               for _ in range(3))
    do = torch.randn_like(q)
    mask = M.prefix_lm(P)

    def step():
        o = anymask.attention(q, k, v, mask, backend="cudnn")
        torch.autograd.grad(o, (q, k, v), do)

    ms = timed(step)
    print(json.dumps({"backend": "cudnn", "prefix_lm fwd+bwd ms": round(ms, 3)}), flush=True)
    reps = 5
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            step()
        torch.cuda.synchronize()
    rows = []
    for e in prof.key_averages():
        us = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        if us:
            rows.append({"kernel": e.key[:120], "us_per_step": round(us / reps, 1), "calls_per_step": e.count / reps})
    rows.sort(key=lambda r: -r["us_per_step"])
    for r in rows[:14]:
        print(json.dumps(r), flush=True)
    return rows[:30]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    result = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "shape": [B, S, H, D], "prefix": P,
              "plans": plan_times(), "profile": profile_backend()}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "cudnn_prefix_probe.json").write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
