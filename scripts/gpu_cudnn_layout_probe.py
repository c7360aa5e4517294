"""Can cuDNN's ragged attention read packed documents in place?  Two questions, on the GPU:

1. ragged offsets over a ``[B, H, S, D]``-contiguous tensor (entry ``n`` of row ``b`` starting at
   token ``s0`` has base ``b*H*S*D + s0*D``, head stride ``S*D``, token stride ``D``) instead of the
   token-major THD copy anymask makes today;
2. batch entries of length 0 (bucket padding without dummy tokens).

Each variant runs the forward and backward graphs and is compared with float32 attention per
document; it prints one JSON line per variant and appends to ``cudnn_layout_probe.jsonl``.

    PYTHONPATH=src python3 scripts/gpu_cudnn_layout_probe.py --out $OUT
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

B, H, S, D = 2, 4, 1024, 64
DOCS = [[300, 500, 224], [1024]]


def reference(q, k, v, do):
    """Per-document float32 attention and its gradients (bidirectional inside each document)."""
    q, k, v = (t.float().detach().requires_grad_() for t in (q, k, v))
    rows = []
    for b, row in enumerate(DOCS):
        parts, s0 = [], 0
        for n in row:
            sl = slice(s0, s0 + n)
            a = torch.softmax(q[b, :, sl] @ k[b, :, sl].transpose(-1, -2) * D ** -0.5, -1)  # [H, n, n]
            parts.append(a @ v[b, :, sl])  # [H, n, D]
            s0 += n
        rows.append(torch.cat(parts, dim=1))  # [H, S, D]
    out = torch.stack(rows)  # [B, H, S, D]
    return out.detach(), torch.autograd.grad(out, (q, k, v), do.float())


def run_variant(G, name: str, empty_entries: int, bhsd: bool) -> dict:
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, do = (torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(4))
    entries = [(b, s0, n) for b, row in enumerate(DOCS) for s0, n in zip([sum(row[:i]) for i in range(len(row))], row)]
    N = len(entries) + empty_entries
    if bhsd:
        base = [b * H * S * D + s0 * D for b, s0, _ in entries]
        stride = lambda n, h, s, d: (h * S * d, S * d, d, 1)  # noqa: E731
        qp, kp, vp, dop = q, k, v, do
    else:
        starts = [0]
        for _, _, n in entries:
            starts.append(starts[-1] + n)
        base = [x * H * D for x in starts[:-1]]
        stride = lambda n, h, s, d: (s * h * d, d, h * d, 1)  # noqa: E731
        qp, kp, vp, dop = (t.transpose(1, 2).reshape(B * S, H, D).contiguous() for t in (q, k, v, do))
    lengths = [n for *_, n in entries] + [0] * empty_entries
    end = base[-1] + lengths[len(entries) - 1] * (D if bhsd else H * D)
    offsets = base + [end] * (empty_entries + 1)  # empty entries start where the last one ends
    col = lambda xs, dt: torch.tensor(xs, dtype=dt).view(-1, 1, 1, 1).cuda()  # noqa: E731
    meta = G.Meta(col(lengths, torch.int32), col(lengths, torch.int32), col(offsets, torch.int64),
                  col(offsets, torch.int64))
    spec = G.Spec(torch.bfloat16, N, H, H, 1024, 1024, D, D ** -0.5, ragged=True, lengths=True,
                  total_q=B * S, total_kv=B * S)
    real = G._token_major
    G._token_major = stride
    G.clear_cache()
    line = {"variant": name}
    try:
        out, stats = G.forward(spec, qp, kp, vp, meta, True)  # o allocated like qp (both layouts)
        dq, dk, dv = G.backward(spec, qp, kp, vp, out, dop, stats, meta)
        if not bhsd:
            out, dq, dk, dv = (t.view(B, S, H, D).transpose(1, 2) for t in (out, dq, dk, dv))
        ref, (rq, rk, rv) = reference(q, k, v, do)
        for key, a, r in (("o", out, ref), ("dq", dq, rq), ("dk", dk, rk), ("dv", dv, rv)):
            line[key] = round(float((a.float() - r).abs().max() / r.abs().max()), 5)
        line["ok"] = all(line[key] < 0.03 for key in ("o", "dq", "dk", "dv"))
    except Exception as exc:  # a layout cuDNN refuses: say so, go on
        line["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
    finally:
        G._token_major = real
        G.clear_cache()
    print(json.dumps(line), flush=True)
    return line


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    p.add_argument("--variant", type=int, help="run only this one (0-3): a crash in cuDNN ends the process")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    from anymask.kernels import cudnn_graphs as G

    variants = [("thd (today)", 0, False), ("thd + 2 empty entries", 2, False), ("bhsd in place", 0, True),
                ("bhsd + 2 empty entries", 2, True)]
    chosen = variants if args.variant is None else [variants[args.variant]]
    rows = [run_variant(G, *v) for v in chosen]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "cudnn_layout_probe.jsonl", "a") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
