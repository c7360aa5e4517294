"""Where does the ``fa4`` backend lose time against a hand-rolled FA4 call?  One GPU probe.

For each mask (bf16 fwd+bwd, B=4 S=4096 16 heads hd 128, a Llama layer's [B, S, H, D] layout) it
times, back to back over ``n`` calls (GPU ms per call and host ms to enqueue them):

    anymask fa4        anymask.attention(..., backend="fa4"): dispatch + plan lookup + FA4
    anymask cudnn      the same through cuDNN, for scale
    direct anymask mod FA4 called here with the backend's mask_mod, aux tensors and block lists
    direct doc-id mod  FA4 called here with the document-id mask_mod of FA4's docs (documents only)

and counts PyTorch-side host syncs in one ``anymask fa4`` call (``set_sync_debug_mode``).
One JSON line per (mask, variant) in ``$OUT/fa4_forms.jsonl``; run under scripts/gpu_fa4.sh's
PYTHONPATH (flash-attn-4 installed).
"""
import json
import os
import warnings
from pathlib import Path

import torch
from gpu_probe_common import cuda_and_host_ms

import anymask
from anymask._optional import probe
from anymask.backend import fa4, fa4_intervals, fa4_prefix
from anymask.bench import fa4_peer
from anymask.bench.cases import bench_mask
from anymask.problem import describe

B, S, H, D = 4, 4096, 16, 128
MASKS = os.environ.get("MASKS", "documents,documents_causal,padding,packed_prefix_lm,prefix_lm").split(",")


def fwd_bwd(f, q, k, v, g):
    def call():
        out = f(q, k, v)
        torch.autograd.grad(out, (q, k, v), g)
    return call


def direct(p):
    """FA4 called with the backend's own mask arguments (no anymask dispatch)."""
    flash = probe("flash_attn.cute")
    if p.structure.base == "prefix_lm" and p.structure.documents is None and p.structure.valid is None:
        kwargs = fa4_prefix.call_kwargs(p)
    else:
        kwargs = fa4_intervals.call_kwargs(fa4_intervals.plan(p))

    def f(q, k, v):
        out = flash.flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), softmax_scale=p.scale,
                                    **kwargs)
        return fa4.first_output(out).transpose(1, 2)
    return f


def syncs_in_one_call(mask, q, k, v, g):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            out = anymask.attention(q, k, v, mask, backend="fa4")
            torch.autograd.grad(out, (q, k, v), g)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return [str(w.message).splitlines()[0][:120] for w in caught if "synchroniz" in str(w.message)]


def main():
    out_path = Path(os.environ.get("OUT", ".")) / "fa4_forms.jsonl"
    torch.manual_seed(0)
    for name in MASKS:
        mask = bench_mask(name, B, S).to("cuda")
        q, k, v, g = (torch.randn(B, S, H, D, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
                      .requires_grad_(i < 3) for i in range(4))  # [B, H, S, D] views of [B, S, H, D]
        p = describe(q, k, v, mask, None)
        forms = {
            "anymask fa4": lambda q, k, v: anymask.attention(q, k, v, mask, backend="fa4"),
            "anymask cudnn": lambda q, k, v: anymask.attention(q, k, v, mask, backend="cudnn"),
            "direct anymask mod": direct(p),
        }
        s = p.structure
        if s.documents is not None and s.valid is None and s.base in ("full", "causal"):
            forms["direct doc-id mod"] = fa4_peer._documents_mod(probe("flash_attn.cute"), s, p)[0]
        rows = []
        for label, f in forms.items():
            try:
                gpu, host = cuda_and_host_ms(fwd_bwd(f, q, k, v, g), n=20)
                rows.append(dict(mask=name, form=label, gpu_ms=round(gpu, 3), host_ms=round(host, 3)))
            except Exception as exc:  # a form that fails is a result here
                rows.append(dict(mask=name, form=label, error=f"{type(exc).__name__}: {str(exc)[:200]}"))
        rows.append(dict(mask=name, form="syncs in one anymask fa4 call", syncs=syncs_in_one_call(mask, q, k, v, g)))
        with out_path.open("a") as fh:
            for r in rows:
                print(json.dumps(r), flush=True)
                fh.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
