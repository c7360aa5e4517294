"""``torch.func`` transforms (grad, jvp, vmap) and forward-mode AD: ``auto`` runs a backend made of
plain PyTorch ops there, and the plain calls before and after keep their own choice.

One jvp used to make sdpa and varlen fail, warn, and pin eager for every later plain call of those
shapes; forced varlen/triton/flex failed deep inside PyTorch or Dynamo.
"""

import warnings

import pytest
import torch
import torch.autograd.forward_ad as fwAD

import anymask
from anymask import masks as M

B, H, S, D = 2, 2, 12, 8
MASKS = {
    "documents_causal": M.documents(lengths=[[4, 8], [12]]) & M.causal(),
    "padding_one_row_empty": M.padding(torch.tensor([[True] * 7 + [False] * 5, [False] * 12])),
    "window": M.window(3) & M.causal(),
    "prefix_lm": M.prefix_lm([3, 5]),
}


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _inputs(device="cpu", dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(B, H, S, D, generator=g, dtype=dtype).to(device) for _ in range(4)]


def _transformed_calls(mask, backend, device="cpu", dtype=torch.float64):
    q, k, v, t = _inputs(device, dtype)

    def f(a):
        return anymask.attention(a, k, v, mask, backend=backend)

    grad = torch.func.grad(lambda a: (f(a) * t).sum())(q)
    _, tangent = torch.func.jvp(f, (q,), (t,))
    batched = torch.func.vmap(f)(torch.stack([q, 2 * q]))
    with fwAD.dual_level():
        dual_tangent = fwAD.unpack_dual(f(fwAD.make_dual(q, t))).tangent
    return grad, tangent, batched, dual_tangent


@pytest.mark.parametrize("device, dtype", [(d, t) for d in DEVICES for t in (torch.float64, torch.float32)])
@pytest.mark.parametrize("name", MASKS)
def test_auto_runs_every_transform_without_falling_back_and_leaves_plain_calls_alone(name, device, dtype):
    mask = MASKS[name].to(device)
    q, k, v, _ = _inputs(device, dtype)
    plain = anymask.which_backend(q, k, v, mask)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="anymask")
        got = _transformed_calls(mask, "auto", device, dtype)
    want = _transformed_calls(mask, "eager", device, dtype)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-12 if dtype == torch.float64 else 2e-5, rtol=0)
    assert anymask.which_backend(q, k, v, mask) == plain


def test_the_transforms_are_right():
    """Against derivatives taken by autograd outside any transform."""
    mask = MASKS["padding_one_row_empty"]
    q, k, v, t = _inputs()
    grad, tangent, batched, dual_tangent = _transformed_calls(mask, "auto")
    q_ = q.clone().requires_grad_()
    out = anymask.attention(q_, k, v, mask, backend="eager")
    torch.testing.assert_close(grad, torch.autograd.grad((out * t).sum(), q_)[0], atol=1e-12, rtol=0)
    numeric = (anymask.attention(q + 1e-6 * t, k, v, mask) - anymask.attention(q - 1e-6 * t, k, v, mask)) / 2e-6
    torch.testing.assert_close(tangent, numeric, atol=1e-6, rtol=0)
    torch.testing.assert_close(dual_tangent, tangent, atol=1e-12, rtol=0)
    torch.testing.assert_close(batched[1], anymask.attention(2 * q, k, v, mask), atol=1e-12, rtol=0)


@pytest.mark.parametrize("backend", [n for n, b in anymask.backends().items() if b["available"] and n not in ("eager", "sdpa")])
def test_a_forced_backend_that_cannot_run_under_a_transform_says_so(backend):
    q, k, v, _ = _inputs()
    mask = MASKS["padding_one_row_empty"]
    with pytest.raises(anymask.BackendUnavailable, match="cannot run under torch.func transforms"):
        torch.func.grad(lambda a: anymask.attention(a, k, v, mask, backend=backend).sum())(q)


def test_a_scale_that_requires_grad_is_refused():
    """Its gradient was silently dropped."""
    q, k, v, _ = _inputs()
    with pytest.raises(TypeError, match="scale is a tensor that requires grad"):
        anymask.attention(q, k, v, M.causal(), scale=torch.tensor(0.5, dtype=torch.float64, requires_grad=True))
