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
    (M.documents(torch.tensor([[0, 0, 1, 1, 0, 0, 2, 2]])), "one contiguous run"),
    (M.CATALOGUE["custom"](1, 8), "not opaque (custom) terms"),
])
def test_backend_declines_what_no_interval_expresses(mask, reason):
    q = torch.randn(1, 2, 8, 16, dtype=torch.bfloat16)
    reasons = fa4_backend.Fa4().problem_reasons(describe(q, q, q, mask, None))
    assert any(reason in r for r in reasons) and any("CUDA tensors only" in r for r in reasons)


@pytest.mark.parametrize("name", ["documents", "documents_causal", "padding", "packed_prefix_lm", "prefix_lm",
                                  "sliding_window"])
def test_backend_takes_every_structured_mask(name):
    q = torch.randn(2, 2, 8, 16, dtype=torch.bfloat16)
    for queries in (q, q[:, :, -3:]):  # training, decoding
        p = describe(queries, q, q, M.CATALOGUE[name](2, 8), None)
        assert fa4_backend.Fa4().problem_reasons(p) == ["fa4 runs on CUDA tensors only, got cpu"]
    assert fa4_backend.window_size(describe(q, q, q, M.window(3) & M.causal(), None)) == (3, 0)
    assert fa4_backend.window_size(describe(q, q, q, M.causal(), None)) == (None, 0)
    assert fa4_backend.window_size(describe(q, q, q, M.full(), None)) == (None, None)
    assert fa4_backend.uses_window_size(describe(q, q, q, M.window(3) & M.causal(), None))
    assert not fa4_backend.uses_window_size(describe(q, q, q, M.causal() & M.documents(lengths=[3, 5]), None))


def _block_truth(dense: torch.Tensor, block: int):
    """Exact (partial, full) key blocks per query block from a dense mask ``[B, 1, Sq, Skv]``."""
    B, _, Sq, Skv = dense.shape
    nq, nk = -(-Sq // block), -(-Skv // block)
    padded = torch.zeros(B, nq * block, nk * block, dtype=torch.long)
    padded[:, :Sq, :Skv] = dense[:, 0].long()
    seen = padded.view(B, nq, block, nk, block).sum(dim=(2, 4))  # [B, nQ, nK]
    rows = torch.full((nq,), block)
    rows[-1] = Sq - (nq - 1) * block
    full = seen == rows[:, None] * block  # a partly filled last key block is never full
    return (seen > 0) & ~full, full


def _dense_blocks(count: torch.Tensor, index: torch.Tensor, width: int) -> torch.Tensor:
    """bool [B, n, width] from FlexAttention's packed lists (count [B, 1, n], index [B, 1, n, *])."""
    out = torch.zeros(count.shape[0], count.shape[2], width + 1, dtype=torch.bool)
    used = torch.arange(index.shape[-1]) < count[:, 0, :, None]  # [B, n, *]
    cols = torch.where(used, index[:, 0].long(), width)
    out.scatter_(2, cols, True)
    return out[..., :width]


@pytest.mark.parametrize("name", ["documents", "documents_causal", "padding", "packed_prefix_lm", "prefix_lm",
                                  "sliding_window"])
@pytest.mark.parametrize("q_len", [300, 40], ids=["training", "decoding"])
def test_fa4_block_lists_and_empty_rows_are_the_masks_own(name, q_len):
    from anymask.backend import fa4_intervals

    B, S = 3, 300
    mask = M.CATALOGUE[name](B, S)
    kv = torch.randn(B, 2, S, 8)
    p = describe(kv[:, :, S - q_len:], kv, kv, mask, None)
    dense = mask.to_dense(B, 1, q_len, S)  # [B, 1, Sq, Skv]
    partial, full = _block_truth(dense, 128)  # [B, nQ, nK]
    bm = fa4_intervals.sparse_blocks(p)
    (_, _, kv_cnt, kv_idx, full_kv_cnt, full_kv_idx, q_cnt, q_idx, full_q_cnt, full_q_idx, *_) = bm.as_tuple()
    nq, nk = partial.shape[1:]
    assert torch.equal(_dense_blocks(kv_cnt, kv_idx, nk), partial)
    assert torch.equal(_dense_blocks(full_kv_cnt, full_kv_idx, nk), full)
    assert torch.equal(_dense_blocks(q_cnt, q_idx, nq), partial.transpose(1, 2))
    assert torch.equal(_dense_blocks(full_q_cnt, full_q_idx, nq), full.transpose(1, 2))
    aux = fa4_intervals.aux_tensors(p)
    assert all(t.dtype == torch.int32 for t in aux)
    lo, hi, *valid = (t.long() for t in aux)  # [B, Sq] x2, [B, Skv]
    kv_pos = torch.arange(S)
    seen = (kv_pos >= lo[..., None]) & (kv_pos <= hi[..., None])  # [B, Sq, Skv]: what the mask_mod computes
    if valid:
        seen &= valid[0][:, None, :].bool()
    assert torch.equal(seen, dense[:, 0])
    has_key = fa4_intervals._row_has_key(*aux[:2], valid[0] if valid else None)  # [B, 1, Sq, 1] or None
    rows_with_keys = dense.any(-1, keepdim=True)  # [B, 1, Sq, 1]
    assert torch.equal(rows_with_keys, torch.ones_like(rows_with_keys) if has_key is None else has_key)


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


def test_contiguity_is_checked_once_per_mask(monkeypatch):
    """Contiguity costs a host sync; checked on every call it starved the GPU (documents fwd+bwd
    291 against 348 TFLOP/s on an H100 once cached), so the backend checks it once per mask."""
    calls = []
    real = fa4_backend.tiles.is_structured
    monkeypatch.setattr(fa4_backend.tiles, "is_structured", lambda s: calls.append(s) or real(s))
    q = torch.randn(2, 2, 8, 16, dtype=torch.bfloat16)
    mask = M.CATALOGUE["documents_causal"](2, 8)
    for _ in range(3):
        fa4_backend.Fa4().problem_reasons(describe(q, q, q, mask, None))
    assert len(calls) == 1
    fa4_backend.Fa4().problem_reasons(describe(q, q, q, M.CATALOGUE["documents"](2, 8), None))
    assert len(calls) == 2


def test_the_peer_keeps_the_faster_of_two_forms():
    """raw_fa4 on packed documents times varlen against FA4's document mask_mod and keeps the faster
    (here two plain functions on CPU, one made slower, through the same bench timing)."""
    import time

    q = torch.randn(1, 2, 8, 16, requires_grad=True)
    p = describe(q, q, q, M.documents(lengths=[3, 5]), None)
    quick = (lambda q, k, v: q * k + v), "quick form"
    slow = (lambda q, k, v: (time.sleep(0.003), q * k + v)[1]), "slow form"
    for order in ([quick, slow], [slow, quick]):
        f, label = fa4_peer._faster(order, (q, q, q), p)
        assert f is quick[0] and label.startswith("quick form (faster than slow form ") and label.endswith(" ms)")
    broken = (lambda q, k, v: 1 / 0), "broken form"
    with pytest.raises(RuntimeError, match="broken form: ZeroDivisionError"):
        fa4_peer._faster([quick, broken], (q, q, q), p)
