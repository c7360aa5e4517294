"""Recognise the structure of a mask so backends can compile it natively.

Every mask is read as a conjunction::

    base  &  same_document  &  padding  &  (other terms, opaque)

where ``base`` is one of

    full        every key
    causal      kv <= q
    window          q - left <= kv <= q + right     (left/right None = unbounded)
    prefix_lm       kv <= q  or  kv < prefix[b]
    prefix_groups   kv <= q  or  group[kv] == group[q]   (``causal() | documents(group)``)

``prefix_groups`` is packed prefix-LM: each document's prompt is one group, every other token its
own, so a prompt sees its whole prompt and the rest is causal (documents narrow it to the row's
document).  With contiguous groups its keys are one interval ``[0, max(q, group_end(q))]``::

    group  7 7 7 -4 -5 8 8 -8        # doc 0: prompt of 3 + 2 answer tokens; doc 1: 2 + 1
           kv 0 1 2 3 4 5 6 7        (& documents([0 0 0 0 0 1 1 1]))
    q 0       # # # . . . . .
    q 3       # # # # . . . .
    q 5       . . . . . # # .
    q 7       . . . . . # # #

For every structured base, the keys a query row may see form one interval ``[lo(q), hi(q)]``;
documents (when contiguous) narrow it further, and padding removes single keys and whole rows.
``Structure.general`` holds whatever could not be recognised (custom/dense/negated/other unions);
a backend that needs pure structure declines when it is non-empty.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from . import masks as M


@dataclass(frozen=True, eq=False)
class Structure:
    base: str = "full"  # "full" | "causal" | "window" | "prefix_lm" | "prefix_groups"
    left: int | None = None  # window: kv >= q - left
    right: int | None = None  # window: kv <= q + right
    prefix: torch.Tensor | None = None  # [B|1] long, prefix_lm only
    documents: torch.Tensor | None = None  # [B|1, S] long
    valid: torch.Tensor | None = None  # [B|1, S] bool
    general: tuple[M.Mask, ...] = field(default=())
    groups: torch.Tensor | None = None  # [B|1, S] long, prefix_groups only

    @property
    def is_structured(self) -> bool:
        """True when nothing opaque is left (the mask is base & documents & padding)."""
        return not self.general

    @property
    def is_causal_like(self) -> bool:
        """Base never lets a query see a later key."""
        return self.base == "causal" or (self.base == "window" and self.right is not None and self.right <= 0)

    def kind(self) -> str:
        """Short human label, e.g. ``documents+causal+padding`` or ``general``."""
        if self.general:
            return "general"
        parts = []
        if self.documents is not None:
            parts.append("documents")
        parts.append(self.base)
        if self.valid is not None:
            parts.append("padding")
        return "+".join(parts)

    def to(self, device) -> "Structure":
        move = (lambda t: None if t is None else t.to(device))
        return Structure(self.base, self.left, self.right, move(self.prefix), move(self.documents),
                         move(self.valid), tuple(g.to(device) for g in self.general), move(self.groups))


def analyse(mask: M.Mask) -> Structure:
    """Split ``mask`` into base / documents / padding / general (see module docstring)."""
    terms = mask.terms if isinstance(mask, M.And) else (mask,)
    base = ("full", None, None, None)
    documents = valid = None
    general: list[M.Mask] = []
    for term in terms:
        leaf = _as_base(term)
        if leaf is not None:
            merged = _merge_base(base, leaf)
            if merged is None:
                general.append(term)
            else:
                base = merged
        elif isinstance(term, M.Documents) and documents is None:
            documents = term.ids
        elif isinstance(term, M.Padding):
            valid = term.valid if valid is None else _and_valid(valid, term.valid)
        else:
            general.append(term)
    kind, left, right, extra = base  # extra: prefix lengths (prefix_lm) or group ids (prefix_groups)
    prefix = extra if kind == "prefix_lm" else None
    groups = extra if kind == "prefix_groups" else None
    return Structure(kind, left, right, prefix, documents, valid, tuple(general), groups)


def _and_valid(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    if a.shape[-1] != b.shape[-1]:
        raise ValueError(f"padding: two padding terms of different lengths ({a.shape[-1]} and {b.shape[-1]})")
    return a & b.to(a.device)


def _as_base(term: M.Mask):
    """(kind, left, right, prefix) for base-like terms, else None."""
    if isinstance(term, M.Full):
        return ("full", None, None, None)
    if isinstance(term, M.Causal):
        return ("causal", None, 0, None)
    if isinstance(term, M.Window):
        return ("window", term.left, term.right, None)
    if isinstance(term, M.Or) and len(term.terms) == 2:
        a, b = term.terms
        if isinstance(a, M.Prefix) and isinstance(b, M.Causal):
            a, b = b, a
        if isinstance(a, M.Causal) and isinstance(b, M.Prefix):
            return ("prefix_lm", None, 0, b.lengths)
        if isinstance(a, M.Documents) and isinstance(b, M.Causal):
            a, b = b, a
        if isinstance(a, M.Causal) and isinstance(b, M.Documents):
            return ("prefix_groups", None, 0, b.ids)
    return None


_PREFIX_KINDS = ("prefix_lm", "prefix_groups")


def _merge_base(a, b):
    """Intersection of two base terms, or None when it is not itself a base."""
    if a[0] == "full":
        return _normalise(b)
    if b[0] == "full":
        return _normalise(a)
    if a[0] in _PREFIX_KINDS or b[0] in _PREFIX_KINDS:
        other = b if a[0] in _PREFIX_KINDS else a
        if other[0] == "causal":  # causal is a subset of both prefix kinds
            return other
        return None
    left = _tightest(a[1], b[1])
    right = _tightest(a[2], b[2])
    return _normalise(("window", left, right, None))


def _tightest(x: int | None, y: int | None) -> int | None:
    if x is None:
        return y
    if y is None:
        return x
    return min(x, y)


def _normalise(base):
    kind, left, right, prefix = base
    if kind == "window" and left is None and right == 0:
        return ("causal", None, 0, None)
    if kind == "window" and left is None and right is None:
        return ("full", None, None, None)
    if kind == "causal":
        return ("causal", None, 0, None)
    return base


def row_intervals(structure: Structure, batch: int, q_len: int, kv_len: int, device=None):
    """Per query row, the inclusive key interval ``[lo, hi]`` the base and documents allow.

    Returns ``lo, hi`` of shape ``[B, Sq]`` (long, absolute key positions; ``lo > hi`` = empty).
    Padding is *not* applied here.  Requires contiguous documents and groups
    (:func:`documents_are_contiguous`).
    """
    device = device or torch.device("cpu")
    q = torch.arange(kv_len - q_len, kv_len, device=device).expand(batch, q_len)  # [B, Sq]
    lo = torch.zeros_like(q)
    hi = torch.full_like(q, kv_len - 1)
    s = structure
    if s.base == "causal":
        hi = q.clone()
    elif s.base == "window":
        if s.left is not None:
            lo = (q - s.left).clamp(min=0)
        if s.right is not None:
            hi = (q + s.right).clamp(max=kv_len - 1)
    elif s.base == "prefix_lm":
        p = s.prefix.to(device).expand(batch)[:, None]  # [B, 1]
        hi = torch.maximum(q, p - 1).clamp(max=kv_len - 1)
    elif s.base == "prefix_groups":
        _, group_end = document_bounds(s.groups.to(device).expand(batch, kv_len))  # [B, Skv]
        hi = torch.maximum(q, group_end[:, kv_len - q_len:])
    if s.documents is not None:
        start, end = document_bounds(s.documents.to(device).expand(batch, kv_len))  # [B, S] each
        lo = torch.maximum(lo, start[:, kv_len - q_len:])
        hi = torch.minimum(hi, end[:, kv_len - q_len:])
    return lo, hi


def document_bounds(ids: torch.Tensor):
    """For ids ``[B, S]`` with contiguous documents: first and last position of each token's document."""
    B, S = ids.shape
    pos = torch.arange(S, device=ids.device).expand(B, S)
    new_doc = torch.ones_like(ids, dtype=torch.bool)
    new_doc[:, 1:] = ids[:, 1:] != ids[:, :-1]
    start = torch.where(new_doc, pos, torch.zeros_like(pos)).cummax(dim=1).values
    last = torch.ones_like(new_doc)
    last[:, :-1] = new_doc[:, 1:]
    end = torch.where(last, pos, torch.full_like(pos, S)).flip(1).cummin(dim=1).values.flip(1)
    return start, end


def documents_are_contiguous(ids: torch.Tensor) -> bool:
    """True when no document id reappears after another document started (per batch row;
    vectorised, one host sync)."""
    runs = (ids[:, 1:] != ids[:, :-1]).sum(dim=1)  # [B]
    ordered = ids.sort(dim=1).values
    distinct = (ordered[:, 1:] != ordered[:, :-1]).sum(dim=1)  # [B]
    return bool((runs == distinct).all())
