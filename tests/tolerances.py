"""Test-side use of the library's one tolerance table (``anymask.tuning.tolerance``).

A backend's output may differ from the float64 reference by at most twice what SDPA's output at
the same dtype differs, plus an absolute slack per dtype scaled by the reference's magnitude —
the same rule that decides which backends may win a measurement.
"""

import torch

from anymask.tuning import tolerance


def sdpa_error(peer: torch.Tensor, ref: torch.Tensor) -> float:
    """Max abs error of the peer (SDPA at the low dtype) against the float64 reference."""
    return (peer.double() - ref.double()).abs().max().item()


def assert_close_to_reference(out: torch.Tensor, ref: torch.Tensor, peer_error: float, *, what: str) -> None:
    dtype = out.dtype
    out, ref = out.double(), ref.double()
    assert torch.isfinite(out).all(), f"{what}: non-finite values"
    err = (out - ref).abs().max().item()
    bound = tolerance(peer_error, dtype, ref.abs().max().item())
    assert err <= bound, f"{what}: max error {err:.3g} > bound {bound:.3g} (SDPA's own error {peer_error:.3g})"
