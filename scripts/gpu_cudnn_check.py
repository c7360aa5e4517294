"""GPU check of the cuDNN backend: graph probes, correctness (fwd+bwd, bf16), timing vs peers.

Run on the GPU machine from the repository root (wheel installed to /tmp/site first)::

    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
    PYTHONPATH=/tmp/site:src python3 scripts/gpu_cudnn_check.py            # all parts, ~6-9 min
    PYTHONPATH=/tmp/site:src python3 scripts/gpu_cudnn_check.py --parts probe,correct

Every case runs in its own try/except (errors are printed with their text and the run goes on);
everything printed also goes to ``$OUT/cudnn_check.log`` (or ``./cudnn_check.log``), flushed per
line.  ``--budget`` seconds (default 480) stops starting new timing cases near the 10-minute limit.

TFLOP/s count unmasked (query, key) pairs only: forward ``4 * D * H * pairs``, forward+backward
3.5 times that.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

import torch

T0 = time.time()
LOG = None
SUMMARY = {"probes": {}, "correct": {}, "timing": []}  # printed as one JSON line at the end


def log(*parts) -> None:
    line = " ".join(str(p) for p in parts)
    print(line, flush=True)
    if LOG is not None:
        LOG.write(line + "\n")
        LOG.flush()


def guarded(what: str, fn, *args, **kwargs):
    """Run one case; print the error (full text + short traceback) instead of stopping."""
    try:
        return fn(*args, **kwargs)
    except Exception as exc:
        log(f"  [ERROR] {what}: {type(exc).__name__}: {exc}")
        SUMMARY.setdefault("errors", []).append(f"{what}: {type(exc).__name__}: {str(exc)[:300]}")
        for line in traceback.format_exc().strip().splitlines()[-8:]:
            log("      " + line)
        try:
            torch.cuda.synchronize()
        except Exception as sync_exc:
            log(f"      (CUDA context is broken after this error: {sync_exc}; later GPU cases will fail)")
        return None


# environment -------------------------------------------------------------------------------------


def environment() -> None:
    log("== environment")
    log(f"python {sys.version.split()[0]}, torch {torch.__version__}, cuda {torch.version.cuda}, "
        f"torch cudnn {torch.backends.cudnn.version()}")
    if torch.cuda.is_available():
        log(f"gpu {torch.cuda.get_device_name(0)}, capability {torch.cuda.get_device_capability(0)}")
    try:
        import cudnn

        log(f"cudnn frontend {cudnn.__version__} from {os.path.dirname(cudnn.__file__)}, "
            f"backend {cudnn.backend_version()} ({cudnn.backend_version_string()})")
    except Exception as exc:
        log(f"cudnn frontend import FAILED: {type(exc).__name__}: {exc}")
    for mod in ("cuda.bindings", "cutlass"):
        try:
            __import__(mod)
            log(f"{mod} importable (cudnn-frontend python engines may use it)")
        except Exception as exc:
            log(f"{mod} not importable ({type(exc).__name__}); cudnn-frontend uses the cuDNN backend engines only")
    try:
        import triton

        log(f"triton {triton.__version__}")
    except Exception as exc:
        log(f"triton not importable: {exc}")
    import anymask

    for name, info in anymask.backends().items():
        log(f"  backend {name:10s} available={info['available']} {'; '.join(info['reasons'])}")


# part 1: raw graph probes (what cuDNN's band means, what it accepts) -----------------------------


def probe_graphs() -> None:
    """Dense graphs on small shapes against a float32 reference of the documented band semantics."""
    from anymask.backend.cudnn import Band, _band_grid
    from anymask.kernels import cudnn_graphs as G

    log("== part 1: graph probes (dense bf16, B=2, Hq=4, Hkv=2, D=64; fwd and bwd vs fp32 band reference)")
    cases = [
        ("no mask", 128, 128, Band()),
        ("causal top-left", 128, 128, Band(False, None, 0)),
        ("causal bottom-right Sq<Skv", 64, 192, Band(True, None, 0)),
        ("causal bottom-right Sq=Skv", 128, 128, Band(True, None, 0)),
        ("sliding lb=17 rb=0", 128, 128, Band(False, 17, 0)),
        ("sliding bottom-right lb=17 rb=0 Sq<Skv", 64, 192, Band(True, 17, 0)),
        ("two-sided lb=17 rb=5", 128, 128, Band(False, 17, 5)),
        ("right bound only rb=5", 128, 128, Band(False, None, 5)),
        ("left bound only lb=17", 128, 128, Band(False, 17, None)),
        ("odd lengths causal 100x100", 100, 100, Band(False, None, 0)),
        ("odd lengths bottom-right 37x100", 37, 100, Band(True, None, 0)),
    ]
    for name, sq, sk, band in cases:
        guarded(name, _probe_one, name, sq, sk, band, G, _band_grid)
    guarded("padding-mask lengths", _probe_lengths, G, _band_grid, Band)
    guarded("ragged THD", _probe_ragged, G, _band_grid, Band)


def _ref_band(q, k, v, grid, scale):
    """float32 reference: q [B, Hq, Sq, D], k/v [B, Hkv, Sk, D], grid bool [Sq, Sk] or [B, 1, Sq, Sk]."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.float().repeat_interleave(rep, 1), v.float().repeat_interleave(rep, 1)
    s = (q.float() @ k.transpose(-1, -2)) * scale
    p = s.masked_fill(~grid, float("-inf")).softmax(-1)
    return torch.nan_to_num(p) @ v


def _probe_one(name, sq, sk, band, G, _band_grid) -> None:
    B, Hq, Hk, D = 2, 4, 2, 64
    q = torch.randn(B, Hq, sq, D, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(B, Hk, sk, D, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(B, Hk, sk, D, device="cuda", dtype=torch.bfloat16)
    spec = G.Spec(torch.bfloat16, B, Hq, Hk, sq, sk, D, D ** -0.5, bottom_right=band.bottom_right,
                  left_bound=band.left_bound, right_bound=band.right_bound, q_stride=tuple(q.stride()),
                  k_stride=tuple(k.stride()), v_stride=tuple(v.stride()))
    grid = _band_grid(band, sq, sk).cuda()
    o, stats = G.forward(spec, q, k, v, G.Meta(), True)
    qf, kf, vf = (t.float().requires_grad_() for t in (q, k, v))
    ref = _ref_band(qf, kf, vf, grid, D ** -0.5)
    err = (o.float() - ref).abs().max().item()
    do = torch.randn_like(o)
    dq, dk, dv = G.backward(spec, q, k, v, o, do, stats, G.Meta())
    rq, rk, rv = torch.autograd.grad(ref, (qf, kf, vf), do.float())
    gerr = max((a.float() - b).abs().max().item() for a, b in ((dq, rq), (dk, rk), (dv, rv)))
    empty = int((~grid.any(-1)).sum())
    verdict = "ok" if err < 0.05 and gerr < 0.2 else "MISMATCH"
    SUMMARY["probes"][name] = verdict
    log(f"  [{verdict}] {name}: fwd max err {err:.3g}, bwd max err {gerr:.3g} (rows seeing nothing: {empty})")


def _probe_lengths(G, _band_grid, Band) -> None:
    B, H, S, D = 3, 2, 256, 64
    q, k, v = (torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    seq = torch.tensor([256, 100, 3], device="cuda", dtype=torch.int32)
    spec = G.Spec(torch.bfloat16, B, H, H, S, S, D, D ** -0.5, lengths=True, q_stride=tuple(q.stride()),
                  k_stride=tuple(k.stride()), v_stride=tuple(v.stride()))
    meta = G.Meta(seq.view(-1, 1, 1, 1), seq.view(-1, 1, 1, 1))
    o, _ = G.forward(spec, q, k, v, meta, False)
    errs = []
    for b, n in enumerate(seq.tolist()):
        ref = _ref_band(q[b:b + 1, :, :n], k[b:b + 1, :, :n], v[b:b + 1, :, :n], torch.ones(n, n, dtype=torch.bool,
                        device="cuda"), D ** -0.5)
        errs.append((o[b:b + 1, :, :n].float() - ref).abs().max().item())
    log(f"  [{'ok' if max(errs) < 0.05 else 'MISMATCH'}] padding-mask lengths {seq.tolist()}: max err per batch "
        f"{[f'{e:.3g}' for e in errs]}")


def _probe_ragged(G, _band_grid, Band) -> None:
    H, D = 4, 64
    lengths = [100, 37, 256, 1]
    T = sum(lengths)
    q, k, v = (torch.randn(T, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    starts = [0]
    for n in lengths:
        starts.append(starts[-1] + n)
    lens = torch.tensor(lengths, dtype=torch.int32, device="cuda").view(-1, 1, 1, 1)
    off = (torch.tensor(starts, dtype=torch.int64, device="cuda") * H * D).view(-1, 1, 1, 1)
    meta = G.Meta(lens, lens, off, off)
    for band in (Band(), Band(False, None, 0), Band(True, 33, 0)):
        spec = G.Spec(torch.bfloat16, len(lengths), H, H, 256, 256, D, D ** -0.5, ragged=True, lengths=True,
                      bottom_right=band.bottom_right, left_bound=band.left_bound, right_bound=band.right_bound,
                      total_q=512, total_kv=512)
        o, stats = G.forward(spec, q, k, v, meta, True)
        dq, dk, dv = G.backward(spec, q, k, v, o, torch.ones_like(o), stats, meta)
        errs = []
        for n, (a, ln) in enumerate(zip(starts, lengths)):
            seg = [t[a:a + ln].transpose(0, 1)[None] for t in (q, k, v)]
            ref = _ref_band(*seg, _band_grid(band, ln, ln).cuda(), D ** -0.5)
            errs.append((o[a:a + ln].transpose(0, 1)[None].float() - ref).abs().max().item())
        finite = bool(torch.isfinite(dq).all() and torch.isfinite(dk).all() and torch.isfinite(dv).all())
        log(f"  [{'ok' if max(errs) < 0.05 and finite else 'MISMATCH'}] ragged {lengths} {band}: fwd max err "
            f"{max(errs):.3g}, grads finite {finite}")


# part 2: correctness through anymask.attention ---------------------------------------------------


def mask_cases(B: int, S: int, seed: int = 0):
    """Name -> mask for B rows of S tokens (documents 256-2048 tokens; padding 35-100% fill)."""
    from anymask import masks as M

    gen = torch.Generator().manual_seed(seed)
    lo, hi = min(256, max(1, S // 8)), min(2048, max(2, S // 2))
    docs = []
    for _ in range(B):
        row = []
        while sum(row) < S:
            row.append(min(S - sum(row), int(torch.randint(lo, hi + 1, (1,), generator=gen))))
        docs.append(row)
    fill = torch.linspace(1.0, 0.35, B)
    valid = torch.arange(S)[None, :] < (fill * S).round().long()[:, None]
    return {
        "full": M.full(),
        "causal": M.causal(),
        "documents": M.documents(lengths=docs),
        "documents_causal": M.documents(lengths=docs) & M.causal(),
        "sliding_window": M.window(min(1024, S // 4)) & M.causal(),
        "prefix_lm": M.prefix_lm(S // 4),
        "prefix_lm_per_batch": M.prefix_lm(torch.linspace(S // 8, S // 2, B).long()),
        "padding": M.padding(valid) & M.full(),
        "padding_causal": M.padding(valid) & M.causal(),
        "left_padding_causal": M.padding(valid.flip(1)) & M.causal(),
        "docs_padding_causal": M.documents(lengths=docs) & M.padding(valid) & M.causal(),
    }


def correctness(args) -> None:
    log("== part 2: correctness through anymask.attention(backend='cudnn'), bf16 fwd+bwd vs eager float64; "
        "bound = 2 x SDPA-bf16 error + 8e-3 x max|ref|")
    few = ("causal", "documents_causal", "sliding_window", "prefix_lm_per_batch", "docs_padding_causal")
    shapes = [  # (B, Hq, Hkv, Sq, Skv, D), masks (None = all)
        ((3, 4, 2, 256, 256, 64), None),
        ((2, 16, 16, 4096, 4096, 128), None),  # realistic
        ((3, 4, 2, 64, 256, 64), None),  # decoding: queries are the last 64 positions
        ((3, 4, 4, 300, 300, 128), few),  # odd length, head dim 128
        ((2, 32, 8, 2048, 2048, 128), ("full", "documents", "documents_causal", "sliding_window", "prefix_lm")),
    ]
    for shape, names in shapes:
        B, Hq, Hkv, Sq, Skv, D = shape
        for name, mask in mask_cases(B, Skv).items():
            if names is not None and name not in names:
                continue
            if time.time() - T0 > args.correct_budget:
                log(f"  [budget] correctness budget {args.correct_budget}s reached; skipping the rest")
                return
            if Sq >= 2048 and name in ("left_padding_causal", "padding") and not args.full:
                continue
            guarded(f"{name} {shape}", _check_one, name, mask, shape)
            torch.cuda.empty_cache()


def _check_one(name, mask, shape) -> None:
    import anymask

    from anymask.backend import cudnn as C

    C._FAILED.clear()  # report every failure, not only the first of its kind
    B, Hq, Hkv, Sq, Skv, D = shape
    q = torch.randn(B, Hq, Sq, D, device="cuda", dtype=torch.float64, requires_grad=True)
    k = torch.randn(B, Hkv, Skv, D, device="cuda", dtype=torch.float64, requires_grad=True)
    v = torch.randn(B, Hkv, Skv, D, device="cuda", dtype=torch.float64, requires_grad=True)
    low = [t.detach().bfloat16().requires_grad_() for t in (q, k, v)]
    reasons = anymask.backends(*low, mask)["cudnn"]["reasons"]
    if reasons:
        log(f"  [skip] {name} {shape}: {'; '.join(reasons)}")
        return
    g = torch.randn(B, Hq, Sq, D, device="cuda", dtype=torch.float64)
    ref = anymask.attention(q, k, v, mask, backend="eager")
    ref_grads = torch.autograd.grad(ref, (q, k, v), g)
    peer = anymask.attention(*low, mask, backend="sdpa")
    peer_grads = torch.autograd.grad(peer, low, g.bfloat16())
    out = anymask.attention(*low, mask, backend="cudnn")
    grads = torch.autograd.grad(out, low, g.bfloat16())
    empty = ~mask.to_dense(B, 1, Sq, Skv, device="cuda").any(-1)[:, 0]  # [B, Sq] rows seeing nothing
    parts, ok = [], True
    for what, a, r, pr in [("out", out, ref, peer)] + list(zip(("dq", "dk", "dv"), grads, ref_grads, peer_grads)):
        err = (a.double() - r).abs().max().item()
        peer_err = (pr.double() - r).abs().max().item()
        bound = 2 * peer_err + 8e-3 * max(1.0, r.abs().max().item())
        finite = bool(torch.isfinite(a).all())
        ok &= finite and err <= bound
        parts.append(f"{what} {err:.3g}/{bound:.3g}")
    zero_rows = bool((out[empty.unsqueeze(1).expand(B, Hq, Sq)] == 0).all()) if empty.any() else True
    zero_grad = bool((grads[0][empty.unsqueeze(1).expand(B, Hq, Sq)] == 0).all()) if empty.any() else True
    ok &= zero_rows and zero_grad
    SUMMARY["correct"][f"{name} {shape}"] = "ok" if ok else "FAIL"
    log(f"  [{'ok' if ok else 'FAIL'}] {name} {shape}: " + ", ".join(parts)
        + (f", empty rows {int(empty.sum())} zero={zero_rows} zero-grad={zero_grad}" if empty.any() else ""))


# part 3: timing ----------------------------------------------------------------------------------


def bench(fn) -> float:
    """Median milliseconds."""
    try:
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=10, rep=50, return_mode="median"))
    except ImportError:
        for _ in range(3):
            fn()
        times = []
        for _ in range(15):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b))
        return sorted(times)[len(times) // 2]


def _runner(backend: str, mask, q, k, v):
    """A callable computing attention with ``backend`` (``sdpa-native`` = raw SDPA, precomputed mask)."""
    import anymask
    import torch.nn.functional as F
    from anymask.structure import analyse

    if backend == "cudnn-preplanned":
        return _preplanned(mask, q, k, v)
    if backend != "sdpa-native":
        return lambda: anymask.attention(q, k, v, mask, backend=backend)
    s = analyse(mask)
    B, H, S, _ = q.shape
    if s.is_structured and s.documents is None and s.valid is None and s.base in ("full", "causal"):
        causal = s.base == "causal"
        return lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=k.shape[1] != H)
    dense = mask.to_dense(B, 1, S, S, device="cuda")
    dense = dense | ~dense.any(-1, keepdim=True)
    return lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=dense, enable_gqa=k.shape[1] != H)


def _preplanned(mask, q, k, v):
    """The cuDNN backend with the plan (segment layout, row blocks) made once: kernel + glue only."""
    from anymask.backend import cudnn as C
    from anymask.problem import describe

    p_train = describe(q, k, v, mask, None)
    with torch.no_grad():
        p_inf = describe(q, k, v, mask, None)
    pl = C.plan(p_train)
    run = C._run_ragged if isinstance(pl, C.RaggedPlan) else C._run_dense
    return lambda: run(q, k, v, p_train if torch.is_grad_enabled() else p_inf, pl)


def timing(args, backends: list[str]) -> None:
    B, S, H, D = args.batch, args.seq, 16, 128
    log(f"== part 3: timing {backends} — B={B}, S={S} ({B * S} tokens), H=16, D=128, bf16; median ms; "
        "TFLOP/s over unmasked pairs")
    import anymask

    for name, mask in mask_cases(B, S, seed=1).items():
        if name in ("prefix_lm_per_batch", "left_padding_causal", "docs_padding_causal", "padding_causal"):
            continue
        pairs = int(mask.to_dense(B, 1, S, S, device="cuda").sum())
        flops = 4 * D * H * pairs
        for backend in backends:
            if time.time() - T0 > args.budget:
                log(f"  [budget] {args.budget}s reached; skipping {name}/{backend} and later cases")
                return
            q, k, v = (torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                       for _ in range(3))
            if backend not in ("sdpa-native", "cudnn-preplanned"):
                reasons = anymask.backends(q, k, v, mask)[backend]["reasons"]
                if reasons:
                    log(f"  {name:20s} {backend:12s} n/a: {'; '.join(reasons)[:160]}")
                    continue
            guarded(f"timing {name}/{backend}", _time_one, name, backend, mask, q, k, v, flops)
            torch.cuda.empty_cache()


def _time_one(name, backend, mask, q, k, v, flops) -> None:
    from anymask.backend import cudnn as C

    C._FAILED.clear()
    fn = _runner(backend, mask, q, k, v)
    g = torch.randn_like(q)
    t_compile = time.time()
    with torch.no_grad():
        fn()
    torch.autograd.grad(fn(), (q, k, v), g)
    torch.cuda.synchronize()
    first = time.time() - t_compile
    with torch.no_grad():
        fwd = bench(fn)
    torch.cuda.reset_peak_memory_stats()
    fb = bench(lambda: torch.autograd.grad(fn(), (q, k, v), g))
    peak = torch.cuda.max_memory_allocated() / 2 ** 30
    SUMMARY["timing"].append({"mask": name, "backend": backend, "fwd_ms": round(fwd, 4), "fwd_bwd_ms": round(fb, 4),
                              "fwd_tflops": round(flops / fwd / 1e9, 1),
                              "fwd_bwd_tflops": round(3.5 * flops / fb / 1e9, 1), "peak_gib": round(peak, 2)})
    log(f"  {name:20s} {backend:12s} fwd {fwd:7.3f} ms {flops / fwd / 1e9:6.1f} TF/s | fwd+bwd {fb:7.3f} ms "
        f"{3.5 * flops / fb / 1e9:6.1f} TF/s | peak {peak:5.1f} GiB | first call {first:5.1f} s")


def graph_report() -> None:
    from anymask.kernels import cudnn_graphs as G

    log(f"== cuDNN graph cache: {G.cache_size()} graphs")
    for key, built in list(G._cache.items())[:40]:
        spec, kind = key[0], key[1]
        try:
            plan = built.graph.get_plan_name_at_index(0)
        except Exception as exc:
            plan = f"? ({type(exc).__name__})"
        log(f"  {kind:3s} B={spec.batch} H={spec.q_heads}/{spec.kv_heads} S={spec.q_len}x{spec.kv_len} "
            f"ragged={spec.ragged} lengths={spec.lengths} br={spec.bottom_right} lb={spec.left_bound} "
            f"rb={spec.right_bound} tot={spec.total_q} ws={built.workspace >> 20} MiB plan={plan}"
            + (f" NOTE {built.note}" if built.note else ""))


def main() -> None:
    global LOG
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default="probe,correct,time,flex")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--budget", type=float, default=480.0)
    ap.add_argument("--correct-budget", type=float, default=250.0,
                    help="seconds since start after which correctness cases are skipped")
    ap.add_argument("--log", default="cudnn_check.log", help="log file name under $OUT (appended)")
    ap.add_argument("--full", action="store_true", help="every mask on the realistic correctness shapes")
    args = ap.parse_args()
    out_dir = os.environ.get("OUT", ".")
    LOG = open(os.path.join(out_dir, args.log), "a")
    log(f"######## gpu_cudnn_check {time.strftime('%Y-%m-%d %H:%M:%S')} args {vars(args)}")
    parts = set(args.parts.split(","))
    guarded("environment", environment)
    if not torch.cuda.is_available():
        log("no CUDA: nothing else to check")
        return
    torch.manual_seed(0)
    if "probe" in parts:
        guarded("probes", probe_graphs)
    if "correct" in parts:
        guarded("correctness", correctness, args)
    log(f"-- elapsed {time.time() - T0:.0f} s")
    if "time" in parts:
        guarded("timing", timing, args, ["cudnn", "cudnn-preplanned", "sdpa-native", "varlen"])
    log(f"-- elapsed {time.time() - T0:.0f} s")
    if "flex" in parts:
        guarded("timing flex", timing, args, ["flex"])
    guarded("graph report", graph_report)
    log(f"== done in {time.time() - T0:.0f} s")
    log(json.dumps(SUMMARY))


if __name__ == "__main__":
    main()
