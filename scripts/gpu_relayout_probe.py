"""How fast does a ``[B, H, S, D] -> [B, S, H, D]`` layout copy run on this GPU?

PyTorch's own strided copy (``x.transpose(1, 2).contiguous()``) beside the same bytes moved as wider
words (``anymask.kernels.relayout``, and int32 / complex128 views for comparison), bf16, head dim
128, B=4, S=4096, for 32 / 16 / 8 heads.  GB/s counts bytes read plus bytes written.  Every variant
is checked bit-exact against PyTorch's copy.  One JSON line per (shape, variant) on stdout and in
``$OUT/relayout_probe.jsonl``.
"""
import json
import os
import sys
from pathlib import Path

import torch

from anymask.kernels import relayout

sys.path.insert(0, str(Path(__file__).parent))
from gpu_probe_common import cuda_ms  # noqa: E402


def words(word: torch.dtype):
    def run(x: torch.Tensor) -> torch.Tensor:  # x [B, H, S, D] -> new [B, S, H, D] memory
        B, H, S, D = x.shape
        out = x.new_empty(B, S, H, D)
        out.view(word).copy_(x.transpose(1, 2).view(word))
        return out
    return run


VARIANTS = {
    "torch": lambda x: x.transpose(1, 2).contiguous(),
    "relayout": lambda x: relayout.tokens_major(x),
    "int32": words(torch.int32),
    "int64": words(torch.int64),
    "complex128": words(torch.complex128),
}


def main() -> None:
    out = Path(os.environ.get("OUT", "."))
    lines = []
    for heads in (32, 16, 8):
        x = torch.randn(4, heads, 4096, 128, device="cuda", dtype=torch.bfloat16)  # [B, H, S, D]
        want = VARIANTS["torch"](x).view(torch.int16)
        moved = 2 * x.numel() * x.element_size()
        for name, fn in VARIANTS.items():
            same = torch.equal(fn(x).reshape(want.shape).view(torch.int16), want)
            ms = cuda_ms(lambda: fn(x), n=50)
            row = {"shape": list(x.shape), "variant": name, "ms": ms, "GB/s": round(moved / ms / 1e6),
                   "bit_exact": same, "gpu": torch.cuda.get_device_name()}
            print(json.dumps(row), flush=True)
            lines.append(json.dumps(row))
    (out / "relayout_probe.jsonl").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
