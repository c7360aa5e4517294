"""Packed (unpadded) layout of a documents/padding mask, computed in O(B * S), never S x S.

A *segment* is the set of valid positions of one batch row that share a document id, in order.
For contiguous documents without padding holes that is a maximal run of positions; a segment
with holes (a padded token inside a document, or a document id that recurs later in the row) is
still exact for the ``full`` and ``causal`` bases, because gathering keeps the order of the
positions, but not for a ``window`` base, whose distances the gathering would shrink
(see :func:`reasons`).

Keys of all segments are gathered into one packed tensor ``[total_k, H, D]`` described by
``cu_seqlens_k`` (int32, the FlashAttention convention); queries likewise.  When ``q_len < kv_len``
the queries are the last ``q_len`` positions of the row, so in every segment they are a *suffix*
of its keys: per-segment bottom-right alignment (flash-attn >= 2.1, xformers ``FromBottomRight``)
is then exactly the absolute-position semantics of :mod:`anymask.masks`.  Segments without
queries are dropped (nobody reads their keys).

    ids   0 0 0 1 1 2 2 2      valid 1 1 1 1 0 1 1 0      ->  segments [0 1 2] [3] [5 6]
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .structure import Structure


@dataclass(frozen=True, eq=False)
class Layout:
    """Where each segment's keys and queries sit in the flattened ``[B * S]`` position space."""

    batch: int
    q_len: int
    kv_len: int
    k_index: torch.Tensor  # [total_k] long: flat key positions b * kv_len + s, segment by segment
    q_index: torch.Tensor  # [total_q] long: flat query rows b * q_len + (s - (kv_len - q_len))
    cu_seqlens_k: torch.Tensor  # [N + 1] int32
    cu_seqlens_q: torch.Tensor  # [N + 1] int32
    k_lengths: tuple[int, ...]  # N key lengths (host copy, for grouping and xformers)
    q_lengths: tuple[int, ...]  # N query lengths
    contiguous: bool  # every segment is a run of consecutive positions

    @property
    def num_segments(self) -> int:
        return len(self.k_lengths)

    @property
    def max_seqlen_k(self) -> int:
        return max(self.k_lengths, default=0)

    @property
    def max_seqlen_q(self) -> int:
        return max(self.q_lengths, default=0)


def _ids_and_valid(s: Structure, batch: int, kv_len: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Document ids ``[B, S]`` (long) and validity ``[B, S]`` (bool), defaults filled in."""
    ids = (s.documents.to(device).long().expand(batch, kv_len) if s.documents is not None
           else torch.zeros(batch, kv_len, dtype=torch.long, device=device))
    valid = (s.valid.to(device).bool().expand(batch, kv_len) if s.valid is not None
             else torch.ones(batch, kv_len, dtype=torch.bool, device=device))
    return ids, valid


def layout(s: Structure, batch: int, q_len: int, kv_len: int, device=None) -> Layout:
    """The packed layout of ``s`` (only its documents and padding are read; see module docstring)."""
    device = torch.device(device) if device is not None else _device_of(s)
    ids, valid = _ids_and_valid(s, batch, kv_len, device)  # [B, S] each
    flat = valid.reshape(-1).nonzero().squeeze(1)  # [n] ascending flat positions of valid tokens
    row, pos = flat // kv_len, flat % kv_len  # [n] each
    tok_ids = ids.reshape(-1)[flat]  # [n]
    # Ids are ranked before any arithmetic: they may span the whole int64 range (64-bit hashes).
    _, id_rank = torch.unique(tok_ids, return_inverse=True)  # [n] in [0, n)
    key = row * (flat.numel() + 1) + id_rank  # [n] one value per (row, document); < B * S * (n + 1)
    groups, inverse = torch.unique(key, return_inverse=True)  # group of each token
    # Order groups by their first position, so contiguous documents come out left to right.
    first = torch.full((groups.numel(),), batch * kv_len, dtype=torch.long, device=device)
    first = first.scatter_reduce(0, inverse, flat, reduce="amin")
    rank = torch.empty_like(first)
    rank[first.argsort()] = torch.arange(first.numel(), device=device)
    seg = rank[inverse]  # [n] segment of each token, numbered left to right
    is_q = pos >= kv_len - q_len  # [n]
    q_count = torch.bincount(seg[is_q], minlength=groups.numel())  # [N0]
    keep = q_count[seg] > 0  # drop segments without queries
    order = torch.sort(seg[keep], stable=True).indices  # tokens grouped by segment, in order
    k_flat, k_seg, k_pos = flat[keep][order], seg[keep][order], pos[keep][order]
    k_lengths = torch.bincount(k_seg, minlength=groups.numel())[q_count > 0]  # [N]
    q_sel = k_pos >= kv_len - q_len
    q_index = (k_flat[q_sel] // kv_len) * q_len + (k_pos[q_sel] - (kv_len - q_len))
    q_lengths = q_count[q_count > 0]
    same_seg = k_seg[1:] == k_seg[:-1]
    contiguous = bool(((k_flat[1:] - k_flat[:-1] == 1) | ~same_seg).all()) if k_seg.numel() > 1 else True
    return Layout(batch, q_len, kv_len, k_flat, q_index, _cumsum(k_lengths), _cumsum(q_lengths),
                  tuple(k_lengths.tolist()), tuple(q_lengths.tolist()), contiguous)


def _cumsum(lengths: torch.Tensor) -> torch.Tensor:
    out = torch.zeros(lengths.numel() + 1, dtype=torch.int32, device=lengths.device)
    out[1:] = lengths.cumsum(0)
    return out


def _device_of(s: Structure) -> torch.device:
    for t in (s.documents, s.valid):
        if t is not None:
            return t.device
    return torch.device("cpu")


def has_holes(s: Structure, batch: int, kv_len: int) -> bool:
    """True when some segment is not a run of consecutive positions (cheap, no layout built)."""
    if s.documents is None and s.valid is None:
        return False
    ids, valid = _ids_and_valid(s, batch, kv_len, _device_of(s))
    # a segment (re)starts at a valid token after padding, or after a token of another document
    # (any id, negative ones too: padding is ``valid``, not an id value)
    starts_here = valid.clone()  # [B, S]
    starts_here[:, 1:] &= ~valid[:, :-1] | (ids[:, 1:] != ids[:, :-1])
    starts = starts_here.sum(1)  # [B] runs of valid same-id positions
    distinct = torch.tensor([row[ok].unique().numel() for row, ok in zip(ids, valid)], device=ids.device)
    return bool((starts != distinct).any())


def reasons(s: Structure, batch: int, q_len: int, kv_len: int) -> list[str]:
    """Why a packed (segment) layout cannot express ``s`` exactly; empty when it can."""
    out = []
    if s.general:
        out.append("the mask has terms that are not documents/padding/causal/window "
                   f"({', '.join(map(repr, s.general))}); packed segments cannot express them")
    if s.base in ("prefix_lm", "prefix_groups"):
        out.append("prefix-LM is not a per-segment causal/full/window mask (its bidirectional prefix "
                   "crosses the causal part); use flex, triton, sdpa or eager")
    if s.base == "window" and not out and has_holes(s, batch, kv_len):
        out.append("sliding window over a segment with holes (padding inside a document, or a "
                   "document id that recurs later in the row): packing would shrink the distances")
    return out


def unpad(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``[B, H, S, D] -> [total, H, D]``: the rows at flat positions ``index`` (differentiable)."""
    B, H, S, D = x.shape
    return x.transpose(1, 2).reshape(B * S, H, D).index_select(0, index)


def repad(y: torch.Tensor, index: torch.Tensor, batch: int, seq_len: int) -> torch.Tensor:
    """``[total, H, D] -> [B, H, S, D]``, zeros where no segment wrote (padded queries output 0)."""
    total, H, D = y.shape
    out = y.new_zeros(batch * seq_len, H, D).index_copy(0, index, y)  # [B * S, H, D]
    return out.view(batch, seq_len, H, D).transpose(1, 2)


def flash_window(s: Structure) -> tuple[int, int]:
    """``(left, right)`` of a full/causal/window base in the FlashAttention convention.

    ``-1`` means unbounded; ``(-1, 0)`` is causal.  Per segment, bottom-right aligned:
    local query ``i`` of ``Lq`` may see local key ``j`` of ``Lk`` when
    ``i + Lk - Lq - left <= j <= i + Lk - Lq + right``.
    """
    if s.base == "full":
        return (-1, -1)
    if s.base == "causal":
        return (-1, 0)
    if s.base == "window":
        return (-1 if s.left is None else s.left, -1 if s.right is None else s.right)
    raise ValueError(f"no FlashAttention window for base {s.base!r}")
