"""cuDNN backend: mask -> graph planning checked exactly against ``mask.to_dense``; the plumbing
(unpad/ragged offsets/dummy segments, prefix-LM row blocks, autograd) checked numerically on CPU
through a stand-in for the cuDNN graphs; real graphs on the GPU (``gpu`` marker).
"""

import dataclasses

import pytest
import torch

import anymask
from anymask import masks as M
from anymask.backend import cudnn as C
from anymask.kernels import cudnn_graphs as G
from anymask.problem import describe

from .tolerances import assert_close_to_reference, sdpa_error

B, S = 3, 300


def _problem(mask, batch=B, q_len=S, kv_len=S, hq=4, hkv=2, d=16, dtype=torch.float32, grad=False):
    q = torch.randn(batch, hq, q_len, d, dtype=dtype, requires_grad=grad)
    k = torch.randn(batch, hkv, kv_len, d, dtype=dtype, requires_grad=grad)
    return describe(q, k, k.detach().clone().requires_grad_(grad), mask, None)


def _valid(lengths, seq=S, left=False):
    pos = torch.arange(seq)
    n = torch.tensor(lengths)[:, None]
    return pos >= seq - n if left else pos < n


PLANNED = {
    "full": lambda: M.full(),
    "causal": lambda: M.causal(),
    "sliding_window": lambda: M.window(37) & M.causal(),
    "window_zero": lambda: M.window(0) & M.causal(),
    "documents": lambda: M.documents(lengths=[[100, 150, 50], [7, 293], [300]]),
    "documents_causal": lambda: M.documents(lengths=[[100, 150, 50], [7, 293], [300]]) & M.causal(),
    "documents_window": lambda: M.documents(lengths=[[100, 150, 50], [7, 293], [300]]) & M.window(20) & M.causal(),
    "padding": lambda: M.padding(_valid([300, 171, 5])) & M.full(),
    "padding_causal": lambda: M.padding(_valid([300, 171, 5])) & M.causal(),
    "left_padding_causal": lambda: M.padding(_valid([300, 171, 5], left=True)) & M.causal(),
    "padding_window": lambda: M.padding(_valid([300, 171, 5])) & M.window(16) & M.causal(),
    "docs_padding": lambda: M.documents(lengths=[[100, 150, 50], [7, 293], [300]])
    & M.padding(_valid([260, 171, 300])) & M.causal(),
    "padding_holes_causal": lambda: M.padding(torch.arange(S).expand(B, S) % 7 != 3) & M.causal(),
    "recurring_documents": lambda: M.documents(torch.arange(S).expand(B, S) // 10 % 3),
    "prefix_lm": lambda: M.prefix_lm(75),
    "prefix_lm_aligned": lambda: M.prefix_lm(128),
    "prefix_lm_per_batch": lambda: M.prefix_lm([0, 130, 299]),
    "prefix_lm_all_prefix": lambda: M.prefix_lm(S),
}
SHAPES = {"square": (S, S), "decode": (45, S), "one_query": (1, S)}


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("name", list(PLANNED))
def test_plan_expands_to_the_mask_exactly(name, shape):
    q_len, kv_len = SHAPES[shape]
    mask = PLANNED[name]()
    p = _problem(mask, q_len=q_len, kv_len=kv_len)
    pl = C.plan(p)
    got = C.plan_to_dense(pl, B, q_len, kv_len)
    assert torch.equal(got, mask.to_dense(B, 1, q_len, kv_len)[:, 0])


def test_plan_kinds():
    assert isinstance(C.plan(_problem(M.causal())), C.DensePlan)
    assert isinstance(C.plan(_problem(PLANNED["padding"]())), C.RaggedPlan)
    causal = C.plan(_problem(M.causal())).blocks[0]
    assert causal.band == C.Band(False, None, 0) and causal.seq_q is None
    decode = C.plan(_problem(M.causal(), q_len=45)).blocks[0]
    assert decode.band == C.Band(True, None, 0)
    window = C.plan(_problem(M.window(37) & M.causal())).blocks[0]
    assert window.band == C.Band(False, 38, 0)


@pytest.mark.parametrize("layout", ["bhsd", "bshd", "sliced"])
def test_exact_prefix_blocks_run_in_place(layout, monkeypatch):
    """A prefix that splits the rows exactly (multiple of 128, same in every row) runs both blocks as
    views of one output and of the gradients (no merge); other prefixes and strides merge."""
    monkeypatch.setattr(G, "forward", _fake_forward)
    monkeypatch.setattr(G, "backward", _fake_backward)
    calls = []
    real = C._RowBlocks.apply
    monkeypatch.setattr(C._RowBlocks, "apply", lambda *a: calls.append(1) or real(*a))
    kw = dict(dtype=torch.float64)
    for mask, in_place in ((M.prefix_lm(128), layout != "sliced"), (M.prefix_lm(75), False),
                           (M.prefix_lm([128, 256, 128]), False)):
        calls.clear()
        if layout == "bshd":
            q, k, v = _bshd(B, 4, 256, 16, **kw), _bshd(B, 2, 256, 16, **kw), _bshd(B, 2, 256, 16, **kw)
        elif layout == "sliced":
            q, k, v = (torch.randn(B, h, 264, 16, **kw)[:, :, 8:].detach().requires_grad_() for h in (4, 2, 2))
        else:
            q, k, v = (torch.randn(B, h, 256, 16, requires_grad=True, **kw) for h in (4, 2, 2))
        out = C.Cudnn().run(q, k, v, describe(q, k, v, mask, None))
        ref = anymask.attention(q, k, v, mask, backend="eager")
        torch.testing.assert_close(out, ref)
        g = torch.randn_like(ref)
        for a, r in zip(torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(ref, (q, k, v), g)):
            torch.testing.assert_close(a, r)
        assert bool(calls) == in_place, mask
        if in_place:
            assert out.stride() == q.stride()
        with torch.no_grad():  # inference: blocks A and B (bottom-right) instead of C and A
            torch.testing.assert_close(C.Cudnn().run(q, k, v, describe(q.detach(), k.detach(), v.detach(), mask, None)), ref)


@pytest.mark.parametrize("prefix, first_rows", [(128, 512), (384, 128)], ids=["short_prefix_C", "long_prefix_B"])
def test_exact_prefix_training_block_and_hooks(prefix, first_rows, monkeypatch):
    """Training runs plain causal over every row (C) up to P = S / 2 and the rows >= P block (B)
    beyond; either way exact, also when saved-tensor hooks hand back contiguous copies of
    [B, S, H, D] inputs (the graphs read raw memory: strides are restored before they run)."""
    seen = []

    def forward(spec, q, k, v, meta, training, out=None):
        seen.append(spec.q_len)
        return _fake_forward(spec, q, k, v, meta, training, out)

    monkeypatch.setattr(G, "forward", forward)
    monkeypatch.setattr(G, "backward", _fake_backward)
    mask = M.prefix_lm(prefix)
    kw = dict(dtype=torch.float64)
    q, k, v = _bshd(2, 4, 512, 16, **kw), _bshd(2, 2, 512, 16, **kw), _bshd(2, 2, 512, 16, **kw)
    hooks = torch.autograd.graph.saved_tensors_hooks(lambda t: t.clone(memory_format=torch.contiguous_format),
                                                     lambda t: t)
    with hooks:
        out = C.Cudnn().run(q, k, v, describe(q, k, v, mask, None))
    assert seen == [first_rows, prefix]  # the first block over every key, then A
    ref = anymask.attention(q, k, v, mask, backend="eager")
    torch.testing.assert_close(out, ref)
    g = torch.randn(2, 512, 4, 16, **kw).transpose(1, 2)
    for a, r in zip(torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(ref, (q, k, v), g)):
        torch.testing.assert_close(a, r)


def test_prefix_lm_uses_two_row_blocks():
    a, b = C.plan(_problem(M.prefix_lm(128), batch=2, q_len=512, kv_len=512)).blocks
    assert (a.row0, a.row1, a.kv1, a.band, a.seq_q) == (0, 128, 128, C.Band(), None)  # exact: no lengths
    assert (b.row0, b.row1, b.kv1, b.band, b.owns) == (128, 512, 512, C.Band(True, None, 0), None)
    a, b = C.plan(_problem(M.prefix_lm([100, 300]), batch=2, q_len=512, kv_len=512)).blocks
    assert (a.row1, a.kv1, a.seq_q.tolist(), a.seq_kv.tolist()) == (384, 384, [100, 300], [100, 300])
    assert (b.row0, b.band.bottom_right) == (0, False)  # min prefix 100 < 128: block B from row 0


def test_ragged_plan_buckets_reuse_graph_shapes():
    def dims(lengths):
        pl = C.plan(_problem(M.documents(lengths=lengths) & M.causal(), batch=1))
        return pl.segments, pl.q_len, pl.kv_len, pl.total_q, pl.total_kv

    assert dims([100, 150, 50]) == dims([130, 90, 80]) == (4, 256, 256, 512, 512)
    pl = C.plan(_problem(M.documents(lengths=[100, 150, 50]), batch=1))
    lq, lk = pl.seq_lengths()
    sq, sk = pl.starts()
    assert lq == [100, 150, 50, 1] and sq == [0, 100, 250, 300, 301]  # dummy: one token at T
    assert sk == sq and pl.dummies == 1


def _cuda_problem(mask, **kw):
    return dataclasses.replace(_problem(mask, **kw), device=torch.device("cuda", 0))


@pytest.fixture
def hopper(monkeypatch):
    monkeypatch.setattr(C, "_capability", lambda index: (9, 0))


def test_reasons(hopper):
    bf16 = dict(dtype=torch.bfloat16)
    for name in PLANNED:
        if name not in ("padding_window",):
            assert C.reasons(_cuda_problem(PLANNED[name](), **bf16)) == [], name
    assert "fp16/bf16 only" in C.reasons(_cuda_problem(M.causal()))[0]
    assert "head dim" in C.reasons(_cuda_problem(M.causal(), d=12, **bf16))[0]
    assert "general terms" in C.reasons(_cuda_problem(M.custom(lambda b, h, q, kv: kv <= q), **bf16))[0]
    assert "looks ahead" in C.reasons(_cuda_problem(M.window(3, 2), **bf16))[0]
    assert "prefix-LM combined" in C.reasons(_cuda_problem(M.prefix_lm(4) & M.padding(_valid([9, 9, 9])), **bf16))[0]
    holes = M.padding(torch.arange(S).expand(B, S) % 7 != 3) & M.window(8) & M.causal()
    assert "holes" in C.reasons(_cuda_problem(holes, **bf16))[0]
    assert "CUDA" in C.reasons(_problem(M.causal(), dtype=torch.bfloat16))[0]


def test_machine_reasons_never_raise():
    reasons = C.Cudnn()._machine_reasons()
    assert isinstance(reasons, list)
    if not torch.cuda.is_available():
        assert any("CUDA" in r for r in reasons)


# plumbing through a stand-in for the cuDNN graphs ------------------------------------------------


def _band_attention(q, k, v, spec, nq, nk, scale):
    """q [Hq, nq, D], k/v [Hkv, nk, D] -> [Hq, nq, D] with the graph's band (float64)."""
    grid = C._band_grid(C.Band(spec.bottom_right, spec.left_bound, spec.right_bound), nq, nk)
    assert grid.any(-1).all(), "a row given to cuDNN sees no key"
    rep = q.shape[0] // k.shape[0]
    k, v = k.repeat_interleave(rep, 0), v.repeat_interleave(rep, 0)
    s = (q @ k.transpose(-1, -2)) * scale
    return s.masked_fill(~grid, float("-inf")).softmax(-1) @ v


def _fake_math(spec, q, k, v, meta):
    """What the graph computes, in float64, differentiable (rows outside lengths: 0)."""
    if not spec.ragged:
        assert (tuple(q.stride()), tuple(k.stride()), tuple(v.stride())) == (spec.q_stride, spec.k_stride, spec.v_stride)
    q, k, v = q.double(), k.double(), v.double()
    if spec.ragged:
        assert q.is_contiguous() and k.is_contiguous()
        hq, d = q.shape[1], q.shape[2]
        starts_q = (meta.off_q.flatten() // (hq * d)).tolist()
        starts_k = (meta.off_kv.flatten() // (k.shape[1] * d)).tolist()
        lq, lk = meta.seq_q.flatten().tolist(), meta.seq_kv.flatten().tolist()
        assert len(lq) == spec.batch and max(lq) <= spec.q_len and max(lk) <= spec.kv_len
        assert starts_q[-1] <= spec.total_q and starts_k[-1] <= spec.total_kv
        assert starts_q[-1] == q.shape[0] or meta.holes_q  # entries cover every row but padding
        out = torch.zeros_like(q)
        for n in range(spec.batch):
            rows = slice(starts_q[n], starts_q[n] + lq[n])
            keys = slice(starts_k[n], starts_k[n] + lk[n])
            o = _band_attention(q[rows].transpose(0, 1), k[keys].transpose(0, 1), v[keys].transpose(0, 1),
                                spec, lq[n], lk[n], spec.scale)
            out = out.index_copy(0, torch.arange(rows.start, rows.stop), o.transpose(0, 1))
        return out
    outs = []
    for b in range(spec.batch):
        nq = spec.q_len if meta.seq_q is None else int(meta.seq_q[b])
        nk = spec.kv_len if meta.seq_kv is None else int(meta.seq_kv[b])
        o = _band_attention(q[b, :, :nq], k[b, :, :nk], v[b, :, :nk], spec, nq, nk, spec.scale)
        outs.append(torch.nn.functional.pad(o, (0, 0, 0, spec.q_len - nq)))
    return torch.stack(outs)


def _like(t, spec, values):
    """``values`` in the layout the real graphs write: ``t``'s with ``keep_layout``, else contiguous."""
    return (torch.empty_like(t) if spec.keep_layout else torch.empty(t.shape, dtype=t.dtype)).copy_(values)


def _into(out, spec, values, which: int):
    """Write ``values`` into the caller's buffer ``out``, which must have the strides the graph
    declares for output ``which`` (index into ``declared_strides``: 3 o, 4 dq, 5 dk, 6 dv)."""
    if not spec.ragged:
        want = G.declared_strides(spec)[which]
        assert all(st == w or n == 1 for n, st, w in zip(out.shape, out.stride(), want)), (which, out.stride(), want)
    return out.copy_(values)


def _fake_forward(spec, q, k, v, meta, training, out=None):
    with torch.no_grad():
        values = _fake_math(spec, q, k, v, meta)
        o = _like(q, spec, values) if out is None else _into(out, spec, values, 3)
    return o, (torch.zeros(spec.batch, spec.q_heads, spec.q_len, 1) if training else None)


def _fake_backward(spec, q, k, v, o, do, stats, meta, out=None):
    assert do.stride() == o.stride()
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    with torch.enable_grad():
        res = _fake_math(spec, *leaves, meta)
        grads = torch.autograd.grad(res, leaves, do.double())
    if out is not None:
        with torch.no_grad():
            return tuple(_into(buf, spec, g, i) for buf, g, i in zip(out, grads, (4, 5, 6)))
    return tuple(_like(t, spec, g) for t, g in zip((q, k, v), grads))


@pytest.mark.parametrize("shape", ["square", "decode"])
@pytest.mark.parametrize("name", list(PLANNED))
def test_plumbing_matches_eager(name, shape, monkeypatch):
    monkeypatch.setattr(G, "forward", _fake_forward)
    monkeypatch.setattr(G, "backward", _fake_backward)
    _check_against_eager(PLANNED[name](), *SHAPES[shape])


def _check_against_eager(mask, q_len: int, kv_len: int, inputs=None):
    """``C.Cudnn().run`` (whatever the graphs are patched to) against eager in float64: output and
    dq, dk, dv.  ``inputs``: (q, k, v), else contiguous [B, 4 | 2, S, 16].  Returns the output."""
    if inputs is None:
        inputs = (torch.randn(B, h, n, 16, dtype=torch.float64, requires_grad=True)
                  for h, n in ((4, q_len), (2, kv_len), (2, kv_len)))
    q, k, v = inputs
    out = C.Cudnn().run(q, k, v, describe(q, k, v, mask, None))
    ref = anymask.attention(q, k, v, mask, backend="eager")
    torch.testing.assert_close(out, ref)
    g = torch.randn_like(ref)
    for n, a, r in zip("qkv", torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(ref, (q, k, v), g)):
        torch.testing.assert_close(a, r, msg=f"d{n}")
    return out


def _bshd(batch, heads, seq, d, **kw):
    """``[B, H, S, D]`` views of a ``[B, S, H, D]`` tensor (the Hugging Face layout)."""
    return torch.randn(batch, seq, heads, d, **kw).transpose(1, 2).detach().requires_grad_()


@pytest.mark.parametrize("name", ["causal", "sliding_window", "prefix_lm", "documents"])
def test_outputs_and_grads_keep_the_bshd_layout(name, monkeypatch):
    """Dense single-block plans write o, dq, dk, dv in the inputs' layout (no copy when the caller
    transposes back); row blocks (prefix-LM) and ragged plans still match eager."""
    monkeypatch.setattr(G, "forward", _fake_forward)
    monkeypatch.setattr(G, "backward", _fake_backward)
    mask = PLANNED[name]()
    q, k, v = _bshd(B, 4, S, 16, dtype=torch.float64), _bshd(B, 2, S, 16, dtype=torch.float64), \
        _bshd(B, 2, S, 16, dtype=torch.float64)
    out = C.Cudnn().run(q, k, v, describe(q, k, v, mask, None))
    g = torch.randn(B, S, 4, 16, dtype=torch.float64).transpose(1, 2)
    grads = torch.autograd.grad(out, (q, k, v), g)
    ref = anymask.attention(q, k, v, mask, backend="eager")
    torch.testing.assert_close(out, ref)
    for a, r in zip(grads, torch.autograd.grad(ref, (q, k, v), g)):
        torch.testing.assert_close(a, r)
    if name in ("causal", "sliding_window", "documents"):  # documents: packed by a transpose, no gather
        assert out.stride() == q.stride()
        assert [t.stride() for t in grads] == [t.stride() for t in (q, k, v)]


def _entry_rows(off, lengths, unit):
    """Token rows of each ragged entry: offsets are in elements, ``unit`` elements per token."""
    return [torch.arange(int(o) // unit, int(o) // unit + int(n)) for o, n in zip(off.flatten()[:-1], lengths.flatten())]


def _ragged_graphs_writing_entries_only(monkeypatch):
    """Real ``G.forward`` / ``G.backward`` (their allocations) with ragged graphs that, like cuDNN,
    write the rows of their entries and nothing else; ``torch.empty`` returns NaN garbage, so an
    output that should have started zeroed shows.  Returns the list of modes' specs seen."""
    seen = []
    real_empty = torch.empty

    def garbage(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    def execute(built, spec, pack, what, device):
        assert spec.ragged
        seen.append(spec)
        q, k, v = (pack[u].detach().double().requires_grad_() for u in (G._Q, G._K, G._V))  # [T, H, D]
        d = q.shape[-1]
        rows_q = _entry_rows(pack[G._OFF_Q], pack[G._SEQ_Q], q.shape[1] * d)
        rows_k = _entry_rows(pack[G._OFF_KV], pack[G._SEQ_KV], k.shape[1] * d)
        assert len(rows_q) == spec.batch
        with torch.enable_grad():
            outs = [_band_attention(q[rq].transpose(0, 1), k[rk].transpose(0, 1), v[rk].transpose(0, 1), spec,
                                    len(rq), len(rk), spec.scale).transpose(0, 1) if len(rq) else None
                    for rq, rk in zip(rows_q, rows_k)]
        if what == "forward":
            for rq, o in zip(rows_q, outs):
                if o is not None:
                    pack[G._O][rq] = o.detach().to(pack[G._O].dtype)
            return
        for rq, rk, o in zip(rows_q, rows_k, outs):
            if o is None:
                continue
            gq, gk, gv = torch.autograd.grad(o, (q, k, v), pack[G._DO][rq].double())
            pack[G._DQ][rq] = gq[rq].to(pack[G._DQ].dtype)
            pack[G._DK][rk] = gk[rk].to(pack[G._DK].dtype)
            pack[G._DV][rk] = gv[rk].to(pack[G._DV].dtype)

    monkeypatch.setattr(torch, "empty", garbage)
    monkeypatch.setattr(G, "_get", lambda key, build: G._Built(None, 0))
    monkeypatch.setattr(G, "_execute", execute)
    monkeypatch.setattr(C, "_empty_entries_ok", lambda: True)
    return seen


RAGGED = [n for n in PLANNED if isinstance(C.plan(_problem(PLANNED[n]())), C.RaggedPlan)]


LAYOUT_MODES = {"bhsd": "heads", "bhsd_gqa": "transpose", "bhsd_gqa_heads": "heads", "bshd_gqa": "tokens",
                "sliced_gqa": "pack"}


def _use_layout(layout, monkeypatch):
    """``bhsd_gqa_heads``: contiguous GQA read in place (one graph per query head of a group), which
    ``_TRANSPOSE_MIN_GROUP`` above the group size keeps."""
    if layout == "bhsd_gqa_heads":
        monkeypatch.setattr(C, "_TRANSPOSE_MIN_GROUP", 99)


def _layout_inputs(layout, q_len, kv_len, d, **kw):
    """q [B, 4, Sq, d], k, v [B, 4 or 2, Skv, d] as leaves: contiguous (``bhsd``), views of
    [B, S, H, D] (``bshd``), or slices of longer tensors (``sliced``: neither)."""
    hkv = 2 if "gqa" in layout else 4

    def make(h, n):
        if layout.startswith("bshd"):
            return _bshd(B, h, n, d, **kw)
        if layout.startswith("sliced"):
            return torch.randn(B, h, n + 8, d, **kw)[:, :, 8:].detach().requires_grad_()
        return torch.randn(B, h, n, d, requires_grad=True, **kw)

    return make(4, q_len), make(hkv, kv_len), make(hkv, kv_len)


@pytest.mark.parametrize("layout", list(LAYOUT_MODES))
@pytest.mark.parametrize("shape", ["square", "decode"])
@pytest.mark.parametrize("name", RAGGED)
def test_ragged_layouts_match_eager(name, shape, layout, monkeypatch):
    """Documents/padding read in place (``heads``: contiguous [B, H, S, D], one graph per query head of
    a kv group; ``tokens``: the [B, S, H, D] layout), transposed into ``tokens`` (contiguous GQA) or
    packed (other strides, segments with holes), against eager, with graphs that leave every row
    outside their entries untouched (padding must come out 0, not garbage)."""
    seen = _ragged_graphs_writing_entries_only(monkeypatch)
    _use_layout(layout, monkeypatch)
    q_len, kv_len = SHAPES[shape]
    mask = PLANNED[name]()
    q, k, v = _layout_inputs(layout, q_len, kv_len, 16, dtype=torch.float64)
    p = describe(q, k, v, mask, None)
    mode = C.layout_mode(q, k, v, p, C.plan(p).layout)
    assert mode == (LAYOUT_MODES[layout] if C.plan(p).layout.contiguous else "pack")
    out = _check_against_eager(mask, q_len, kv_len, (q, k, v))
    assert seen and all(s.q_heads == (1 if mode == "heads" else 4) for s in seen)
    calls = 2 if mode == "heads" and layout == "bhsd_gqa_heads" else 1  # graph calls per pass (fwd, bwd)
    assert len(seen) == 2 * calls
    if mode in ("heads", "tokens"):
        assert out.stride() == q.stride()  # written in place of the inputs' layout
    if mode == "transpose":
        assert out.transpose(1, 2).is_contiguous()  # the copies' [B, S, H, D] memory



def _dense_graphs_writing_lengths_only(monkeypatch):
    """Real ``G.forward`` / ``G.backward`` (their allocations) with dense graphs that write o and dq
    only on rows ``< seq_q`` and dk, dv only on rows ``< seq_kv`` of each batch row when they have
    lengths (a kernel skipping tiles past them may); ``torch.empty*`` return NaN garbage.  Returns
    the specs seen."""
    seen = []
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def garbage(real):
        def make(*args, **kwargs):
            t = real(*args, **kwargs)
            return t.fill_(float("nan")) if t.is_floating_point() else t
        return make

    def write(buf, values, lengths):
        for b in range(buf.shape[0]):
            rows = buf.shape[2] if lengths is None else int(lengths[b])
            buf[b, :, :rows] = values[b, :, :rows].to(buf.dtype)

    def execute(built, spec, pack, what, device):
        assert not spec.ragged
        seen.append(spec)
        meta = G.Meta(pack.get(G._SEQ_Q), pack.get(G._SEQ_KV))
        leaves = [pack[u].detach().requires_grad_() for u in (G._Q, G._K, G._V)]
        with torch.enable_grad():
            res = _fake_math(spec, *leaves, meta)  # [B, Hq, Sq, D] float64
        if what == "forward":
            write(pack[G._O], res.detach(), meta.seq_q)
            if G._STATS in pack:
                pack[G._STATS].zero_()
            return
        grads = torch.autograd.grad(res, leaves, pack[G._DO].double())
        for uid, g, lengths in zip((G._DQ, G._DK, G._DV), grads, (meta.seq_q, meta.seq_kv, meta.seq_kv)):
            write(pack[uid], g, lengths)

    monkeypatch.setattr(torch, "empty", garbage(real_empty))
    monkeypatch.setattr(torch, "empty_like", garbage(real_empty_like))
    monkeypatch.setattr(G, "_get", lambda key, build: G._Built(None, 0))
    monkeypatch.setattr(G, "_execute", execute)
    return seen


@pytest.mark.parametrize("prefix", [[0, 130, 299], [75], [128], [20, 40, 300]])
def test_prefix_blocks_with_lengths_leave_no_garbage(prefix, monkeypatch):
    """Prefix-LM block A runs with per-batch lengths unless the prefix is one multiple of 128; its
    dq / dk / dv views are added whole by autograd, so rows cuDNN need not write must start at 0."""
    seen = _dense_graphs_writing_lengths_only(monkeypatch)
    _check_against_eager(M.prefix_lm(torch.tensor(prefix)), S, S)
    assert any(s.lengths for s in seen) == (prefix != [128])

def test_in_place_entries_and_buckets():
    """``heads``: entries (row, head, segment) in memory order, offsets into [B * H * S, 1, D];
    ``tokens``: one per segment into [B * S, H, D]; length-0 entries fill the power-of-two bucket."""
    mask = M.documents(lengths=[[100, 150, 50], [7, 293], [300]]) & M.padding(_valid([260, 171, 300]))
    q = torch.randn(B, 4, S, 16)
    p = describe(q, q, q, mask, None)
    pl = C.plan(p)
    heads = C._in_place(pl, p, q.device, "heads")
    assert len(heads.metas) == 1
    # segments: row 0 [0,100) [100,250) [250,260); row 1 [0,7) [7,171); row 2 [0,300)
    starts = [(0, 0), (0, 100), (0, 250), (1, 0), (1, 7), (2, 0)]
    lengths = [100, 150, 10, 7, 164, 300]
    want = [((b * 4 + h) * S + s0) * 16 for b in range(3) for h in range(4)
            for (bb, s0) in starts if bb == b]
    want_len = [n for b in range(3) for h in range(4) for (bb, _), n in zip(starts, lengths) if bb == b]
    assert heads.entries == 32 and heads.heads == (1, 1) and heads.total == (4096, 4096)  # B * H * S = 3600, bucketed
    off = heads.metas[0].off_q.flatten().tolist()
    assert off[:24] == want and off[24:] == [want[-1] + 300 * 16] * 9
    assert heads.metas[0].seq_q.flatten().tolist() == want_len + [0] * 8
    runs = [((b * 4 + h) * S + n, (b * 4 + h + 1) * S) for b, n in enumerate([260, 171, 300]) for h in range(4)]
    assert heads.metas[0].holes_q == heads.metas[0].holes_kv == tuple(r for r in runs if r[0] < r[1])  # padding
    tokens = C._in_place(pl, p, q.device, "tokens")
    assert tokens.entries == 8 and tokens.heads == (4, 4) and tokens.total == (1024, 1024)  # 900, bucketed
    assert tokens.metas[0].off_kv.flatten().tolist()[:6] == [(b * S + s0) * 4 * 16 for b, s0 in starts]
    docs = C._in_place(C.plan(describe(q, q, q, M.documents(lengths=[[100, 200]] * 3), None)), p, q.device, "tokens")
    assert tokens.metas[0].holes_q == ((260, S), (S + 171, 2 * S))  # [B * S, H, D]: a run per padded batch row
    assert docs.metas[0].holes_q == docs.metas[0].holes_kv == ()  # every position in a segment: nothing zeroed
    k = torch.randn(B, 2, S, 16)  # GQA: two calls, the j-th query head of each kv group; kv offsets shared
    p = describe(q, k, k, mask, None)
    gqa = C._in_place(C.plan(p), p, q.device, "heads")
    assert len(gqa.metas) == 2 and gqa.entries == 16 and gqa.total == (4096, 2048)
    for j, meta in enumerate(gqa.metas):
        assert meta.off_q.flatten().tolist()[:12] == [((b * 4 + h * 2 + j) * S + s0) * 16 for b in range(3)
                                                      for h in range(2) for (bb, s0) in starts if bb == b]
        assert meta.off_kv.flatten().tolist() == gqa.metas[0].off_kv.flatten().tolist()


def test_ragged_tensors_made_once_and_gather_only_with_holes():
    """Lengths, offsets and indices go to the device once per plan (host copies synchronise the
    stream); rows are gathered only when padding leaves holes, else packing is a transpose."""
    q = torch.randn(B, 4, S, 16, dtype=torch.float64)
    k = torch.randn(B, 2, S, 16, dtype=torch.float64)
    for name, whole in (("documents", True), ("padding", False)):
        p = describe(q, k, k, PLANNED[name](), None)
        pl = C.plan(p)
        first = C._ragged_tensors(pl, p, q.device)
        assert C._ragged_tensors(pl, p, q.device) is first
        assert (first.q_whole, first.k_whole) == (whole, whole)
        assert first.metas[0].seq_q.flatten().tolist() == pl.seq_lengths()[0]
        # the same mask and sizes with other head counts / head dim share the plan, not the offsets
        q2, k2 = torch.randn(B, 8, S, 32, dtype=torch.float64), torch.randn(B, 4, S, 32, dtype=torch.float64)
        p2 = describe(q2, k2, k2, p.mask, None)
        other = C._ragged_tensors(pl, p2, q.device)
        sq, sk = pl.starts()
        assert other.metas[0].off_q.flatten().tolist() == [x * 8 * 32 for x in sq]
        assert other.metas[0].off_kv.flatten().tolist() == [x * 4 * 32 for x in sk]
        assert first.metas[0].off_kv.flatten().tolist() == [x * 2 * 16 for x in sk]


def _stride_checking_graphs(monkeypatch):
    """Real ``G.forward`` / ``G.backward`` (their allocations) with graphs that only check that every
    dense tensor bound to a graph has the strides the graph was declared with; returns the log."""
    seen = []

    def execute(built, spec, pack, what, device):
        if not spec.ragged:
            declared = dict(zip((G._Q, G._K, G._V, G._O, G._DQ, G._DK, G._DV), G.declared_strides(spec)))
            declared[G._DO] = declared[G._O]
            for uid, t in pack.items():
                if uid in declared:
                    want = declared[uid]
                    assert all(st == w or n == 1 for n, st, w in zip(t.shape, t.stride(), want)), (what, uid)
                    seen.append((what, spec.keep_layout))
        for uid in (G._O, G._DQ, G._DK, G._DV):
            if uid in pack:
                pack[uid].zero_()

    monkeypatch.setattr(G, "_get", lambda key, build: G._Built(None, 0))
    monkeypatch.setattr(G, "_execute", execute)
    return seen


@pytest.mark.parametrize("offload", [False, True], ids=["plain", "hooks_return_contiguous"])
@pytest.mark.parametrize("name", ["causal", "prefix_lm", "padding"])
def test_real_allocations_match_the_declared_strides(name, offload, monkeypatch):
    """o, dO, dq, dk, dv as ``G.forward``/``G.backward`` allocate them, and q, k, v, o as backward gets
    them back (also from saved-tensor hooks that return contiguous copies), have the graph's strides."""
    seen = _stride_checking_graphs(monkeypatch)
    mask = PLANNED[name]()
    q, k, v = _bshd(B, 4, S, 16, dtype=torch.bfloat16), _bshd(B, 2, S, 16, dtype=torch.bfloat16), \
        _bshd(B, 2, S, 16, dtype=torch.bfloat16)
    hooks = torch.autograd.graph.saved_tensors_hooks(lambda t: t.contiguous(), lambda t: t) if offload else None
    if hooks:
        with hooks:
            out = C.Cudnn().run(q, k, v, describe(q, k, v, mask, None))
    else:
        out = C.Cudnn().run(q, k, v, describe(q, k, v, mask, None))
    torch.autograd.grad(out, (q, k, v), torch.randn(B, S, 4, 16, dtype=torch.bfloat16).transpose(1, 2))
    if name != "padding":  # ragged: token-major descriptors, not compared here
        assert {what for what, _ in seen} == {"forward", "backward"}
        assert all(keep for _, keep in seen) or name != "causal"  # causal: one block, in the inputs' layout


def test_dense_permutation():
    x = torch.randn(2, 5, 3, 4)
    assert C._dense_permutation(x) and C._dense_permutation(x.transpose(1, 2))
    assert not C._dense_permutation(x[:, :4]) and not C._dense_permutation(x.transpose(1, 2)[:, :, 1:])
    assert C._dense_permutation(torch.randn(1, 3, 1, 4).transpose(1, 2))


def test_graph_failure_becomes_a_reason(hopper, monkeypatch):
    def broken(*args, **kwargs):
        raise G.CudnnGraphError("cuDNN forward graph failed at check_support: not supported")

    monkeypatch.setattr(G, "forward", broken)
    monkeypatch.setattr(C, "_FAILED", {})
    q, k, v = (torch.randn(1, 2, 64, 16, dtype=torch.bfloat16) for _ in range(3))
    p = describe(q, k, v, M.causal(), None)
    with pytest.raises(G.CudnnGraphError):
        C.Cudnn().run(q, k, v, p)
    cuda_p = dataclasses.replace(p, device=torch.device("cuda", 0))
    assert "failed on this kind of call earlier" in C.reasons(cuda_p)[-1]


# real graphs -------------------------------------------------------------------------------------


def _gpu_ready() -> bool:
    return torch.cuda.is_available() and anymask.backends()["cudnn"]["available"]


@pytest.mark.gpu
@pytest.mark.skipif(not _gpu_ready(), reason="needs CUDA and nvidia-cudnn-frontend")
@pytest.mark.parametrize("layout", list(LAYOUT_MODES))
@pytest.mark.parametrize("shape", ["square", "decode"])
@pytest.mark.parametrize("name", list(PLANNED))
def test_gpu_matches_eager(name, shape, layout, monkeypatch):
    """Every planned mask on real graphs; documents/padding in each ragged mode (``LAYOUT_MODES``)."""
    _use_layout(layout, monkeypatch)
    if layout not in ("sliced_gqa", "bhsd_gqa") and name not in RAGGED:
        pytest.skip("dense plans: contiguous and sliced inputs are the layouts that differ")
    q_len, kv_len = SHAPES[shape]
    mask = PLANNED[name]()
    q, k, v = _layout_inputs(layout, q_len, kv_len, 64, device="cuda", dtype=torch.float64)
    low = [t.detach().bfloat16().requires_grad_() for t in (q, k, v)]
    assert [t.stride() for t in low] == [t.stride() for t in (q, k, v)] or layout.startswith("sliced")
    if layout.startswith("sliced"):
        low = [torch.empty(B, t.shape[1], t.shape[2] + 8, 64, device="cuda", dtype=torch.bfloat16)[:, :, 8:]
               .copy_(t).detach().requires_grad_() for t in (q, k, v)]
    p = describe(*low, mask, None)
    reasons = anymask.backends(*low, mask)["cudnn"]["reasons"]
    if reasons:
        pytest.skip("; ".join(reasons))
    if name in RAGGED:
        want = LAYOUT_MODES[layout] if C.plan(p).layout.contiguous and C._empty_entries_ok() else "pack"
        assert C.layout_mode(*low, p, C.plan(p).layout) == want
    _check_cudnn_on_gpu(q, k, v, low, mask, torch.randn(B, 4, q_len, 64, device="cuda", dtype=torch.float64))


def _check_cudnn_on_gpu(q, k, v, low, mask, g):
    """cuDNN on the bf16 copies ``low`` against float64 eager on ``q, k, v``, within SDPA-bf16's own
    error; returns cuDNN's output and gradients."""
    ref = anymask.attention(q, k, v, mask, backend="eager")
    ref_grads = torch.autograd.grad(ref, (q, k, v), g)
    peer = anymask.attention(*low, mask, backend="sdpa")
    peer_grads = torch.autograd.grad(peer, low, g.bfloat16())
    out = anymask.attention(*low, mask, backend="cudnn")
    grads = torch.autograd.grad(out, low, g.bfloat16())
    assert_close_to_reference(out, ref, sdpa_error(peer, ref), what="cudnn output")
    for n, a, r, pg in zip("qkv", grads, ref_grads, peer_grads):
        assert_close_to_reference(a, r, sdpa_error(pg, r), what=f"cudnn d{n}")
    return out, grads


@pytest.mark.gpu
@pytest.mark.skipif(not _gpu_ready(), reason="needs CUDA and nvidia-cudnn-frontend")
@pytest.mark.parametrize("name", ["causal", "sliding_window", "full"])
def test_gpu_bshd_layout_kept_and_exact(name):
    mask = PLANNED[name]()
    kw = dict(device="cuda", dtype=torch.float64)
    q, k, v = _bshd(B, 4, S, 64, **kw), _bshd(B, 2, S, 64, **kw), _bshd(B, 2, S, 64, **kw)
    low = [t.detach().bfloat16().requires_grad_() for t in (q, k, v)]
    assert [t.stride() for t in low] == [t.stride() for t in (q, k, v)]
    out, grads = _check_cudnn_on_gpu(q, k, v, low, mask, torch.randn(B, S, 4, 64, **kw).transpose(1, 2))
    assert out.stride() == low[0].stride()
    assert [t.stride() for t in grads] == [t.stride() for t in low]


@pytest.mark.gpu
@pytest.mark.skipif(not _gpu_ready(), reason="needs CUDA and nvidia-cudnn-frontend")
@pytest.mark.parametrize("name", ["causal", "documents", "prefix_lm"])
def test_gpu_raw_launch_used_and_same_as_graph_execute(name, monkeypatch):
    """The graphs run through the raw-pointer launch (frontend 1.32), with the results of the
    frontend's own ``graph.execute`` (forward bit for bit; backward within cuDNN's run-to-run
    difference: dQ is accumulated with atomics)."""
    mask = PLANNED[name]()
    q, k, v = (torch.randn(B, 4, S, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    g = torch.randn(B, 4, S, 64, device="cuda", dtype=torch.bfloat16)

    def run():
        out = anymask.attention(q, k, v, mask, backend="cudnn")
        return (out, *torch.autograd.grad(out, (q, k, v), g))

    G.clear_cache()
    raw = run()
    assert G._cache and all(b.launch is not None for b in G._cache.values())
    G.clear_cache()
    monkeypatch.setattr(G, "_raw_launch", lambda graph: None)
    public = run()
    assert all(b.launch is None for b in G._cache.values())
    G.clear_cache()
    assert torch.equal(raw[0], public[0])
    again = run()  # the public path twice: how far two runs of one path are apart
    for a, b, c in zip(raw[1:], public[1:], again[1:]):
        assert (a.float() - b.float()).abs().max() <= 2 * (c.float() - b.float()).abs().max() + 1e-2


@pytest.mark.gpu
@pytest.mark.skipif(not _gpu_ready(), reason="needs CUDA and nvidia-cudnn-frontend")
def test_gpu_raw_launch_refused_falls_back_to_graph_execute(monkeypatch):
    """A frontend whose private raw call takes other arguments costs nothing but speed."""
    q, k, v = (torch.randn(B, 4, S, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    want = anymask.attention(q, k, v, M.causal(), backend="sdpa")
    G.clear_cache()

    def refuse(*args):
        raise TypeError("incompatible function arguments")

    monkeypatch.setattr(G, "_raw_launch", lambda graph: G._Launch((), refuse, -1))
    monkeypatch.setattr(G, "_raw_launch_works", [True])
    out = anymask.attention(q, k, v, M.causal(), backend="cudnn")
    assert G._raw_launch_works == [False]
    G.clear_cache()
    torch.testing.assert_close(out, want, atol=2e-2, rtol=0)


@pytest.mark.parametrize("runs", [1, 3, 9])
def test_alloc_zeroes_exactly_the_holes(runs, monkeypatch):
    """Rows in the holes come back zero, whatever the allocator held; up to a few runs, the other
    rows are left as they were (cuDNN writes them); past that, one fill zeroes everything."""
    real_empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *a, **kw: real_empty(*a, **kw).fill_(float("nan")))
    holes = tuple((10 * i + 2, 10 * i + 5) for i in range(runs))
    out = G.alloc((100, 2, 4), torch.float32, torch.device("cpu"), holes)  # [rows, H, D]
    in_hole = torch.zeros(100, dtype=torch.bool)
    for start, stop in holes:
        in_hole[start:stop] = True
    assert bool((out[in_hole] == 0).all())
    untouched = out[~in_hole]
    assert bool(untouched.isnan().all()) if runs <= G._MAX_HOLE_FILLS else bool((untouched == 0).all())


def test_holes_are_the_rows_in_no_entry():
    """Runs of rows outside every entry, with overlapping, unsorted and empty entries."""
    assert C._holes([5, 0, 3, 9], [2, 2, 3, 0], 12) == ((2, 3), (7, 12))
    assert C._holes([0], [12], 12) == ()
    assert C._holes([], [], 4) == ((0, 4),)
