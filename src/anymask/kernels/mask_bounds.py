"""Compact mask description for the block-sparse kernels, built in O(S) from the mask structure.

Per query row an inclusive key interval ``[lo, hi]`` (padded query rows get an empty interval);
padding whose valid positions form one run per batch row is folded into the intervals, any other
padding keeps a per-key valid flag (``kvalid``) that the kernels test in every tile.

Lowered to per-tile work lists for tiles of ``BM`` query rows by ``BN`` keys::

    row view  (forward, dQ)     per q-tile m:  kv tiles [first, full_first) partial,
                                               [full_first, full_end) full, [full_end, end) partial
    col view  (dK, dV)          per kv-tile n: the same four numbers over q tiles

A kernel tile is FULL when every one of its ``BM x BN`` slots is in bounds and visible (no mask
math, no bounds checks); EMPTY tiles lie outside ``[first, end)`` and are never loaded.  For
structured masks whose padding is one run the lowering is exact; with scattered padding every tile
is treated as partial.  An ``order`` per view lists tiles by descending work, so the heaviest
programs start first (load balance for causal and other skewed masks).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field

import torch

from .. import masks as M
from ..structure import Structure, documents_are_contiguous, row_intervals


@dataclass(frozen=True, eq=False)
class MaskBounds:
    lo: torch.Tensor  # [Bm, Sq] int32, absolute key index; empty row when lo > hi
    hi: torch.Tensor  # [Bm, Sq] int32
    kvalid: torch.Tensor | None  # [Bm, Skv] int8, only for padding that is not one run
    lo_mono: torch.Tensor  # [Bm, Sq] long, non-decreasing (query padding not applied)
    hi_mono: torch.Tensor  # [Bm, Sq] long, non-decreasing
    row_span: torch.Tensor  # [Bm, 2] long, first and last valid query row (local index)
    q_len: int
    kv_len: int
    views: dict = field(default_factory=dict, repr=False)  # (view, block_m, block_n) -> lowering

    @property
    def batch(self) -> int:
        """1 when the mask is the same for every batch row, else B."""
        return self.lo.shape[0]


def reasons(structure: Structure) -> list[str]:
    """Why the compact description cannot express this mask (empty = it can)."""
    if structure.general:
        terms = ", ".join(repr(t) for t in structure.general)
        return [f"mask has general terms ({terms}); the triton kernel needs base & documents & padding"]
    if structure.documents is not None and not documents_are_contiguous(structure.documents):
        return ["documents are not contiguous (an id reappears after another document); "
                "the triton kernel needs one key interval per query row"]
    if structure.groups is not None and not documents_are_contiguous(structure.groups):
        return ["prefix groups are not contiguous (a group id reappears after another group); "
                "the triton kernel needs one key interval per query row"]
    return []


def _batch_rows(s: Structure) -> int:
    sizes = [t.shape[0] for t in (s.prefix, s.groups, s.documents, s.valid) if t is not None]
    return max(sizes, default=1)


def build(structure: Structure, q_len: int, kv_len: int, device) -> MaskBounds:
    """Row intervals and (when needed) key flags for a structured mask; see :func:`reasons`."""
    s = structure.to(device)
    bm = _batch_rows(s)
    lo, hi = row_intervals(s, bm, q_len, kv_len, device=device)  # [Bm, Sq] long each
    kvalid = None
    row_span = torch.tensor([[0, q_len - 1]], device=device).expand(bm, 2)
    if s.valid is not None:
        valid = s.valid.expand(bm, kv_len)  # [Bm, Skv] bool
        keys = torch.arange(kv_len, device=device)
        first = torch.where(valid, keys, kv_len).min(dim=1).values  # [Bm]
        last = torch.where(valid, keys, -1).max(dim=1).values  # [Bm]
        one_run = bool((valid.sum(dim=1) == (last - first + 1).clamp(min=0)).all())
        if one_run:
            lo = torch.maximum(lo, first[:, None])
            hi = torch.minimum(hi, last[:, None])
        else:
            kvalid = valid.to(torch.int8).contiguous()
        off = kv_len - q_len
        row_span = torch.stack([(first - off).clamp(min=0), (last - off).clamp(max=q_len - 1)], dim=1)
        q_valid = valid[:, off:]  # [Bm, Sq]
        lo_rows = torch.where(q_valid, lo, torch.full_like(lo, kv_len))
        hi_rows = torch.where(q_valid, hi, torch.full_like(hi, -1))
    else:
        lo_rows, hi_rows = lo, hi
    return MaskBounds(lo_rows.to(torch.int32).contiguous(), hi_rows.to(torch.int32).contiguous(), kvalid,
                      lo.contiguous(), hi.contiguous(), row_span.contiguous(), q_len, kv_len)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _pack(first, full_first, full_end, end, scattered: bool):
    """Tiles ``int32 [Bm, n, 4]`` and ``order int32 [Bm, n]`` from per-tile ranges ``[Bm, n]``."""
    empty = end <= first
    first = torch.where(empty, 0, first)
    end = torch.where(empty, 0, end)
    no_full = empty | (full_end <= full_first) | scattered
    full_first = torch.where(no_full, end, full_first.clamp(min=first, max=end))
    full_end = torch.where(no_full, end, full_end.clamp(min=full_first, max=end))
    tiles = torch.stack([first, full_first, full_end, end], dim=-1).to(torch.int32).contiguous()
    work = 2 * (end - first) - (full_end - full_first)  # a partial tile costs about twice a full one
    order = torch.sort(work, dim=1, descending=True, stable=True).indices.to(torch.int32).contiguous()
    return tiles, order


def row_tiles(b: MaskBounds, block_m: int, block_n: int):
    """Row view, cached on ``b``; see :func:`_row_tiles`."""
    key = ("row", block_m, block_n)
    if key not in b.views:
        b.views[key] = _row_tiles(b, block_m, block_n)
    return b.views[key]


def col_tiles(b: MaskBounds, block_m: int, block_n: int):
    """Column view, cached on ``b``; see :func:`_col_tiles`."""
    key = ("col", block_m, block_n)
    if key not in b.views:
        b.views[key] = _col_tiles(b, block_m, block_n)
    return b.views[key]


def live(b: MaskBounds) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rows [Bm, Sq], keys [Bm, Skv])`` int8, cached on ``b``: 1 where a query row sees some key,
    1 where some query row sees the key.  The other slots (padding, keys no row reaches) are never
    read into a result, so what they hold must not set the fp16x3 scales (:mod:`split16`)."""
    if "live" not in b.views:
        seen = b.lo <= b.hi  # [Bm, Sq] padded query rows are empty
        lo, hi = b.lo.long(), b.hi.long()
        # the union of the rows' intervals, by a difference array: +1 at lo, -1 past hi (not
        # _rows_per_key, whose row span would count a padded row between valid ones)
        edges = torch.zeros(b.batch, b.kv_len + 1, dtype=torch.long, device=lo.device)  # [Bm, Skv + 1]
        edges.scatter_add_(1, torch.where(seen, lo, b.kv_len), seen.long())
        edges.scatter_add_(1, torch.where(seen, hi + 1, b.kv_len), -seen.long())
        keys = edges.cumsum(1)[:, :b.kv_len] > 0  # [Bm, Skv]
        if b.kvalid is not None:
            keys &= b.kvalid.bool()
        b.views["live"] = (seen.to(torch.int8).contiguous(), keys.to(torch.int8).contiguous())
    return b.views["live"]


def split_level(b: MaskBounds) -> int:
    """The fp16x3 kernels' ``SPLIT``: 1 when every slot is :func:`live` (each value set its scale, so
    nothing needs clamping), 2 when some are dead.  Cached on ``b`` (one device sync, once)."""
    if "split_level" not in b.views:
        rows, keys = live(b)
        b.views["split_level"] = 1 if bool(rows.all()) and bool(keys.all()) else 2
    return b.views["split_level"]


def _row_tiles(b: MaskBounds, block_m: int, block_n: int):
    """Row view for q tiles of ``block_m`` rows and kv tiles of ``block_n`` keys.

    Returns ``tiles int32 [Bm, nM, 4]`` = (first, full_first, full_end, end) kv-tile indices and
    ``order int32 [Bm, nM]`` (q tiles by descending work).
    """
    bm, n_m = b.batch, _cdiv(b.q_len, block_m)
    pad = n_m * block_m - b.q_len
    lo = b.lo.long()
    hi = b.hi.long()
    nonempty = lo <= hi
    big = b.kv_len
    lo_any = torch.nn.functional.pad(torch.where(nonempty, lo, big), (0, pad), value=big)
    hi_any = torch.nn.functional.pad(torch.where(nonempty, hi, -1), (0, pad), value=-1)
    first_key = lo_any.view(bm, n_m, block_m).min(dim=2).values  # [Bm, nM]
    last_key = hi_any.view(bm, n_m, block_m).max(dim=2).values
    first = first_key // block_n
    end = torch.where(last_key >= 0, last_key // block_n + 1, 0)
    max_lo = torch.nn.functional.pad(lo, (0, pad), value=big).view(bm, n_m, block_m).max(dim=2).values
    min_hi = torch.nn.functional.pad(hi, (0, pad), value=-1).view(bm, n_m, block_m).min(dim=2).values
    full_first = (max_lo + block_n - 1) // block_n
    full_end = (min_hi + 1) // block_n
    return _pack(first, full_first, full_end, end, b.kvalid is not None)


def _col_tiles(b: MaskBounds, block_m: int, block_n: int):
    """Column view: per kv tile of ``block_n`` keys, the q tiles (of ``block_m`` rows) to visit.

    Returns ``tiles int32 [Bm, nN, 4]`` = (first, full_first, full_end, end) q-tile indices and
    ``order int32 [Bm, nN]``.  Uses that the unpadded intervals are non-decreasing in the row.
    """
    bm, n_n, skv = b.batch, _cdiv(b.kv_len, block_n), b.kv_len
    lo, hi = b.lo_mono, b.hi_mono  # [Bm, Sq] non-decreasing
    rs, re = b.row_span[:, :1], b.row_span[:, 1:]  # [Bm, 1]
    row_a, row_b, live = _rows_per_key(b)  # [Bm, Skv] each
    pad = n_n * block_n - skv
    first_row = torch.nn.functional.pad(torch.where(live, row_a, b.q_len), (0, pad), value=b.q_len)
    last_row = torch.nn.functional.pad(torch.where(live, row_b, -1), (0, pad), value=-1)
    first = first_row.view(bm, n_n, block_n).min(dim=2).values // block_m  # [Bm, nN]
    last = last_row.view(bm, n_n, block_n).max(dim=2).values
    end = torch.where(last >= 0, last // block_m + 1, 0)
    start = torch.arange(n_n, device=lo.device) * block_n  # [nN]
    stop = (start + block_n - 1).expand(bm, n_n).contiguous()
    full_a = torch.searchsorted(hi, stop, side="left").clamp(min=rs)  # rows seeing the tile's last key
    full_b = (torch.searchsorted(lo, start.expand(bm, n_n).contiguous(), side="right") - 1).clamp(max=re)
    full_first = (full_a + block_m - 1) // block_m
    full_end = torch.where(stop < skv, (full_b + 1) // block_m, 0)
    return _pack(first, full_first, full_end, end, b.kvalid is not None)


def _rows_per_key(b: MaskBounds):
    """Per key ``[Bm, Skv]``: the first and last query row that may see it, and whether one does
    (padded keys and keys outside every row's interval do not).  Uses that the unpadded intervals
    are non-decreasing in the row."""
    lo, hi = b.lo_mono, b.hi_mono  # [Bm, Sq] non-decreasing
    rs, re = b.row_span[:, :1], b.row_span[:, 1:]  # [Bm, 1]
    keys = torch.arange(b.kv_len, device=lo.device).expand(b.batch, b.kv_len).contiguous()  # [Bm, Skv]
    row_a = torch.searchsorted(hi, keys, side="left").clamp(min=rs)  # first row with hi >= kv
    row_b = (torch.searchsorted(lo, keys, side="right") - 1).clamp(max=re)  # last row with lo <= kv
    live = row_a <= row_b
    if b.kvalid is not None:
        live &= b.kvalid.bool()
    return row_a, row_b, live


_CACHE: "weakref.WeakKeyDictionary[M.Mask, dict]" = weakref.WeakKeyDictionary()


def cached(mask: M.Mask, key: tuple, make):
    """``make()`` memoised per mask object and ``key``: layers sharing one mask lower it once.

    The key includes each mask tensor's storage and version counter, so in-place edits of a mask's
    tensors are noticed.
    """
    entry = _CACHE.setdefault(mask, {})
    full_key = (key, M.stamp(mask))
    if full_key not in entry:
        if len(entry) > 32:
            entry.clear()
        entry[full_key] = make()
    return entry[full_key]
