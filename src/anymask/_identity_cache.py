"""``IdentityLRU``: a small LRU of values derived from objects, keyed by those objects' identity.

Masks, the Hugging Face layer keys and the keyword tensors of a forward are reused object by
object (every layer of a model gets the same ones), so what is derived from them — a dense mask,
a packed layout, a compiled plan, auto's decision — is looked up by ``id()`` plus plain values
(shapes, device).  An ``id`` can be reused once its object dies, so each entry keeps its anchor
objects: strongly (the default: the id stays taken while cached), or weakly (``weak=True``: the
entry stops matching when they die; for anchors too large to keep alive).

Values are built outside ``torch.inference_mode``: a mask first used in an eval pass under it is
used for training later, and autograd cannot save inference tensors for backward.
"""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from typing import Callable

import torch


class IdentityLRU:
    """At most ``size`` entries, least recently used evicted first.  ``at_most=(predicate, n)``
    also keeps at most ``n`` entries whose value satisfies ``predicate`` (the oldest go first)."""

    def __init__(self, size: int, *, weak: bool = False,
                 at_most: tuple[Callable[[object], bool], int] | None = None):
        self.size = size
        self.weak = weak
        self.at_most = at_most
        self._entries: "OrderedDict[tuple, tuple[tuple, object]]" = OrderedDict()
        self._lock = threading.Lock()  # threads serving one model share it: no eviction mid-lookup

    def get(self, anchors: tuple, key: tuple, build: Callable[[], object]):
        """The value cached for (these very ``anchors``, ``key``), else ``build()`` stored and returned
        (built outside the lock: two threads missing at once both build, the last one is kept)."""
        full = (tuple(map(id, anchors)), key)
        with self._lock:
            hit = self._entries.get(full)
            if hit is not None and all(self._alive(held) is a for held, a in zip(hit[0], anchors)):
                self._entries.move_to_end(full)
                return hit[1]
        with torch.inference_mode(False):
            value = build()
        self.put(anchors, key, value)
        return value

    def put(self, anchors: tuple, key: tuple, value) -> None:
        """Store ``value`` for (these very ``anchors``, ``key``), replacing what was there."""
        full = (tuple(map(id, anchors)), key)
        held = tuple(weakref.ref(a) for a in anchors) if self.weak else anchors
        with self._lock:
            self._entries[full] = (held, value)
            self._entries.move_to_end(full)
            while len(self._entries) > self.size:
                self._entries.popitem(last=False)
            if self.at_most is not None:
                predicate, n = self.at_most
                matching = [k for k, (_, v) in self._entries.items() if predicate(v)]
                for old in matching[:-n] if n else matching:
                    del self._entries[old]

    def _alive(self, held):
        return held() if self.weak else held

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def values(self):
        """``(anchors, value)`` per entry, oldest first (anchors as held: weak references if weak): a copy."""
        with self._lock:
            return list(self._entries.values())

    def __len__(self) -> int:
        return len(self._entries)


def version(t) -> int | None:
    """``t._version`` (bumped by every in-place edit), or None for an inference tensor, which has no
    version counter (tensors made under ``torch.inference_mode()``): edits of those cannot be seen."""
    return None if t.is_inference() else t._version
