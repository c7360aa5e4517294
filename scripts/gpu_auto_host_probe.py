"""Host cost of ``backend="auto"`` per call on a GPU: auto against the backend it picks, forced.

Since 2026-12-07 auto's per-mask decision is keyed on the mask's stamp (an in-place edit of the
mask's tensors is seen), computed on every call.  Small shapes (B1 S1024 H16 D64 bf16, forward
under no_grad and forward+backward), where host time can exceed GPU time; masks: causal, packed
documents, padding, a custom mask_mod reading a tensor.  Run it on two source trees (PYTHONPATH) to
compare.  Prints one JSON line per case: GPU and host ms per call, auto and forced.
"""
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from gpu_probe_common import cuda_and_host_ms  # noqa: E402

import anymask  # noqa: E402
from anymask import masks  # noqa: E402


def cases(S: int, dev: torch.device):
    ids = torch.repeat_interleave(torch.arange(4, device=dev), S // 4)[None]
    valid = torch.arange(S, device=dev)[None] < (S * 3) // 4
    band = torch.arange(S, device=dev) // 128
    yield "causal", masks.causal()
    yield "documents", masks.documents(ids) & masks.causal()
    yield "padding", masks.padding(valid)
    yield "custom", masks.custom(lambda b, h, q, k: band[q] >= band[k])


def main() -> None:
    dev = torch.device("cuda")
    B, H, S, D = 1, 16, 1024, 64
    for name, mask in cases(S, dev):
        for grad in (False, True):
            q, k, v = (torch.randn(B, H, S, D, device=dev, dtype=torch.bfloat16, requires_grad=grad)
                       for _ in range(3))
            picked = anymask.which_backend(q, k, v, mask)

            def step(backend):
                if grad:
                    anymask.attention(q, k, v, mask, backend=backend).sum().backward()
                else:
                    with torch.no_grad():
                        anymask.attention(q, k, v, mask, backend=backend)

            row = {"mask": name, "grad": grad, "picked": picked}
            for label, backend in (("auto", "auto"), ("forced", picked)):
                gpu, host = cuda_and_host_ms(lambda: step(backend), n=50)
                row[f"{label}_gpu_ms"], row[f"{label}_host_ms"] = round(gpu, 4), round(host, 4)
            row["auto_extra_host_ms"] = round(row["auto_host_ms"] - row["forced_host_ms"], 4)
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
