"""The micro-batches of each step, the same for any world size with the same ``data_shards``.

The examples are cut into ``shards`` fixed shards; rank ``r`` of ``world`` owns shards
``r, r + world, ...`` and packs only those.  Each step takes ``grad_accum`` micro-batches per
rank, round-robin over its shards::

    data_shards 2, grad_accum 2, one process      step s: shard0[s], shard1[s]
    data_shards 2, grad_accum 1, two processes    step s: rank 0 shard0[s] | rank 1 shard1[s]

An epoch ends when the first shard (over all ranks) runs out; every rank agrees on the count.
Epochs pack anew, so their step counts differ a little; an epoch that packs into fewer than a
step's micro-batches has no step and is skipped (:meth:`Stream.next_epoch`).
"""

from __future__ import annotations

from .config import ConfigError
from .data import Example
from .distributed import Dist
from .packing import Packed, pack, shard

MAX_EMPTY_EPOCHS = 8  # epochs in a row without a step before the data counts as too small for one


class Stream:
    def __init__(self, examples_by_shard: dict[int, list[Example]], max_tokens: int, grad_accum: int,
                 seed: int, d: Dist):
        self.shards = sorted(examples_by_shard)
        self.examples = examples_by_shard
        if grad_accum % len(self.shards):
            raise ConfigError(f"grad_accum ({grad_accum}) must be a multiple of the data shards per rank "
                             f"({len(self.shards)})")
        self.per_shard = grad_accum // len(self.shards)  # micro-batches per shard per step
        self.grad_accum = grad_accum
        self.max_tokens, self.seed, self.d = max_tokens, seed, d
        self._epoch, self._rows = None, {}

    def steps_in_epoch(self, epoch: int) -> int:
        self._load(epoch)
        local = min(len(rows) for rows in self._rows.values()) // self.per_shard
        return int(self.d.min(local))

    def next_epoch(self, epoch: int) -> tuple[int, int]:
        """The first epoch after ``epoch`` with at least one step, and its step count.  Epochs in
        between pack into too few micro-batches for a step and are skipped; :class:`ConfigError`
        after ``MAX_EMPTY_EPOCHS`` of them in a row."""
        for later in range(epoch + 1, epoch + 1 + MAX_EMPTY_EPOCHS):
            steps = self.steps_in_epoch(later)
            if steps:
                return later, steps
        raise ConfigError(f"epochs {epoch + 1}-{epoch + MAX_EMPTY_EPOCHS} each pack into too few micro-batches for "
                          f"a step (every rank needs --grad-accum {self.grad_accum} of them): lower --grad-accum, "
                          "or --tokens-per-batch for more micro-batches")

    def step(self, epoch: int, index: int) -> list[Packed]:
        """The micro-batches of step ``index`` of ``epoch`` on this rank."""
        self._load(epoch)
        out = []
        for j in range(self.per_shard):
            for s in self.shards:
                out.append(self._rows[s][index * self.per_shard + j])
        return out

    def left_out(self, epoch: int) -> tuple[int, int]:
        """``(micro-batches, documents)`` of ``epoch`` on this rank past its last whole step: each
        step takes ``grad_accum`` micro-batches per rank (the same count on every rank)."""
        used = self.steps_in_epoch(epoch) * self.per_shard
        rest = [row for s in self.shards for row in self._rows[s][used:]]
        return len(rest), sum(len(row.doc_lengths) for row in rest)

    def rows(self, epoch: int) -> list[Packed]:
        """Every micro-batch this rank packs for ``epoch`` (the steps use a prefix of them)."""
        self._load(epoch)
        return [row for s in self.shards for row in self._rows[s]]

    def _load(self, epoch: int) -> None:
        if self._epoch != epoch:
            self._rows = {s: pack(self.examples[s], self.max_tokens, seed=self.seed, epoch=epoch, shard_index=s)
                          for s in self.shards}
            self._epoch = epoch


def local_shards(count: int, d: Dist) -> list[int]:
    """The shards rank ``d.rank`` owns."""
    if count % d.world:
        raise ConfigError(f"data_shards ({count}) must be a multiple of the world size ({d.world})")
    return list(range(d.rank, count, d.world))


def split(examples: list[Example], shards: list[int], count: int) -> dict[int, list[Example]]:
    return {s: shard(examples, s, count) for s in shards}
