"""Pack variable-length examples into fixed-token micro-batches, documents kept apart.

A micro-batch is **one row** of at most ``max_tokens`` tokens holding whole examples back to back,
with no padding.  Documents are told apart by ``position_ids`` that restart at 0 for each document,
which is exactly what ``anymask.hf`` reads to isolate them (causal or bidirectional)::

    documents      |  doc 0  | doc 1 |    doc 2    |
    input_ids       a b c d   e f     g h i j k
    position_ids    0 1 2 3   0 1     0 1 2 3 4
    doc_ids         0 0 0 0   1 1     2 2 2 2 2

Examples are assigned to bins first-fit by decreasing length within windows of a shuffled order,
so rows come out nearly full; the order of rows is shuffled again.  Everything is a function of
``(seed, epoch, shard)``, so every rank can pack its own shard and get the same rows any time.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace

import torch

from .config import ConfigError
from .data import Example

WINDOW = 4096  # examples per first-fit-decreasing window


@dataclass(frozen=True)
class Packed:
    """One packed row.  Tensors are ``[1, S]``; ``seed`` drives per-batch randomness (diffusion)."""

    input_ids: torch.Tensor  # [1, S] long
    position_ids: torch.Tensor  # [1, S] long, restarts at 0 per document
    doc_ids: torch.Tensor  # [1, S] long, 0.. per row
    prompt: torch.Tensor  # [1, S] bool, prompt (sft/prefix_lm) or query (embedding) tokens
    doc_lengths: tuple[int, ...]
    seed: int
    same_as: tuple[int, ...] = ()  # per document: the first document of the row with the same tokens

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[-1])

    def to(self, device) -> "Packed":
        return replace(self, input_ids=self.input_ids.to(device), position_ids=self.position_ids.to(device),
                       doc_ids=self.doc_ids.to(device), prompt=self.prompt.to(device))


def shard(examples: list[Example], index: int, count: int) -> list[Example]:
    """Examples ``index, index + count, ...`` (a fixed assignment, independent of the epoch)."""
    return examples[index::count]


def pack(examples: list[Example], max_tokens: int, *, seed: int = 0, epoch: int = 0, shard_index: int = 0,
         shuffle: bool = True) -> list[Packed]:
    """Pack ``examples`` (each at most ``max_tokens`` long) into rows; see the module docstring."""
    rng = random.Random(_mix(seed, epoch, shard_index))
    order = list(range(len(examples)))
    if shuffle:
        rng.shuffle(order)
    bins: list[list[int]] = []
    for start in range(0, len(order), WINDOW):
        bins.extend(_first_fit_decreasing(order[start:start + WINDOW], examples, max_tokens))
    if shuffle:
        rng.shuffle(bins)
    return [_row([examples[i] for i in b], _mix(seed, epoch, shard_index, n)) for n, b in enumerate(bins)]


def _first_fit_decreasing(items: list[int], examples: list[Example], max_tokens: int) -> list[list[int]]:
    rank = {i: k for k, i in enumerate(items)}
    free: list[int] = []
    bins: list[list[int]] = []
    for i in sorted(items, key=lambda i: -len(examples[i])):
        size = len(examples[i])
        if size > max_tokens:
            raise ConfigError(f"example from line {examples[i].line} has {size} tokens > {max_tokens}")
        for b, room in enumerate(free):
            if room >= size:
                bins[b].append(i)
                free[b] -= size
                break
        else:
            bins.append([i])
            free.append(max_tokens - size)
    return [sorted(b, key=rank.__getitem__) for b in bins]


def _row(examples: list[Example], seed: int) -> Packed:
    ids, pos, doc, prompt, lengths, same_as, first = [], [], [], [], [], [], {}
    for ex in examples:
        for d in ex.docs:
            n = len(d.ids)
            same_as.append(first.setdefault(d.ids, len(lengths)))  # the first document with these tokens
            ids.extend(d.ids)
            pos.extend(range(n))
            doc.extend([len(lengths)] * n)
            prompt.extend([True] * d.prompt_len + [False] * (n - d.prompt_len))
            lengths.append(n)
    row = lambda xs, dtype=torch.long: torch.tensor(xs, dtype=dtype).unsqueeze(0)  # noqa: E731
    return Packed(row(ids), row(pos), row(doc), row(prompt, torch.bool), tuple(lengths), seed, tuple(same_as))


def _mix(*parts: int) -> int:
    """A stable 63-bit seed from integers (FNV-1a style; the same in every process)."""
    h = 1469598103934665603
    for p in parts:
        h = ((h ^ (p & 0xFFFFFFFFFFFFFFFF)) * 1099511628211) & 0x7FFFFFFFFFFFFFFF
    return h
