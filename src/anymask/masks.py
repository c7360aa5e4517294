"""Composable attention masks: what may attend to what.

A mask answers, for batch ``b``, head ``h``, query position ``q`` and key position ``kv``:
may ``q`` see ``kv``?  Positions are **absolute**.  When a call has fewer queries than keys
(``q_len < kv_len``, decoding with a KV cache) the queries are the *last* ``q_len`` positions
(bottom-right alignment)::

    causal(), q_len = 3, kv_len = 6        (queries are positions 3, 4, 5)

              kv 0 1 2 3 4 5
        q 3      # # # # . .
        q 4      # # # # # .
        q 5      # # # # # #

Masks compose with ``&`` (both allow), ``|`` (either allows) and ``~`` (negation)::

    prefix_lm(2), same as causal() | prefix(2)  documents(lengths=[2, 3]) & causal()

        # # . . .                                  # . . . .
        # # . . .                                  # # . . .
        # # # . .                                  . . # . .
        # # # # .                                  . . # # .
        # # # # #                                  . . # # #

Packed prefix-LM (each document's prompt bidirectional, the rest causal) composes the same way:
a document's prompt tokens share a group id, every other token is its own group::

    documents(lengths=[3, 2]) & (causal() | documents([0, 0, -3, 1, -5]))

        # # . . .           doc 0: prompt of 2, then 1 answer token
        # # . . .           doc 1: prompt of 1, then 1 answer token
        # # # . .
        . . . # .
        . . . # #

Masks are immutable: constructors copy their inputs (``dense`` excepted), and backends cache
what they compile from a mask object (BlockMasks, tile lists, dense tensors).

A query row that sees no key outputs exactly 0 (and receives zero gradient) on every backend.
``padding(valid)`` hides padded keys *and* padded queries.

``Mask.to_dense`` is the oracle every compiled form is tested against.  The terms keep their
structure (document ids, prefix lengths, window sizes, padding) so that backends can compile them
natively without ever building an ``S x S`` tensor; see :func:`anymask.structure.analyse`.
"""

from __future__ import annotations

import functools
import itertools
import numbers
import operator
import types
import warnings
import weakref
from typing import Callable, Iterable, Sequence

import torch

from ._identity_cache import version

MaskMod = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class Mask:
    """Base class of every mask term.  Build masks with the constructors below, not directly.

    A mask's settings are fixed once built (``m.left = 100`` raises): its dense form, FlexAttention
    plan and ``auto``'s choice are cached on it, and would silently keep the old window.  Tensors it
    holds may be edited in place; the caches notice (their version counters are part of the key).
    """

    def __setattr__(self, name: str, value) -> None:
        if name in self.__dict__:
            raise AttributeError(
                f"{type(self).__name__}.{name} cannot change once the mask is built: its caches (dense "
                "form, plans, auto's choice) keep the old value. Build a new mask instead (e.g. "
                "anymask.masks.window(100) for a wider window)")
        object.__setattr__(self, name, value)

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"{type(self).__name__}.{name} cannot be removed: masks are fixed once built")

    def mask_mod(self, b: torch.Tensor, h: torch.Tensor, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        """FlexAttention-style predicate on absolute positions; index tensors broadcast."""
        raise NotImplementedError

    def validate(self, batch: int, heads: int, q_len: int, kv_len: int) -> None:
        """Raise ``ValueError`` when this mask cannot describe a call of these sizes."""

    def to(self, device: torch.device | str) -> "Mask":
        """This mask with its tensors on ``device`` (cached: repeated calls are free)."""
        return self

    def children(self) -> tuple["Mask", ...]:
        return ()

    # composition -------------------------------------------------------------------------
    def __and__(self, other: "Mask") -> "Mask":
        _check_mask(other, "&")
        return And(_flatten(And, (self, other)))

    def __or__(self, other: "Mask") -> "Mask":
        _check_mask(other, "|")
        return Or(_flatten(Or, (self, other)))

    def __rand__(self, other) -> "Mask":  # ``3 & mask``: the clear TypeError of ``mask & 3``
        return self & other

    def __ror__(self, other) -> "Mask":
        return self | other

    def __invert__(self) -> "Mask":
        return Not(self)

    # oracle ------------------------------------------------------------------------------
    def to_dense(self, batch: int, heads: int, q_len: int, kv_len: int, device=None) -> torch.Tensor:
        """The mask as a bool tensor ``[batch, heads, q_len, kv_len]`` (True = may attend)."""
        batch, heads, q_len, kv_len = _check_sizes(batch, heads, q_len, kv_len)
        check_not_meta(self)
        self.validate(batch, heads, q_len, kv_len)
        device = torch.device(device) if device is not None else self._default_device()
        m = self.to(device)
        b = torch.arange(batch, device=device).view(-1, 1, 1, 1)  # [B, 1, 1, 1]
        h = torch.arange(heads, device=device).view(1, -1, 1, 1)  # [1, H, 1, 1]
        q = torch.arange(kv_len - q_len, kv_len, device=device).view(1, 1, -1, 1)  # [1, 1, Sq, 1]
        kv = torch.arange(kv_len, device=device).view(1, 1, 1, -1)  # [1, 1, 1, Skv]
        out = expand_mask_mod_output(self, m.mask_mod(b, h, q, kv), (batch, heads, q_len, kv_len))
        return out.contiguous()

    def picture(self, q_len: int = 12, kv_len: int | None = None, *, batch: int = 0, head: int = 0,
                batch_size: int | None = None) -> str:
        """ASCII grid of one batch row / head: ``#`` may attend, ``.`` may not.  The mask is built for
        ``batch_size`` rows (default: as many as its tensors hold, at least ``batch + 1``)."""
        kv_len = q_len if kv_len is None else kv_len
        held_batch, held_heads = _held_sizes(self)
        if batch_size is not None:
            _check_drawn("batch", batch, batch_size, f"batch_size={batch_size}")
        elif held_batch > 1:
            _check_drawn("batch", batch, held_batch, f"{self!r} holds {held_batch} batch rows, 0 to {held_batch - 1}")
        batch_size = batch_size or max(held_batch, _drawn_index("batch", batch) + 1)
        if held_heads > 1:
            _check_drawn("head", head, held_heads, f"{self!r} holds {held_heads} heads, 0 to {held_heads - 1}")
        heads = max(held_heads, _drawn_index("head", head) + 1)
        grid = self.to_dense(batch_size, heads, q_len, kv_len, device="cpu")[batch, head]
        return "\n".join(" ".join("#" if x else "." for x in row.tolist()) for row in grid)

    def _default_device(self) -> torch.device:
        for t in _tensors(self):
            return t.device
        return torch.device("cpu")


def _held_sizes(mask: Mask) -> tuple[int, int]:
    """The batch rows and heads the tensors of ``mask``'s terms hold (1 where they broadcast)."""
    leaves = [leaf for leaf in _leaves(mask) if isinstance(leaf, _TensorMask)]
    batch = max((t.shape[0] for leaf in leaves for t in _tensors(leaf) if t.dim()), default=1)
    heads = max((leaf.tensor.shape[1] for leaf in leaves if isinstance(leaf, Dense)), default=1)
    return batch, heads


def _drawn_index(name: str, index) -> int:
    """``picture``'s batch row or head: an int of 0 or more."""
    if isinstance(index, bool) or not isinstance(index, int) or index < 0:
        raise ValueError(f"picture: {name} must be an int of 0 or more, got {index!r}")
    return index


def _check_drawn(name: str, index, size: int, why: str) -> None:
    """``picture``: a batch row or head outside the mask is a clear error, not a shape mismatch."""
    if _drawn_index(name, index) >= size:
        raise ValueError(f"picture: {name} {index} is out of range ({why})")


def check_not_meta(mask: Mask) -> None:
    """A clear error for a mask holding meta tensors (no values to read lengths or ids from)."""
    if any(t.is_meta for t in _tensors(mask)):
        raise ValueError(f"{mask!r} holds meta tensors: a mask needs its values (lengths, ids, valid "
                         "flags); build it from real tensors")


def _tensors(mask: Mask):
    for value in vars(mask).values():
        if isinstance(value, torch.Tensor):
            yield value
    for child in mask.children():
        yield from _tensors(child)


def _captured(fn, depth: int = 0, budget: list | None = None):
    """Tensors a custom ``mask_mod`` reads besides its arguments: closure cells, defaults, globals it
    names, a bound method's object or a callable object's attributes, a ``functools.partial``'s
    arguments; looked for inside lists, tuples, dicts and plain objects (an ``nn.Module``'s
    buffers and parameters too), and in the functions those name: three levels deep, the first 256
    items of a container, 4096 values in all."""
    values = [*(getattr(fn, "__defaults__", None) or ()), *(getattr(fn, "args", None) or ()),
              *((getattr(fn, "keywords", None) or {}).values())]
    for cell in getattr(fn, "__closure__", None) or ():
        try:
            values.append(cell.cell_contents)
        except ValueError:  # an empty cell
            pass
    code, scope = getattr(fn, "__code__", None), getattr(fn, "__globals__", {})
    names = code.co_names if code else ()
    values += [scope[n] for n in names if n in scope]
    # A module or class it reads is not searched whole; the attributes the code names are (``state.ids``).
    values += [vars(v)[n] for v in list(values) if isinstance(v, (types.ModuleType, type))
               for n in names if n in vars(v)]
    values.append(getattr(fn, "__self__", None))  # a bound method's object
    if isinstance(fn, functools.partial):
        values.append(fn.func)
    elif code is None and hasattr(fn, "__dict__"):  # a callable object
        values += list(vars(fn).values())
    seen: set[int] = {id(fn)}
    budget = [_SEARCH_NODES] if budget is None else budget
    for value in values:
        yield from _tensors_within(value, depth, seen, budget)


_SEARCH_DEPTH = 3  # container / attribute / function levels followed from a mask_mod
_SEARCH_WIDTH = 256  # items looked at per container
_SEARCH_NODES = 4096  # values looked at per mask_mod in all: a big global table costs little per call


def _tensors_within(value, depth: int, seen: set, budget: list):
    if budget[0] <= 0:
        return
    budget[0] -= 1
    if isinstance(value, torch.Tensor):
        yield value
        return
    if depth >= _SEARCH_DEPTH or id(value) in seen or value is None or isinstance(
            value, (str, bytes, int, float, bool, complex, type, types.ModuleType)):
        return
    seen.add(id(value))
    if isinstance(value, dict):
        items = value.values()
    elif isinstance(value, (list, tuple, set, frozenset)):
        items = value
    elif isinstance(value, (types.FunctionType, types.MethodType, functools.partial)):
        yield from _captured(value, depth + 1, budget)
        return
    elif hasattr(value, "__dict__"):
        items = vars(value).values()
    else:
        return
    for item in itertools.islice(items, _SEARCH_WIDTH):
        yield from _tensors_within(item, depth + 1, seen, budget)


class MaskModOutputError(TypeError):
    """A custom ``mask_mod`` returned something other than a bool tensor: the user's code, which
    every backend that evaluates it would find alike (``auto`` does not fall back on it)."""


def expand_mask_mod_output(mask: Mask, out, shape: tuple[int, int, int, int]) -> torch.Tensor:
    """``out`` (what ``mask``'s mask_mod returned for index grids of ``shape`` = ``[B, H, R, Skv]``)
    expanded to ``shape``; a clear error naming the mask when it is not a bool tensor of that shape."""
    if not isinstance(out, torch.Tensor) or out.dtype != torch.bool:
        raise MaskModOutputError(f"mask_mod of {mask!r} must return a bool tensor, got {type(out).__name__}"
                                 + (f" of {out.dtype}" if isinstance(out, torch.Tensor) else ""))
    try:
        ok = torch.broadcast_shapes(out.shape, shape) == torch.Size(shape)
    except RuntimeError:
        ok = False
    if not ok:
        raise ValueError(f"mask_mod of {mask!r} returned shape {list(out.shape)} for index grids of "
                         f"[B, H, Sq, Skv] = {list(shape)}: it must broadcast to that shape (use b, h, q_idx "
                         "and kv_idx elementwise, as FlexAttention's mask_mod does)")
    return out.expand(shape)


def stamp(mask: Mask) -> tuple:
    """Identity, storage and version counter of every tensor ``mask`` holds or its custom
    ``mask_mod`` reads: caches of what is derived from a mask key on it, so in-place edits of those
    tensors are seen, and so is a global the ``mask_mod`` reads being rebound to a new tensor (even
    one the allocator put at a freed tensor's address, with the same version count)."""
    held, fns = _held(mask)
    if not (held or fns):
        return ()
    if fns:  # what a mask_mod reads is looked up on every call: a global may be rebound
        read = tuple(t for fn in fns for t in _captured(fn))
        if any(t.is_inference() for t in read):
            _warn_unversioned()
        held += read
    return tuple((_token(t), _address(t), version(t)) for t in held)


_HELD: "weakref.WeakKeyDictionary[Mask, tuple]" = weakref.WeakKeyDictionary()


def _held(mask: Mask) -> tuple[tuple[torch.Tensor, ...], tuple[MaskMod, ...]]:
    """The tensors ``mask`` holds and its custom ``mask_mod`` functions, found once per mask: its
    settings are fixed once built (``stamp`` runs on every attention call).  The functions, not their
    ``Custom`` leaves: a bare ``custom()`` is its own leaf, and would keep its weak key alive."""
    held = _HELD.get(mask)
    if held is None:
        held = _HELD[mask] = (tuple(_tensors(mask)), tuple(m.fn for m in _leaves(mask) if isinstance(m, Custom)))
    return held


_TOKENS = itertools.count()


def _token(t: torch.Tensor) -> int:
    """A number for this tensor object, never given to another (``id`` is, once the object dies)."""
    token = getattr(t, "_anymask_token", None)
    if token is None:
        token = next(_TOKENS)
        try:
            t._anymask_token = token
        except (AttributeError, RuntimeError):  # a tensor type that takes no attributes: its id
            return id(t)
    return token


def _address(t: torch.Tensor):
    try:
        return t.data_ptr()
    except RuntimeError:  # tensor subclasses without storage (a sharded DTensor): its identity
        return id(t)


@functools.lru_cache(maxsize=1)
def _warn_unversioned() -> None:
    warnings.warn("anymask: a custom mask_mod reads a tensor made under torch.inference_mode(); PyTorch keeps "
                  "no version counter for those, so an in-place edit of it is not seen by the masks anymask "
                  "caches: make a new mask after editing it (or create the tensor outside inference_mode)",
                  RuntimeWarning, stacklevel=4)


def _leaves(mask: Mask):
    yield mask
    for child in mask.children():
        yield from _leaves(child)


def _check_mask(other, op: str) -> None:
    if not isinstance(other, Mask):
        raise TypeError(f"cannot combine a Mask with {type(other).__name__} using {op!r}; "
                        "build masks with anymask.masks constructors")


def _check_sizes(batch: int, heads: int, q_len: int, kv_len: int) -> tuple[int, int, int, int]:
    """The four sizes as Python ints (NumPy and other integers taken; bools are not sizes)."""
    for name, value in (("batch", batch), ("heads", heads), ("q_len", q_len), ("kv_len", kv_len)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    batch, heads, q_len, kv_len = (int(x) for x in (batch, heads, q_len, kv_len))
    if q_len > kv_len:
        raise ValueError(f"q_len ({q_len}) must not exceed kv_len ({kv_len}): queries are the last "
                         "q_len of the kv_len positions")
    return batch, heads, q_len, kv_len


def _flatten(kind, terms) -> tuple[Mask, ...]:
    out: list[Mask] = []
    for t in terms:
        out.extend(t.terms if type(t) is kind else (t,))
    return tuple(out)


class _TensorMask(Mask):
    """A term holding tensors; ``to(device)`` copies once per device and caches the copy until a
    tensor it holds is edited in place (a ``dense`` mask keeps the caller's tensor)."""

    def to(self, device):
        device = torch.device(device)
        if all(t.device == device for t in _tensors(self)):
            return self
        cache = self.__dict__.setdefault("_device_cache", {})
        now = stamp(self)
        held = cache.get(device)
        if held is None or held[0] != now:
            clone = object.__new__(type(self))
            clone.__dict__.update({k: (v.to(device) if isinstance(v, torch.Tensor) else v)
                                   for k, v in vars(self).items() if k != "_device_cache"})
            held = cache[device] = (now, clone)
        return held[1]


# leaves -----------------------------------------------------------------------------------------


class Full(Mask):
    def mask_mod(self, b, h, q, kv):
        return torch.ones_like(q >= 0) & (kv >= 0)

    def __repr__(self):
        return "full()"


class Causal(Mask):
    def mask_mod(self, b, h, q, kv):
        return kv <= q

    def __repr__(self):
        return "causal()"


class Window(Mask):
    def __init__(self, left: int | None, right: int | None):
        self.left, self.right = left, right

    def mask_mod(self, b, h, q, kv):
        ok = torch.ones_like(q >= 0) & (kv >= 0)
        if self.left is not None:
            ok = ok & (kv >= q - self.left)
        if self.right is not None:
            ok = ok & (kv <= q + self.right)
        return ok

    def __repr__(self):
        return f"window({self.left}, {self.right})"


class Documents(_TensorMask):
    def __init__(self, ids: torch.Tensor):
        self.ids = ids  # [B or 1, S] long

    def validate(self, batch, heads, q_len, kv_len):
        if self.ids.shape[-1] != kv_len:
            raise ValueError(f"documents: ids cover {self.ids.shape[-1]} positions but the keys have "
                             f"kv_len={kv_len}")
        if self.ids.shape[0] not in (1, batch):
            raise ValueError(f"documents: ids have batch {self.ids.shape[0]}, expected 1 or {batch}")

    def mask_mod(self, b, h, q, kv):
        rows = b if self.ids.shape[0] > 1 else torch.zeros_like(b)
        return self.ids[rows, q] == self.ids[rows, kv]

    def __repr__(self):
        return f"documents(ids of shape {list(self.ids.shape)})"


class Padding(_TensorMask):
    def __init__(self, valid: torch.Tensor):
        self.valid = valid  # [B, S] bool

    def validate(self, batch, heads, q_len, kv_len):
        if tuple(self.valid.shape) != (batch, kv_len) and tuple(self.valid.shape) != (1, kv_len):
            raise ValueError(f"padding: valid has shape {list(self.valid.shape)}, expected "
                             f"[{batch}, {kv_len}] (batch, kv_len)")

    def mask_mod(self, b, h, q, kv):
        rows = b if self.valid.shape[0] > 1 else torch.zeros_like(b)
        return self.valid[rows, q] & self.valid[rows, kv]

    def __repr__(self):
        return f"padding(valid of shape {list(self.valid.shape)})"


class Prefix(_TensorMask):
    def __init__(self, lengths: torch.Tensor):
        self.lengths = lengths  # [B or 1] long

    def validate(self, batch, heads, q_len, kv_len):
        if self.lengths.shape[0] not in (1, batch):
            raise ValueError(f"prefix: {self.lengths.shape[0]} lengths given for batch {batch}")
        held = self.__dict__.get("_longest")  # (version, value): reading it every call would wait for
        now = version(self.lengths)  # the GPU every call; read again after an in-place edit
        if held is None or held[0] != now:
            held = self.__dict__["_longest"] = (now, int(self.lengths.max()))
        longest = held[1]
        if longest > kv_len:
            raise ValueError(f"prefix: length {longest} exceeds kv_len={kv_len}")

    def mask_mod(self, b, h, q, kv):
        rows = b if self.lengths.shape[0] > 1 else torch.zeros_like(b)
        return (kv < self.lengths[rows]) & (q >= 0)

    def __repr__(self):
        return f"prefix({self.lengths.tolist()})"


class Custom(Mask):
    def __init__(self, fn: MaskMod):
        self.fn = fn

    def mask_mod(self, b, h, q, kv):
        out = self.fn(b, h, q, kv)
        if not isinstance(out, torch.Tensor):
            raise MaskModOutputError(f"custom mask_mod must return a bool tensor, got {type(out).__name__}")
        return out

    def __repr__(self):
        return f"custom({getattr(self.fn, '__name__', 'mask_mod')})"


class Dense(_TensorMask):
    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor  # bool, broadcastable to [B, H, Sq, Skv]

    def validate(self, batch, heads, q_len, kv_len):
        try:
            torch.broadcast_shapes(self.tensor.shape, (batch, heads, q_len, kv_len))
        except RuntimeError:
            raise ValueError(f"dense: mask of shape {list(self.tensor.shape)} does not broadcast to "
                             f"[{batch}, {heads}, {q_len}, {kv_len}]") from None
        if torch.broadcast_shapes(self.tensor.shape, (batch, heads, q_len, kv_len)) != (batch, heads, q_len, kv_len):
            raise ValueError(f"dense: mask of shape {list(self.tensor.shape)} is larger than the call "
                             f"[{batch}, {heads}, {q_len}, {kv_len}]")
        if self.tensor.shape[-1] == 1 < self.tensor.shape[-2] and q_len != kv_len:
            raise ValueError(f"dense: mask of shape {list(self.tensor.shape)} is broadcast over keys, so it cannot "
                             f"say where its rows sit among {kv_len} keys when q_len is {q_len}: give it "
                             f"{kv_len} key columns")

    def mask_mod(self, b, h, q, kv):
        t = self.tensor  # [B|1, H|1, Sq|1, Skv|1]
        rows_q, cols_kv = t.shape[-2], t.shape[-1]
        # Absolute query positions -> rows of this tensor (queries are the last rows; a tensor
        # broadcast over keys is only taken where q_len == kv_len, see validate).
        qi = (q - (cols_kv - rows_q) if cols_kv > 1 else q) if rows_q > 1 else torch.zeros_like(q)
        ki = kv if cols_kv > 1 else torch.zeros_like(kv)
        bi = b if t.shape[0] > 1 else torch.zeros_like(b)
        hi = h if t.shape[1] > 1 else torch.zeros_like(h)
        return t[bi, hi, qi, ki]

    def __repr__(self):
        return f"dense(shape {list(self.tensor.shape)})"


# composites -------------------------------------------------------------------------------------


class _Nary(Mask):
    """A combination of several terms (``And`` / ``Or``)."""

    def __init__(self, terms: tuple[Mask, ...]):
        self.terms = terms

    def children(self):
        return self.terms

    def validate(self, *sizes):
        for t in self.terms:
            t.validate(*sizes)

    def to(self, device):
        moved = tuple(t.to(device) for t in self.terms)
        return self if all(a is b for a, b in zip(moved, self.terms)) else type(self)(moved)


class And(_Nary):
    def mask_mod(self, b, h, q, kv):
        out = self.terms[0].mask_mod(b, h, q, kv)
        for t in self.terms[1:]:
            out = out & t.mask_mod(b, h, q, kv)
        return out

    def __repr__(self):
        return "(" + " & ".join(map(repr, self.terms)) + ")"


class Or(_Nary):
    def mask_mod(self, b, h, q, kv):
        out = self.terms[0].mask_mod(b, h, q, kv)
        for t in self.terms[1:]:
            out = out | t.mask_mod(b, h, q, kv)
        return out

    def __repr__(self):
        return "(" + " | ".join(map(repr, self.terms)) + ")"


class Not(Mask):
    def __init__(self, term: Mask):
        self.term = term

    def children(self):
        return (self.term,)

    def validate(self, *sizes):
        self.term.validate(*sizes)

    def to(self, device):
        moved = self.term.to(device)
        return self if moved is self.term else Not(moved)

    def mask_mod(self, b, h, q, kv):
        return ~self.term.mask_mod(b, h, q, kv)

    def __repr__(self):
        return f"~{self.term!r}"


# constructors -----------------------------------------------------------------------------------


def full() -> Mask:
    """Every query sees every key (bidirectional)::

        # # # #
        # # # #
        # # # #
    """
    return Full()


def causal() -> Mask:
    """``kv <= q`` (bottom-right aligned when ``q_len < kv_len``)::

        # . . .
        # # . .
        # # # .
        # # # #
    """
    return Causal()


def window(left: int | None, right: int | None = 0) -> Mask:
    """``q - left <= kv <= q + right`` (``None`` = unbounded).  ``window(1)``::

        # . . .
        # # . .
        . # # .
        . . # #

    ``window(1, 1)`` is a band of width 3; ``window(n) & causal()`` is a causal sliding window.
    A bound of ``2**62`` or more (``sys.maxsize``) reaches past any sequence: it is taken as ``None``,
    so that ``q + right`` never overflows int64.
    """
    bounds = {}
    for name, value in (("left", left), ("right", right)):
        bounds[name] = None if value is None else _as_int(value)
        if value is not None and (bounds[name] is None or bounds[name] < 0):
            raise ValueError(f"window: {name} must be a non-negative int or None, got {value!r}")
        if bounds[name] is not None and bounds[name] >= _UNBOUNDED_FROM:
            bounds[name] = None
    return Window(bounds["left"], bounds["right"])


_UNBOUNDED_FROM = 2 ** 62  # a window bound this wide is no bound: positions + it stays inside int64


def _as_int(value) -> int | None:
    """``value`` as a Python int when it is one (numpy and 0-d tensor integers too, not bools)."""
    if isinstance(value, bool) or (isinstance(value, torch.Tensor) and value.dtype == torch.bool):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def _dense_layout(name: str, t: torch.Tensor) -> torch.Tensor:
    """``t`` when it is an ordinary (strided) tensor; a sparse or other layout is a ``TypeError`` here,
    not a failure deep inside a backend."""
    if t.layout != torch.strided:
        raise TypeError(f"{name}: expected an ordinary (strided) tensor, got layout {t.layout}; "
                        "convert it with .to_dense()")
    if t.is_meta:
        raise ValueError(f"{name}: got a meta tensor; a mask needs its values (lengths, ids, valid flags): "
                         "build it from real tensors")
    return t


def documents(ids: torch.Tensor | Sequence[int] | None = None, *,
              lengths: Sequence[int] | Sequence[Sequence[int]] | None = None) -> Mask:
    """Same-document only.  ``documents(lengths=[2, 3])`` (ids ``[0 0 1 1 1]``)::

        # # . . .
        # # . . .
        . . # # #
        . . # # #
        . . # # #

    ``ids``: int tensor ``[B, S]`` or ``[S]``.  ``lengths``: a list of document lengths, or one
    list per batch row (rows must cover the same total length).
    """
    if (ids is None) == (lengths is None):
        raise ValueError("documents: give exactly one of ids or lengths")
    if lengths is not None:
        ids = _ids_from_lengths(lengths)
    ids = _dense_layout("documents", torch.as_tensor(ids))
    if ids.dtype.is_floating_point or ids.dtype == torch.bool or ids.is_complex():
        raise TypeError(f"documents: ids must be an integer tensor, got {ids.dtype}")
    if ids.dim() == 1:
        ids = ids.unsqueeze(0)
    if ids.dim() != 2 or ids.shape[-1] == 0:
        raise ValueError(f"documents: ids must have shape [B, S] or [S], got {list(ids.shape)}")
    return Documents(ids.long().clone())


def _ids_from_lengths(lengths) -> torch.Tensor:
    if isinstance(lengths, torch.Tensor):
        _dense_layout("documents", lengths)
    if _as_int(lengths) is not None:  # one document: lengths=4
        lengths = [lengths]
    elif not isinstance(lengths, Iterable):
        raise TypeError(f"documents: lengths must be ints (one per document, or one list per batch row), "
                        f"got {type(lengths).__name__}")
    lengths = lengths.tolist() if hasattr(lengths, "tolist") else list(lengths)  # a tensor, an array, a generator
    flat = all(_as_int(x) is not None for x in lengths)
    rows = [list(lengths)] if flat else [list(r) if isinstance(r, Iterable) else [r] for r in lengths]
    if not rows or any(not r for r in rows):
        raise ValueError("documents: lengths must not be empty")
    for i, r in enumerate(rows):
        if any(_as_int(x) is None or _as_int(x) < 1 for x in r):
            raise ValueError(f"documents: lengths must be positive ints (or one list of them per row), got {lengths!r}")
        rows[i] = [_as_int(x) for x in r]
    totals = {sum(r) for r in rows}
    if len(totals) != 1:
        raise ValueError(f"documents: every batch row must cover the same length, got totals {sorted(totals)}")
    return torch.stack([torch.repeat_interleave(torch.arange(len(r)), torch.tensor(r)) for r in rows])


def padding(valid: torch.Tensor) -> Mask:
    """Hide padded keys and padded queries.  ``valid`` is an HF-style ``[B, S]`` 0/1 or bool
    tensor.  ``padding([[1, 1, 1, 0]])``::

        # # # .
        # # # .
        # # # .
        . . . .      <- a padded query sees nothing and outputs 0
    """
    valid = _dense_layout("padding", torch.as_tensor(valid))
    if valid.dim() != 2:
        raise ValueError(f"padding: valid must have shape [B, S], got {list(valid.shape)}")
    if valid.dtype != torch.bool:
        if valid.is_complex() or not ((valid == 0) | (valid == 1)).all():
            raise ValueError("padding: valid must be bool or hold only 0 and 1")
        valid = valid != 0
    return Padding(valid.clone())


def prefix(lengths: int | Sequence[int] | torch.Tensor) -> Mask:
    """Keys before the prefix length are visible to every query: ``kv < lengths[b]``.
    ``prefix(2)``::

        # # . .
        # # . .
        # # . .
        # # . .
    """
    if lengths is None or isinstance(lengths, (str, bytes)):
        raise TypeError(f"prefix: lengths must be an int, one int per batch row or a tensor, got {lengths!r}")
    lengths = _dense_layout("prefix", torch.as_tensor(lengths))
    if lengths.numel() == 0:
        raise ValueError("prefix: lengths must not be empty (one int, or one per batch row)")
    if lengths.dtype.is_floating_point or lengths.dtype == torch.bool:
        raise TypeError(f"prefix: lengths must be integers, got {lengths.dtype}")
    if lengths.dim() > 1:
        raise ValueError(f"prefix: lengths must be one int or one per batch row ([B]), got shape {list(lengths.shape)}")
    lengths = lengths.reshape(-1).long()
    if lengths.numel() == 0 or int(lengths.min()) < 0:
        raise ValueError(f"prefix: lengths must be non-negative and not empty, got {lengths.tolist()}")
    return Prefix(lengths.clone())


def prefix_lm(lengths: int | Sequence[int] | torch.Tensor) -> Mask:
    """Bidirectional prefix, causal rest: ``causal() | prefix(lengths)``.  ``prefix_lm(2)``::

        # # . . .
        # # . . .
        # # # . .
        # # # # .
        # # # # #
    """
    return causal() | prefix(lengths)


def custom(mask_mod: MaskMod) -> Mask:
    """FlexAttention-style ``mask_mod(b, h, q_idx, kv_idx) -> bool tensor`` on absolute positions.
    It is called with broadcasting index tensors, so write it with tensor operations
    (``q_idx >= kv_idx``, ``table[b, q_idx]``), not Python ``if``.
    """
    if not callable(mask_mod):
        raise TypeError(f"custom: mask_mod must be callable, got {type(mask_mod).__name__}")
    return Custom(mask_mod)


def dense(tensor: torch.Tensor) -> Mask:
    """An explicit bool mask broadcastable to ``[B, H, Sq, Skv]`` (True = may attend).

    Unlike the other constructors (which copy their small inputs), ``dense`` keeps a view of
    ``tensor``: an in-place edit of it changes the mask, and what backends cached from it is
    derived again (except for a tensor made under ``torch.inference_mode()``, which has no version
    counter: make a new mask then).
    """
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"dense: expected a torch.Tensor, got {type(tensor).__name__}")
    _dense_layout("dense", tensor)
    if tensor.dtype != torch.bool:
        raise TypeError(f"dense: mask must be a bool tensor, got {tensor.dtype}")
    if tensor.dim() > 4 or tensor.dim() < 2:
        raise ValueError(f"dense: mask must have 2 to 4 dims, got shape {list(tensor.shape)}")
    return Dense(tensor.reshape((1,) * (4 - tensor.dim()) + tuple(tensor.shape)))


CATALOGUE: dict[str, Callable[[int, int], Mask]] = {
    "full": lambda batch, seq: full(),
    "causal": lambda batch, seq: causal(),
    "padding": lambda batch, seq: padding(torch.arange(seq).expand(batch, seq) < _padded_lengths(batch, seq)[:, None]),
    "documents": lambda batch, seq: documents(lengths=_doc_lengths(seq)),
    "documents_causal": lambda batch, seq: documents(lengths=_doc_lengths(seq)) & causal(),
    "prefix_lm": lambda batch, seq: prefix_lm(max(1, seq // 4)),
    "packed_prefix_lm": lambda batch, seq: _packed_prefix_lm(seq),
    "sliding_window": lambda batch, seq: window(max(1, seq // 4)) & causal(),
    "custom": lambda batch, seq: custom(lambda b, h, q, kv: ((q - kv) % 3 == 0) & (kv <= q)),
}
"""Named example masks for ``batch`` rows of ``seq`` tokens (demo, bench, tests)."""


def _packed_prefix_lm(seq: int, prompt_share: float = 0.4) -> Mask:
    """Packed prefix-LM: per document a bidirectional prompt (the first ``prompt_share`` of it),
    causal after.  Prompt tokens of a document share a group id, every other token is its own group::

        documents(lengths=[3, 2]) & (causal() | documents(group)),  group = [0 -2 -3 1 -5]
    """
    lengths = _doc_lengths(seq)
    doc = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))  # [S]
    start = torch.tensor([0, *lengths[:-1]]).cumsum(0)[doc]  # [S] first position of each token's document
    prompt = torch.tensor([max(1, round(n * prompt_share)) for n in lengths])[doc]  # [S]
    pos = torch.arange(seq)
    group = torch.where(pos - start < prompt, doc, -1 - pos)  # [S]
    return documents(lengths=lengths) & (causal() | documents(group))


def _padded_lengths(batch: int, seq: int) -> torch.Tensor:
    """Real tokens per row of the catalogue's padding: 100% down to 35% of ``seq`` across the batch;
    one row keeps the middle, 67.5% (its first version gave a lone row all 100%: nothing padded)."""
    fill = torch.linspace(1.0, 0.35, batch) if batch > 1 else torch.tensor([0.675])  # [B]
    return (fill * seq).round().long().clamp(min=1)


def _doc_lengths(seq: int) -> list[int]:
    """Deterministic uneven document lengths summing to ``seq``."""
    out, pattern, i = [], (0.125, 0.375, 0.0625, 0.25, 0.1875), 0
    while sum(out) < seq:
        out.append(max(1, min(seq - sum(out), round(seq * pattern[i % len(pattern)]))))
        i += 1
    return out
