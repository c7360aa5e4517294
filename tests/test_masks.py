"""Masks: exact grids for every constructor, composition, structure analysis, bad input."""

import types
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import anymask
from anymask import masks as M
from anymask.structure import analyse, document_bounds, documents_are_contiguous, row_intervals


def grid(text: str) -> torch.Tensor:
    rows = [r.split() for r in text.strip().splitlines()]
    return torch.tensor([[c == "#" for c in r] for r in rows])


def dense2d(mask, q_len, kv_len=None, batch=1, b=0):
    kv_len = q_len if kv_len is None else kv_len
    return mask.to_dense(batch, 1, q_len, kv_len)[b, 0]


CASES = [
    (M.full(), 3, 3, """
        # # #
        # # #
        # # #"""),
    (M.causal(), 4, 4, """
        # . . .
        # # . .
        # # # .
        # # # #"""),
    (M.causal(), 3, 6, """
        # # # # . .
        # # # # # .
        # # # # # #"""),
    (M.window(1), 4, 4, """
        # . . .
        # # . .
        . # # .
        . . # #"""),
    (M.window(1, 1), 4, 4, """
        # # . .
        # # # .
        . # # #
        . . # #"""),
    (M.window(None, 1), 3, 3, """
        # # .
        # # #
        # # #"""),
    (M.window(1) & M.causal(), 2, 5, """
        . . # # .
        . . . # #"""),
    (M.documents(lengths=[2, 3]), 5, 5, """
        # # . . .
        # # . . .
        . . # # #
        . . # # #
        . . # # #"""),
    (M.documents(lengths=[2, 3]) & M.causal(), 5, 5, """
        # . . . .
        # # . . .
        . . # . .
        . . # # .
        . . # # #"""),
    (M.documents(torch.tensor([7, 7, 3, 7])), 4, 4, """
        # # . #
        # # . #
        . . # .
        # # . #"""),
    (M.padding(torch.tensor([[1, 1, 1, 0]])), 4, 4, """
        # # # .
        # # # .
        # # # .
        . . . ."""),
    (M.padding(torch.tensor([[0, 1, 1, 1]])) & M.causal(), 4, 4, """
        . . . .
        . # . .
        . # # .
        . # # #"""),
    (M.prefix(2), 4, 4, """
        # # . .
        # # . .
        # # . .
        # # . ."""),
    (M.prefix_lm(2), 5, 5, """
        # # . . .
        # # . . .
        # # # . .
        # # # # .
        # # # # #"""),
    (M.prefix_lm(3), 2, 5, """
        # # # # .
        # # # # #"""),
    (~M.causal(), 3, 3, """
        . # #
        . . #
        . . ."""),
    (M.custom(lambda b, h, q, kv: (q + kv) % 2 == 0), 3, 3, """
        # . #
        . # .
        # . #"""),
    (M.custom(lambda b, h, q, kv: kv == q), 2, 4, """
        . . # .
        . . . #"""),
    (M.dense(torch.tensor([[True, False], [False, True]])), 2, 2, """
        # .
        . #"""),
    (M.causal() | M.window(None, 1), 3, 3, """
        # # .
        # # #
        # # #"""),
]


@pytest.mark.parametrize("mask, q_len, kv_len, expected", CASES, ids=[repr(c[0]) for c in CASES])
def test_constructor_grids(mask, q_len, kv_len, expected):
    assert torch.equal(dense2d(mask, q_len, kv_len), grid(expected))


def test_per_batch_terms():
    m = M.prefix_lm(torch.tensor([1, 3]))
    assert torch.equal(dense2d(m, 3, batch=2, b=0), grid("# . .\n# # .\n# # #"))
    assert torch.equal(dense2d(m, 3, batch=2, b=1), grid("# # #\n# # #\n# # #"))
    docs = M.documents(lengths=[[1, 2], [2, 1]])
    assert torch.equal(dense2d(docs, 3, batch=2, b=1), grid("# # .\n# # .\n. . #"))


def test_head_dependent_custom_mask():
    m = M.custom(lambda b, h, q, kv: (kv <= q) | (h == 1))
    d = m.to_dense(1, 2, 3, 3)
    assert torch.equal(d[0, 0], grid("# . .\n# # .\n# # #"))
    assert d[0, 1].all()


def test_picture_is_the_dense_grid():
    assert M.prefix_lm(2).picture(3) == "# # .\n# # .\n# # #"


def test_prefix_lm_is_causal_or_prefix():
    lengths = torch.tensor([0, 3, 7])
    a = M.prefix_lm(lengths).to_dense(3, 1, 7, 7)
    b = (M.causal() | M.prefix(lengths)).to_dense(3, 1, 7, 7)
    assert torch.equal(a, b)


@pytest.mark.parametrize("make, error, match", [
    (lambda: M.documents(), ValueError, "exactly one"),
    (lambda: M.documents(torch.tensor([0.5, 1.0])), TypeError, "integer"),
    (lambda: M.documents(torch.zeros(2, 2, 2, dtype=torch.long)), ValueError, r"\[B, S\]"),
    (lambda: M.documents(lengths=[[2, 2], [3]]), ValueError, "same length"),
    (lambda: M.documents(lengths=[2, 0]), ValueError, "positive"),
    (lambda: M.padding(torch.tensor([1, 0])), ValueError, r"\[B, S\]"),
    (lambda: M.padding(torch.tensor([[1, 2]])), ValueError, "0 and 1"),
    (lambda: M.prefix(-1), ValueError, "non-negative"),
    (lambda: M.prefix(1.5), TypeError, "integers"),
    (lambda: M.prefix([]), ValueError, "must not be empty"),
    (lambda: M.documents(torch.tensor([[0, 0, 1]]).to_sparse()), TypeError, "strided"),
    (lambda: M.padding(torch.tensor([[1, 0]]).to_sparse()), TypeError, "strided"),
    (lambda: M.prefix(torch.tensor([2]).to_sparse()), TypeError, "strided"),
    (lambda: M.dense(torch.ones(2, 2, dtype=torch.bool).to_sparse()), TypeError, "strided"),
    (lambda: M.window(-1), ValueError, "left"),
    (lambda: M.dense(torch.ones(2, 2)), TypeError, "bool"),
    (lambda: M.custom(3), TypeError, "callable"),
    (lambda: M.causal() & torch.ones(2), TypeError, "combine"),
])
def test_bad_constructor_input(make, error, match):
    with pytest.raises(error, match=match):
        make()


@pytest.mark.parametrize("mask, sizes, match", [
    (M.documents(lengths=[3, 3]), (1, 1, 5, 5), "kv_len=5"),
    (M.documents(torch.zeros(3, 4, dtype=torch.long)), (2, 1, 4, 4), "batch 3"),
    (M.padding(torch.ones(2, 4)), (2, 1, 5, 5), r"\[2, 5\]"),
    (M.prefix([1, 2, 3]), (2, 1, 4, 4), "3 lengths"),
    (M.prefix(9), (1, 1, 4, 4), "exceeds"),
    (M.dense(torch.ones(3, 3, dtype=torch.bool)), (1, 1, 4, 4), "broadcast"),
    (M.causal(), (1, 1, 5, 4), "must not exceed"),
])
def test_sizes_that_do_not_fit(mask, sizes, match):
    with pytest.raises(ValueError, match=match):
        mask.to_dense(*sizes)


def test_custom_must_return_bool():
    with pytest.raises(TypeError, match="bool"):
        M.custom(lambda b, h, q, kv: (q - kv).float()).to_dense(1, 1, 2, 2)


# structure analysis ------------------------------------------------------------------------------


def rebuild(s):
    """A mask built back from a Structure (used to check analyse() loses nothing)."""
    base = {
        "full": M.full(),
        "causal": M.causal(),
        "window": M.window(s.left, s.right),
        "prefix_lm": M.prefix_lm(s.prefix) if s.prefix is not None else None,
        "prefix_groups": M.causal() | M.documents(s.groups) if s.groups is not None else None,
    }[s.base]
    m = base
    if s.documents is not None:
        m = m & M.documents(s.documents)
    if s.valid is not None:
        m = m & M.padding(s.valid)
    for g in s.general:
        m = m & g
    return m


@pytest.mark.parametrize("name", list(M.CATALOGUE))
def test_catalogue_structure(name):
    m = M.CATALOGUE[name](2, 20)
    s = analyse(m)
    assert torch.equal(rebuild(s).to_dense(2, 1, 20, 20), m.to_dense(2, 1, 20, 20))
    assert (s.kind() == "general") == (name == "custom")


def test_structure_merges_bases():
    s = analyse(M.window(4, 3) & M.causal() & M.window(2, None))
    assert (s.base, s.left, s.right) == ("window", 2, 0)
    assert analyse(M.window(None, 0)).base == "causal"
    assert analyse(M.prefix_lm(3) & M.causal()).base == "causal"
    assert analyse(M.prefix_lm(3) & M.window(2)).general
    groups = M.documents(torch.tensor([0, 0, 1, 2]))
    assert analyse(M.causal() | groups).base == "prefix_groups"
    assert analyse(groups | M.causal()).base == "prefix_groups"
    assert analyse((M.causal() | groups) & M.causal()).base == "causal"
    assert analyse((M.causal() | groups) & M.prefix_lm(2)).general


def test_packed_prefix_lm_docstring_grid():
    """The grid in anymask.structure's docstring, rows 0, 3, 5, 7."""
    group = torch.tensor([7, 7, 7, -4, -5, 8, 8, -8])
    m = M.documents(torch.tensor([0, 0, 0, 0, 0, 1, 1, 1])) & (M.causal() | M.documents(group))
    rows = m.picture(8).splitlines()
    assert [rows[i] for i in (0, 3, 5, 7)] == ["# # # . . . . .", "# # # # . . . .",
                                               ". . . . . # # .", ". . . . . # # #"]
    s = analyse(m)
    assert s.kind() == "documents+prefix_groups"
    lo, hi = row_intervals(s, 1, 8, 8)
    assert lo.tolist() == [[0, 0, 0, 0, 0, 5, 5, 5]] and hi.tolist() == [[2, 2, 2, 3, 4, 6, 6, 7]]
    small = M.documents(lengths=[3, 2]) & (M.causal() | M.documents([0, 0, -3, 1, -5]))  # anymask.masks docstring
    assert small.picture(5).splitlines() == ["# # . . .", "# # . . .", "# # # . .", ". . . # .", ". . . # #"]


SEQ = 9


@st.composite
def mask_trees(draw, depth=0):
    ids = draw(st.lists(st.integers(0, 2), min_size=SEQ, max_size=SEQ))
    valid = draw(st.lists(st.booleans(), min_size=SEQ, max_size=SEQ))
    leaves = [
        M.full(), M.causal(),
        M.window(draw(st.integers(0, 4)), draw(st.one_of(st.none(), st.integers(0, 3)))),
        M.documents(torch.tensor(ids)),
        M.documents(torch.tensor(sorted(ids))),
        M.padding(torch.tensor([valid])),
        M.prefix(draw(st.integers(0, SEQ))),
        M.prefix_lm(draw(st.integers(0, SEQ))),
        M.custom(lambda b, h, q, kv: (q * kv) % 3 != 1),
    ]
    leaf = st.sampled_from(leaves)
    if depth >= 2:
        return draw(leaf)
    op = draw(st.sampled_from(["leaf", "and", "or", "not"]))
    if op == "leaf":
        return draw(leaf)
    a = draw(mask_trees(depth + 1))
    if op == "not":
        return ~a
    b = draw(mask_trees(depth + 1))
    return a & b if op == "and" else a | b


@settings(max_examples=150, deadline=None)
@given(mask_trees(), st.integers(1, SEQ))
def test_random_compositions(mask, q_len):
    dense = mask.to_dense(1, 1, q_len, SEQ)
    # analyse() keeps the meaning exactly
    assert torch.equal(rebuild(analyse(mask)).to_dense(1, 1, q_len, SEQ), dense)
    # & | ~ agree with elementwise logic on the oracle
    other = M.causal()
    assert torch.equal((mask & other).to_dense(1, 1, q_len, SEQ), dense & other.to_dense(1, 1, q_len, SEQ))
    assert torch.equal((mask | other).to_dense(1, 1, q_len, SEQ), dense | other.to_dense(1, 1, q_len, SEQ))
    assert torch.equal((~mask).to_dense(1, 1, q_len, SEQ), ~dense)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(1, 5), min_size=1, max_size=5), st.sampled_from(["full", "causal", "window", "prefix_lm", "prefix_groups"]),
       st.integers(0, 6), st.data())
def test_row_intervals_match_oracle(lengths, base, n, data):
    S = sum(lengths)
    q_len = data.draw(st.integers(1, S))
    if base == "prefix_groups":  # contiguous runs of random lengths, ids in order
        runs = data.draw(st.lists(st.integers(1, 4), min_size=1, max_size=S))
        groups = torch.repeat_interleave(torch.arange(len(runs)), torch.tensor(runs))
        groups = torch.cat([groups, torch.arange(len(runs), len(runs) + S)])[:S]
    base_mask = {"full": M.full, "causal": M.causal, "window": lambda: M.window(n, 1),
                 "prefix_lm": lambda: M.prefix_lm(min(n, S)),
                 "prefix_groups": lambda: M.causal() | M.documents(groups)}[base]()
    m = base_mask & M.documents(lengths=lengths)
    lo, hi = row_intervals(analyse(m), 1, q_len, S)
    kv = torch.arange(S)
    from_intervals = (kv >= lo[0, :, None]) & (kv <= hi[0, :, None])
    assert torch.equal(from_intervals, m.to_dense(1, 1, q_len, S)[0, 0])


def test_document_helpers():
    ids = torch.tensor([[0, 0, 1, 1, 1, 2], [5, 5, 5, 5, 5, 5]])
    start, end = document_bounds(ids)
    assert start.tolist() == [[0, 0, 2, 2, 2, 5], [0] * 6]
    assert end.tolist() == [[1, 1, 4, 4, 4, 5], [5] * 6]
    assert documents_are_contiguous(ids)
    assert not documents_are_contiguous(torch.tensor([[0, 1, 0]]))


def test_mask_moves_device_once():
    m = M.documents(lengths=[2, 2])
    assert m.to("cpu") is m
    assert m.to_dense(1, 1, 4, 4).device.type == "cpu"


def test_prefix_lengths_read_once_and_checked_every_call(monkeypatch):
    """A prefix's longest length is read from its tensor once (on a GPU, a read is a wait), and
    still checked against every call's kv_len."""
    m = M.prefix(torch.tensor([3, 6]))
    m.validate(2, 1, 8, 8)
    reads = []
    monkeypatch.setattr(torch.Tensor, "max", lambda self, *a, **k: reads.append(1))
    m.validate(2, 1, 8, 8)
    with pytest.raises(ValueError, match="length 6 exceeds kv_len=5"):
        m.validate(2, 1, 5, 5)
    assert reads == []


def test_dense_broadcast_over_keys_takes_whole_rows():
    rows = torch.tensor([True, False, True, True])[:, None]  # [Sq, 1]: query rows that see every key
    m = M.dense(rows)
    q, k, v = (torch.randn(1, 2, 4, 8, dtype=torch.float64) for _ in range(3))
    ref = M.dense(rows.expand(4, 4).contiguous())
    for backend in ("eager", "sdpa"):
        torch.testing.assert_close(anymask.attention(q, k, v, m, backend=backend),
                                   anymask.attention(q, k, v, ref, backend="eager"))
    with pytest.raises(ValueError, match="broadcast over keys"):
        anymask.attention(q[:, :, :4], torch.randn(1, 2, 6, 8, dtype=torch.float64),
                          torch.randn(1, 2, 6, 8, dtype=torch.float64), m)


@pytest.mark.parametrize("huge", [2 ** 62, 2 ** 63 - 1, 2 ** 63, 10 ** 30])
def test_a_huge_window_bound_is_no_bound(huge):
    """``q + right`` with ``right = sys.maxsize`` overflowed int64: 15 of 16 rows came out zero."""
    q, k, v = (torch.randn(1, 1, 16, 8, dtype=torch.float64) for _ in range(3))
    for wide, unbounded in ((M.window(None, huge), M.full()), (M.window(huge), M.causal())):
        assert torch.equal(wide.to_dense(1, 1, 16, 16), unbounded.to_dense(1, 1, 16, 16))
        for backend in ("eager", "sdpa"):
            torch.testing.assert_close(anymask.attention(q, k, v, wide, backend=backend),
                                       anymask.attention(q, k, v, unbounded, backend="eager"))


def test_documents_lengths_as_tensor_or_array():
    np = pytest.importorskip("numpy")
    ref = M.documents(lengths=[1, 3]).to_dense(1, 1, 4, 4)
    assert torch.equal(M.documents(lengths=torch.tensor([1, 3])).to_dense(1, 1, 4, 4), ref)
    assert torch.equal(M.documents(lengths=np.array([1, 3])).to_dense(1, 1, 4, 4), ref)
    assert torch.equal(M.documents(lengths=[np.int64(1), 3]).to_dense(1, 1, 4, 4), ref)
    assert torch.equal(M.documents(lengths=[[1, np.int32(3)]]).to_dense(1, 1, 4, 4), ref)
    assert torch.equal(M.window(np.int64(1), torch.tensor(0)).to_dense(1, 1, 4, 4), M.window(1).to_dense(1, 1, 4, 4))
    one = M.full().to_dense(1, 1, 4, 4)  # one document: lengths=4
    for single in (4, torch.tensor(4), np.int64(4)):
        assert torch.equal(M.documents(lengths=single).to_dense(1, 1, 4, 4), one)
    with pytest.raises(TypeError, match="documents: lengths must be ints"):
        M.documents(lengths=4.0)
    with pytest.raises(TypeError, match="prefix: lengths must be an int"):
        M.prefix(None)


@pytest.mark.parametrize("make, match", [
    (lambda: M.documents(lengths=[2, True]), r"positive ints .*\[2, True\]"),
    (lambda: M.documents(lengths=[2.0, 3]), "positive ints"),
    (lambda: M.window(True), "non-negative int"),
    (lambda: M.window(1.5), "non-negative int"),
    (lambda: M.prefix_lm(torch.tensor([[1, 2], [3, 4]])), r"one per batch row \(\[B\]\), got shape \[2, 2\]"),
])
def test_constructor_arguments_of_the_wrong_kind_are_refused(make, match):
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.parametrize("backend", ["eager", "sdpa", "flex"])
def test_dense_mask_sees_in_place_edits_of_its_tensor(backend):
    """``masks.dense`` keeps a view: editing the tensor changes the mask, caches included."""
    table = torch.ones(6, 6, dtype=torch.bool).tril()  # [Sq, Skv]
    m = M.dense(table)
    q, k, v = (torch.randn(1, 2, 6, 8) for _ in range(3))
    if anymask.backends(q, k, v, m)[backend]["reasons"]:
        pytest.skip(f"{backend} does not run this mask here")
    first = anymask.attention(q, k, v, m, backend=backend)
    table[3:, :2] = False
    second = anymask.attention(q, k, v, m, backend=backend)
    torch.testing.assert_close(second, anymask.attention(q, k, v, M.dense(table.clone()), backend="eager"))
    assert not torch.allclose(first[:, :, 3:], second[:, :, 3:])


def test_device_copy_of_a_dense_mask_follows_in_place_edits():
    """``dense`` keeps the caller's tensor: its copy on another device (meta here, CUDA in use) is
    made again after an edit, and reused while there is none."""
    table = torch.ones(4, 4, dtype=torch.bool)
    m = M.dense(table)
    first = m.to("meta")
    assert m.to("meta") is first
    table[0, 1:] = False
    second = m.to("meta")
    assert second is not first and m.to("meta") is second


@pytest.mark.parametrize("backend", ["eager", "sdpa", "flex"])  # varlen declines custom masks
def test_custom_mask_sees_in_place_edits_of_the_tensors_it_reads(backend):
    table = torch.ones(6, dtype=torch.bool)
    m = M.custom(lambda b, h, q, kv: table[kv] & (kv <= q))
    q, k, v = (torch.randn(1, 2, 6, 8) for _ in range(3))
    if anymask.backends(q, k, v, m)[backend]["reasons"]:
        pytest.skip(f"{backend} does not run this mask here")
    first = anymask.attention(q, k, v, m, backend=backend)
    table[:2] = False
    second = anymask.attention(q, k, v, m, backend=backend)
    fresh = M.custom(lambda b, h, q, kv: table.clone()[kv] & (kv <= q))
    torch.testing.assert_close(second, anymask.attention(q, k, v, fresh, backend="eager"))
    assert not torch.allclose(first, second)


class _Table:
    def __init__(self, allowed):
        self.allowed = allowed

    def __call__(self, b, h, q, kv):
        return self.allowed[kv] & (kv <= q)


def _custom_reading_through(kind, table):
    """A custom mask whose mask_mod reaches ``table`` through a container, an object or a module."""
    if kind == "list":
        tables = [table]
        return M.custom(lambda b, h, q, kv: tables[0][kv] & (kv <= q))
    if kind == "dict":
        tables = {"allowed": table}
        return M.custom(lambda b, h, q, kv: tables["allowed"][kv] & (kv <= q))
    if kind == "callable_object":
        return M.custom(_Table(table))
    if kind == "object_attribute":
        holder = _Table(table)
        return M.custom(lambda b, h, q, kv: holder.allowed[kv] & (kv <= q))
    if kind == "python_module":  # e.g. a config module: ``state.allowed``
        state = types.ModuleType("state")
        state.allowed = table
        return M.custom(lambda b, h, q, kv: state.allowed[kv] & (kv <= q))
    if kind == "class_attribute":
        class Config:
            allowed = table
        return M.custom(lambda b, h, q, kv: Config.allowed[kv] & (kv <= q))
    module = torch.nn.Module()
    module.register_buffer("allowed", table)
    return M.custom(lambda b, h, q, kv: module.allowed[kv] & (kv <= q))


@pytest.mark.parametrize("kind", ["list", "dict", "callable_object", "object_attribute", "module_buffer",
                                  "python_module", "class_attribute"])
def test_custom_mask_sees_edits_through_containers_and_objects(kind):
    table = torch.ones(6, dtype=torch.bool)
    m = _custom_reading_through(kind, table)
    q, k, v = (torch.randn(1, 2, 6, 8) for _ in range(3))
    before = M.stamp(m)
    first = anymask.attention(q, k, v, m, backend="sdpa")
    table[:2] = False
    assert M.stamp(m) != before
    second = anymask.attention(q, k, v, m, backend="sdpa")
    fresh = M.custom(lambda b, h, q, kv: table.clone()[kv] & (kv <= q))
    torch.testing.assert_close(second, anymask.attention(q, k, v, fresh, backend="eager"))
    assert not torch.allclose(first, second)


_REBOUND = None  # a module global that a mask_mod reads and the test rebinds


def test_custom_mask_sees_a_global_rebound_to_a_new_tensor_at_the_same_address():
    """The new tensor reuses the old one's memory and version count (the allocator hands freed
    blocks out again): only its identity tells the cached mask is stale."""
    global _REBOUND
    raw = bytearray(b"\x01" * 6)
    _REBOUND = torch.frombuffer(raw, dtype=torch.bool)
    m = M.custom(lambda b, h, q, kv: _REBOUND[kv] & (kv <= q))
    q, k, v = (torch.randn(1, 2, 6, 8) for _ in range(3))
    first = anymask.attention(q, k, v, m, backend="sdpa")
    raw[:2] = b"\x00\x00"  # not through a tensor: no version bump
    _REBOUND = torch.frombuffer(raw, dtype=torch.bool)
    second = anymask.attention(q, k, v, m, backend="sdpa")
    fresh = M.custom(lambda b, h, q, kv: _REBOUND.clone()[kv] & (kv <= q))
    torch.testing.assert_close(second, anymask.attention(q, k, v, fresh, backend="eager"))
    assert not torch.allclose(first, second)


def test_custom_mask_reading_an_inference_tensor_warns_once():
    from anymask.masks import _warn_unversioned

    _warn_unversioned.cache_clear()
    with torch.inference_mode():
        table = torch.ones(6, dtype=torch.bool)
    m = M.custom(lambda b, h, q, kv: table[kv] & (kv <= q))
    with pytest.warns(RuntimeWarning, match="no version counter"):
        M.stamp(m)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        M.stamp(m)


@pytest.mark.parametrize("backend", ["eager", "sdpa"])
def test_custom_mask_mod_of_the_wrong_shape_names_the_mask(backend):
    m = M.custom(lambda b, h, q, kv: torch.ones(3, dtype=torch.bool))
    q, k, v = (torch.randn(1, 2, 8, 8) for _ in range(3))
    with pytest.raises(ValueError, match=r"returned shape \[3\] for index grids of \[B, H, Sq, Skv\]"):
        anymask.attention(q, k, v, m, backend=backend)
    with pytest.raises(ValueError, match="must broadcast"):
        M.custom(lambda b, h, q, kv: torch.ones(3, dtype=torch.bool)).picture(4)


def test_picture_of_a_row_outside_the_mask_says_so():
    two_rows = M.padding([[1, 1, 0], [1, 0, 0]])
    with pytest.raises(ValueError, match=r"picture: batch 5 is out of range \(padding\(valid of shape \[2, 3\]\) "
                                         r"holds 2 batch rows, 0 to 1\)"):
        two_rows.picture(3, batch=5)
    assert two_rows.picture(3, batch=1) == "# . .\n. . .\n. . ."
    assert two_rows.picture(3) == "# # .\n# # .\n. . ."  # the rows the mask holds, not batch + 1
    with pytest.raises(ValueError, match=r"picture: batch 2 is out of range \(batch_size=2\)"):
        M.causal().picture(3, batch=2, batch_size=2)
    with pytest.raises(ValueError, match="picture: batch must be an int of 0 or more, got -1"):
        M.causal().picture(3, batch=-1)
    two_heads = M.dense(torch.eye(3, dtype=torch.bool).expand(1, 2, 3, 3))
    assert two_heads.picture(3, head=1) == "# . .\n. # .\n. . #"
    with pytest.raises(ValueError, match=r"picture: head 2 is out of range \(dense\(shape \[1, 2, 3, 3\]\) holds 2 heads"):
        two_heads.picture(3, head=2)


@pytest.mark.parametrize("batch,seq", [(1, 4096), (1, 64), (2, 256), (4, 4096)])
def test_catalogue_padding_pads_at_every_batch_size(batch, seq):
    """The bench's padding case pads something even with one row (the GPU grid's S=16384 runs B=1,
    and there the first version padded nothing: a full-attention case reported as padding)."""
    valid = M.CATALOGUE["padding"](batch, seq).to_dense(batch, 1, seq, seq)[:, 0].any(1)  # [B, S] keys seen
    fill = valid.float().mean(1)  # [B]
    assert (fill < 1).any() and (fill >= 0.34).all()
    if batch > 1:
        assert fill.max() == 1 and fill.min() < 0.36  # 35-100% fill across the batch


@pytest.mark.parametrize("make, name, value", [
    (lambda: M.window(8), "left", 100),
    (lambda: M.prefix(4), "lengths", torch.tensor([2])),
    (lambda: M.causal() & M.window(8), "terms", (M.causal(),)),
    (lambda: ~M.causal(), "term", M.full()),
])
def test_a_built_mask_cannot_change(make, name, value):
    """Editing a setting after a call would keep the cached dense form / plan / choice of the old
    one (a window widened in place ran with the old window, error 1.7): refused instead."""
    mask = make()
    q = k = v = torch.randn(1, 1, 12, 4)
    before = anymask.attention(q, k, v, mask, backend="sdpa")
    with pytest.raises(AttributeError, match="cannot change once the mask is built"):
        setattr(mask, name, value)
    with pytest.raises(AttributeError, match="fixed once built"):
        delattr(mask, name)
    torch.testing.assert_close(anymask.attention(q, k, v, mask, backend="sdpa"), before)



def test_a_prefix_edited_in_place_is_validated_again():
    """Prefix lengths are read once per version of their tensor: an edit past the keys is refused."""
    mask = M.dense(torch.ones(1, 1, 8, 8, dtype=torch.bool)) & M.prefix(3)
    prefix = next(leaf for leaf in M._leaves(mask) if isinstance(leaf, M.Prefix))
    prefix.validate(1, 1, 8, 8)
    prefix.lengths.fill_(9)
    with pytest.raises(ValueError, match="prefix: length 9 exceeds kv_len=8"):
        prefix.validate(1, 1, 8, 8)


def test_custom_masks_are_freed_after_use():
    """A bare custom() mask kept itself alive through the per-mask record of what it holds."""
    import gc
    import weakref

    import anymask

    q = torch.randn(1, 1, 8, 4)
    alive = []
    for _ in range(40):
        ids = torch.arange(8) // 3
        mask = M.custom(lambda b, h, qi, kv, ids=ids: ids[qi] == ids[kv])
        anymask.attention(q, q, q, mask, backend="eager")
        alive.append(weakref.ref(mask))
        del mask
    gc.collect()
    assert sum(ref() is not None for ref in alive) <= 8  # what bounded caches may still hold
