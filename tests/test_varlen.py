"""Packed segments (``anymask.segments``) and the varlen backend against the dense oracle.

Segments: cu_seqlens and gather indices exactly what ``to_dense`` implies; unpad/repad round trip.
Backend: forward and backward against eager in float64, tolerance relative to SDPA's own error at
the same dtype; padded queries output exact zeros with zero gradient.  Inputs are fresh random
tensors on every run (no fixed seed).
"""

import pytest
import torch

import anymask
from anymask import masks as M
from anymask import segments as seg
from anymask.backend import varlen as V
from anymask.problem import describe
from anymask.structure import analyse

from .tolerances import assert_close_to_reference, sdpa_error

S = 37


def _valid(starts_ends, S=S):
    """Bool [B, S]: row b valid on [start, end)."""
    pos = torch.arange(S)
    return torch.stack([(pos >= a) & (pos < b) for a, b in starts_ends])


def _random_ids(B, S):
    return torch.randint(0, 3, (B, S))


HASHES = torch.tensor([-2**63, 2**63 - 1, 7])  # document ids may be any int64, e.g. 64-bit hashes


CASES = {
    "documents": lambda B: M.documents(lengths=[5, 12, 20]),
    "documents_causal": lambda B: M.documents(lengths=[7, 1, 29]) & M.causal(),
    "padding_right_causal": lambda B: M.padding(_valid([(0, 30), (0, S)])[:B]) & M.causal(),
    "padding_left_causal": lambda B: M.padding(_valid([(6, S), (0, S)])[:B]) & M.causal(),
    "padding_full": lambda B: M.padding(_valid([(0, 23), (3, 31)])[:B]),
    "documents_padding": lambda B: (M.documents(torch.tensor([[0] * 10 + [1] * 20 + [2] * 7, [4] * 30 + [5] * 7]))
                                    & M.padding(_valid([(0, 33), (2, S)])) & M.causal()),
    "window_documents": lambda B: M.documents(lengths=[9, 28]) & M.window(4) & M.causal(),
    "window2_documents": lambda B: M.documents(lengths=[9, 28]) & M.window(3, 2),
    "holes_causal": lambda B: M.documents(_random_ids(B, S)) & M.padding(torch.rand(B, S) > 0.3) & M.causal(),
    "fully_padded_row": lambda B: M.padding(_valid([(0, 0), (4, 20)])) & M.causal(),
    "int64_hash_ids": lambda B: M.documents(HASHES[_random_ids(B, S)]) & M.causal(),
}

SHAPES = {  # B, Hq, Hkv, Sq, Skv, D
    "mha": (2, 2, 2, S, S, 16),
    "gqa": (2, 4, 2, S, S, 8),
    "q<kv": (2, 2, 1, 6, S, 16),
}


@pytest.fixture(params=["gather", "split"])
def cpu_path(request, monkeypatch):
    """Both CPU paths of the varlen backend: batched gathers, or one SDPA call per contiguous run."""
    monkeypatch.setattr(V, "_SPLIT_MIN_MEAN", 10**9 if request.param == "gather" else 0)
    return request.param


def _run(q, k, v, mask, backend, dtype, grad_out):
    leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    out = anymask.attention(*leaves, mask, backend=backend)
    out.backward(grad_out.to(dtype))
    return out, [t.grad for t in leaves]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("case", list(CASES))
def test_varlen_matches_eager_fwd_bwd(case, shape, dtype, cpu_path):
    B, Hq, Hkv, Sq, Skv, D = SHAPES[shape]
    mask = CASES[case](B)
    q = torch.randn(B, Hq, Sq, D, dtype=torch.float64)
    k, v = (torch.randn(B, Hkv, Skv, D, dtype=torch.float64) for _ in range(2))
    grad_out = torch.randn(B, Hq, Sq, D, dtype=torch.float64)
    assert anymask.backends(q, k, v, mask)["varlen"]["reasons"] == []
    ref, ref_grads = _run(q, k, v, mask, "eager", torch.float64, grad_out)
    peer, peer_grads = _run(q, k, v, mask, "sdpa", dtype, grad_out)
    out, grads = _run(q, k, v, mask, "varlen", dtype, grad_out)
    assert out.dtype == dtype and out.shape == (B, Hq, Sq, D)
    assert_close_to_reference(out, ref, sdpa_error(peer, ref), what=f"varlen {case} output")
    for name, g, r, pg in zip("qkv", grads, ref_grads, peer_grads):
        assert_close_to_reference(g, r, sdpa_error(pg, r), what=f"varlen {case} d{name}")


@pytest.mark.parametrize("case", list(CASES))
def test_varlen_float64_is_exact(case, cpu_path):
    B, H, D = 2, 2, 8
    mask = CASES[case](B)
    q, k, v = (torch.randn(B, H, S, D, dtype=torch.float64, requires_grad=True) for _ in range(3))
    out = anymask.attention(q, k, v, mask, backend="varlen")
    ref = anymask.attention(q, k, v, mask, backend="eager")
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize("case", ["padding_right_causal", "padding_left_causal", "fully_padded_row", "holes_causal"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_padded_queries_output_zero_with_zero_grad(case, dtype, cpu_path):
    B, H, D = 2, 2, 8
    mask = CASES[case](B)
    empty = ~mask.to_dense(B, H, S, S).any(-1)  # [B, H, S]
    q, k, v = (torch.randn(B, H, S, D, dtype=dtype, requires_grad=True) for _ in range(3))
    out = anymask.attention(q, k, v, mask, backend="varlen")
    assert torch.isfinite(out).all() and (out[empty] == 0).all()
    out.backward(torch.randn_like(out))
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()
    assert (q.grad[empty] == 0).all()


def test_split_path_runs_contiguous_segments_of_useful_length(monkeypatch):
    calls = []
    real = V.split_segments
    monkeypatch.setattr(V, "split_segments", lambda *a: calls.append(1) or real(*a))
    q, k, v = (torch.randn(2, 2, 256, 8) for _ in range(3))
    anymask.attention(q, k, v, M.documents(lengths=[100, 156]) & M.causal(), backend="varlen")
    assert calls == [1]  # mean segment 128 tokens
    anymask.attention(q, k, v, M.documents(lengths=[8] * 32), backend="varlen")
    assert calls == [1]  # 8-token segments: the batched gathers
    anymask.attention(q, k, v, M.documents(torch.tensor([0] * 100 + [1] * 56 + [0] * 100)), backend="varlen")
    assert calls == [1]  # a document with a hole is not a run


@pytest.mark.parametrize("garbage", [0.0, float("nan"), float("inf")])
def test_every_query_padded(garbage):
    mask = M.padding(torch.zeros(2, S)) & M.causal()
    q, k, v = (torch.randn(2, 2, S, 8) for _ in range(3))
    k[:, :, -1] = garbage  # what an uninitialised cache slot may hold: every slot here is padded
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out = anymask.attention(q, k, v, mask, backend="varlen")
    assert (out == 0).all()
    out.sum().backward()
    assert all((t.grad == 0).all() for t in (q, k, v))


# segments ------------------------------------------------------------------------------------


def _oracle_segments(mask, B, Sq, Skv):
    """Segments implied by the dense oracle: classes of valid keys that see each other under
    ``full`` (documents & padding only), ordered by first position, restricted to those with queries."""
    dense = mask.to_dense(B, 1, Skv, Skv)[:, 0]  # [B, S, S]
    out = []
    for b in range(B):
        seen = set()
        for i in range(Skv):
            if i in seen or not dense[b, i, i]:
                continue
            members = dense[b, i].nonzero().squeeze(1).tolist()
            seen.update(members)
            keys = [b * Skv + j for j in members]
            queries = [b * Sq + j - (Skv - Sq) for j in members if j >= Skv - Sq]
            if queries:
                out.append((keys, queries))
    return sorted(out, key=lambda kq: kq[0][0])


def _random_documents_padding(B, S):
    ids = torch.randint(0, 4, (B, S))
    if torch.rand(()) < 0.5:  # contiguous documents
        ids = ids.sort(dim=1).values
    return M.documents(ids) & M.padding(torch.rand(B, S) > 0.25)


@pytest.mark.parametrize("trial", range(20))
def test_layout_is_what_the_oracle_implies(trial):
    B, Skv = int(torch.randint(1, 4, ())), int(torch.randint(1, 40, ()))
    Sq = int(torch.randint(1, Skv + 1, ()))
    mask = _random_documents_padding(B, Skv)
    lay = seg.layout(analyse(mask), B, Sq, Skv)
    expected = _oracle_segments(mask, B, Sq, Skv)
    assert lay.cu_seqlens_k.dtype == torch.int32 and lay.cu_seqlens_q.dtype == torch.int32
    assert lay.k_lengths == tuple(len(kq[0]) for kq in expected)
    assert lay.q_lengths == tuple(len(kq[1]) for kq in expected)
    assert lay.cu_seqlens_k.tolist() == [0, *torch.tensor(lay.k_lengths, dtype=torch.long).cumsum(0).tolist()]
    assert lay.cu_seqlens_q.tolist() == [0, *torch.tensor(lay.q_lengths, dtype=torch.long).cumsum(0).tolist()]
    assert lay.k_index.tolist() == [j for keys, _ in expected for j in keys]
    assert lay.q_index.tolist() == [j for _, queries in expected for j in queries]
    assert lay.max_seqlen_k == max(lay.k_lengths, default=0)
    square = seg.layout(analyse(mask), B, Skv, Skv)
    assert seg.has_holes(analyse(mask), B, Skv) == (not square.contiguous)


def test_ids_spanning_int64_stay_apart_across_rows():
    """Ids at both ends of int64 in every row: one segment per (row, document), never merged (an
    id span computed in int64 overflowed and joined documents of different rows)."""
    ids = torch.tensor([[-2**63] * 4 + [2**63 - 1] * 4]).expand(3, 8)
    lay = seg.layout(analyse(M.documents(ids)), 3, 8, 8)
    assert lay.k_lengths == (4,) * 6 and lay.k_index.tolist() == list(range(24))


def test_contiguous_documents_give_runs():
    ids = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2]])
    valid = torch.tensor([[1, 1, 1, 1, 0, 1, 1, 0]])
    lay = seg.layout(analyse(M.documents(ids) & M.padding(valid)), 1, 8, 8)
    assert lay.cu_seqlens_k.tolist() == [0, 3, 4, 6] and lay.k_index.tolist() == [0, 1, 2, 3, 5, 6]
    assert lay.contiguous


def test_unpad_repad_round_trip():
    B, H, D = 3, 2, 4
    mask = _random_documents_padding(B, S)
    lay = seg.layout(analyse(mask), B, S, S)
    x = torch.randn(B, H, S, D)
    packed = seg.unpad(x, lay.q_index)  # [T, H, D]
    assert packed.shape == (lay.q_index.numel(), H, D)
    back = seg.repad(packed, lay.q_index, B, S)
    in_segment = mask.to_dense(B, 1, S, S)[:, 0].diagonal(dim1=1, dim2=2)  # [B, S]
    assert torch.equal(back, x * in_segment[:, None, :, None])


def test_reasons():
    q = k = v = torch.randn(1, 1, 8, 4)
    why = lambda m: anymask.backends(q, k, v, m)["varlen"]["reasons"]
    assert why(M.documents(torch.tensor([[0, 0, 1, 1, 1, 0, 0, 0]])) & M.causal()) == []
    assert "holes" in why(M.documents(torch.tensor([[0, 0, 1, 1, 1, 0, 0, 0]])) & M.window(2) & M.causal())[0]
    assert "holes" in why(M.padding(torch.tensor([[1, 1, 0, 1, 1, 1, 1, 1]])) & M.window(2))[0]
    assert why(M.padding(torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1]])) & M.window(2)) == []
    recurring_negative = torch.tensor([[-1, -1, -2, -2, -1, -1, -1, -2]])  # ids are any integers
    assert "holes" in why(M.documents(recurring_negative) & M.window(1) & M.causal())[0]
    assert why(M.documents(recurring_negative.sort().values) & M.window(1) & M.causal()) == []
    assert "prefix-LM" in why(M.prefix_lm(3))[0]
    assert "custom" in why(M.causal() & M.custom(lambda b, h, q, kv: q != kv))[0]


def test_cpu_kernel_is_sdpa():
    q = k = v = torch.randn(1, 2, 8, 16, dtype=torch.bfloat16)
    assert V.kernel(describe(q, k, v, M.documents(lengths=[3, 5]), None)) == "sdpa"



@pytest.mark.parametrize("flash", ["bare", "old"])
def test_kernel_takes_flash_attn_only_where_its_backend_runs(flash, monkeypatch):
    """A ``flash_attn`` that imports is not enough: flash-attn-4's bare package has no varlen
    function, and one older than 2.3 has no ``window_size``; both run batched SDPA instead."""
    import sys
    import types

    import anymask.backend as backends
    from anymask._optional import probe
    from anymask.backend.flash_attn import FlashAttn

    fake = types.ModuleType("flash_attn")
    if flash == "old":
        fake.__version__ = "2.2.0"
        fake.flash_attn_func = fake.flash_attn_varlen_func = lambda *a, **kw: None
    monkeypatch.setitem(sys.modules, "flash_attn", fake)
    probe.cache_clear()
    monkeypatch.setattr(backends, "_INSTANCES", {})
    monkeypatch.setattr(FlashAttn, "_machine_reasons", lambda self: [] if flash == "old" else ["bare"])
    monkeypatch.setattr(V, "_fused_ok", lambda p: True)
    monkeypatch.setattr(V, "torch_varlen", lambda: None)
    try:
        q = k = v = torch.randn(1, 2, 8, 16, dtype=torch.bfloat16)
        docs = describe(q, k, v, M.documents(lengths=[3, 5]) & M.causal(), None)
        window = describe(q, k, v, M.documents(lengths=[3, 5]) & M.window(2) & M.causal(), None)
        assert V.kernel(docs) == ("flash_attn" if flash == "old" else "sdpa")
        assert V.kernel(window) == "sdpa"
    finally:
        probe.cache_clear()

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_varlen_cuda(case, dtype, shape):
    B, Hq, Hkv, Sq, Skv, D = SHAPES[shape]
    D = 64
    mask = CASES[case](B)
    q = torch.randn(B, Hq, Sq, D, dtype=torch.float64, device="cuda")
    k, v = (torch.randn(B, Hkv, Skv, D, dtype=torch.float64, device="cuda") for _ in range(2))
    p = describe(q.to(dtype), k.to(dtype), v.to(dtype), mask, None)
    expected = "sdpa" if dtype == torch.float32 else "torch"
    if V.torch_varlen() is not None or dtype == torch.float32:
        assert V.kernel(p) == expected
    grad_out = torch.randn(B, Hq, Sq, D, dtype=torch.float64, device="cuda")
    ref, ref_grads = _run(q, k, v, mask, "eager", torch.float64, grad_out)
    peer, peer_grads = _run(q, k, v, mask, "sdpa", dtype, grad_out)
    out, grads = _run(q, k, v, mask, "varlen", dtype, grad_out)
    assert_close_to_reference(out, ref, sdpa_error(peer, ref), what=f"varlen cuda {case} output")
    for name, g, r, pg in zip("qkv", grads, ref_grads, peer_grads):
        assert_close_to_reference(g, r, sdpa_error(pg, r), what=f"varlen cuda {case} d{name}")
