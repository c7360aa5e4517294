"""Why is anymask:flex slower than transformers' flex_attention in training?  One H200 probe.

Part A: one attention layer (the 1B shape: S 16384, H 32:8, D 64, bf16, packed documents),
fwd+bwd, anymask forced backends vs auto vs a hand-rolled compiled flex with create_block_mask:
GPU time per call (events), host time per call, and the sync/copy calls the profiler sees.
Part B: one training step of gpu_train_bench (diffusion task), anymask vs flex_attention, under
torch.profiler: top ops by CUDA and by CPU time, dynamo recompiles.  Logs to $OUT.
"""
import json, os, sys, time
from pathlib import Path
import torch

sys.path.insert(0, str(Path(__file__).parent))
from gpu_probe_common import cuda_and_host_ms as events, packed_lengths  # noqa: E402
OUT = Path(os.environ.get("OUT", "."))
DEV = os.environ.get("PROBE_DEVICE", "cuda")
TINY = DEV == "cpu"
SORT = "cuda_time_total" if DEV == "cuda" else "cpu_time_total"
dev = torch.device(DEV)


def syncs(fn):
    from torch.profiler import profile, ProfilerActivity
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn(); torch.cuda.synchronize()
    names = {}
    for ev in prof.events():
        if any(w in ev.name for w in ("Synchronize", "Memcpy", "item", "_local_scalar_dense", "nonzero")):
            names[ev.name] = names.get(ev.name, 0) + 1
    return names


def part_a():
    import anymask
    from anymask import masks
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    S, H, KV, D = 16384, 32, 8, 64
    lengths = packed_lengths(S)
    ids = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths)).to(dev)
    q = torch.randn(1, H, S, D, device=dev, dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(1, KV, S, D, device=dev, dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(1, KV, S, D, device=dev, dtype=torch.bfloat16, requires_grad=True)
    do = torch.randn_like(q)
    cflex = torch.compile(flex_attention, dynamic=False)
    res = {}
    for name in ("docs", "docs_causal"):
        m = masks.documents(ids.unsqueeze(0))
        if name == "docs_causal":
            m = m & masks.causal()
        causal = name == "docs_causal"
        def mod(b, h, qi, ki):
            r = ids[qi] == ids[ki]
            return (r & (ki <= qi)) if causal else r
        bm = create_block_mask(mod, 1, None, S, S, device=dev)
        variants = {"raw_flex": lambda: cflex(q, k, v, block_mask=bm, enable_gqa=True)}
        for be in ("flex", "triton", "varlen", "cudnn", "auto"):
            variants[be] = (lambda be=be: anymask.attention(q, k, v, m, backend=be))
        # a fresh mask each call, as in training (one per step, shared by the layers)
        def fresh():
            mm = masks.documents(ids.unsqueeze(0)) & (masks.causal() if causal else masks.full())
            return anymask.attention(q, k, v, mm, backend="flex")
        variants["flex_fresh_mask"] = fresh
        for vname, f in variants.items():
            try:
                fw = events(lambda: f())
                fb = events(lambda: torch.autograd.grad(f(), (q, k, v), do))
                sy = syncs(lambda: torch.autograd.grad(f(), (q, k, v), do))
                res[f"{name}/{vname}"] = dict(fwd_ms=round(fw[0], 3), fwd_host_ms=round(fw[1], 3),
                                              fb_ms=round(fb[0], 3), fb_host_ms=round(fb[1], 3), syncs=sy)
            except Exception as exc:
                res[f"{name}/{vname}"] = f"{type(exc).__name__}: {str(exc)[:200]}"
            print(name, vname, res[f"{name}/{vname}"], flush=True)
    return res


def part_b():
    import gpu_train_bench as tb
    from torch.profiler import profile, ProfilerActivity
    import torch._dynamo.utils as du
    args = tb.argparse.Namespace(device=DEV, tiny=TINY, tokens=16384, warmup=2, steps=3, checkpointing=False)
    out = {}
    for attn in ("anymask", "flex_attention"):
        orig = tb.train_step if hasattr(tb, "train_step") else None
        du.counters.clear()
        t0 = time.perf_counter()
        r = tb.run_one("diffusion", attn, args)
        out[attn] = dict(r, counters={k: dict(v) for k, v in du.counters.items() if k in ("stats", "recompiles", "frames")},
                         wall=round(time.perf_counter() - t0, 1))
        print(attn, json.dumps(out[attn])[:1500], flush=True)
    return out


def part_b_profile():
    import gpu_train_bench as tb
    from torch.profiler import profile, ProfilerActivity
    import anymask.train.loop as loop
    for attn in ("anymask", "flex_attention"):
        real = loop.train_step
        calls = {"n": 0}
        sync = torch.cuda.synchronize if DEV == "cuda" else (lambda: None)
        def wrapped(*a, **kw):
            calls["n"] += 1
            if calls["n"] == 4:
                with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if DEV == 'cuda' else [])) as prof:
                    r = real(*a, **kw); sync()
                ka = prof.key_averages()
                (OUT / f"prof_{attn}.txt").write_text(
                    ka.table(sort_by=SORT, row_limit=30) + "\n\n" +
                    ka.table(sort_by="self_cpu_time_total", row_limit=30))
                print(f"== {attn} by CUDA total\n" + ka.table(sort_by=SORT, row_limit=14), flush=True)
                return r
            return real(*a, **kw)
        loop.train_step = wrapped
        args = tb.argparse.Namespace(device=DEV, tiny=TINY, tokens=16384, warmup=3, steps=2, checkpointing=False)
        tb.run_one("embedding", attn, args)
        loop.train_step = real


if __name__ == "__main__":
    torch._logging.set_logs(recompiles=True)
    what = sys.argv[1:] or ["a", "b", "p"]
    res = {}
    if "a" in what:
        res["layer"] = part_a()
    if "b" in what:
        res["train"] = part_b()
    if "p" in what:
        part_b_profile()
    (OUT / "overhead_probe.json").write_text(json.dumps(res, indent=1, default=str))
