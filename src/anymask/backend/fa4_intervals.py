"""Structured masks on FlashAttention 4 as one ``mask_mod`` over per-row key intervals.

Every structured mask (base & contiguous documents & padding, :mod:`anymask.structure`) lets query
row ``q`` see the keys ``lo[b, q] <= kv <= hi[b, q]`` that are valid (:func:`anymask.tiles.row_bounds`).
The ``mask_mod`` reads ``lo`` and ``hi`` (and ``valid``, with padding) from tensors, so one JIT
compile serves every mask of that form.  ``documents(lengths=[2, 2]) & causal()``::

    kv  0 1 2 3        lo hi
    q 0 # . . .         0  0
    q 1 # # . .         0  1      lo <= kv <= hi
    q 2 . . # .         2  2      (and valid[kv], with padding)
    q 3 . . # #         2  3

FA4's block sparsity skips tiles no row sees and runs tiles every row fully sees without the
``mask_mod`` (:func:`sparse_blocks`), built once per mask object.  This is FA4's own documented way to
mask packed documents (a ``mask_mod`` on ``aux_tensors``), not its varlen entry point.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

from .. import tiles
from .common import PerMaskCache
from .flex import block_mask_from_tiles

SPARSE_BLOCK = (128, 128)  # the BlockMask granularity FA4's SM90 block-sparse backward expects
_PLANS = PerMaskCache()


@dataclass(frozen=True)
class IntervalPlan:
    aux: list  # [lo, hi] int32 [B, Sq] (+ valid int32 [B, Skv] with padding), on the device
    fwd: object  # BlockSparseTensorsTorch, key blocks per query block
    bwd: object  # BlockSparseTensorsTorch, query blocks per key block
    row_has_key: torch.Tensor | None  # bool [B, 1, Sq, 1]; None when every row sees a key


@lru_cache(maxsize=1)
def interval_mods():
    """The CuTe mask_mods ``(without padding, with padding)``, defined once: FA4 caches compiled
    kernels by the callable's source, so each form compiles once for every mask it serves."""
    import cutlass
    import cutlass.cute as cute
    from flash_attn.cute.utils import scalar_to_ssa

    @cute.jit
    def in_interval(batch, head, q_idx, kv_idx, seqlen_info, aux_tensors):
        lo = scalar_to_ssa(aux_tensors[0][batch[0], q_idx[0]], cutlass.Int32)
        hi = scalar_to_ssa(aux_tensors[1][batch[0], q_idx[0]], cutlass.Int32)
        return (kv_idx >= lo) & (kv_idx <= hi)

    @cute.jit
    def in_interval_and_valid(batch, head, q_idx, kv_idx, seqlen_info, aux_tensors):
        lo = scalar_to_ssa(aux_tensors[0][batch[0], q_idx[0]], cutlass.Int32)
        hi = scalar_to_ssa(aux_tensors[1][batch[0], q_idx[0]], cutlass.Int32)
        valid = scalar_to_ssa(aux_tensors[2][batch[0], kv_idx[0]], cutlass.Int32)
        return (kv_idx >= lo) & (kv_idx <= hi) & (valid != 0)

    return in_interval, in_interval_and_valid


def sparse_blocks(p):
    """FlexAttention's ``BlockMask`` of ``p``'s tile classes at :data:`SPARSE_BLOCK` (no mask_mod:
    FA4 takes its own), in O(S * S / 128).  A partly filled last key block is never full."""
    classes = tiles.tile_classes(p.mask, p.batch, 1, p.q_len, p.kv_len, SPARSE_BLOCK, device=p.device,
                                 structure=p.structure)  # [B, 1, nQ, nK]
    if p.kv_len % SPARSE_BLOCK[1]:
        last = classes[..., -1]
        last[last == tiles.FULL] = tiles.PARTIAL
    return block_mask_from_tiles(classes, SPARSE_BLOCK, (p.q_len, p.kv_len), None)


def block_lists(bm):
    """FA4's forward (key blocks per query block) and backward (query blocks per key block) lists."""
    from flash_attn.cute.block_sparsity import BlockSparseTensorsTorch

    (_, _, kv_cnt, kv_idx, full_kv_cnt, full_kv_idx, q_cnt, q_idx, full_q_cnt, full_q_idx, *_) = bm.as_tuple()
    return (BlockSparseTensorsTorch(kv_cnt, kv_idx, full_kv_cnt, full_kv_idx, block_size=SPARSE_BLOCK),
            BlockSparseTensorsTorch(q_cnt, q_idx, full_q_cnt, full_q_idx, block_size=SPARSE_BLOCK))


def plan(p) -> IntervalPlan:
    """The aux tensors, block lists and empty rows of problem ``p``, built once per mask object."""
    return _PLANS.get(p, lambda: _build(p))


def call_kwargs(pl: IntervalPlan) -> dict:
    """What ``flash_attn_func`` takes for a plan."""
    with_valid = len(pl.aux) == 3
    return dict(mask_mod=interval_mods()[with_valid], aux_tensors=pl.aux, block_sparse_tensors=pl.fwd,
                block_sparse_tensors_bwd=pl.bwd)


def aux_tensors(p) -> list:
    """``[lo, hi]`` int32 ``[B, Sq]`` and, with padding, ``valid`` int32 ``[B, Skv]``: what the
    mask_mod reads."""
    lo, hi, valid = tiles.row_bounds(p.structure, p.batch, p.q_len, p.kv_len, p.device)  # [B, Sq] x2, [B, Skv]
    return [t.to(torch.int32).contiguous() for t in (lo, hi, valid) if t is not None]


def _build(p) -> IntervalPlan:
    aux = aux_tensors(p)
    valid = aux[2] if len(aux) == 3 else None
    return IntervalPlan(aux, *block_lists(sparse_blocks(p)), _row_has_key(aux[0], aux[1], valid))


def _row_has_key(lo: torch.Tensor, hi: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor | None:
    """bool ``[B, 1, Sq, 1]``: row ``q`` sees at least one key; None when all rows do."""
    has = lo <= hi  # [B, Sq]
    if valid is not None:
        before = torch.nn.functional.pad(valid.long().cumsum(dim=1), (1, 0))  # [B, Skv + 1]: valid keys before i
        seen = before.gather(1, (hi + 1).clamp(min=0)) - before.gather(1, lo.clamp(max=valid.shape[1]))
        has = has & (seen > 0)
    return None if bool(has.all()) else has[:, None, :, None]
