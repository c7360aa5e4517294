"""Our Triton kernels: mask lowering exactly against the dense oracle; forward and backward against
float64 eager, with tolerances relative to SDPA's own error at the same dtype.

Where to run.  With a CUDA device (and ``TRITON_INTERPRET`` unset) the kernels run on the GPU.
Without one they run on the CPU through Triton's interpreter, which needs ``TRITON_INTERPRET=1``
in the environment *before Triton is first imported* (``triton.jit`` reads it at decoration time,
Triton's own standard library included).  So:

- if Triton is not imported yet (or was imported under the interpreter), a module-scoped fixture
  sets the variable, imports the kernels in this process, and restores the environment after the
  module; other test modules never see the variable;
- if something earlier in this process imported Triton without it (``torch.compile`` does), the
  fixture runs this file once in a fresh ``python -m pytest`` subprocess with the variable set
  and each test here reports its own outcome from that run (its JUnit XML).

Without Triton installed the kernel tests skip; the lowering tests need only PyTorch.  Inputs are
fresh random tensors on every run.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torch

import anymask
from anymask import masks as M
from anymask.kernels import mask_bounds as MB
from anymask.structure import analyse

from .tolerances import assert_close_to_reference, sdpa_error

HAS_TRITON = importlib.util.find_spec("triton") is not None
ON_GPU = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") in ("", "0")
DEVICE = "cuda" if ON_GPU else "cpu"
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed (pip install triton)")


def _interpreter_ready() -> bool:
    """True when Triton can still run its interpreter in this process."""
    if "triton" not in sys.modules:
        return True
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(sys.modules["triton"].language.standard.zeros, InterpretedFunction)


class Delegated:
    """Outcomes of this file's tests from a subprocess run under ``TRITON_INTERPRET=1``."""

    def __init__(self, tmp: Path):
        xml = tmp / "triton.xml"
        root = Path(__file__).resolve().parents[1]
        env = {**os.environ, "TRITON_INTERPRET": "1"}
        run = subprocess.run([sys.executable, "-m", "pytest", str(Path(__file__).resolve()), "-q",
                              "-p", "no:cacheprovider", f"--junitxml={xml}"],
                             cwd=root, env=env, capture_output=True, text=True, timeout=600)
        self.log = run.stdout[-4000:] + run.stderr[-2000:]
        self.outcomes = {}
        if xml.exists():
            for case in ET.parse(xml).iter("testcase"):
                self.outcomes[case.get("name")] = self._outcome(case)

    @staticmethod
    def _outcome(case) -> tuple[str, str]:
        for tag, outcome in (("failure", "failed"), ("error", "failed"), ("skipped", "skipped")):
            found = case.find(tag)
            if found is not None:
                return outcome, found.get("message", "")
        return "passed", ""

    def report(self, name: str) -> None:
        outcome, message = self.outcomes.get(name, ("missing", self.log))
        if outcome == "skipped":
            pytest.skip(message)
        if outcome != "passed":
            pytest.fail(f"{outcome} in the interpreter subprocess: {message}")


@pytest.fixture(scope="module")
def kernels(tmp_path_factory):
    """The kernels for this device, or a :class:`Delegated` when the interpreter can't run here."""
    if not HAS_TRITON:
        pytest.skip("triton is not installed")
    if ON_GPU:
        yield importlib.import_module("anymask.kernels.triton_fwd")
        return
    if not _interpreter_ready():
        yield Delegated(tmp_path_factory.mktemp("triton"))
        return
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        yield importlib.import_module("anymask.kernels.triton_fwd")
    finally:
        if old is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = old


@pytest.fixture
def delegated(kernels, request) -> bool:
    """True when this test's outcome came from the subprocess (the test body then returns)."""
    if isinstance(kernels, Delegated):
        kernels.report(request.node.name)
        return True
    return False


# --- masks -------------------------------------------------------------------------------------

def _valid(B, S, starts, ends):
    pos = torch.arange(S).expand(B, S)
    return (pos >= torch.tensor(starts)[:, None]) & (pos < torch.tensor(ends)[:, None])


MASKS = {
    **{name: make for name, make in M.CATALOGUE.items() if name != "custom"},
    "left_padding_causal": lambda B, S: M.padding(_valid(B, S, [3] + [0] * (B - 1), [S] * B)) & M.causal(),
    "padded_queries_full": lambda B, S: M.padding(_valid(B, S, [0] * B, [S - 5] + [S] * (B - 1))),
    "scattered_padding": lambda B, S: M.padding((torch.arange(S) % 5 != 2).expand(B, S)) & M.causal(),
    "band": lambda B, S: M.window(5, 3),
    "documents_window": lambda B, S: M.documents(lengths=[S // 3, S - S // 3]) & M.window(4) & M.causal(),
    "prefix_lm_per_row": lambda B, S: M.prefix_lm(torch.tensor([S // 2] + [3] * (B - 1))),
    "documents_padding": lambda B, S: M.documents(lengths=[S // 2, S - S // 2]) & M.padding(
        _valid(B, S, [0] * B, [S - 4] * B)) & M.causal(),
}


# --- lowering (no triton needed) ---------------------------------------------------------------

def oracle_classes(dense: torch.Tensor, bm: int, bn: int) -> torch.Tensor:
    """Kernel tile classes from a dense ``[Sq, Skv]`` mask: 0 empty, 1 partial, 2 full, where full
    means every slot of the ``bm x bn`` tile is in bounds and visible."""
    sq, skv = dense.shape
    n_m, n_n = -(-sq // bm), -(-skv // bn)
    padded = torch.zeros(n_m * bm, n_n * bn, dtype=torch.bool)
    padded[:sq, :skv] = dense
    t = padded.view(n_m, bm, n_n, bn)
    full, any_ = t.all(3).all(1), t.any(3).any(1)
    return torch.where(full, 2, torch.where(any_, 1, 0))


def classes_of(tiles: torch.Tensor, n_other: int) -> torch.Tensor:
    """Expand ``[n, 4]`` (first, full_first, full_end, end) ranges to ``[n, n_other]`` classes."""
    first, full_first, full_end, end = (x[:, None] for x in tiles.long().unbind(-1))
    idx = torch.arange(n_other)
    out = torch.where((idx >= first) & (idx < end), 1, 0)
    return torch.where((idx >= full_first) & (idx < full_end), 2, out)


LOWERING_SIZES = [(17, 17), (37, 37), (5, 37), (64, 64), (33, 100), (1, 9)]
LOWERING_BLOCKS = [(16, 16), (8, 16), (16, 8), (32, 16), (4, 4), (128, 64)]


@pytest.mark.parametrize("name", list(MASKS))
@pytest.mark.parametrize("q_len,kv_len", LOWERING_SIZES)
def test_lowering_matches_dense_oracle(name, q_len, kv_len):
    B = 3
    mask = MASKS[name](B, kv_len)
    bounds = MB.build(analyse(mask), q_len, kv_len, "cpu")
    dense = mask.to_dense(B, 1, q_len, kv_len)[:, 0]  # [B, Sq, Skv]
    scattered = bounds.kvalid is not None
    assert scattered == (name == "scattered_padding")
    lo, hi = bounds.lo.long(), bounds.hi.long()
    keys = torch.arange(kv_len)
    for bm, bn in LOWERING_BLOCKS:
        rows, row_order = MB.row_tiles(bounds, bm, bn)
        cols, col_order = MB.col_tiles(bounds, bm, bn)
        for b in range(B):
            r = min(b, bounds.batch - 1)
            visible = (keys >= lo[r, :, None]) & (keys <= hi[r, :, None])
            if scattered:
                visible &= bounds.kvalid[r].bool()
            assert torch.equal(visible, dense[b]), (name, b)
            want = oracle_classes(dense[b], bm, bn)  # [nM, nN]
            got_rows = classes_of(rows[r], want.shape[1])
            got_cols = classes_of(cols[r], want.shape[0]).T
            if scattered:  # sound, not exact: no tile skipped that has a visible pair, none unmasked
                assert not ((got_rows == 0) & (want > 0)).any() and not (got_rows == 2).any()
                assert not ((got_cols == 0) & (want > 0)).any() and not (got_cols == 2).any()
            else:
                assert torch.equal(got_rows, want), (name, b, bm, bn)
                assert torch.equal(got_cols, want), (name, b, bm, bn)
            assert sorted(row_order[r].tolist()) == list(range(rows.shape[1]))
            assert sorted(col_order[r].tolist()) == list(range(cols.shape[1]))


@pytest.mark.parametrize("name", list(MASKS))
@pytest.mark.parametrize("q_len,kv_len", LOWERING_SIZES)
def test_live_slots_are_those_the_dense_oracle_uses(name, q_len, kv_len):
    """Keys some row sees, exactly; rows that see a key, exactly (a row whose interval holds only
    scattered padding may count as live: that only widens the fp16x3 scale's view)."""
    B = 3
    mask = MASKS[name](B, kv_len)
    bounds = MB.build(analyse(mask), q_len, kv_len, "cpu")
    dense = mask.to_dense(B, 1, q_len, kv_len)[:, 0]  # [B, Sq, Skv]
    rows, keys = MB.live(bounds)
    rows, keys = rows.expand(B, q_len).bool(), keys.expand(B, kv_len).bool()
    assert torch.equal(keys, dense.any(1)), name
    if bounds.kvalid is None:
        assert torch.equal(rows, dense.any(2)), name
    else:
        assert not (dense.any(2) & ~rows).any(), name
    all_live = bool(dense.any(2).all()) and bool(dense.any(1).all())
    if bounds.kvalid is None or not dense.any(1).all():  # rows exact, or a dead key decides it
        assert MB.split_level(bounds) == (1 if all_live else 2), name  # 1: the kernels clamp nothing



def test_live_keys_leave_out_a_padded_querys_document():
    """Scattered padding (kept per key) where the only query of a document is padded: no row sees
    that document's keys, so they must not set the fp16x3 scales (huge values there flushed every
    real key to 0 in fp16: error 1.2)."""
    ids = torch.tensor([[0] * 9 + [1] * 3])  # queries are positions 8..11: query 8 alone in document 0
    valid = torch.ones(1, 12, dtype=torch.bool)
    valid[0, 2] = valid[0, 8] = False  # a hole (padding not one run), and query 8 padded
    mask = M.documents(ids) & M.padding(valid)
    bounds = MB.build(analyse(mask), 4, 12, "cpu")
    assert bounds.kvalid is not None
    rows, keys = MB.live(bounds)
    dense = mask.to_dense(1, 1, 4, 12)[0, 0]  # [Sq, Skv]
    assert keys[0].bool().tolist() == dense.any(0).tolist() == [False] * 9 + [True] * 3
    assert rows[0].bool().tolist() == dense.any(1).tolist()

def test_lowering_orders_heaviest_tiles_first():
    bounds = MB.build(analyse(M.causal()), 256, 256, "cpu")
    tiles, order = MB.row_tiles(bounds, 64, 64)
    assert order[0].tolist() == [3, 2, 1, 0]
    tiles, order = MB.col_tiles(bounds, 64, 64)
    assert order[0].tolist() == [0, 1, 2, 3]


def test_lowering_is_shared_across_batch_when_mask_is():
    bounds = MB.build(analyse(M.documents(lengths=[5, 7]) & M.causal()), 12, 12, "cpu")
    assert bounds.batch == 1 and bounds.lo.shape == (1, 12)


def test_reasons_for_masks_without_intervals():
    assert MB.reasons(analyse(M.causal() & M.padding(torch.ones(2, 8)))) == []
    custom = MB.reasons(analyse(M.custom(lambda b, h, q, kv: q >= kv)))
    assert custom and "general" in custom[0]
    split = MB.reasons(analyse(M.documents(torch.tensor([[0, 0, 1, 1, 0, 0]]))))
    assert split and "contiguous" in split[0]


# --- kernels -----------------------------------------------------------------------------------

def _inputs(B, Hq, Hkv, Sq, Skv, D):
    q = torch.randn(B, Hq, Sq, D, dtype=torch.float64, device=DEVICE)
    k = torch.randn(B, Hkv, Skv, D, dtype=torch.float64, device=DEVICE)
    v = torch.randn(B, Hkv, Skv, D, dtype=torch.float64, device=DEVICE)
    return q, k, v


def _run(q, k, v, mask, backend, dtype, grad_out, scale=None):
    leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    out = anymask.attention(*leaves, mask, backend=backend, scale=scale)
    out.backward(grad_out.to(dtype))
    return out, [t.grad for t in leaves]


def _check(mask, shape, dtype, scale=None):
    B, Hq, Hkv, Sq, Skv, D = shape
    q, k, v = _inputs(B, Hq, Hkv, Sq, Skv, D)
    grad_out = torch.randn(B, Hq, Sq, D, dtype=torch.float64, device=DEVICE)
    ref, ref_grads = _run(q, k, v, mask, "eager", torch.float64, grad_out, scale)
    peer, peer_grads = _run(q, k, v, mask, "sdpa", dtype, grad_out, scale)
    out, grads = _run(q, k, v, mask, "triton", dtype, grad_out, scale)
    assert out.dtype == dtype and out.shape == (B, Hq, Sq, D)
    assert_close_to_reference(out, ref, sdpa_error(peer, ref), what="triton output")
    for name, g, r, pg in zip("qkv", grads, ref_grads, peer_grads):
        assert g.dtype == dtype
        assert_close_to_reference(g, r, sdpa_error(pg, r), what=f"triton d{name}")


DTYPES = [torch.float32, torch.float16]


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16"])
@pytest.mark.parametrize("name", list(MASKS))
def test_forward_backward_every_mask(delegated, name, dtype):
    if delegated:
        return
    _check(MASKS[name](2, 41), (2, 2, 2, 41, 41, 16), dtype, scale=0.3 if dtype == torch.float32 else None)  # fp32: a non-default scale


SHAPES = {  # B, Hq, Hkv, Sq, Skv, D
    "gqa": (1, 4, 2, 37, 37, 32),
    "q<kv": (2, 2, 1, 19, 45, 16),
    "d64": (1, 2, 2, 50, 50, 64),
    "tiny": (1, 1, 1, 3, 7, 16),
}


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16"])
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("name", ["causal", "documents_causal", "padding", "prefix_lm", "sliding_window"])
def test_forward_backward_shapes(delegated, name, shape, dtype):
    if delegated:
        return
    dims = SHAPES[shape]
    _check(MASKS[name](dims[0], dims[4]), dims, dtype)


@needs_triton
def test_longer_sequence_with_many_tiles(delegated):
    if delegated:
        return
    _check(MASKS["documents_causal"](1, 100), (1, 2, 1, 100, 100, 32), torch.float32)


@needs_triton
@pytest.mark.parametrize("name", ["left_padding_causal", "padded_queries_full", "scattered_padding"])
def test_rows_that_see_nothing_output_zero_with_zero_grad(delegated, name):
    if delegated:
        return
    B, H, S, D = 2, 2, 23, 16
    mask = MASKS[name](B, S)
    empty = ~mask.to_dense(B, H, S, S, device=DEVICE).any(-1)  # [B, H, S]
    assert empty.any()
    q, k, v = (t.float().requires_grad_() for t in _inputs(B, H, H, S, S, D))
    out = anymask.attention(q, k, v, mask, backend="triton")
    assert torch.isfinite(out).all() and (out[empty] == 0).all()
    out.backward(torch.randn_like(out))
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()
    assert (q.grad[empty] == 0).all()


@needs_triton
@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU (too large for the interpreter)")
def test_more_than_65535_batch_heads_on_gpu():
    """Batch x heads past 65535, the limit of a CUDA grid's second axis (the backward's first
    kernel once put it there): a batch of short rows, as embedding models run."""
    _check(MASKS["padding"](4097, 16), (4097, 16, 16, 16, 16, 16), torch.float16)


@needs_triton
def test_backward_is_deterministic(delegated):
    if delegated:
        return
    mask = MASKS["documents_causal"](1, 40)
    q, k, v = (t.float() for t in _inputs(1, 4, 2, 40, 40, 16))
    grads = []
    for _ in range(2):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        anymask.attention(*leaves, mask, backend="triton").sum().backward()
        grads.append([t.grad for t in leaves])
    assert all(torch.equal(a, b) for a, b in zip(*grads))


@needs_triton
def test_double_backward_is_refused_not_wrong(delegated):
    """The backward runs Triton kernels autograd cannot differentiate: a second backward raises
    instead of dropping this call's part of the gradient."""
    if delegated:
        return
    q, k, v = (t.float().requires_grad_() for t in _inputs(1, 2, 2, 12, 12, 16))
    out = anymask.attention(q, k, v, M.causal(), backend="triton")
    (gq,) = torch.autograd.grad(out.square().sum(), q, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        (gq.square().sum() + q.square().sum()).backward()


@needs_triton
def test_rows_past_32_bit_offsets_are_refused(delegated, monkeypatch):
    """Rows further apart than the kernels' 32-bit row offsets reach (lowered here to 512 elements):
    a clear error when forced, the next backend under auto."""
    if delegated:
        return
    from anymask.backend import triton_backend

    monkeypatch.setattr(triton_backend, "_INT32_OFFSETS", 512)
    q, k, v = (t.float() for t in _inputs(1, 2, 2, 40, 40, 16))
    with pytest.raises(RuntimeError, match="32-bit row offsets"):
        anymask.attention(q, k, v, M.causal(), backend="triton")
    small = [t[:, :, :20] for t in (q, k, v)]
    torch.testing.assert_close(anymask.attention(*small, M.causal(), backend="triton"),
                               anymask.attention(*small, M.causal(), backend="eager"), atol=1e-5, rtol=1e-5)


@needs_triton
def test_bfloat16_runs(delegated):
    if delegated:
        return
    """bf16 end to end (computed in fp32 under the interpreter, natively on a GPU)."""
    _check(MASKS["prefix_lm"](1, 33), (1, 2, 2, 33, 33, 16), torch.bfloat16)


@needs_triton
def test_forward_only_under_no_grad(delegated):
    if delegated:
        return
    q, k, v = (t.float() for t in _inputs(1, 2, 2, 20, 20, 16))
    with torch.no_grad():
        out = anymask.attention(q, k, v, M.causal(), backend="triton")
    ref = anymask.attention(q, k, v, M.causal(), backend="eager")
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@needs_triton
def test_reasons(delegated):
    if delegated:
        return
    q, k, v = (t.float() for t in _inputs(1, 2, 2, 8, 8, 16))
    ok = anymask.backends(q, k, v, M.causal())["triton"]
    assert ok["available"], ok["reasons"]

    def reasons(q, k, v, mask=M.causal()):
        return " | ".join(anymask.backends(q, k, v, mask)["triton"]["reasons"])

    assert "float64" in reasons(q.double(), k.double(), v.double())
    odd = [torch.randn(1, 2, 8, 24, device=DEVICE) for _ in range(3)]
    assert "head dim 24" in reasons(*odd)
    assert "general" in reasons(q, k, v, M.custom(lambda b, h, qi, kv: qi >= kv))
    assert "contiguous" in reasons(q, k, v, M.documents(torch.tensor([[0, 0, 1, 1, 0, 0, 2, 2]])))
    with pytest.raises(anymask.BackendUnavailable, match="general"):
        anymask.attention(q, k, v, M.custom(lambda b, h, qi, kv: qi >= kv), backend="triton")


@needs_triton
def test_strided_inputs_from_bshd_layout(delegated):
    """q, k, v as ``[B, S, H, D]`` transposed views (the Hugging Face layout) need no copy."""
    if delegated:
        return
    B, S, H, D = 2, 29, 2, 16
    q, k, v = (torch.randn(B, S, H, D, device=DEVICE).transpose(1, 2).requires_grad_() for _ in range(3))
    mask = MASKS["documents_causal"](B, S)
    out = anymask.attention(q, k, v, mask, backend="triton")
    out.sum().backward()  # an expanded (stride 0) output gradient
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    ref = anymask.attention(*leaves, mask, backend="eager")
    ref.sum().backward()
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)
    for t, r in zip((q, k, v), leaves):
        torch.testing.assert_close(t.grad, r.grad, atol=2e-5, rtol=2e-5)
    # output and gradients keep the [B, S, H, D] layout underneath: no copies after the call
    for t in (out, q.grad, k.grad, v.grad):
        assert t.transpose(1, 2).is_contiguous(), t.stride()
    dense = torch.randn(B, H, S, D, device=DEVICE)
    out = anymask.attention(dense, dense, dense, mask, backend="triton")
    assert out.is_contiguous()
    torch.testing.assert_close(out, anymask.attention(dense, dense, dense, mask, backend="eager"), atol=2e-5,
                               rtol=2e-5)


@needs_triton
@pytest.mark.parametrize("name", ["documents_causal", "band", "scattered_padding"])
def test_unmerged_partial_loops(delegated, monkeypatch, name):
    """``ANYMASK_TRITON_MERGED=0``: one loop per partial run, same results."""
    if delegated:
        return
    monkeypatch.setenv("ANYMASK_TRITON_MERGED", "0")
    _check(MASKS[name](2, 45), (2, 2, 1, 45, 45, 16), torch.float32)


# --- fp32 as three fp16 products (fp16x3) ---------------------------------------------------------

MAGNITUDES = {  # q, k, v, dO multipliers: fp16 alone would overflow or flush most of these to zero
    "unit": (1.0, 1.0, 1.0, 1.0),
    "small_q_large_k": (1e-3, 1e3, 1e-4, 1e5),
    "large_q_tiny_grad": (1e6, 1e-6, 3e3, 1e-8),
    "fp32_extremes": (1e25, 1e-25, 1e-20, 1e20),  # scales near 2**+-80: their products would overflow fp32
    "large_ds": (1e-10, 1.0, 1e35, 1.0),  # dS near 1e36: a gradient accumulated in scaled units overflows
}


def _with_precision(precision: str, fn, head_dim: int = 16):
    """``fn()`` with the fp32 dots of all three kernels set to ``precision``."""
    from anymask.kernels import config as C

    try:
        for kernel in ("fwd", "dkdv", "dq"):
            C.override(kernel, head_dim, torch.float32, precision=precision)
        return fn()
    finally:
        C.reset()


@needs_triton
def test_split_scales_are_powers_of_two_per_kv_group(delegated):
    if delegated:
        return
    from anymask.kernels import split16

    q = torch.randn(2, 4, 9, 16, dtype=torch.float32, device=DEVICE)
    q[0, 2:] *= 1e-7  # the second kv group of row 0
    q[1] = 0  # row 1 all zero
    every_row = torch.ones(1, 9, dtype=torch.int8, device=DEVICE)
    sc = split16.scales([q, None], kv_heads=2, live=[every_row, None])  # [B, Hkv, 2]
    top = q.abs().unflatten(1, (2, 2)).amax(dim=(2, 3, 4))  # [B, Hkv]
    scaled = top * sc[..., 0]
    nonzero = top > 0
    assert ((scaled[nonzero] >= 2**13) & (scaled[nonzero] < 2**14)).all(), scaled
    assert (sc[..., 0][~nonzero] == 1).all() and (sc[..., 1] == 1).all()
    mantissa, _ = torch.frexp(sc)
    assert (mantissa == 0.5).all()  # exact powers of two: scaling loses nothing
    q[0, 0, 0, 0], q[0, 3, 1, 1] = float("inf"), float("nan")  # non-finite entries do not count
    assert torch.equal(split16.scales([q, None], kv_heads=2, live=[every_row, None]), sc)
    q[:, :, 8] = 1e30  # nor anything in a row no result reads
    not_last = every_row.clone()
    not_last[:, 8] = 0
    assert torch.equal(split16.scales([q, None], kv_heads=2, live=[not_last, None]), sc)


@needs_triton
@pytest.mark.parametrize("magnitudes", list(MAGNITUDES))
@pytest.mark.parametrize("name", ["documents_causal", "padding", "prefix_lm", "left_padding_causal"])
def test_fp16x3_dots_match_fp32(delegated, name, magnitudes):
    """fp32 through fp16x3 dots is as close to float64 as SDPA-fp32 (within 2x, slack one part in a
    million of the largest value), for inputs far from 1 and one head a thousand times smaller."""
    if delegated:
        return
    B, Hq, Hkv, S, D = 2, 4, 2, 45, 32
    mask = MASKS[name](B, S)
    mult = MAGNITUDES[magnitudes]
    q, k, v = _inputs(B, Hq, Hkv, S, S, D)
    grad_out = torch.randn(B, Hq, S, D, dtype=torch.float64, device=DEVICE)
    q, k, v, grad_out = (t * m for t, m in zip((q, k, v, grad_out), mult))
    q[:, 1] *= 1e-3
    ref, ref_grads = _run(q, k, v, mask, "eager", torch.float64, grad_out)
    peer, peer_grads = _run(q, k, v, mask, "sdpa", torch.float32, grad_out)
    out, grads = _with_precision("fp16x3", lambda: _run(q, k, v, mask, "triton", torch.float32, grad_out), D)
    for what, got, r, pg in zip(("out", "dq", "dk", "dv"), [out, *grads], [ref, *ref_grads], [peer, *peer_grads]):
        err = (got.double() - r).abs().max().item()
        bound = 2 * sdpa_error(pg, r) + 1e-6 * r.abs().max().item()
        assert torch.isfinite(got).all() and err <= bound, f"{what}: error {err:.3g} > {bound:.3g}"


def test_fp32_precision_setting(monkeypatch):
    from anymask.kernels import config as C

    monkeypatch.delenv("ANYMASK_TRITON_FP32", raising=False)
    assert C.get("fwd", 128, torch.float32).precision == "fp16x3"
    assert C.get("fwd", 128, torch.bfloat16).precision == "tf32"  # unused for half inputs
    monkeypatch.setenv("ANYMASK_TRITON_FP32", "bf16x6")
    assert C.get("dq", 64, torch.float32).precision == "bf16x6"
    monkeypatch.setenv("ANYMASK_TRITON_FP32", "fp16")
    with pytest.raises(ValueError, match="expected one of fp16x3"):
        C.get("dq", 64, torch.float32)


@needs_triton
def test_fp16x3_nan_in_a_padded_row_stays_local(delegated):
    """A NaN in a padded query row (garbage a caller left there) must not set the scale of its
    whole kv group: every real row's output stays as in float64."""
    if delegated:
        return
    B, H, Hkv, S, D = 2, 4, 2, 32, 16
    valid = torch.ones(B, S, dtype=torch.bool)
    valid[0, -4:] = False
    mask = M.padding(valid.to(DEVICE))
    q, k, v = _inputs(B, H, Hkv, S, S, D)
    q, k = q * 1e5, k * 1e-5
    q[0, 0, -1, 0] = float("nan")
    ref = anymask.attention(q, k, v, mask, backend="eager")
    out = _with_precision("fp16x3", lambda: anymask.attention(q.float(), k.float(), v.float(), mask,
                                                              backend="triton"))
    real = valid.to(DEVICE)[:, None, :, None].expand_as(out)  # [B, H, S, D]
    assert torch.isfinite(out[real]).all()
    torch.testing.assert_close(out[real].double(), ref[real], atol=1e-5, rtol=1e-5)


@needs_triton
@pytest.mark.parametrize("garbage", [1e9, 1e12, 1e30, -3e38])
@pytest.mark.parametrize("name", ["padded_queries_full", "left_padding_causal", "scattered_padding",
                                  "documents_padding"])
def test_fp16x3_huge_finite_values_in_unused_slots_change_nothing(delegated, name, garbage):
    """Padded q, k, v and dO rows holding huge finite values (an uninitialised cache, an upstream
    overflow) leave every real row's output and gradients as in float64: they neither set the
    fp16 scales nor turn into inf times a zero probability."""
    if delegated:
        return
    B, H, Hkv, S, D = 2, 4, 2, 37, 16
    mask = MASKS[name](B, S)
    dense = mask.to_dense(B, 1, S, S)[:, 0].to(DEVICE)  # [B, Sq, Skv]
    real_q, real_k = dense.any(2), dense.any(1)  # [B, S] each
    q, k, v = _inputs(B, H, Hkv, S, S, D)
    grad_out = torch.randn(B, H, S, D, dtype=torch.float64, device=DEVICE)
    for t, real in ((q, real_q), (k, real_k), (v, real_k), (grad_out, real_q)):
        t.masked_fill_(~real[:, None, :, None], garbage)
    ref, ref_grads = _run(q, k, v, mask, "eager", torch.float64, grad_out)
    out, grads = _with_precision("fp16x3", lambda: _run(q, k, v, mask, "triton", torch.float32, grad_out), D)
    for what, got, want, real in (("out", out, ref, real_q), ("dq", grads[0], ref_grads[0], real_q),
                                  ("dk", grads[1], ref_grads[1], real_k), ("dv", grads[2], ref_grads[2], real_k)):
        sel = real[:, None, :, None].expand_as(got)
        torch.testing.assert_close(got[sel].double(), want[sel], atol=2e-5, rtol=2e-5, msg=what)


@needs_triton
@pytest.mark.parametrize("name", ["documents_causal", "scattered_padding"])
def test_fp32_ieee_dots(delegated, name):
    """The non-split fp32 path (``ANYMASK_TRITON_FP32=ieee``, and bf16x6/tf32x3 on a GPU)."""
    if delegated:
        return
    _with_precision("ieee", lambda: _check(MASKS[name](2, 41), (2, 2, 1, 41, 41, 16), torch.float32))
