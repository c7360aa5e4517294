"""Every available backend agrees with eager (float64) on every mask it accepts.

Tolerance is relative to PyTorch's own low-precision error: a backend may be off from the float64
reference by at most twice what SDPA is off at the same dtype, plus a small absolute slack (SDPA
itself is held to eager at the same dtype, and the peer's own error is capped: ``tolerances.py``).
Inputs are fresh random tensors on every run.
"""

import warnings

import pytest
import torch

import anymask
from anymask import masks as M
from anymask.problem import describe

from .tolerances import assert_close_to_reference, peer_for, sdpa_error

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
BACKENDS = [n for n in anymask.backends() if n != "eager"]


def make_inputs(B, Hq, Hkv, Sq, Skv, D, device, requires_grad=True):
    q = torch.randn(B, Hq, Sq, D, dtype=torch.float64, device=device)
    k = torch.randn(B, Hkv, Skv, D, dtype=torch.float64, device=device)
    v = torch.randn(B, Hkv, Skv, D, dtype=torch.float64, device=device)
    return [t.requires_grad_(requires_grad) for t in (q, k, v)]


def run_with_grads(q, k, v, mask, backend, dtype, grad_out):
    leaves = [t.detach().to(dtype).requires_grad_(q.requires_grad) for t in (q, k, v)]
    out = anymask.attention(*leaves, mask, backend=backend)
    if not q.requires_grad:
        return out, None
    out.backward(grad_out.to(dtype))
    return out, [t.grad for t in leaves]


SHAPES = [  # B, Hq, Hkv, Sq, Skv, D
    (2, 4, 4, 37, 37, 16),
    (2, 4, 2, 37, 37, 16),  # GQA
    (2, 2, 1, 5, 37, 16),  # decoding: queries are the last 5 positions
    (2, 2, 1, 1, 37, 16),  # one decoding step: causal sees every key (sdpa runs it with no mask)
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", SHAPES, ids=["mha", "gqa", "q<kv", "q1"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("mask_name", list(M.CATALOGUE))
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("grad", [False, True], ids=["fwd", "fwd+bwd"])
def test_backend_matches_eager(backend, mask_name, dtype, shape, device, grad):
    B, Hq, Hkv, Sq, Skv, D = shape
    if device == "cuda" and dtype == torch.float64:
        pytest.skip("not a GPU dtype")
    mask = M.CATALOGUE[mask_name](B, Skv)
    q, k, v = make_inputs(B, Hq, Hkv, Sq, Skv, D, device, requires_grad=grad)
    low = [t.detach().to(dtype).requires_grad_(grad) for t in (q, k, v)]
    with torch.set_grad_enabled(grad):
        reasons = anymask.backends(*low, mask)[backend]["reasons"]
    if reasons:
        pytest.skip(f"{backend}: {'; '.join(reasons)}")
    grad_out = torch.randn(B, Hq, Sq, D, dtype=torch.float64, device=device)
    ref, ref_grads = run_with_grads(q, k, v, mask, "eager", torch.float64, grad_out)
    peer, peer_grads = run_with_grads(q, k, v, mask, peer_for(backend), dtype, grad_out)
    out, grads = run_with_grads(q, k, v, mask, backend, dtype, grad_out)
    assert out.dtype == dtype and out.shape == (B, Hq, Sq, D)
    assert_close_to_reference(out, ref, sdpa_error(peer, ref), what=f"{backend} output")
    if grad:
        for name, g, r, pg in zip("qkv", grads, ref_grads, peer_grads):
            assert_close_to_reference(g, r, sdpa_error(pg, r), what=f"{backend} d{name}")


EMPTY_ROW_MASKS = {
    "padded_queries": lambda B, S: M.padding(torch.arange(S).expand(B, S) < torch.tensor([[S - 3], [S]])) & M.causal(),
    "left_padding": lambda B, S: M.padding(torch.arange(S).expand(B, S) >= torch.tensor([[4], [0]])) & M.causal(),
    "no_key_rows": lambda B, S: M.window(2) & M.causal() & M.custom(lambda b, h, q, kv: q % 4 != 0),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mask_name", list(EMPTY_ROW_MASKS))
@pytest.mark.parametrize("backend", ["eager", *BACKENDS])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_rows_that_see_nothing_output_zero_with_zero_grad(backend, mask_name, dtype, device):
    B, H, S, D = 2, 2, 19, 8
    mask = EMPTY_ROW_MASKS[mask_name](B, S)
    empty = ~mask.to_dense(B, H, S, S, device=device).any(-1)  # [B, H, S]
    assert empty.any()
    q, k, v = (t.detach().to(dtype).requires_grad_() for t in make_inputs(B, H, H, S, S, D, device))
    reasons = anymask.backends(q, k, v, mask)[backend]["reasons"]
    if reasons:
        pytest.skip(f"{backend}: {'; '.join(reasons)}")
    out = anymask.attention(q, k, v, mask, backend=backend)
    assert torch.isfinite(out).all()
    assert (out[empty] == 0).all()
    out.backward(torch.randn_like(out))
    assert torch.isfinite(q.grad).all() and torch.isfinite(k.grad).all() and torch.isfinite(v.grad).all()
    assert (q.grad[empty] == 0).all()


def test_every_backend_reports_availability():
    info = anymask.backends()
    assert {"eager", "sdpa"} <= set(info)
    for name, entry in info.items():
        assert set(entry) == {"available", "reasons", "summary"}
        assert entry["available"] == (not entry["reasons"]), name
    assert info["eager"]["available"] and info["sdpa"]["available"]


def test_auto_picks_a_backend_that_can_run():
    q, k, v = make_inputs(1, 2, 2, 16, 16, 8, "cpu", requires_grad=False)
    for name, make in M.CATALOGUE.items():
        mask = make(1, 16)
        chosen = anymask.which_backend(q.float(), k.float(), v.float(), mask)
        assert anymask.backends(q.float(), k.float(), v.float(), mask)[chosen]["available"], name


SCALE_MASKS = [M.causal(), M.full(), M.documents(lengths=[9, 10]) & M.causal(), M.window(3) & M.causal()]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["eager", *BACKENDS])
def test_scale_is_honoured(backend, device):
    """A non-default ``scale`` reaches every backend, forward and backward (forward only where the
    backend runs no backward here), on each mask it runs."""
    B, H, S, D = 2, 2, 19, 16
    q, k, v = make_inputs(B, H, H, S, S, D, device)
    grad_out = torch.randn(B, H, S, D, dtype=torch.float64, device=device)
    ran = 0
    for mask in SCALE_MASKS:
        for grad in (True, False):
            low = [t.detach().float().requires_grad_(grad) for t in (q, k, v)]
            with torch.set_grad_enabled(grad):
                if anymask.backends(*low, mask)[backend]["reasons"]:
                    continue
                leaves = [t.detach().requires_grad_(grad) for t in (q, k, v)]
                ref = anymask.attention(*leaves, mask, backend="eager", scale=0.3)
                out = anymask.attention(*low, mask, backend=backend, scale=0.3)
            assert_close_to_reference(out, ref, 0.0, what=f"{backend} output at scale 0.3")  # fp32: the slack alone
            if grad:
                ref.backward(grad_out)
                out.backward(grad_out.float())
                for name, g, r in zip("qkv", (t.grad for t in low), (t.grad for t in leaves)):
                    assert_close_to_reference(g, r, 0.0, what=f"{backend} d{name} at scale 0.3")
            ran += 1
            break
    if not ran:
        pytest.skip(f"{backend} runs none of the scale test's masks here")


def test_problem_records_grad_and_structure():
    q, k, v = make_inputs(1, 2, 2, 8, 8, 4, "cpu")
    p = describe(q, k, v, M.documents(lengths=[3, 5]) & M.causal(), None)
    assert p.requires_grad and p.structure.kind() == "documents+causal"
    with torch.no_grad():
        assert not describe(q, k, v, M.full(), None).requires_grad


@pytest.mark.parametrize("error", [RuntimeError, TypeError, AttributeError])
def test_auto_falls_back_when_a_backend_fails_at_run_time(error, monkeypatch):
    """A backend's run-time error, or a library's API drift (an unexpected keyword, a missing
    attribute), moves ``auto`` on to the next backend."""
    from anymask import backend as B
    from anymask.dispatch import candidates

    q, k, v = (t.float() for t in make_inputs(1, 2, 2, 16, 16, 8, "cpu", requires_grad=False))
    mask = M.causal()
    first = candidates(describe(q, k, v, mask, None))[0]

    def broken(*args, **kwargs):
        raise error("kernel exploded")

    monkeypatch.setattr(B.get(first), "run", broken)
    with pytest.warns(RuntimeWarning, match="kernel exploded") as record:
        out = anymask.attention(q, k, v, mask)
    assert [w.filename for w in record if "kernel exploded" in str(w.message)] == [__file__]  # the caller's line
    torch.testing.assert_close(out, anymask.attention(q, k, v, mask, backend="eager"))
    with pytest.raises(error, match="kernel exploded"):
        anymask.attention(q, k, v, mask, backend=first)



@pytest.mark.parametrize("mask", [M.documents(lengths=[5, 11]) & M.causal(), M.window(3) & M.causal(), M.causal()],
                         ids=["documents", "window", "causal"])
def test_auto_does_not_fall_back_on_checkpointings_early_stop(mask):
    """Non-reentrant checkpointing ends its recomputation by raising through the backend's ops;
    ``auto`` lets it pass (no fallback warning, the same backend, exact gradients)."""
    import warnings

    from torch.utils.checkpoint import checkpoint

    q, k, v = (t.float().requires_grad_() for t in make_inputs(1, 2, 2, 16, 16, 8, "cpu", requires_grad=False))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = checkpoint(lambda *t: anymask.attention(*t, mask) * 2, q, k, v, use_reentrant=False)
        out.sum().backward()
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    (anymask.attention(*leaves, mask, backend="eager") * 2).sum().backward()
    for got, ref in zip((q, k, v), leaves):
        torch.testing.assert_close(got.grad.double(), ref.grad, atol=1e-5, rtol=1e-5)

def test_auto_keeps_the_fallback_after_a_run_time_failure(monkeypatch):
    """The failing backend is not rebuilt and retried on every later call (every layer, every step),
    and ``which_backend`` names the backend that ran."""
    from anymask import backend as B
    from anymask.dispatch import candidates

    q, k, v = (t.float() for t in make_inputs(1, 2, 2, 16, 16, 8, "cpu", requires_grad=False))
    mask = M.causal()
    first, second = candidates(describe(q, k, v, mask, None))[:2]
    assert anymask.which_backend(q, k, v, mask) == first
    attempts = []

    def broken(*args, **kwargs):
        attempts.append(1)
        raise RuntimeError("kernel exploded")

    monkeypatch.setattr(B.get(first), "run", broken)
    with pytest.warns(RuntimeWarning, match="kernel exploded"):
        anymask.attention(q, k, v, mask)
    for _ in range(3):
        out = anymask.attention(q, k, v, mask)
    assert len(attempts) == 1
    assert anymask.which_backend(q, k, v, mask) == second
    torch.testing.assert_close(out, anymask.attention(q, k, v, mask, backend="eager"))


def test_auto_retries_a_backend_that_ran_out_of_memory(monkeypatch):
    from anymask import backend as B
    from anymask.dispatch import candidates

    q, k, v = (t.float() for t in make_inputs(1, 2, 2, 16, 16, 8, "cpu", requires_grad=False))
    mask = M.causal()
    first = candidates(describe(q, k, v, mask, None))[0]
    attempts = []

    def out_of_memory(*args, **kwargs):
        attempts.append(1)
        raise torch.OutOfMemoryError("out of memory")

    monkeypatch.setattr(B.get(first), "run", out_of_memory)
    for _ in range(2):
        with pytest.warns(RuntimeWarning, match="out of memory"):
            anymask.attention(q, k, v, mask)
    assert len(attempts) == 2 and anymask.which_backend(q, k, v, mask) == first


def test_auto_ignores_a_cached_winner_this_install_does_not_know(monkeypatch, tmp_path):
    from anymask import tuning

    monkeypatch.setenv(tuning.ENV_DIR, str(tmp_path))
    q, k, v = (t.float() for t in make_inputs(1, 2, 2, 16, 16, 8, "cpu", requires_grad=False))
    mask = M.causal()
    monkeypatch.setattr(tuning, "lookup", lambda p: "from_a_newer_anymask")
    out = anymask.attention(q, k, v, mask)
    torch.testing.assert_close(out, anymask.attention(q, k, v, mask, backend="eager"))


def test_auto_falls_back_after_a_triton_compile_or_resource_error(monkeypatch):
    """Triton's errors (out of shared memory, a dot precision an old Triton lacks) are not
    ``RuntimeError``s; ``auto`` still moves on to the next backend."""
    errors = pytest.importorskip("triton.runtime.errors")
    from anymask import backend as B
    from anymask.dispatch import candidates

    q, k, v = (t.float() for t in make_inputs(1, 2, 2, 16, 16, 8, "cpu", requires_grad=False))
    mask = M.causal()
    first = candidates(describe(q, k, v, mask, None))[0]

    def out_of_shared_memory(*args, **kwargs):
        raise errors.OutOfResources(262144, 232448, "shared memory")

    monkeypatch.setattr(B.get(first), "run", out_of_shared_memory)
    with pytest.warns(RuntimeWarning, match="out of resource: shared memory"):
        out = anymask.attention(q, k, v, mask)
    torch.testing.assert_close(out, anymask.attention(q, k, v, mask, backend="eager"))


@pytest.mark.parametrize("backend", ["eager", "sdpa", "flex"])
def test_head_dependent_custom_mask(backend):
    q, k, v = (t.float() for t in make_inputs(1, 2, 2, 12, 12, 8, "cpu", requires_grad=False))
    mask = M.custom(lambda b, h, qi, kv: (kv <= qi) | (h == 1))  # head 0 causal, head 1 full
    if anymask.backends(q, k, v, mask)[backend]["reasons"]:
        pytest.skip(f"{backend} cannot run here")
    out = anymask.attention(q, k, v, mask, backend=backend)
    head0 = anymask.attention(q[:, :1], k[:, :1], v[:, :1], M.causal(), backend="eager")
    head1 = anymask.attention(q[:, 1:], k[:, 1:], v[:, 1:], M.full(), backend="eager")
    torch.testing.assert_close(out, torch.cat([head0, head1], dim=1), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["eager", *BACKENDS, "auto"])
def test_a_mask_first_used_under_inference_mode_then_trains(backend, device):
    """An eval pass under ``torch.inference_mode`` caches what backends derive from the mask; the
    training step after it must not get those tensors (autograd cannot save inference tensors:
    sdpa raised, and auto fell back and pinned another backend)."""
    B, H, S, D = 2, 2, 17, 16
    valid = torch.ones(B, S, dtype=torch.bool)
    valid[0, 10:] = False
    mask = M.padding(valid) & M.causal()
    q, k, v = make_inputs(B, H, H, S, S, D, device, requires_grad=False)
    q32, k32, v32 = (t.float() for t in (q, k, v))
    training = [t.requires_grad_() for t in (q32.clone(), k32.clone(), v32.clone())]
    if backend != "auto" and anymask.backends(*training, mask)[backend]["reasons"]:
        pytest.skip(f"{backend} cannot train on this mask here")
    with torch.inference_mode():
        anymask.attention(q32, k32, v32, mask, backend=backend)
    grad_out = torch.randn(B, H, S, D, dtype=torch.float64, device=device)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # auto falling back warns
        out, grads = run_with_grads(q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), mask, backend,
                                    torch.float32, grad_out)
    fresh, fresh_grads = run_with_grads(q, k, v, M.padding(valid) & M.causal(), backend, torch.float32, grad_out)
    torch.testing.assert_close(out, fresh)
    for got, want in zip(grads, fresh_grads):
        torch.testing.assert_close(got, want)
