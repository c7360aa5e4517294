"""Does ``backend="cudnn"`` read or keep memory it does not own?  The caching allocator is filled
with NaN and freed before each case, so an output or gradient row a graph leaves unwritten (or a
read past a buffer's end that reaches a softmax weight of 0) shows as NaN or a large error.

Cases: prefix-LM with per-row prefixes that are not multiples of 128 (block A runs with per-batch
lengths; its dq / dk / dv views are added whole), and packed documents / padding whose token counts
are not powers of two (the ragged graphs declare power-of-two capacities) in each layout mode.
Reference: float64 eager on the GPU.  Prints one line per case and writes $OUT/nan_probe.jsonl.
"""
import json
import os

import torch

import anymask
from anymask import masks as M

OUT = os.environ.get("OUT", ".")
D = 128


def fill_with_nan():
    """Fill the allocator's free blocks (small and large pools) with NaN, then free them."""
    torch.cuda.synchronize()
    held = [torch.full((nbytes // 2,), float("nan"), device="cuda", dtype=torch.bfloat16)
            for nbytes, count in ((256 << 10, 64), (1 << 20, 32), (4 << 20, 16), (32 << 20, 16), (256 << 20, 4))
            for _ in range(count)]
    del held
    torch.cuda.synchronize()


def lengths_mask(B, S, gen):
    lengths = torch.randint(S // 3, S + 1, (B,), generator=gen)
    return M.padding(torch.arange(S)[None, :] < lengths[:, None])


def doc_ids(B, S, gen):
    cuts = torch.randint(0, 5, (B, S), generator=gen) == 0
    return M.documents(cuts.long().cumsum(-1))


CASES = {  # name: (B, Hq, Hkv, S, layout, mask maker)
    "prefix_256_3000": (2, 8, 8, 4096, "bhsd", lambda B, S, g: M.prefix_lm(torch.tensor([256, 3000]))),
    "prefix_75": (3, 8, 4, 1000, "bhsd", lambda B, S, g: M.prefix_lm(75)),
    "prefix_0_130_299": (3, 8, 8, 300, "bshd", lambda B, S, g: M.prefix_lm(torch.tensor([0, 130, 299]))),
    "docs_causal_bhsd": (3, 8, 8, 1000, "bhsd", lambda B, S, g: doc_ids(B, S, g) & M.causal()),
    "docs_full_bshd_gqa": (3, 8, 2, 1000, "bshd", lambda B, S, g: doc_ids(B, S, g)),
    "docs_causal_sliced": (3, 8, 2, 1000, "sliced", lambda B, S, g: doc_ids(B, S, g) & M.causal()),
    "padding_causal_bhsd": (3, 8, 8, 1000, "bhsd", lambda B, S, g: lengths_mask(B, S, g) & M.causal()),
    "padding_full_bshd": (5, 8, 8, 777, "bshd", lambda B, S, g: lengths_mask(B, S, g)),
}


def inputs(B, Hq, Hkv, S, layout, gen):
    def make(h):
        if layout == "bshd":
            return torch.randn(B, S, h, D, generator=gen, dtype=torch.float64).cuda().transpose(1, 2)
        if layout == "sliced":  # a view into a longer head dim: neither layout is dense
            return torch.randn(B, h, S, 2 * D, generator=gen, dtype=torch.float64).cuda()[..., :D]
        return torch.randn(B, h, S, D, generator=gen, dtype=torch.float64).cuda()
    return make(Hq), make(Hkv), make(Hkv), make(Hq)


def main():
    rows = []
    for name, (B, Hq, Hkv, S, layout, make_mask) in CASES.items():
        gen = torch.Generator().manual_seed(len(rows))
        mask = make_mask(B, S, gen)
        q, k, v, g = inputs(B, Hq, Hkv, S, layout, gen)
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        ref = anymask.attention(*leaves, mask, backend="eager")
        ref_grads = torch.autograd.grad(ref, leaves, g)
        torch.cuda.empty_cache()
        fill_with_nan()
        low = [t.detach().bfloat16().requires_grad_() for t in (q, k, v)]
        try:
            out = anymask.attention(*low, mask, backend="cudnn")
            grads = torch.autograd.grad(out, low, g.bfloat16())
            got = [out, *grads]
            finite = [bool(t.isfinite().all()) for t in got]
            err = [round(((a.double() - r).abs().max() / r.abs().max()).item(), 5)
                   for a, r in zip(got, [ref, *ref_grads])]
        except Exception as exc:
            finite, err = None, f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
        ok = finite is not None and all(finite) and max(err) < 0.05
        rows.append(dict(case=name, B=B, Hq=Hq, Hkv=Hkv, S=S, layout=layout, finite=finite, err=err, ok=ok))
        print(f"{name:22s} finite o/dq/dk/dv {finite} err {err} {'ok' if ok else '<<<<< WRONG'}", flush=True)
    with open(os.path.join(OUT, "nan_probe.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


if __name__ == "__main__":
    print(torch.__version__, torch.cuda.get_device_name(), "cudnn", torch.backends.cudnn.version(), flush=True)
    main()
