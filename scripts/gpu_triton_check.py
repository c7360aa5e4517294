"""Check and time our Triton kernels on a CUDA GPU (made for an H200; < 8 minutes).

    PYTHONPATH=src python scripts/gpu_triton_check.py            # correctness + timing
    PYTHONPATH=src python scripts/gpu_triton_check.py --quick    # fewer masks, bf16 timing only
    PYTHONPATH=src python scripts/gpu_triton_check.py --sweep    # also try a few tile configs
    PYTHONPATH=src python scripts/gpu_triton_check.py --no-correctness --dtypes fp32   # one part
    PYTHONPATH=src python scripts/gpu_triton_check.py --fp32-sweep --no-correctness --no-timing
                                                   # fp32 dot precisions x tile configs, with errors

1. Correctness: forward and backward against float64 eager on smaller shapes (odd lengths, GQA,
   head dims 64 and 128), bf16 and fp32; our max error divided by SDPA's own error at that dtype
   (PASS when <= 2, as in the tests).  fp32 uses the default dots, fp16x3 (``--ieee`` also checks ieee).
2. Timing (``triton.testing.do_bench``, median): issue 5's cases, B*S = 16k tokens (B=4, S=4096),
   16 heads, head dim 128 -- our kernel through ``anymask.attention(backend="triton")`` against
   SDPA (native for causal/full, else a prebuilt dense mask) and compiled FlexAttention with a
   prebuilt BlockMask.  TFLOP/s over unmasked pairs (fwd 4*D*pairs, fwd+bwd 3.5x that).  Timing
   stops ``--budget`` seconds after the start, so the whole run stays under 8 minutes.

Prints a table and one JSON line at the end; writes ``gpu_triton_check.log`` and ``.json`` to
``$OUT`` when set.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

import torch

import anymask
from anymask import masks as M
from anymask.kernels import config as C

LOG: list[str] = []


def say(line: str = "") -> None:
    """Print ``line`` and append it to ``$OUT/gpu_triton_check.log`` at once (a timeout keeps it)."""
    print(line, flush=True)
    LOG.append(line)
    out = os.environ.get("OUT")
    if out:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "gpu_triton_check.log"), "w" if len(LOG) == 1 else "a") as f:
            f.write(line + "\n")


def doc_lengths(seq: int, seed: int) -> list[int]:
    """Documents of 256-2048 tokens summing to ``seq`` (the last one cut to fit)."""
    g = torch.Generator().manual_seed(seed)
    out: list[int] = []
    while sum(out) < seq:
        out.append(min(seq - sum(out), int(torch.randint(256, 2049, (1,), generator=g))))
    return out


def make_mask(kind: str, batch: int, seq: int) -> M.Mask:
    if kind in ("documents", "documents_causal"):
        docs = M.documents(lengths=[doc_lengths(seq, row) for row in range(batch)])
        return docs & M.causal() if kind == "documents_causal" else docs
    if kind == "padding":
        fill = torch.linspace(1.0, 0.35, batch)
        valid = torch.arange(seq)[None, :] < (fill * seq).round().long()[:, None]
        return M.padding(valid)
    if kind == "prefix_lm":
        return M.prefix_lm(seq // 4)
    if kind == "window":
        return M.window(1024) & M.causal()
    return {"causal": M.causal, "full": M.full}[kind]()


MASKS = ["documents", "documents_causal", "padding", "prefix_lm", "window", "causal", "full"]


def visible_pairs(mask: M.Mask, batch: int, seq: int) -> int:
    from anymask import tiles

    return tiles.visible_pairs(mask, batch, 1, seq, seq, device="cuda")


# --- correctness --------------------------------------------------------------------------------

def _fwd_bwd(q, k, v, mask, backend, dtype, g):
    leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    out = anymask.attention(*leaves, mask, backend=backend)
    out.backward(g.to(dtype))
    return [out] + [t.grad for t in leaves]


def _err(xs, refs):
    return [(x.double() - r).abs().max().item() for x, r in zip(xs, refs)]


def correctness(kinds, dtypes, ieee: bool) -> list[dict]:
    say("== correctness vs float64 eager (ratio = our error / SDPA's error at the dtype; PASS <= 2) ==")
    rows = []
    shapes = [(2, 8, 2, 1000, 1000, 128), (1, 4, 4, 777, 1111, 64)]  # B, Hq, Hkv, Sq, Skv, D
    for B, Hq, Hkv, Sq, Skv, D in shapes:
        for kind in kinds:
            mask = make_mask(kind, B, Skv)
            q = torch.randn(B, Hq, Sq, D, device="cuda", dtype=torch.float64)
            k = torch.randn(B, Hkv, Skv, D, device="cuda", dtype=torch.float64)
            v = torch.randn(B, Hkv, Skv, D, device="cuda", dtype=torch.float64)
            g = torch.randn(B, Hq, Sq, D, device="cuda", dtype=torch.float64)
            ref = _fwd_bwd(q, k, v, mask, "eager", torch.float64, g)
            for dtype in dtypes:
                peer = _err(_fwd_bwd(q, k, v, mask, "sdpa", dtype, g), ref)
                precisions = (["fp16x3", "ieee"] if ieee else ["fp16x3"]) if dtype == torch.float32 else ["-"]
                for prec in precisions:
                    if prec != "-":
                        os.environ["ANYMASK_TRITON_FP32"] = prec
                    ours = _err(_fwd_bwd(q, k, v, mask, "triton", dtype, g), ref)
                    ratio = max(o / max(p, 1e-12) for o, p in zip(ours, peer))
                    ok = all(o <= 2 * p + (2e-6 if dtype == torch.float32 else 8e-3) for o, p in zip(ours, peer))
                    row = dict(kind=kind, shape=[B, Hq, Hkv, Sq, Skv, D], dtype=str(dtype).split(".")[-1],
                               precision=prec, ours=ours, sdpa=peer, ratio=ratio, ok=ok)
                    rows.append(row)
                    say(f"{kind:17s} {str([B, Hq, Hkv, Sq, Skv, D]):28s} {row['dtype']:9s} {prec:6s} "
                        f"out/dq/dk/dv err {' '.join(f'{e:.1e}' for e in ours)}  sdpa "
                        f"{' '.join(f'{e:.1e}' for e in peer)}  ratio {ratio:5.2f} {'PASS' if ok else 'FAIL'}")
                os.environ.pop("ANYMASK_TRITON_FP32", None)
            del q, k, v, g, ref
            torch.cuda.empty_cache()
    return rows


# --- timing -------------------------------------------------------------------------------------

_FLEX: dict = {}  # the compiled flex_attention and the interval buffers its mask_mod reads


def _interval_mod(b, h, qi, kv):
    """``lo[b, q] <= kv <= hi[b, q]``: every bench mask (causal and full too) as row intervals."""
    return (kv >= _FLEX["lo"][b, qi]) & (kv <= _FLEX["hi"][b, qi])


def _flex_fn(mask, B, S, Hq, Hkv):
    """Compiled flex_attention with a BlockMask built once (outside the timed region).

    One ``mask_mod`` reading O(S) row intervals from fixed buffers serves every mask (refilled per
    mask), so flex compiles once per dtype and pass rather than once per mask.
    """
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    from anymask.kernels import mask_bounds
    from anymask.structure import analyse

    bounds = mask_bounds.build(analyse(mask), S, S, "cuda")
    assert bounds.kvalid is None
    if "compiled" not in _FLEX:
        _FLEX["compiled"] = torch.compile(flex_attention, dynamic=False)
    if "lo" not in _FLEX or _FLEX["lo"].shape != (B, S):
        _FLEX["lo"] = torch.empty(B, S, dtype=torch.int32, device="cuda")
        _FLEX["hi"] = torch.empty(B, S, dtype=torch.int32, device="cuda")
    _FLEX["lo"].copy_(bounds.lo.expand(B, S))
    _FLEX["hi"].copy_(bounds.hi.expand(B, S))
    block = create_block_mask(_interval_mod, B, None, S, S, device="cuda")
    compiled, gqa = _FLEX["compiled"], Hq != Hkv
    return lambda q, k, v: compiled(q, k, v, block_mask=block, enable_gqa=gqa)


def _sdpa_fn(mask, B, S, Hq, Hkv):
    import torch.nn.functional as F

    s = mask
    gqa = {"enable_gqa": True} if Hq != Hkv else {}
    if isinstance(s, M.Causal):
        return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True, **gqa)
    if isinstance(s, M.Full):
        return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, **gqa)
    dense = mask.to_dense(B, 1, S, S, device="cuda")  # [B, 1, S, S]
    dense = dense | ~dense.any(-1, keepdim=True)
    return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=dense, **gqa)


def _time(fn, q, k, v, grad: bool) -> float:
    from triton.testing import do_bench

    if not grad:
        with torch.no_grad():
            return do_bench(lambda: fn(q, k, v), warmup=10, rep=60, return_mode="median")
    g = torch.randn_like(q)

    def step():
        fn(q, k, v).backward(g)

    return do_bench(step, warmup=5, rep=60, grad_to_none=[q, k, v], return_mode="median")


def timing(kinds, dtypes, peers, B=4, S=4096, Hq=16, Hkv=16, D=128, deadline=None) -> list[dict]:
    say(f"== timing: B={B} S={S} Hq={Hq} Hkv={Hkv} D={D}; TFLOP/s over unmasked pairs ==")
    rows = []
    for kind in kinds:  # masks outer: a budget stop loses causal/full first, not a whole dtype
        for dtype in dtypes:
            mask = make_mask(kind, B, S)
            pairs = visible_pairs(mask, B, S) * Hq
            flops = 4 * D * pairs
            q = torch.randn(B, Hq, S, D, device="cuda", dtype=dtype, requires_grad=True)
            k = torch.randn(B, Hkv, S, D, device="cuda", dtype=dtype, requires_grad=True)
            v = torch.randn(B, Hkv, S, D, device="cuda", dtype=dtype, requires_grad=True)
            fns = {"triton": lambda q, k, v, m=mask: anymask.attention(q, k, v, m, backend="triton")}
            if "sdpa" in peers:
                fns["sdpa"] = _sdpa_fn(mask, B, S, Hq, Hkv)
            if "flex" in peers:
                fns["flex"] = _flex_fn(mask, B, S, Hq, Hkv)
            for name, fn in fns.items():
                for grad in (False, True):
                    if deadline and time.time() > deadline:
                        say("(time budget reached; stopping timing)")
                        return rows
                    try:
                        ms = _time(fn, q, k, v, grad)
                        tf = (3.5 if grad else 1.0) * flops / (ms * 1e-3) / 1e12
                    except Exception as exc:  # a peer that cannot run this case
                        ms, tf = float("nan"), float("nan")
                        say(f"  {name} failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
                    row = dict(kind=kind, dtype=str(dtype).split(".")[-1], backend=name,
                               mode="fwd+bwd" if grad else "fwd", ms=ms, tflops=tf)
                    rows.append(row)
                    say(f"{kind:17s} {row['dtype']:9s} {name:7s} {row['mode']:8s} {ms:9.3f} ms {tf:7.1f} TFLOP/s")
            del q, k, v
            torch.cuda.empty_cache()
    return rows


def summarise(rows: list[dict]) -> list[dict]:
    """Per (mask, dtype, mode): our TFLOP/s over the best peer's."""
    out = []
    keys = sorted({(r["kind"], r["dtype"], r["mode"]) for r in rows})
    say("== ratio: triton / best peer ==")
    for kind, dtype, mode in keys:
        got = {r["backend"]: r["tflops"] for r in rows if (r["kind"], r["dtype"], r["mode"]) == (kind, dtype, mode)}
        peers = {n: t for n, t in got.items() if n != "triton" and t == t}
        if "triton" not in got or not peers:
            continue
        best = max(peers, key=peers.get)
        ratio = got["triton"] / peers[best]
        out.append(dict(kind=kind, dtype=dtype, mode=mode, triton=got["triton"], best=best,
                        best_tflops=peers[best], ratio=ratio))
        say(f"{kind:17s} {dtype:9s} {mode:8s} triton {got['triton']:7.1f}  best {best:5s} {peers[best]:7.1f}"
            f"  x{ratio:4.2f}")
    return out


SWEEP = {  # dtype -> kernel -> configs (block_m, block_n, warps, stages, merged); the first is the default
    torch.bfloat16: {
        "fwd": [(128, 64, 8, 3, True), (128, 64, 8, 3, False), (128, 128, 8, 3, True), (64, 64, 4, 3, True)],
        "dkdv": [(64, 128, 8, 3, True), (64, 128, 8, 3, False), (64, 64, 4, 2, True), (64, 128, 8, 2, True)],
        "dq": [(128, 64, 8, 3, True), (128, 64, 8, 3, False), (64, 64, 4, 2, True), (128, 128, 8, 2, True)],
    },
    torch.float32: {
        "fwd": [(64, 32, 4, 2, True), (64, 64, 4, 1, True), (32, 64, 4, 2, True)],
        "dkdv": [(32, 64, 4, 2, True), (32, 64, 4, 1, True), (16, 64, 4, 2, True)],
        "dq": [(64, 32, 4, 2, True), (64, 32, 4, 1, True), (32, 32, 4, 2, True)],
    },
}


def sweep(D=128) -> list[dict]:
    """Time a few tile configs per kernel (one kernel changed at a time; bf16 and fp32, hd 128)."""
    say("== sweep: tile configs (fwd rows time the forward; dkdv/dq rows time forward+backward) ==")
    rows = []
    B, S, H = 4, 4096, 16
    for dtype, kernels in SWEEP.items():
        kinds = ("causal", "documents_causal") if dtype == torch.bfloat16 else ("documents_causal",)
        for kind in kinds:
            mask = make_mask(kind, B, S)
            q = torch.randn(B, H, S, D, device="cuda", dtype=dtype, requires_grad=True)
            k = torch.randn(B, H, S, D, device="cuda", dtype=dtype, requires_grad=True)
            v = torch.randn(B, H, S, D, device="cuda", dtype=dtype, requires_grad=True)

            def fn(q, k, v):
                return anymask.attention(q, k, v, mask, backend="triton")

            for kernel, configs in kernels.items():
                for bm, bn, warps, stages, merged in configs:
                    C.reset()
                    C.override(kernel, D, dtype, block_m=bm, block_n=bn, num_warps=warps, num_stages=stages,
                               merged=merged)
                    try:
                        ms = _time(fn, q, k, v, grad=kernel != "fwd")
                    except Exception as exc:
                        ms = float("nan")
                        say(f"  {kernel} {(bm, bn, warps, stages, merged)} failed: {type(exc).__name__}: "
                            f"{str(exc).splitlines()[0][:160]}")
                    name = str(dtype).split(".")[-1]
                    rows.append(dict(kind=kind, dtype=name, kernel=kernel,
                                     config=[bm, bn, warps, stages, merged], ms=ms))
                    say(f"{kind:17s} {name:9s} {kernel:5s} BM={bm:3d} BN={bn:3d} warps={warps} stages={stages} "
                        f"merged={int(merged)}  {ms:8.3f} ms")
            C.reset()
            del q, k, v
    return rows


FP32_SWEEP = {  # kernel -> configs (block_m, block_n, warps, stages); the first is the default.  Rounds 6-9
    # (benchmarks/results/nvidia-h200/fp32-sweep/) picked the defaults with bf16x6 dots; these are their
    # neighbours.
    "fwd": [(128, 64, 8, 1), (128, 128, 8, 1), (64, 128, 4, 1), (128, 64, 4, 1)],
    "dkdv": [(32, 128, 8, 1), (32, 128, 4, 1), (16, 128, 8, 1), (64, 64, 8, 1), (32, 64, 8, 1)],
    "dq": [(128, 32, 8, 1), (128, 32, 4, 1), (128, 16, 8, 1), (64, 32, 8, 1), (64, 64, 8, 1)],
}
FP16X3_SWEEP = {  # fp16x3 stages two fp16 parts (an fp32 tile's bytes) where bf16x6 stages three: the bf16
    # defaults (larger tiles, more stages) and their neighbours.
    "fwd": [(128, 64, 8, 2), (128, 64, 8, 3), (128, 128, 8, 2), (64, 64, 4, 3), (128, 64, 8, 1), (128, 32, 8, 2)],
    "dkdv": [(64, 128, 8, 2), (32, 128, 8, 2), (64, 64, 4, 2), (64, 128, 8, 1), (32, 128, 8, 1), (64, 64, 8, 3)],
    "dq": [(128, 64, 8, 2), (128, 32, 8, 2), (64, 64, 4, 2), (128, 64, 8, 1), (128, 32, 8, 1), (64, 64, 8, 3)],
}


def fp32_sweep(precisions, swept=("tf32x3", "bf16x6"), D=128, kind="documents") -> list[dict]:
    """fp32 dot precisions (tf32x3, bf16x6, fp16x3: fp32-level; tf32, bf16x3: bounds) x tile configs.

    Error rows: our max error / SDPA-fp32's against float64 on a small shape (PASS <= 2); timing rows
    as in :func:`sweep` (fwd configs time the forward, dkdv/dq configs forward+backward).
    """
    say(f"== fp32 sweep: {kind}, hd {D} ==")
    rows = []
    B, Hq, Hkv, S = 2, 8, 2, 1000
    mask = make_mask(kind, B, S)
    # plain randn, then q, k, v, dO at far apart magnitudes (fp16x3 scales each into fp16's range)
    for inputs, mult in (("randn", (1.0, 1.0, 1.0, 1.0)), ("scaled", (1e-3, 1e3, 1e-4, 1e5))):
        t = [torch.randn(B, h, S, D, device="cuda", dtype=torch.float64) * m for h, m in zip((Hq, Hkv, Hkv, Hq), mult)]
        ref = _fwd_bwd(*t[:3], mask, "eager", torch.float64, t[3])
        peer = _err(_fwd_bwd(*t[:3], mask, "sdpa", torch.float32, t[3]), ref)
        for prec in precisions:
            C.reset()
            for kernel in ("fwd", "dkdv", "dq"):
                C.override(kernel, D, torch.float32, precision=prec)
            try:
                ours = _err(_fwd_bwd(*t[:3], mask, "triton", torch.float32, t[3]), ref)
            except Exception as exc:
                say(f"  {prec} failed: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}")
                continue
            ratio = max(o / max(p, 1e-30) for o, p in zip(ours, peer))
            rows.append(dict(precision=prec, inputs=inputs, errors=ours, sdpa=peer, ratio=ratio))
            say(f"error {prec:7s} {inputs:6s} out/dq/dk/dv {' '.join(f'{e:.1e}' for e in ours)}  sdpa "
                f"{' '.join(f'{e:.1e}' for e in peer)}  ratio {ratio:6.2f} {'PASS' if ratio <= 2 else 'FAIL'}")
        del t, ref
    B, H, S = 4, 16, 4096
    mask = make_mask(kind, B, S)
    flops = 4 * D * visible_pairs(mask, B, S) * H
    q, k, v = (torch.randn(B, H, S, D, device="cuda", dtype=torch.float32, requires_grad=True) for _ in range(3))

    def fn(q, k, v):
        return anymask.attention(q, k, v, mask, backend="triton")

    for prec in precisions:
        every = prec in swept  # the others: defaults only, fwd and fwd+bwd once
        for kernel, configs in (FP16X3_SWEEP if prec == "fp16x3" else FP32_SWEEP).items():
            if not every and kernel == "dq":
                continue
            for cfg in configs if every else [None]:  # None: this precision's default tiles at this head dim
                C.reset()
                for kn in ("fwd", "dkdv", "dq"):
                    tiles = dict(zip(("block_m", "block_n", "num_warps", "num_stages"), cfg)) if cfg and kn == kernel else {}
                    C.override(kn, D, torch.float32, precision=prec, **tiles)
                used = C.get(kernel, D, torch.float32)
                cfg = (used.block_m, used.block_n, used.num_warps, used.num_stages)
                bm, bn, warps, stages = cfg
                try:
                    ms = _time(fn, q, k, v, grad=kernel != "fwd")
                except Exception as exc:
                    ms = float("nan")
                    say(f"  {prec} {kernel} {cfg} failed: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}")
                tf = (1.0 if kernel == "fwd" else 3.5) * flops / (ms * 1e-3) / 1e12
                rows.append(dict(precision=prec, kernel=kernel, config=list(cfg), ms=ms, tflops=tf))
                say(f"time  {prec:7s} {kernel:5s} BM={bm:3d} BN={bn:3d} warps={warps} stages={stages}"
                    f"  {ms:8.3f} ms {tf:6.1f} TFLOP/s ({'fwd' if kernel == 'fwd' else 'fwd+bwd'})")
    C.reset()
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer masks; bf16 timing only")
    parser.add_argument("--sweep", action="store_true", help="also time a few tile configs")
    parser.add_argument("--fp32-sweep", action="store_true", help="fp32 dot precisions x tile configs")
    parser.add_argument("--fp32-precisions", default="tf32x3,bf16x6,tf32,bf16x3,ieee",
                        help="the --fp32-sweep's precisions")
    parser.add_argument("--fp32-swept", default="tf32x3,bf16x6",
                        help="those of them timed with every tile config (the others: defaults only)")
    parser.add_argument("--fp32-head-dim", type=int, default=128, help="the --fp32-sweep's head dim")
    parser.add_argument("--no-correctness", action="store_true")
    parser.add_argument("--no-timing", action="store_true")
    parser.add_argument("--ieee", action="store_true", help="also check fp32 with ieee dots")
    parser.add_argument("--peers", default="sdpa,flex", help="comma list of peers to time (sdpa, flex)")
    parser.add_argument("--masks", default=",".join(MASKS), help="comma list of masks")
    parser.add_argument("--dtypes", default="bf16,fp32", help="timing dtypes (bf16, fp16, fp32)")
    parser.add_argument("--budget", type=float, default=400.0, help="seconds after which timing stops")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    start = time.time()
    import triton

    say(f"device {torch.cuda.get_device_name()} torch {torch.__version__} triton {triton.__version__}")
    torch.manual_seed(0)
    kinds = ["documents_causal", "padding", "causal"] if args.quick else args.masks.split(",")
    result: dict = {}
    try:
        if not args.no_correctness:
            result["correctness"] = correctness(kinds, [torch.bfloat16, torch.float32], args.ieee)
        if args.sweep:
            result["sweep"] = sweep()
        if args.fp32_sweep:
            result["fp32_sweep"] = fp32_sweep(args.fp32_precisions.split(","), args.fp32_swept.split(","),
                                              D=args.fp32_head_dim)
        if not args.no_timing:
            names = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
            dtypes = [torch.bfloat16] if args.quick else [names[d] for d in args.dtypes.split(",")]
            peers = [p for p in args.peers.split(",") if p]
            rows = timing(kinds, dtypes, peers, deadline=start + args.budget)
            result["timing"] = rows
            result["summary"] = summarise(rows)
    except Exception:
        say(traceback.format_exc())
        result["error"] = traceback.format_exc().splitlines()[-1]
    result["seconds"] = round(time.time() - start, 1)
    result["all_correct"] = all(r["ok"] for r in result.get("correctness", []))
    line = json.dumps(result)
    print(line)
    out = os.environ.get("OUT")
    if out:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "gpu_triton_check.json"), "w") as f:
            f.write(line + "\n")
    return 0 if result["all_correct"] and "error" not in result else 1


if __name__ == "__main__":
    sys.exit(main())
