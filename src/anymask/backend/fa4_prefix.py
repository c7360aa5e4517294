"""Prefix-LM on FlashAttention 4: one ``mask_mod`` that reads each row's prefix length from a tensor,
so one JIT compile serves every length and per-row prefixes, plus FA4's block sparsity so that
tiles above the diagonal and past the prefix are skipped.  ``prefix_lm([2, 3])``, row 0::

    kv  0 1 2 3
    q 0 # # . .
    q 1 # # . .      kv <= q  or  kv < prefix[b]
    q 2 # # # .
    q 3 # # # #

The block lists come from the mask's tile classes at FA4's SM90 granularity (128 x 128,
:func:`.fa4_intervals.sparse_blocks`), built once per mask object.  Queries and keys must be the same positions
(``q_len == kv_len``).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

from .common import PerMaskCache
from .fa4_intervals import block_lists, sparse_blocks

_PLANS = PerMaskCache()


@dataclass(frozen=True)
class PrefixPlan:
    lengths: torch.Tensor  # [B] int32 on the device: each row's prefix length
    fwd: object  # BlockSparseTensorsTorch, key blocks per query block
    bwd: object  # BlockSparseTensorsTorch, query blocks per key block


@lru_cache(maxsize=1)
def prefix_lm_mod():
    """The CuTe mask_mod, defined once (FA4 caches compiled kernels by the callable's source)."""
    import cutlass
    import cutlass.cute as cute
    from flash_attn.cute.utils import scalar_to_ssa

    @cute.jit
    def mod(batch, head, q_idx, kv_idx, seqlen_info, aux_tensors):
        lengths = aux_tensors[0]
        limit = scalar_to_ssa(lengths[batch[0]], cutlass.Int32)
        return (kv_idx <= q_idx) | (kv_idx < limit)

    return mod


def call_kwargs(p) -> dict:
    """What ``flash_attn_func`` takes for problem ``p``'s prefix-LM, built once per mask object."""
    pl = _PLANS.get(p, lambda: _build(p))
    return dict(mask_mod=prefix_lm_mod(), aux_tensors=[pl.lengths], block_sparse_tensors=pl.fwd,
                block_sparse_tensors_bwd=pl.bwd)


def _build(p) -> PrefixPlan:
    lengths = p.structure.prefix.to(p.device).reshape(-1).expand(p.batch).to(torch.int32).contiguous()  # [B]

    return PrefixPlan(lengths, *block_lists(sparse_blocks(p)))
