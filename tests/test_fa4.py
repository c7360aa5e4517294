"""FlashAttention 4: the ``fa4`` backend's reasons (its numerics are in test_backends_agree on a GPU
with flash-attn-4), and the ``raw_fa4`` bench peer (FA4 called by hand): listed only where
flash-attn-4 is installed, skipped with the reason where it cannot run, and on a GPU with FA4 it
agrees with the float64 reference on every mask it has a call form for (``gpu`` marker)."""

import pytest
import torch

from anymask import masks as M
from anymask.backend import fa4 as fa4_backend
from anymask.bench import fa4_peer, variants
from anymask.bench.cases import Case
from anymask.bench.runner import run
from anymask.bench.timing import Settings
from anymask.problem import describe
from anymask.tuning import tolerance

FAST = Settings(warmup=1, rounds=2, budget_s=0.01, max_iters=4, min_iters=2)
FA4_MASKS = ("causal", "full", "sliding_window", "documents", "documents_causal", "padding", "prefix_lm")


pytestmark = pytest.mark.usefixtures("private_cache")


def test_listed_only_where_installed_and_skipped_with_the_reason():
    assert ("raw_fa4" in variants.names()) == fa4_peer.importable()
    rows = run([Case("documents_causal", 2, 64, 2, 2, 16, "fp32", "fwd")], device="cpu", names=["eager", "raw_fa4"],
               settings=FAST, progress=False)
    fa4 = [r for r in rows if r.variant == "raw_fa4"]
    assert len(fa4) == 1 and fa4[0].status == "skipped"
    assert ("CUDA only" if fa4_peer.importable() else "flash-attn-4") in fa4[0].reason
    assert [r.status for r in rows if r.variant == "eager"] == ["ok"]


@pytest.mark.parametrize("mask, reason", [
    (M.causal() & M.documents(lengths=[3, 5]), "declines documents and padding"),
    (M.padding(torch.tensor([[1] * 6 + [0] * 2])), "declines documents and padding"),
    (M.CATALOGUE["packed_prefix_lm"](1, 8), "no packed prefix-LM"),
    (M.CATALOGUE["custom"](1, 8), "not opaque (custom) terms"),
])
def test_backend_declines_packed_and_custom_masks(mask, reason):
    q = torch.randn(1, 2, 8, 16, dtype=torch.bfloat16)
    reasons = fa4_backend.Fa4().problem_reasons(describe(q, q, q, mask, None))
    assert any(reason in r for r in reasons) and any("CUDA tensors only" in r for r in reasons)
    for plain in (M.window(3) & M.causal(), M.prefix_lm(5)):
        assert fa4_backend.Fa4().problem_reasons(describe(q, q, q, plain, None)) == ["fa4 runs on CUDA tensors only, got cpu"]
    decoding = describe(q[:, :, -2:], q, q, M.prefix_lm(3), None)
    assert any("q_len == kv_len" in r for r in fa4_backend.Fa4().problem_reasons(decoding))
    assert fa4_backend.window_size(describe(q, q, q, M.window(3) & M.causal(), None)) == (3, 0)
    assert fa4_backend.window_size(describe(q, q, q, M.causal(), None)) == (None, 0)
    assert fa4_backend.window_size(describe(q, q, q, M.full(), None)) == (None, None)


def _fa4_on_gpu() -> bool:
    return torch.cuda.is_available() and fa4_peer.importable()


@pytest.mark.gpu
@pytest.mark.skipif(not _fa4_on_gpu(), reason="needs CUDA and flash-attn-4")
@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
def test_gpu_fa4_matches_the_reference(layout):
    cases = [Case(m, 2, 512, 4, 2, 64, "bf16", "fwd+bwd") for m in FA4_MASKS]
    rows = run(cases, device="cuda", names=["sdpa", "raw_fa4"], settings=FAST, progress=False, layout=layout)
    for mask in FA4_MASKS:
        got = {r.variant: r for r in rows if r.mask == mask}
        fa4, sdpa = got["raw_fa4"], got["sdpa"]
        assert fa4.status == "ok", f"{mask}: {fa4.reason}"
        assert fa4.backend.startswith("fa4")
        assert fa4.max_err <= tolerance(sdpa.max_err, torch.bfloat16, 4.0), (mask, fa4.max_err, sdpa.max_err)
        assert fa4.grad_err <= tolerance(sdpa.grad_err, torch.bfloat16, 4.0), (mask, fa4.grad_err, sdpa.grad_err)


@pytest.mark.gpu
@pytest.mark.skipif(not _fa4_on_gpu(), reason="needs CUDA and flash-attn-4")
def test_gpu_fa4_declines_what_it_cannot_express():
    cases = [Case(m, 2, 256, 4, 4, 64, "bf16", "fwd") for m in ("packed_prefix_lm", "custom")]
    cases.append(Case("causal", 2, 256, 4, 4, 64, "fp32", "fwd"))
    rows = run(cases, device="cuda", names=["raw_fa4"], settings=FAST, progress=False)
    assert [r.status for r in rows] == ["skipped"] * 3
    assert "mask_mod" in rows[0].reason and "mask_mod" in rows[1].reason and "fp16/bf16" in rows[2].reason
