"""Under ``torch.autocast`` anymask takes its inputs as ``F.scaled_dot_product_attention`` does
(cast to autocast's dtype) and runs the backend with autocast off.

A Llama layer under autocast hands attention float32 q, k (rotary embedding in the hidden
states' float32) and a bfloat16 v: anymask refused that mix, so a float32 model trained with
autocast (``Trainer(bf16=True)``) could not use it; and eager's float32 math (its reference for
bf16 inputs) ran its matmuls in bfloat16 under autocast.
"""

import pytest
import torch

import anymask
from anymask import masks as M

from .test_hf_common import VOCAB, tiny_model, twin

MASK = M.documents(lengths=[[5, 11], [16]]) & M.causal()
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
BACKENDS = list(anymask.backends())


def _qkv(dtype=torch.float32, device="cpu", head_dim=16):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(2, 4, 16, head_dim, generator=g, dtype=dtype).to(device) for _ in range(3)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_inputs_are_cast_to_autocasts_dtype_and_the_backend_runs_without_it(backend, device):
    q, k, v = _qkv(device=device, head_dim=64)
    mask = MASK.to(device)
    if anymask.backends(q.bfloat16(), k.bfloat16(), v.bfloat16(), mask)[backend]["reasons"]:
        pytest.skip(f"{backend} cannot run this call in bf16 here")
    want = anymask.attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), mask, backend=backend)
    with torch.autocast(device, dtype=torch.bfloat16):
        out = anymask.attention(q, k, v.bfloat16(), mask, backend=backend)  # mixed, as a Llama layer
        assert anymask.which_backend(q, k, v.bfloat16(), mask, backend=backend) == backend
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, want, atol=0, rtol=0)


def test_float64_stays_float64_and_exact_under_autocast():
    q, k, v = _qkv(torch.float64)
    want = anymask.attention(q, k, v, MASK, backend="eager")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = anymask.attention(q, k, v, MASK, backend="eager")
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, want, atol=1e-13, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_a_float32_model_trains_under_autocast_like_sdpa(family, device):
    theirs = tiny_model(family, "sdpa").train().to(device)
    ours = twin(theirs, "anymask")
    ids = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(1)).to(device)
    losses, grads = [], []
    for model in (theirs, ours):
        with torch.autocast(device, dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        losses.append(loss.detach())
        grads.append([p.grad for p in model.parameters()])
    torch.testing.assert_close(losses[1], losses[0], atol=1e-2, rtol=0)
    for mine, want in zip(*reversed(grads)):
        torch.testing.assert_close(mine, want, atol=5e-2 * want.abs().max().item() + 1e-6, rtol=0)


def test_a_fallback_warning_under_autocast_names_the_callers_line(monkeypatch):
    """The cast re-entered attention(), so the warning pointed inside anymask."""
    from anymask import backend as B

    q, k, v = _qkv()
    first = anymask.which_backend(q.bfloat16(), k.bfloat16(), v.bfloat16(), MASK)

    def broken(*args):
        raise RuntimeError("kernel exploded")

    monkeypatch.setattr(B.get(first), "run", broken)
    from anymask import dispatch

    dispatch.forget_choices()
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.warns(RuntimeWarning, match="kernel exploded") as caught:
        anymask.attention(q, k, v, MASK)
    assert caught[0].filename == __file__
    dispatch.forget_choices()
