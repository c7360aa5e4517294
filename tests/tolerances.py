"""One table of per-dtype tolerances, relative to PyTorch's own low-precision error.

A backend's output may differ from the float64 reference by at most ``RATIO`` times what SDPA's
output at the same dtype differs, plus an absolute slack scaled by the reference's magnitude.
"""

import torch

RATIO = 2.0
ABS_SLACK = {torch.float64: 1e-10, torch.float32: 2e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def sdpa_error(peer: torch.Tensor, ref: torch.Tensor) -> float:
    """Max abs error of the peer (SDPA at the low dtype) against the float64 reference."""
    return (peer.double() - ref.double()).abs().max().item()


def assert_close_to_reference(out: torch.Tensor, ref: torch.Tensor, peer_error: float, *, what: str) -> None:
    dtype = out.dtype
    out, ref = out.double(), ref.double()
    assert torch.isfinite(out).all(), f"{what}: non-finite values"
    err = (out - ref).abs().max().item()
    scale = max(1.0, ref.abs().max().item())
    bound = RATIO * peer_error + ABS_SLACK[dtype] * scale
    assert err <= bound, f"{what}: max error {err:.3g} > bound {bound:.3g} (SDPA's own error {peer_error:.3g})"
