"""Does a result depend on what freed GPU memory held before?  (test_cudnn.py's bshd sliding-window
case failed only after the file's earlier GPU tests: the SDPA peer's dQ was 4-5 off float64.)

For each sequence length, layout and mask: float64 eager on the GPU as the reference, then bf16
forward+backward through raw ``F.scaled_dot_product_attention`` forced onto each SDPA backend and
through anymask's backends, once on clean memory (fresh cache) and once after the caching allocator
was filled with large values and freed ("dirty").  Prints the max error of out/dq/dk/dv relative to
the reference's scale, and writes the table as JSON lines to $OUT/dirty_probe.jsonl.
"""
import json
import os
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import anymask
from anymask import masks as M

OUT = os.environ.get("OUT", ".")
D, HQ, HKV, B = 64, 4, 2, 3
RAW = {"sdpa_default": None, "sdpa_cudnn": SDPBackend.CUDNN_ATTENTION,
       "sdpa_efficient": SDPBackend.EFFICIENT_ATTENTION, "sdpa_math": SDPBackend.MATH}
MASKS = {"window_causal": lambda: M.window(37) & M.causal(), "causal": M.causal, "full": M.full,
         "prefix_lm": lambda: M.prefix_lm(40)}
BACKENDS = [b for b in ("sdpa", "cudnn", "triton", "flex") if len(sys.argv) < 2 or b in sys.argv[1].split(",")]


def dirty(value=3.0e3):
    """Fill the allocator's free blocks (small and large pools) with ``value``, then free them."""
    torch.cuda.synchronize()
    held = []
    for nbytes, count in ((256 << 10, 64), (512 << 10, 64), (1 << 20, 32), (4 << 20, 16), (32 << 20, 8)):
        for _ in range(count):
            held.append(torch.full((nbytes // 2,), value, device="cuda", dtype=torch.bfloat16))
    del held
    torch.cuda.synchronize()


def tensors(S, layout, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)

    def mk(h):
        if layout == "bshd":
            return torch.randn(B, S, h, D, device="cuda", dtype=torch.float64, generator=g).transpose(1, 2)
        return torch.randn(B, h, S, D, device="cuda", dtype=torch.float64, generator=g)
    return mk(HQ), mk(HKV), mk(HKV), mk(HQ)


def errors(out, grads, ref, ref_grads):
    scale = [ref.abs().max().item()] + [r.abs().max().item() for r in ref_grads]
    got = [out] + list(grads)
    return [round((a.double() - r).abs().max().item() / s, 5) for a, r, s in zip(got, [ref] + list(ref_grads), scale)]


def main():
    rows = []
    for S in (300, 320, 384):
        for layout in ("bshd", "bhsd"):
            for mname, make in MASKS.items():
                mask = make()
                q, k, v, g = tensors(S, layout, seed=S)
                leaves = [t.detach().requires_grad_() for t in (q, k, v)]
                ref = anymask.attention(*leaves, mask, backend="eager")
                ref_grads = torch.autograd.grad(ref, leaves, g)
                dense = mask.to_dense(B, 1, S, S, device="cuda")
                for memory in ("clean", "dirty"):
                    variants = {}
                    for rname, kind in RAW.items():
                        def raw(lo, kind=kind):
                            with (sdpa_kernel([kind]) if kind is not None else torch.enable_grad()):
                                return F.scaled_dot_product_attention(*lo, attn_mask=dense, enable_gqa=True)
                        variants[rname] = raw
                    for b in BACKENDS:
                        variants[b] = lambda lo, b=b: anymask.attention(*lo, mask, backend=b)
                    for vname, fn in variants.items():
                        torch.cuda.empty_cache()
                        if memory == "dirty":
                            dirty()
                        low = [t.detach().bfloat16().requires_grad_() for t in (q, k, v)]
                        try:
                            out = fn(low)
                            grads = torch.autograd.grad(out, low, g.bfloat16())
                            errs = errors(out, grads, ref, ref_grads)
                        except Exception as e:  # a forced SDPA backend may refuse this input
                            errs = f"{type(e).__name__}: {str(e).splitlines()[0][:80]}"
                        row = dict(S=S, layout=layout, mask=mname, memory=memory, variant=vname, err=errs)
                        rows.append(row)
                        flag = "" if isinstance(errs, str) or max(errs) < 0.05 else "   <<<<< WRONG"
                        print(f"S={S} {layout} {mname:13s} {memory:5s} {vname:15s} out/dq/dk/dv {errs}{flag}", flush=True)
    with open(os.path.join(OUT, "dirty_probe.jsonl"), "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    torch.manual_seed(0)
    print(torch.__version__, torch.cuda.get_device_name(), "cudnn", torch.backends.cudnn.version(), flush=True)
    main()
