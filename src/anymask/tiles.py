"""Tile classes of a mask: which ``(bq, bk)`` tiles are empty, full or partial.

The attention matrix of one batch row and head is cut into tiles of ``bq`` query rows by ``bk``
key columns; the last row/column of tiles may be narrower when the block size does not divide
the length.  A tile is

    EMPTY    no pair in it is visible        (a kernel skips it)
    FULL     every pair in it is visible     (a kernel runs it without mask math)
    PARTIAL  anything else                   (a kernel evaluates the mask inside it)

Queries are the last ``q_len`` of the ``kv_len`` positions (bottom-right)::

    causal(), q_len = 6, kv_len = 8, tiles (2, 4)         classes [nQ=3, nK=2]

              kv 0 1 2 3 | 4 5 6 7
        q 2      # # # . | . . . .                        P  E
        q 3      # # # # | . . . .
                 --------+--------
        q 4      # # # # | # . . .                        F  P
        q 5      # # # # | # # . .
                 --------+--------
        q 6      # # # # | # # # .                        F  P
        q 7      # # # # | # # # #

Structured masks (base & contiguous documents & padding, see :mod:`anymask.structure`) are
classified from per-row key intervals and a prefix count of valid keys: O(S * S / bk) time and
memory in chunks, never an ``S x S`` tensor.  Masks with opaque (``general``) terms or documents
that are not contiguous are evaluated densely, a bounded chunk of query rows at a time.
"""

from __future__ import annotations

import torch

from . import masks as M
from .structure import Structure, analyse, documents_are_contiguous, row_intervals

EMPTY, PARTIAL, FULL = 0, 1, 2

_CHUNK_ELEMENTS = 1 << 22  # elements per intermediate tensor in the chunked loops


def is_structured(structure: Structure) -> bool:
    """True when the structured (interval) path applies: no opaque terms, contiguous documents
    and prefix groups."""
    if not structure.is_structured:
        return False
    return all(ids is None or documents_are_contiguous(ids) for ids in (structure.documents, structure.groups))


def is_head_invariant(mask: M.Mask) -> bool:
    """True when no term can depend on the head (no custom terms, no per-head dense tensor)."""
    if isinstance(mask, M.Custom):
        return False
    if isinstance(mask, M.Dense) and mask.tensor.shape[1] > 1:
        return False
    return all(is_head_invariant(c) for c in mask.children())


def row_bounds(structure: Structure, batch: int, q_len: int, kv_len: int, device=None):
    """Per query row, the key interval ``[lo, hi]`` and the valid keys: ``lo, hi, valid``.

    ``lo``, ``hi``: long ``[B, Sq]`` (absolute key positions); padded query rows get an empty
    interval (``lo = kv_len``, ``hi = -1``).  ``valid``: bool ``[B, Skv]``, or ``None`` without
    padding.  A key ``kv`` is visible from row ``q`` iff ``lo <= kv <= hi`` and ``valid[kv]``.
    Needs a structured mask (:func:`is_structured`).
    """
    device = torch.device(device) if device is not None else torch.device("cpu")
    lo, hi = row_intervals(structure, batch, q_len, kv_len, device=device)  # [B, Sq] each
    valid = None
    if structure.valid is not None:
        valid = structure.valid.to(device).expand(batch, kv_len)  # [B, Skv]
        q_valid = valid[:, kv_len - q_len:]  # [B, Sq]
        lo = torch.where(q_valid, lo, torch.full_like(lo, kv_len))
        hi = torch.where(q_valid, hi, torch.full_like(hi, -1))
    return lo, hi, valid


def _valid_prefix(valid: torch.Tensor) -> torch.Tensor:
    """``P[b, i]`` = number of valid keys before position ``i``: long ``[B, Skv + 1]``."""
    counts = valid.long().cumsum(dim=1)  # [B, Skv]
    return torch.cat([torch.zeros_like(counts[:, :1]), counts], dim=1)


def _count_in(lo, hi, prefix, start, end):
    """Visible keys of each row in each key range ``[start, end]``.

    lo, hi: [B, R] with ``0 <= lo <= Skv`` and ``-1 <= hi < Skv``; start, end: [K] within
    ``[0, Skv)``; prefix: [B, Skv + 1] or None.  Returns [B, R, K].  An empty intersection
    (``a > e``) gives ``e + 1 <= a``, hence a difference ``<= 0``, clamped to 0.
    """
    a = torch.maximum(lo[..., None], start)  # [B, R, K], in [0, Skv]
    e1 = torch.minimum(hi[..., None], end) + 1  # [B, R, K], in [0, Skv]
    if prefix is None:
        return (e1 - a).clamp_(min=0)
    B, R, K = a.shape
    top = prefix.gather(1, e1.view(B, R * K))
    return (top - prefix.gather(1, a.view(B, R * K))).clamp_(min=0).view(B, R, K)


def _rows_per_chunk(bq: int, per_row: int) -> int:
    return max(bq, (_CHUNK_ELEMENTS // max(1, per_row)) // bq * bq)


def _classify(all_full: torch.Tensor, all_empty: torch.Tensor) -> torch.Tensor:
    out = torch.full(all_full.shape, PARTIAL, dtype=torch.int8, device=all_full.device)
    out[all_full] = FULL
    out[all_empty] = EMPTY
    return out


def pad_dim(x: torch.Tensor, dim: int, size: int, value) -> torch.Tensor:
    """Pad ``x`` along ``dim`` to ``size`` entries with ``value``."""
    missing = size - x.shape[dim]
    if missing == 0:
        return x
    shape = list(x.shape)
    shape[dim] = missing
    return torch.cat([x, torch.full(shape, value, dtype=x.dtype, device=x.device)], dim=dim)


def _structured_tiles(structure, batch, q_len, kv_len, bq, bk, device) -> torch.Tensor:
    lo, hi, valid = row_bounds(structure, batch, q_len, kv_len, device)  # [B, Sq] each
    prefix = None if valid is None else _valid_prefix(valid)  # [B, Skv + 1]
    n_k = -(-kv_len // bk)
    start = torch.arange(n_k, device=device) * bk  # [nK]
    end = (start + bk).clamp(max=kv_len) - 1  # [nK]
    width = end - start + 1  # [nK]
    step = _rows_per_chunk(bq, batch * n_k)
    out = []
    for r0 in range(0, q_len, step):
        r1 = min(q_len, r0 + step)
        cnt = _count_in(lo[:, r0:r1], hi[:, r0:r1], prefix, start, end)  # [B, R, nK]
        rows = -(-(r1 - r0) // bq) * bq
        full = pad_dim(cnt == width, 1, rows, True).view(batch, -1, bq, n_k).all(dim=2)  # [B, nq, nK]
        empty = pad_dim(cnt == 0, 1, rows, True).view(batch, -1, bq, n_k).all(dim=2)
        out.append(_classify(full, empty))
    return torch.cat(out, dim=1)[:, None]  # [B, 1, nQ, nK]


def _dense_chunks(mask, batch, heads, q_len, kv_len, step, device):
    """Yield ``(r0, dense)`` with dense bool ``[B, H, R, Skv]`` for query rows ``r0 : r0 + R``."""
    m = mask.to(device)
    b = torch.arange(batch, device=device).view(-1, 1, 1, 1)  # [B, 1, 1, 1]
    h = torch.arange(heads, device=device).view(1, -1, 1, 1)  # [1, H, 1, 1]
    kv = torch.arange(kv_len, device=device).view(1, 1, 1, -1)  # [1, 1, 1, Skv]
    offset = kv_len - q_len
    for r0 in range(0, q_len, step):
        r1 = min(q_len, r0 + step)
        q = torch.arange(offset + r0, offset + r1, device=device).view(1, 1, -1, 1)  # [1, 1, R, 1]
        yield r0, M.expand_mask_mod_output(mask, m.mask_mod(b, h, q, kv), (batch, heads, r1 - r0, kv_len))


def _dense_tiles(mask, batch, heads, q_len, kv_len, bq, bk, device) -> torch.Tensor:
    n_k = -(-kv_len // bk)
    out = []
    for r0, d in _dense_chunks(mask, batch, heads, q_len, kv_len,
                               _rows_per_chunk(bq, batch * heads * n_k * bk), device):
        rows = -(-d.shape[2] // bq) * bq
        shape = (batch, heads, rows // bq, bq, n_k, bk)
        full = pad_dim(pad_dim(d, 2, rows, True), 3, n_k * bk, True).reshape(shape).all(dim=5).all(dim=3)
        empty = ~pad_dim(pad_dim(d, 2, rows, False), 3, n_k * bk, False).reshape(shape).any(dim=5).any(dim=3)
        out.append(_classify(full, empty))
    return torch.cat(out, dim=2)  # [B, H, nQ, nK]


def _device_of(mask: M.Mask, device) -> torch.device:
    return torch.device(device) if device is not None else mask._default_device()


def tile_classes(mask: M.Mask, batch: int, heads: int, q_len: int, kv_len: int,
                 block: int | tuple[int, int] = 128, *, device=None,
                 structure: Structure | None = None) -> torch.Tensor:
    """Tile classes ``int8 [B, H|1, nQ, nK]`` (``EMPTY``/``PARTIAL``/``FULL``) for tiles ``block``.

    ``nQ = ceil(q_len / bq)``, ``nK = ceil(kv_len / bk)``.  The head dimension is 1 when the mask
    cannot depend on the head.  ``structure`` may pass an existing :func:`analyse` result.
    """
    bq, bk = (block, block) if isinstance(block, int) else block
    if bq < 1 or bk < 1:
        raise ValueError(f"block sizes must be positive, got {(bq, bk)}")
    batch, heads, q_len, kv_len = M._check_sizes(batch, heads, q_len, kv_len)
    mask.validate(batch, heads, q_len, kv_len)
    device = _device_of(mask, device)
    structure = analyse(mask) if structure is None else structure
    if is_structured(structure):
        return _structured_tiles(structure, batch, q_len, kv_len, bq, bk, device)
    h = 1 if is_head_invariant(mask) else heads
    return _dense_tiles(mask, batch, h, q_len, kv_len, bq, bk, device)


def visible_pairs(mask: M.Mask, batch: int, heads: int, q_len: int, kv_len: int, *,
                  device=None, structure: Structure | None = None) -> int:
    """Exact number of visible ``(b, h, q, kv)`` pairs: O(B * S) for structured masks."""
    batch, heads, q_len, kv_len = M._check_sizes(batch, heads, q_len, kv_len)
    mask.validate(batch, heads, q_len, kv_len)
    device = _device_of(mask, device)
    structure = analyse(mask) if structure is None else structure
    if is_structured(structure):
        lo, hi, valid = row_bounds(structure, batch, q_len, kv_len, device)  # [B, Sq] each
        prefix = None if valid is None else _valid_prefix(valid)
        ends = torch.tensor([0, kv_len - 1], device=device)
        cnt = _count_in(lo, hi, prefix, ends[:1], ends[1:])  # [B, Sq, 1]
        return int(cnt.sum()) * heads
    h = 1 if is_head_invariant(mask) else heads
    step = max(1, _CHUNK_ELEMENTS // (batch * h * kv_len))
    total = sum(int(d.sum()) for _, d in _dense_chunks(mask, batch, h, q_len, kv_len, step, device))
    return total * (heads // h)


def density(mask: M.Mask, batch: int, heads: int, q_len: int, kv_len: int, *,
            device=None, structure: Structure | None = None) -> float:
    """Fraction of visible pairs, in ``[0, 1]``."""
    pairs = visible_pairs(mask, batch, heads, q_len, kv_len, device=device, structure=structure)
    return pairs / (batch * heads * q_len * kv_len)


def tile_counts(classes: torch.Tensor) -> dict[str, int]:
    """How many tiles of each class: ``{"empty": n, "partial": n, "full": n}``."""
    return {name: int((classes == value).sum())
            for name, value in (("empty", EMPTY), ("partial", PARTIAL), ("full", FULL))}
