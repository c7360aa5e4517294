"""``IdentityLRU``: hits only for the very same anchor objects, LRU eviction, the ``at_most`` cap,
and weak anchors that stop matching when they die."""

import gc

from anymask._identity_cache import IdentityLRU


class Anchor:
    pass


def test_hits_by_identity_and_key_only():
    cache, built = IdentityLRU(2), []
    a, b = Anchor(), Anchor()

    def build(tag):
        built.append(tag)
        return tag

    assert cache.get((a,), (1,), lambda: build("a1")) == "a1"
    assert cache.get((a,), (1,), lambda: build("again")) == "a1"  # same object, same key: cached
    assert cache.get((a,), (2,), lambda: build("a2")) == "a2"  # other key
    assert cache.get((b,), (1,), lambda: build("b1")) == "b1"  # other object: evicts (a, 1), the oldest
    assert len(cache) == 2
    assert cache.get((a,), (1,), lambda: build("a1 rebuilt")) == "a1 rebuilt"
    assert built == ["a1", "a2", "b1", "a1 rebuilt"]


def test_at_most_caps_matching_values_oldest_first():
    cache = IdentityLRU(10, at_most=(lambda v: v.startswith("big"), 2))
    anchors = [Anchor() for _ in range(4)]
    for i, x in enumerate(anchors):
        cache.get((x,), (), lambda i=i: f"big{i}")
    cache.get((Anchor(),), (), lambda: "small")
    assert sorted(v for _, v in cache.values()) == ["big2", "big3", "small"]


def test_weak_anchors_stop_matching_when_they_die():
    cache = IdentityLRU(4, weak=True)
    a = Anchor()
    cache.get((a,), (), lambda: "first")
    del a
    gc.collect()
    (held,), _ = next(iter(cache.values()))
    assert held() is None  # the cache did not keep it alive, and a dead anchor matches no new object
    assert cache.get((Anchor(),), (), lambda: "second") == "second"
