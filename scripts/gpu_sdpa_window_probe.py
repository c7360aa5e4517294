"""Which SDPA path gets dQ wrong for a causal sliding window (bf16, cuda), with dO contiguous or a view?  Errors against float64
eager for anymask's sdpa backend and raw F.scaled_dot_product_attention variants."""
import torch
import torch.nn.functional as F

import anymask
from anymask import masks as M

torch.manual_seed(0)
B, S, D = 3, 300, 64
mask = M.window(37) & M.causal()
dense = mask.to_dense(B, 1, S, S, device="cuda")  # [B, 1, S, S]


def run(hq, hkv, layout):
    shape = (B, S, hq, D) if layout == "bshd" else (B, hq, S, D)
    mk = lambda h: (torch.randn(B, S, h, D, device="cuda", dtype=torch.float64).transpose(1, 2)  # noqa: E731
                    if layout == "bshd" else torch.randn(B, h, S, D, device="cuda", dtype=torch.float64))
    q, k, v = mk(hq), mk(hkv), mk(hkv)
    g = (torch.randn(B, S, hq, D, device="cuda", dtype=torch.float64).transpose(1, 2) if GRAD == "bshd"
         else torch.randn(B, hq, S, D, device="cuda", dtype=torch.float64))
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    ref = anymask.attention(*leaves, mask, backend="eager")
    rg = torch.autograd.grad(ref, leaves, g)
    out = {}
    low = [t.detach().bfloat16().requires_grad_() for t in (q, k, v)]
    o = anymask.attention(*low, mask, backend="sdpa")
    out["anymask_sdpa"] = (o, torch.autograd.grad(o, low, g.bfloat16()))
    o = F.scaled_dot_product_attention(*low, attn_mask=dense, enable_gqa=hq != hkv)
    out["raw_dense_gqa"] = (o, torch.autograd.grad(o, low, g.bfloat16()))
    kk = [t.repeat_interleave(hq // hkv, 1) for t in low[1:]]
    o = F.scaled_dot_product_attention(low[0], *kk, attn_mask=dense)
    out["raw_dense_expanded"] = (o, torch.autograd.grad(o, low, g.bfloat16()))
    lc = [t.detach().contiguous().requires_grad_() for t in low]
    o = F.scaled_dot_product_attention(*lc, attn_mask=dense, enable_gqa=hq != hkv)
    out["raw_dense_gqa_contig"] = (o, torch.autograd.grad(o, lc, g.bfloat16()))
    for name, (o, gr) in out.items():
        errs = [(o.double() - ref).abs().max().item()] + [(a.double() - r).abs().max().item() for a, r in zip(gr, rg)]
        print(f"{hq}:{hkv} {layout} grad {GRAD} {name:22s} out/dq/dk/dv err " + " ".join(f"{e:.3g}" for e in errs), flush=True)


for GRAD in ("bshd", "bhsd"):  # dO as a [B, S, H, D] view (what a Llama layer's backward gives) or contiguous
    for hq, hkv in ((4, 2), (4, 4)):
        for layout in ("bshd", "bhsd"):
            run(hq, hkv, layout)
