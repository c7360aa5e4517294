"""flash-attn arguments and xformers bias descriptions expand back to exactly ``to_dense()``.

The expansions below are written from each library's documented semantics, independently of the
compilers under test.  When xformers imports, its own ``materialize`` is checked too; live kernel
runs are GPU tests, skipped where the libraries or CUDA are missing.
"""

import pytest
import torch

import anymask
from anymask import masks as M
from anymask.backend.flash_attn import flash_args
from anymask.backend.xformers import build_bias, compile_xformers_bias, xformers_reasons
from anymask.structure import analyse

from .tolerances import assert_close_to_reference, sdpa_error

S = 23


def _valid(spans):
    pos = torch.arange(S)
    return torch.stack([(pos >= a) & (pos < b) for a, b in spans])


DOCS = torch.tensor([[0] * 5 + [1] * 11 + [2] * 7, [3] * 20 + [4] * 3])
MASKS = {
    "full": M.full(),
    "causal": M.causal(),
    "window_causal": M.window(4) & M.causal(),
    "window_two_sided": M.window(3, 2),
    "window_right_only": M.window(None, 2),
    "documents": M.documents(DOCS),
    "documents_causal": M.documents(DOCS) & M.causal(),
    "documents_window": M.documents(DOCS) & M.window(3) & M.causal(),
    "padding_right": M.padding(_valid([(0, 17), (0, S)])) & M.causal(),
    "padding_left": M.padding(_valid([(5, S), (1, S)])) & M.causal(),
    "padding_full": M.padding(_valid([(0, 17), (2, 20)])),
    "documents_padding_window": M.documents(DOCS) & M.padding(_valid([(0, 20), (3, S)])) & M.window(2, 0),
    "holes_causal": M.documents(torch.tensor([[0, 1, 0] * 7 + [1, 1]] * 2)) & M.padding(torch.rand(2, S) > 0.3) & M.causal(),
    "fully_padded_row": M.padding(_valid([(0, 0), (0, 9)])) & M.causal(),
}
Q_LENS = [S, 7, 1]


def _band(lq, lk, causal, left, right):
    """flash-attn: query i of lq sees key j of lk (bottom-right aligned) -- its documented rule."""
    i = torch.arange(lq)[:, None] + (lk - lq)
    j = torch.arange(lk)[None, :]
    ok = torch.ones(lq, lk, dtype=torch.bool)
    if causal:
        ok &= j <= i
    if left >= 0:
        ok &= j >= i - left
    if right >= 0:
        ok &= j <= i + right
    return ok


def _scatter_segments(lay, B, Sq, Skv, block):
    """Dense [B, Sq, Skv] from per-segment blocks ``block(lq, lk)`` placed at the layout's indices."""
    out = torch.zeros(B, Sq, Skv, dtype=torch.bool)
    cq, ck = lay.cu_seqlens_q.tolist(), lay.cu_seqlens_k.tolist()
    for n in range(lay.num_segments):
        qi, ki = lay.q_index[cq[n]:cq[n + 1]], lay.k_index[ck[n]:ck[n + 1]]
        b = int(qi[0]) // Sq
        assert (qi // Sq == b).all() and (ki // Skv == b).all()
        out[b, (qi % Sq)[:, None], (ki % Skv)[None, :]] = block(len(qi), len(ki))
    return out


def expand_flash(args, B, Sq, Skv):
    left, right = args.window_size
    block = lambda lq, lk: _band(lq, lk, args.causal, left, right)
    if not args.varlen:
        return block(Sq, Skv).expand(B, Sq, Skv)
    return _scatter_segments(args.layout, B, Sq, Skv, block)


def _xformers_block(desc, lq, lk):
    """One block of an xformers bias, from the class docstrings (True = may attend)."""
    i = torch.arange(lq)[:, None]
    j = torch.arange(lk)[None, :]
    shift = lk - lq
    name, w = desc.cls, desc.window_size
    if name in (None, "BlockDiagonalMask"):
        return torch.ones(lq, lk, dtype=torch.bool)
    if name == "BlockDiagonalCausalMask":  # top-left
        return j <= i
    if name in ("LowerTriangularFromBottomRightMask", "BlockDiagonalCausalFromBottomRightMask"):
        return j <= i + shift
    if name == "BlockDiagonalCausalLocalAttentionMask":  # top-left, window_size keys
        return (j <= i) & (j > i - w)
    if name in ("LowerTriangularFromBottomRightLocalAttentionMask",
                "BlockDiagonalCausalLocalAttentionFromBottomRightMask"):
        return (j <= i + shift) & (j > i + shift - w)
    if name == "LocalAttentionFromBottomRightMask":  # q - left <= k + s <= q + right, s = lq - lk
        return (i - desc.window_left <= j - shift) & (j - shift <= i + desc.window_right)
    raise AssertionError(name)


def expand_xformers(desc, B, Sq, Skv):
    block = lambda lq, lk: _xformers_block(desc, lq, lk)
    if not desc.packed:
        return block(Sq, Skv).expand(B, Sq, Skv)
    return _scatter_segments(desc.layout, B, Sq, Skv, block)


def _cases():
    return [pytest.param(name, sq, id=f"{name}-q{sq}") for name in MASKS for sq in Q_LENS]


@pytest.mark.parametrize("name,sq", _cases())
def test_flash_args_expand_to_the_oracle(name, sq):
    mask, B = MASKS[name], 2
    s = analyse(mask)
    try:
        args = flash_args(s, B, sq, S)
    except ValueError as exc:
        pytest.fail(f"flash_args refused {name}: {exc}")
    assert args.varlen == (s.documents is not None or s.valid is not None)
    assert torch.equal(expand_flash(args, B, sq, S), mask.to_dense(B, 1, sq, S)[:, 0])


@pytest.mark.parametrize("name,sq", _cases())
def test_xformers_bias_expands_to_the_oracle(name, sq):
    mask, B = MASKS[name], 2
    s = analyse(mask)
    reasons = xformers_reasons(s, B, sq, S)
    if reasons:
        pytest.skip("; ".join(reasons))
    desc = compile_xformers_bias(s, B, sq, S)
    assert torch.equal(expand_xformers(desc, B, sq, S), mask.to_dense(B, 1, sq, S)[:, 0])


def test_xformers_bias_classes():
    s = lambda m: compile_xformers_bias(analyse(m), 1, S, S)
    assert s(M.full()).cls is None
    assert s(M.causal()).cls == "LowerTriangularFromBottomRightMask"
    assert s(M.window(4) & M.causal()).window_size == 5
    docs = s(M.documents(lengths=[5, 18]) & M.causal())
    assert docs.cls == "BlockDiagonalCausalMask" and docs.q_seqlen == [5, 18] and docs.kv_seqlen == [5, 18]
    decode = compile_xformers_bias(analyse(M.documents(lengths=[5, 18]) & M.causal()), 1, 4, S)
    assert decode.cls == "BlockDiagonalCausalFromBottomRightMask" and decode.q_seqlen == [4]


def test_reasons_of_what_neither_can_compile():
    two_sided = analyse(M.documents(lengths=[5, 18]) & M.window(2, 2))
    assert "two-sided" in xformers_reasons(two_sided, 1, S, S)[0]
    assert flash_args(two_sided, 1, S, S).window_size == (2, 2)  # flash-attn takes it
    for mask, word in [(M.prefix_lm(4), "prefix-LM"), (M.causal() & M.custom(lambda b, h, q, kv: q != kv), "custom"),
                       (M.padding(torch.tensor([[1, 0] + [1] * (S - 2)])) & M.window(3), "holes")]:
        with pytest.raises(ValueError, match=word):
            flash_args(analyse(mask), 1, S, S)
        assert word in " ".join(xformers_reasons(analyse(mask), 1, S, S))


def test_machine_reasons_explain_and_never_raise():
    info = anymask.backends()
    for name in ("flash_attn", "xformers"):
        assert info[name]["available"] == (not info[name]["reasons"])
        if not torch.cuda.is_available():
            assert info[name]["reasons"], name
    q = k = v = torch.randn(1, 2, 8, 16)
    for name in ("flash_attn", "xformers"):
        reasons = anymask.backends(q, k, v, M.causal())[name]["reasons"]
        assert reasons and all(isinstance(r, str) and r for r in reasons)


xformers_attn_bias = None
try:
    from xformers.ops.fmha import attn_bias as xformers_attn_bias
except Exception:
    pass


@pytest.mark.skipif(xformers_attn_bias is None, reason="xformers is not importable")
@pytest.mark.parametrize("name,sq", _cases())
def test_xformers_materialize_matches_the_oracle(name, sq):
    mask, B = MASKS[name], 2
    s = analyse(mask)
    if xformers_reasons(s, B, sq, S):
        pytest.skip("no xformers bias for this mask")
    desc = compile_xformers_bias(s, B, sq, S)
    bias = build_bias(desc, xformers_attn_bias)
    dense = mask.to_dense(B, 1, sq, S)[:, 0]  # [B, Sq, S]
    if bias is None:
        assert dense.all()
        return
    if not desc.packed:
        got = bias.materialize((sq, S), device="cpu").isfinite()
        assert all(torch.equal(got, dense[b]) for b in range(B))
        return
    lay = desc.layout
    got = bias.materialize((lay.q_index.numel(), lay.k_index.numel()), device="cpu").isfinite()  # [Tq, Tk]
    qb, qr = lay.q_index // sq, lay.q_index % sq
    kb, kc = lay.k_index // S, lay.k_index % S
    expected = (qb[:, None] == kb[None, :]) & dense[qb[:, None], qr[:, None], kc[None, :]]
    assert torch.equal(got, expected)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("backend", ["flash_attn", "xformers"])
@pytest.mark.parametrize("name,sq", _cases())
def test_live_kernels_match_eager(backend, name, sq):
    mask, B, Hq, Hkv, D = MASKS[name], 2, 4, 2, 64
    q = torch.randn(B, Hq, sq, D, dtype=torch.float64, device="cuda")
    k, v = (torch.randn(B, Hkv, S, D, dtype=torch.float64, device="cuda") for _ in range(2))
    low = [t.to(torch.bfloat16).requires_grad_() for t in (q, k, v)]
    reasons = anymask.backends(*low, mask)[backend]["reasons"]
    if reasons:
        pytest.skip("; ".join(reasons))
    grad_out = torch.randn(B, Hq, sq, D, dtype=torch.float64, device="cuda")
    results = {}
    for b, dtype in (("eager", torch.float64), ("sdpa", torch.bfloat16), (backend, torch.bfloat16)):
        leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
        out = anymask.attention(*leaves, mask, backend=b)
        out.backward(grad_out.to(dtype))
        results[b] = (out, [t.grad for t in leaves])
    (ref, ref_g), (peer, peer_g), (out, g) = results["eager"], results["sdpa"], results[backend]
    assert_close_to_reference(out, ref, sdpa_error(peer, ref), what=f"{backend} {name} output")
    for n, a, r, pg in zip("qkv", g, ref_g, peer_g):
        assert_close_to_reference(a, r, sdpa_error(pg, r), what=f"{backend} {name} d{n}")
