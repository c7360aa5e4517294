"""The ``sdpa`` backend on CUDA with a mask tensor: gradients exact where PyTorch's cuDNN attention
kernel has been wrong (anymask keeps calls with a mask tensor off it, ``common.masked_sdpa``).

``scripts/gpu_sdpa_cudnn_mutation.py`` runs this file with that guard undone: the flag test fails on
any GPU, the 704-key test where PyTorch prefers cuDNN (Hopper/Blackwell, torch 2.11+)."""

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import anymask
from anymask import masks as M

from .tolerances import assert_close_to_reference, sdpa_error

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _memory_efficient(q, k, v, mask):
    """The peer: SDPA's memory-efficient kernel forced, with the mask as a dense bool tensor."""
    B, H, S, _ = q.shape
    dense = mask.to_dense(B, 1, S, S, device=q.device)  # [B, 1, S, S]
    k, v = (t.repeat_interleave(H // t.shape[1], dim=1) for t in (k, v))  # [B, H, S, D]: it takes no GQA
    with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION]):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=dense)


def _check_sdpa_against_float64(q, k, v, mask, g):
    """anymask sdpa on bf16 copies vs float64 eager, bounded by the memory-efficient kernel's error
    (eager at bf16 rounds logits of -120 to 0.5 and is no peer for the first test).  The inputs are
    rounded to bf16 first, so the reference sees what the kernels see."""
    q, k, v, g = (t.bfloat16().double() for t in (q, k, v, g))
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    ref = anymask.attention(*leaves, mask, backend="eager")
    ref_grads = torch.autograd.grad(ref, leaves, g)
    outs = {}
    runs = {"sdpa": lambda *t: anymask.attention(*t, mask, backend="sdpa"),
            "peer": lambda *t: _memory_efficient(*t, mask)}
    for name, run in runs.items():
        low = [t.detach().bfloat16().requires_grad_() for t in (q, k, v)]
        out = run(*low)
        outs[name] = (out, *torch.autograd.grad(out, low, g.bfloat16()))
    for i, what in enumerate(("out", "dq", "dk", "dv")):
        ref_i = ref if i == 0 else ref_grads[i - 1]
        assert_close_to_reference(outs["sdpa"][i], ref_i, sdpa_error(outs["peer"][i], ref_i), what=f"sdpa {what}")


def test_very_negative_logits_at_704_keys():
    """pytorch/pytorch#196678: key length % 128 == 64 and every logit ~ -120 gave NaN dQ through
    cuDNN with any mask tensor (prefix-LM reaches SDPA as a dense bool mask)."""
    L, D = 704, 64
    kw = dict(device="cuda", dtype=torch.float64)
    # Every logit ~ (1 * -15 * 64) / sqrt(64) = -120: each row's logsumexp < -ln(FLT_MAX).  (One huge
    # column instead would amplify bf16's rounding of dQ's cancelling sum past any bound.)
    q = 1.0 + 0.1 * torch.randn(1, 2, L, D, **kw)
    k = -15.0 + 0.1 * torch.randn(1, 2, L, D, **kw)
    v = torch.randn(1, 2, L, D, **kw)
    _check_sdpa_against_float64(q, k, v, M.prefix_lm(64), torch.randn(1, 2, L, D, **kw))


def test_sliding_window_bshd_grouped_heads():
    """The H100 case whose SDPA dQ was 5.2 off float64 once in a full run of tests/test_cudnn.py
    (it passes alone, with or without the guard): kept as a plain check of the guarded path with
    [B, S, H, D] views and grouped heads."""
    B, S, D = 3, 300, 64
    kw = dict(device="cuda", dtype=torch.float64)
    q, k, v, g = (torch.randn(B, S, h, D, **kw).transpose(1, 2) for h in (4, 2, 2, 4))  # [B, H, S, D] views
    _check_sdpa_against_float64(q, k, v, M.window(37) & M.causal(), g)


def test_masked_calls_leave_cudnn_off_and_keep_the_callers_choice(monkeypatch):
    """On any CUDA GPU (not only where PyTorch prefers cuDNN): while anymask's SDPA call with a mask
    tensor runs, cuDNN's kernel is off, a kernel the caller turned off stays off, and the caller's
    flags are back afterwards."""
    seen = []
    real = F.scaled_dot_product_attention

    def spy(*args, **kwargs):
        cuda = torch.backends.cuda
        seen.append((kwargs.get("attn_mask") is not None, cuda.cudnn_sdp_enabled(), cuda.math_sdp_enabled()))
        return real(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    q = torch.randn(1, 4, 64, 64, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(1, 2, 64, 64, device="cuda", dtype=torch.bfloat16) for _ in range(2))  # GQA 4:2
    with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]):  # math off, cuDNN on
        anymask.attention(q, k, v, M.prefix_lm(16), backend="sdpa")
        assert torch.backends.cuda.cudnn_sdp_enabled() and not torch.backends.cuda.math_sdp_enabled()
    assert seen == [(True, False, False)]
