"""Tile classes, visible pairs and density against the dense oracle, exactly."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from anymask import masks, tiles
from anymask.structure import analyse


def oracle_tiles(dense: torch.Tensor, bq: int, bk: int) -> torch.Tensor:
    """Tile classes straight from a dense ``[B, H, Sq, Skv]`` mask, one tile at a time."""
    B, H, Sq, Skv = dense.shape
    n_q, n_k = -(-Sq // bq), -(-Skv // bk)
    out = torch.empty(B, H, n_q, n_k, dtype=torch.int8)
    for i in range(n_q):
        for j in range(n_k):
            t = dense[:, :, i * bq:(i + 1) * bq, j * bk:(j + 1) * bk].flatten(2)  # [B, H, tile]
            out[:, :, i, j] = torch.where(t.all(-1), tiles.FULL, torch.where(t.any(-1), tiles.PARTIAL,
                                                                             tiles.EMPTY)).to(torch.int8)
    return out


def check(mask, batch, heads, q_len, kv_len, block):
    dense = mask.to_dense(batch, heads, q_len, kv_len)  # [B, H, Sq, Skv]
    got = tiles.tile_classes(mask, batch, heads, q_len, kv_len, block)
    bq, bk = (block, block) if isinstance(block, int) else block
    assert got.dtype == torch.int8
    assert got.shape[1] in (1, heads)
    assert torch.equal(got.expand(batch, heads, -1, -1), oracle_tiles(dense, bq, bk)), (mask, block)
    assert tiles.visible_pairs(mask, batch, heads, q_len, kv_len) == int(dense.sum())
    assert tiles.density(mask, batch, heads, q_len, kv_len) == pytest.approx(dense.float().mean().item())


SIZES = [(1, 1), (5, 5), (16, 16), (17, 17), (7, 23), (1, 19), (31, 64), (33, 33)]
BLOCKS = [1, 4, (3, 5), (16, 16), (8, 128), (64, 7)]


@pytest.mark.parametrize("name", sorted(masks.CATALOGUE))
@pytest.mark.parametrize("q_len,kv_len", SIZES)
def test_catalogue(name, q_len, kv_len):
    mask = masks.CATALOGUE[name](3, kv_len)
    for block in BLOCKS:
        check(mask, 3, 2, q_len, kv_len, block)


def test_structured_path_taken_and_head_dim_one():
    mask = masks.documents(lengths=[5, 9, 3]) & masks.causal() & masks.padding(torch.rand(2, 17) > 0.2)
    assert tiles.is_structured(analyse(mask))
    assert tiles.tile_classes(mask, 2, 4, 17, 17, 4).shape == (2, 1, 5, 5)


def test_head_dependent_custom_mask_keeps_heads():
    mask = masks.custom(lambda b, h, q, kv: (kv <= q) & ((kv + h) % 2 == 0))
    assert not tiles.is_head_invariant(mask)
    check(mask, 2, 3, 9, 13, (4, 3))
    assert tiles.tile_classes(mask, 2, 3, 9, 13, 4).shape == (2, 3, 3, 4)


def test_non_contiguous_documents_use_dense_path():
    ids = torch.tensor([[0, 0, 1, 1, 0, 2, 2, 1, 0, 0, 3]])
    mask = masks.documents(ids) & masks.causal()
    assert not tiles.is_structured(analyse(mask))
    for block in (1, 2, 3, (4, 2)):
        check(mask, 1, 1, 11, 11, block)
        check(mask, 1, 1, 6, 11, block)


def test_fully_masked_rows_and_all_padding():
    valid = torch.zeros(2, 12, dtype=torch.bool)
    valid[1, :5] = True
    for mask in (masks.padding(valid), masks.padding(valid) & masks.window(2, 1), ~masks.full()):
        for block in (1, 4, (5, 3)):
            check(mask, 2, 2, 12, 12, block)
            check(mask, 2, 2, 7, 12, block)


def test_small_chunks(monkeypatch):
    """The chunked loops agree with one big chunk."""
    monkeypatch.setattr(tiles, "_CHUNK_ELEMENTS", 7)
    for name in ("documents_causal", "padding", "custom", "prefix_lm"):
        check(masks.CATALOGUE[name](2, 29), 2, 2, 23, 29, (3, 4))


def test_tile_counts():
    classes = tiles.tile_classes(masks.causal(), 1, 1, 8, 8, 4)
    assert classes[0, 0].tolist() == [[tiles.PARTIAL, tiles.EMPTY], [tiles.FULL, tiles.PARTIAL]]
    assert tiles.tile_counts(classes) == {"empty": 1, "partial": 2, "full": 1}


def test_docstring_example():
    classes = tiles.tile_classes(masks.causal(), 1, 1, 6, 8, (2, 4))
    assert classes[0, 0].tolist() == [[1, 0], [2, 1], [2, 1]]


def test_bad_block():
    with pytest.raises(ValueError, match="block"):
        tiles.tile_classes(masks.causal(), 1, 1, 8, 8, (0, 4))


def test_large_structured_is_cheap():
    """S = 32k packed documents + padding: the structured path never builds S x S."""
    S = 1 << 15
    valid = torch.ones(1, S, dtype=torch.bool)
    valid[0, -1000:] = False
    mask = masks.documents(lengths=[S // 4, S // 2, S // 4]) & masks.causal() & masks.padding(valid)
    classes = tiles.tile_classes(mask, 1, 8, S, S, 128)
    assert classes.shape == (1, 1, 256, 256)
    n_tiles = 256 * 256
    assert tiles.tile_counts(classes)["empty"] > n_tiles * 0.6
    lengths = [S // 4, S // 2, S // 4 - 1000]
    expected = sum(n * (n + 1) // 2 for n in lengths) * 8
    assert tiles.visible_pairs(mask, 1, 8, S, S) == expected


# random compositions ---------------------------------------------------------------------------

@st.composite
def leaf(draw, batch, seq):
    kind = draw(st.sampled_from(["full", "causal", "window", "documents", "padding", "prefix",
                                 "prefix_lm", "custom", "dense"]))
    if kind == "full":
        return masks.full()
    if kind == "causal":
        return masks.causal()
    if kind == "window":
        left = draw(st.one_of(st.none(), st.integers(0, seq)))
        right = draw(st.one_of(st.none(), st.integers(0, seq)))
        return masks.window(left, right)
    if kind == "documents":
        ids = sorted(draw(st.lists(st.integers(0, 4), min_size=seq, max_size=seq)))
        if draw(st.booleans()):
            ids = draw(st.permutations(ids))
        return masks.documents(torch.tensor(ids))
    if kind == "padding":
        rows = draw(st.lists(st.lists(st.booleans(), min_size=seq, max_size=seq), min_size=batch, max_size=batch))
        return masks.padding(torch.tensor(rows))
    if kind in ("prefix", "prefix_lm"):
        lengths = draw(st.lists(st.integers(0, seq), min_size=batch, max_size=batch))
        return (masks.prefix if kind == "prefix" else masks.prefix_lm)(lengths)
    if kind == "custom":
        m = draw(st.integers(2, 4))
        return masks.custom(lambda b, h, q, kv: (q + kv + h) % m != 0)
    return masks.dense(torch.rand(seq, seq) > 0.3)


@st.composite
def composition(draw, batch, seq):
    mask = draw(leaf(batch, seq))
    for _ in range(draw(st.integers(0, 3))):
        other = draw(leaf(batch, seq))
        op = draw(st.sampled_from(["and", "and", "or", "not"]))
        mask = mask & other if op == "and" else mask | other if op == "or" else mask & ~other
    return mask


@st.composite
def case(draw):
    batch, seq = draw(st.integers(1, 3)), draw(st.integers(1, 24))
    mask = draw(composition(batch, seq))
    q_len = seq if isinstance(mask, masks.Dense) or _has_dense(mask) else draw(st.integers(1, seq))
    block = (draw(st.integers(1, 9)), draw(st.integers(1, 9)))
    return mask, batch, draw(st.integers(1, 3)), q_len, seq, block


def _has_dense(mask) -> bool:
    return isinstance(mask, masks.Dense) or any(_has_dense(c) for c in mask.children())


@settings(max_examples=150, deadline=None)
@given(case())
def test_random_compositions(args):
    check(*args)
