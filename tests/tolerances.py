"""Test-side use of the library's one tolerance table (``anymask.tuning.tolerance``).

A backend's output may differ from the float64 reference by at most twice what SDPA's output at
the same dtype differs, plus an absolute slack per dtype scaled by the reference's magnitude —
the same rule that decides which backends may win a measurement.

The peer's own error is capped (``PEER_CAP``, relative to the reference's magnitude): a peer that is
itself wrong for a mask must fail the test, not widen every backend's bound to match.  SDPA, when
it is the backend under test, takes eager at the same low dtype as its peer (``peer_for``).
"""

import torch

from anymask.tuning import tolerance

PEER_CAP = {torch.float32: 1e-3, torch.float16: 1 / 64, torch.bfloat16: 1 / 16}


def peer_for(backend: str) -> str:
    """The backend whose low-precision error sets the bound: SDPA, except for SDPA itself."""
    return "eager" if backend == "sdpa" else "sdpa"


def sdpa_error(peer: torch.Tensor, ref: torch.Tensor) -> float:
    """Max abs error of the peer (SDPA at the low dtype) against the float64 reference."""
    return (peer.double() - ref.double()).abs().max().item()


def assert_close_to_reference(out: torch.Tensor, ref: torch.Tensor, peer_error: float, *, what: str) -> None:
    dtype = out.dtype
    out, ref = out.double(), ref.double()
    magnitude = ref.abs().max().item()
    assert torch.isfinite(out).all(), f"{what}: non-finite values"
    cap = PEER_CAP.get(dtype, 1e-3) * max(1.0, magnitude)
    assert peer_error <= cap, f"{what}: the peer itself is off by {peer_error:.3g} (> {cap:.3g}); no bound to test against"
    err = (out - ref).abs().max().item()
    bound = tolerance(peer_error, dtype, magnitude)
    assert err <= bound, f"{what}: max error {err:.3g} > bound {bound:.3g} (SDPA's own error {peer_error:.3g})"
