"""Build one attention call's anymask :class:`~anymask.Mask` from what transformers hands over.

Nothing here builds an ``S x S`` tensor: padding stays a ``[B, S]`` vector, packed documents stay a
``[B, S]`` id vector, and the base (causal / bidirectional / prefix-LM / window) stays a formula.
The pieces, for one layer of one forward call::

    mask = base  &  window (sliding layers)  &  documents (packed)  &  padding

Key positions are the layer's keys (for a sliding-window cache, only the last ``kv_len`` positions
the cache keeps); queries are the last ``q_len`` of them (``anymask``'s bottom-right convention)::

    prefill, q_len = kv_len = 5, prefix_lm(3),         decoding one token, q_len = 1, kv_len = 6
    left padding [0 1 1 1 1]

        . . . . .    <- padded query: output 0                 # # # # # #
        . # # . .
        . # # . .
        . # # # .
        . # # # #
"""

from __future__ import annotations

import functools
import sys
import warnings

import weakref
from dataclasses import dataclass, field
from typing import Callable

import torch

from . import masks
from ._identity_cache import IdentityLRU, version

SPEC_NAMES = ("causal", "bidirectional", "prefix_lm")


@dataclass(frozen=True)
class LayerKeys:
    """What transformers' mask factory knows about one layer's keys; our mask function returns it.

    ``padding``: ``[B, kv_len]`` bool (True = real token) for exactly this layer's keys, or None
    when nothing is padded.  ``q_offset`` / ``kv_offset``: absolute positions of the first query and
    the first key (a sliding-window cache drops old keys, so ``kv_offset`` can be > 0).
    ``local_size``: the sliding window (in tokens, self included) when transformers built this
    mask for a sliding layer.  ``local_inclusive``: transformers' own rule for this layer lets a
    query see keys exactly ``local_size`` away (its bidirectional sliding mask, ``|q - kv| <= w``:
    ModernBERT's local layers, decoders with ``config.is_causal=False``) instead of at most
    ``local_size - 1`` (causal windows, Gemma 3's bidirectional one)::

        w = 2, bidirectional     |q - kv| < w           |q - kv| <= w (local_inclusive)
                                 # # . . .              # # # . .
                                 # # # . .              # # # # .
                                 . # # # .              # # # # #

    ``own_rule``: what transformers' own rule for this call does between neighbouring tokens
    (``"sees-later"``, ``"one-way"``; see ``anymask.hf._own_rule``): an overlay on a causal or
    bidirectional rule (image-token blocks, a prompt block) shows there.
    """

    padding: torch.Tensor | None
    batch: int
    q_length: int
    kv_length: int
    q_offset: int
    kv_offset: int
    local_size: int | None = None
    local_inclusive: bool = False
    own_rule: frozenset[str] = frozenset()
    mask_given: bool = False  # the call passed an attention_mask (transformers then splits no packed rows)
    rule: Callable | None = field(default=None, compare=False, repr=False)  # transformers' mask_function

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """The 4-D mask this stands for, ``[B, 1, q_len, kv_len]``: transformers treats a mask
        that ``generate`` prepared in advance (static caches) as ready by its ``ndim``."""
        return (self.batch, 1, self.q_length, self.kv_length)

    @property
    def ndim(self) -> int:
        return 4


def check_spec(spec) -> None:
    """Raise ``ValueError``/``TypeError`` for anything that is not a spec name or a Mask."""
    if isinstance(spec, masks.Mask):
        return
    if not isinstance(spec, str):
        raise TypeError(f"mask spec must be one of {SPEC_NAMES} or an anymask Mask, got {type(spec).__name__}")
    if spec not in SPEC_NAMES:
        raise ValueError(f"unknown mask spec {spec!r}; use one of {SPEC_NAMES} or an anymask Mask")


_PER_CALL = ("position_ids", "cu_seq_lens_k", "prefix_lengths", "token_type_ids")
_BUILT = IdentityLRU(4)  # recent masks by what they were built from: full + sliding layers, and room


def build_mask(spec, keys: LayerKeys | None, q_len: int, kv_len: int, batch: int, *, reach: int | None,
               training: bool, kwargs: dict) -> masks.Mask:
    """The mask of one attention call (see module docstring).

    ``kv_len``/``q_len``: the sizes of this call's keys and queries (after any static-cache trim).
    ``reach``: a sliding layer's window as the farthest key a query sees on either side,
    ``|q - kv| <= reach`` (``w - 1`` for transformers' usual window of ``w`` tokens, self included),
    or None.  ``kwargs``: the attention function's keyword arguments (``position_ids``,
    ``cu_seq_lens_k``, ``token_type_ids``, ``prefix_lengths``).

    Every layer of one forward gets the same ``keys`` object and the same keyword tensors, so the
    layers share one Mask object: backends that compile a mask (a dense tensor, a block mask)
    then do it once per forward, not once per layer.
    """
    if keys is None:
        return _build(spec, keys, q_len, kv_len, batch, reach, training, kwargs)
    anchors = (keys, spec, *(kwargs.get(name) for name in _PER_CALL))
    versions = tuple(version(a) if isinstance(a, torch.Tensor) else None for a in anchors)
    return _BUILT.get(anchors, (versions, q_len, kv_len, batch, reach, training),
                      lambda: _build(spec, keys, q_len, kv_len, batch, reach, training, kwargs))


def _build(spec, keys, q_len, kv_len, batch, reach, training, kwargs) -> masks.Mask:
    first_key = keys.kv_offset if keys is not None else 0  # absolute position of key 0
    no_past = (keys.q_offset == 0) if keys is not None else q_len == kv_len
    valid = _fit_padding(keys.padding, kv_len) if keys is not None and keys.padding is not None else None
    ids = _document_ids(kwargs, q_len, kv_len, batch, valid)
    if ids is not None and keys is not None and keys.mask_given and kwargs.get("cu_seq_lens_k") is None:
        _warn_split_where_transformers_joins("attention_mask")
    elif ids is not None and keys is not None and kwargs.get("cu_seq_lens_k") is None and _joined_by_rule(keys, ids):
        _warn_split_where_transformers_joins("cache")
    mask = _base(spec, q_len, kv_len, batch, first_key, no_past, training, kwargs, ids)
    if reach is not None:  # |q - kv| <= reach (kv <= q already bounds it on the right when causal)
        mask = mask & masks.window(reach, reach)
    if ids is not None:
        mask = mask & masks.documents(ids)
    if valid is not None:
        mask = mask & masks.padding(valid)
    return mask


def _joined_by_rule(keys: LayerKeys, ids: torch.Tensor) -> bool:
    """Whether transformers' own rule for this call lets the first query after a document boundary
    see the key before it (it splits packed rows only where no attention_mask and no cache are
    passed; a plain forward makes a cache: ``use_cache`` defaults to True)."""
    if keys.rule is None:
        return False
    from .hf import _ask

    q_start = ids.shape[-1] - keys.q_length  # first query's column in ids
    starts = (ids[:, 1:] != ids[:, :-1]).nonzero()  # [n, 2]: (row, column - 1) of each document start
    starts = starts[starts[:, 1] + 1 >= q_start]
    if starts.numel() == 0:
        return False
    row, col = (int(x) for x in starts[0])
    q = torch.tensor([keys.kv_offset + col + 1], device=ids.device)
    seen = _ask(keys.rule, ids.shape[0], q, q - 1, "whether it splits packed rows")
    return seen is not None and bool(seen[row, 0])


_WHY_TRANSFORMERS_JOINS = {
    "attention_mask": "transformers' sdpa/eager split rows only when no attention_mask is passed (and there is "
                      "no cache), so with this attention_mask they would attend across them. For packed rows this "
                      "is what you want",
    "cache": "transformers' sdpa/eager do not split here because the call has a cache (use_cache defaults to "
             "True, also in training; Trainer passes use_cache=False), so they attend across them. For packed "
             "rows this is what you want (pass use_cache=False to make sdpa agree)",
}


@functools.lru_cache(maxsize=None)
def _warn_split_where_transformers_joins(why: str) -> None:
    """Once per ``why`` (a key of :data:`_WHY_TRANSFORMERS_JOINS`): anymask split packed rows that
    transformers' own attention would run as one sequence."""
    warnings.warn(
        "anymask.hf: position_ids that restart or jump split this call into packed documents, which attend "
        f"only within themselves; {_WHY_TRANSFORMERS_JOINS[why]}; for one sequence with gapped positions (PoSE), "
        "pass position_ids that step by 1 and give the gaps another way, or use attn_implementation='sdpa'",
        stacklevel=6)


@functools.lru_cache(maxsize=1)
def _warn_prompt_in_chunks() -> None:
    warnings.warn(
        "anymask.hf: prefix_lm without prefix_lengths= takes a call's tokens as the prefix only when nothing is "
        "cached; this call adds several tokens to a cache (a chunked prefill, generate() continuing from "
        "past_key_values), so they run causally and the prefix ends where the first call ended. Send the whole "
        "prompt in one call (no prefill_chunk_size) or pass prefix_lengths= to a forward", stacklevel=6)


def _in_assisted_generation() -> bool:
    """Whether this call runs inside transformers' assisted decoding (an assistant model or prompt
    lookup), whose model calls carry guessed tokens after the real ones."""
    frame = sys._getframe(1)
    for _ in range(64):
        if frame is None:
            return False
        if frame.f_code.co_name == "_assisted_decoding" and "transformers" in frame.f_code.co_filename:
            return True
        frame = frame.f_back
    return False


def _base(spec, q_len, kv_len, batch, first_key, no_past, training, kwargs, ids) -> masks.Mask:
    if kwargs.get("prefix_lengths") is not None and spec != "prefix_lm":
        raise ValueError(f"prefix_lengths= applies to the 'prefix_lm' spec, but this call's spec is {spec!r}: "
                         "pass anymask_mask='prefix_lm' with it (or set_mask(model, 'prefix_lm'))")
    if isinstance(spec, masks.Mask):
        if first_key and not _relative(spec):
            raise ValueError(f"this layer's cache dropped its first {first_key} keys (a sliding-window cache), "
                             f"and the mask {spec!r} depends on absolute positions, which the layer's keys no "
                             "longer start at; use the 'prefix_lm' spec with prefix_lengths=, or a full cache")
        return spec
    if spec == "causal":
        return masks.causal()
    if spec == "bidirectional":
        return masks.full()
    if kwargs.get("prefix_lengths") is not None and ids is not None:
        raise ValueError("prefix_lengths= gives one prefix per row, but this row packs several documents: "
                         "pass token_type_ids (0 = prefix, 1 = continuation) to give each document its prefix")
    _check_token_types(kwargs, q_len, kv_len, batch, first_key)
    groups = _prefix_groups(kwargs, kv_len, first_key, ids)
    if groups is not None:
        return masks.causal() | masks.documents(groups)
    prefix = _prefix_lengths(kwargs, kv_len, first_key)
    if prefix is None:
        if training:
            raise ValueError("prefix_lm needs the prefix per call when training: pass prefix_lengths=[...] "
                             "(one per row, in tokens from the start of the row) or token_type_ids "
                             "(0 = prefix, 1 = continuation) to the model's forward; to generate, call "
                             "model.eval() first (the model is in training mode)")
        # Inference without an explicit prefix: the first call's tokens (the prompt) are the prefix,
        # later calls (decoding with a cache) continue causally.
        if _in_assisted_generation():
            raise ValueError("prefix_lm without prefix_lengths= takes a call's tokens as the prefix when nothing is "
                             "cached, but assisted generation (assistant_model=, prompt_lookup_num_tokens=) sends "
                             "the prompt together with its guessed tokens: they would join the prefix. Give the "
                             "prefix as a mask instead: anymask.hf.set_mask(model, anymask.masks.prefix_lm(n)) "
                             "for a prompt of n tokens")
        if not no_past and q_len > 1:
            _warn_prompt_in_chunks()
        return masks.full() if no_past else masks.causal()
    return masks.prefix_lm(prefix)


def _relative(mask: masks.Mask) -> bool:
    """Whether ``mask`` depends only on ``q - kv`` (full, causal, windows and their combinations)."""
    if isinstance(mask, (masks.Full, masks.Causal, masks.Window)):
        return True
    children = mask.children() if hasattr(mask, "children") else ()
    return bool(children) and all(_relative(c) for c in children)


def _check_token_types(kwargs, q_len: int, kv_len: int, batch: int, first_key: int) -> None:
    """``token_type_ids`` for prefix_lm: ``[B, T]`` of 0/1 (or bool), T = this call's tokens or every position so
    far, and not together with ``prefix_lengths`` (one host sync, once per forward: the mask is cached)."""
    types = kwargs.get("token_type_ids")
    if types is None:
        return
    if kwargs.get("prefix_lengths") is not None:
        raise ValueError("give the prefix once: prefix_lengths= or token_type_ids, not both")
    total = first_key + kv_len
    if types.dim() != 2 or types.shape[0] not in (1, batch) or types.shape[1] not in (q_len, total):
        spans = f"{q_len} (this call's tokens)" + (f" or {total} (every position so far)" if total != q_len else "")
        raise ValueError(f"token_type_ids of shape {list(types.shape)} do not fit this call: give [{batch}, T] "
                         f"with T = {spans}")
    if types.dtype != torch.bool and bool(((types != 0) & (types != 1)).any()):
        shown = types[(types != 0) & (types != 1)][0].item()
        raise ValueError(f"token_type_ids for prefix_lm hold 0 (prefix) and 1 (continuation) only, got {shown}")


def _prefix_groups(kwargs, kv_len: int, first_key: int, ids) -> torch.Tensor | None:
    """``[B, kv_len]`` prefix groups when ``token_type_ids`` mark several prefixes in a row (packed
    documents, each with its prompt), for ``causal() | documents(groups)``: each run of prefix
    tokens is one group, every continuation token its own.  None when each row has at most one
    prefix, at its start (``prefix_lm(lengths)`` then), or the types do not cover every key::

        token_type_ids   0 0 1 1 0 0 0 1        (two documents: prompt, answer; prompt, answer)
        groups           0 0 -3 -4 2 2 2 -8
    """
    types = kwargs.get("token_type_ids")
    if types is None or types.dim() != 2 or types.shape[-1] != first_key + kv_len:
        return None
    is_cont = types[:, first_key:] != 0  # [B, kv_len]
    seen_cont = is_cont.long().cumsum(-1)  # [B, kv_len] continuation tokens so far
    if ids is None and not bool((~is_cont & (seen_cont > 0)).any()):
        return None
    pos = torch.arange(kv_len, device=types.device)
    return torch.where(is_cont, -1 - pos, seen_cont)


def _prefix_lengths(kwargs, kv_len: int, first_key: int) -> torch.Tensor | None:
    """Per-row prefix length in this call's key coordinates, or None when none was given."""
    given = kwargs.get("prefix_lengths")
    if given is not None:
        lengths = torch.as_tensor(given).reshape(-1)
        if lengths.dtype.is_floating_point or lengths.dtype == torch.bool or lengths.is_complex():
            raise TypeError(f"prefix_lengths must be integers (tokens from the start of each row), got {lengths.dtype}")
        if lengths.numel() and int(lengths.min()) < 0:
            raise ValueError(f"prefix_lengths must be >= 0, got {lengths.tolist()}")
        return (lengths.long() - first_key).clamp(0, kv_len)
    types = kwargs.get("token_type_ids")
    if types is None:
        return None
    # types: [B, T]; T covers this call's queries, or every position so far
    total = first_key + kv_len
    T = types.shape[-1]
    is_cont = types != 0
    none = torch.full_like(is_cont[:, 0], T, dtype=torch.long)
    first_cont = torch.where(is_cont.any(-1), is_cont.int().argmax(-1), none)  # [B]
    return (first_cont.long() + (total - T) - first_key).clamp(0, kv_len)


_LAST_IDS: list = []  # [(source weakref, versions and sizes, ids, padding weakref)]: one entry, reused across layers


def _document_ids(kwargs, q_len: int, kv_len: int, batch: int,
                  valid: torch.Tensor | None = None) -> torch.Tensor | None:
    """Cached :func:`_find_document_ids`: every layer of one forward gets the same ``position_ids``
    / ``cu_seq_lens_k`` tensor, so the (host-synchronising) detection runs once per forward."""
    source = kwargs.get("cu_seq_lens_k")
    source = kwargs.get("position_ids") if source is None else source
    if source is None:
        return None
    if source.is_inference() or (valid is not None and valid.is_inference()):  # no version counter: not cached
        return _find_document_ids(kwargs, q_len, kv_len, batch, valid)
    key = (source._version, q_len, kv_len, batch, None if valid is None else valid._version)
    entry = _LAST_IDS[0] if _LAST_IDS else None
    if (entry is not None and entry[0]() is source and entry[1] == key
            and (entry[3] is None if valid is None else entry[3]() is valid)):
        return entry[2]
    ids = _find_document_ids(kwargs, q_len, kv_len, batch, valid)
    _LAST_IDS[:] = [(weakref.ref(source), key, ids, None if valid is None else weakref.ref(valid))]
    return ids


def _find_document_ids(kwargs, q_len: int, kv_len: int, batch: int,
                       valid: torch.Tensor | None = None) -> torch.Tensor | None:
    """``[B|1, kv_len]`` document ids of packed rows, or None when every row is one document.

    From ``cu_seq_lens_k`` (TRL's ``DataCollatorWithFlattening``) when given, else from resets of
    ``position_ids``: a new document starts wherever a real token's position does not step by +1
    from the previous real token's.  Padding (``valid`` ``[B, kv_len]``) is skipped over, its slots
    counted or not: the positions ``generate()`` (or ``arange``) gives a row with padding in the
    middle are one document::

        position_ids  0 1 2 0 1 0 1 2 3        0 1 2 1 1 3 4 5 6
        valid                                  1 1 1 0 0 1 1 1 1
        document      0 0 0 1 1 2 2 2 2        0 0 0 0 0 0 0 0 0

    Only a call whose queries are its keys (no cache past) can be split; decoding calls see one
    document.
    """
    cu = kwargs.get("cu_seq_lens_k")
    if cu is not None:
        cu = cu.reshape(-1)
        if int(cu[-1]) == kv_len and batch == 1:
            pos = torch.arange(kv_len, device=cu.device)
            ids = torch.searchsorted(cu[1:-1].to(pos.dtype).contiguous(), pos, right=True)
            return ids.unsqueeze(0) if int(ids[-1]) > 0 else None
        if q_len == kv_len:
            raise ValueError(f"cu_seq_lens_k ends at {int(cu[-1])} but the call has {kv_len} keys in batch "
                             f"{batch}; packed inputs must be one row of exactly the packed tokens")
        return None
    pos = kwargs.get("position_ids")
    if pos is None or q_len != kv_len or pos.dim() != 2 or pos.shape[-1] != kv_len:
        return None
    if valid is None:
        step = torch.diff(pos, dim=-1) != 1  # [B|1, S-1]
    else:
        valid = valid.to(pos.device)
        pos = pos.expand(valid.shape[0], -1)  # [B, S]
        index = torch.arange(kv_len, device=pos.device).expand_as(pos)
        last_real = torch.where(valid, index, -1).cummax(dim=-1).values  # [B, S]: latest real token at or before
        before = last_real[:, :-1]  # [B, S-1]: the real token before each position from 1 on
        previous = pos.gather(-1, before.clamp(min=0))  # its position id
        # one document goes on when positions count real tokens (+1) or every slot (+ the gap)
        goes_on = (pos[:, 1:] == previous + 1) | (pos[:, 1:] == previous + index[:, 1:] - before)
        step = valid[:, 1:] & (before >= 0) & ~goes_on
    if not bool(step.any()):
        return None
    ids = torch.zeros_like(pos)
    ids[:, 1:] = step.long().cumsum(-1)
    return ids


def _fit_padding(valid: torch.Tensor, kv_len: int) -> torch.Tensor:
    """Right-align the padding vector to this call's keys (the keys are the last ``kv_len``)."""
    if valid.shape[-1] == kv_len:
        return valid
    if valid.shape[-1] > kv_len:
        return valid[:, -kv_len:]
    raise ValueError(f"attention_mask covers {valid.shape[-1]} positions but the layer has {kv_len} keys")
