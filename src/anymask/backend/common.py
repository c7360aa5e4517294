"""Small tensor helpers shared by backends."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from .. import masks as M
from .._identity_cache import IdentityLRU


def expand_kv(t: torch.Tensor, q_heads: int) -> torch.Tensor:
    """Repeat k/v heads for grouped-query attention: ``[B, Hkv, S, D] -> [B, Hq, S, D]``."""
    groups = q_heads // t.shape[1]
    return t if groups == 1 else t.repeat_interleave(groups, dim=1)


class _NothingVisible(torch.autograd.Function):
    """Attention in which no query sees any key: output 0 and zero gradients, whatever q, k, v hold
    (``0 * q.sum()`` would turn a NaN in a padded slot into a NaN output)."""

    @staticmethod
    def forward(ctx, q, k, v):
        ctx.inputs = [(t.shape, t.dtype, t.device) for t in (q, k, v)]
        return q.new_zeros(*q.shape[:-1], v.shape[-1])  # [B, Hq, Sq, Dv]

    @staticmethod
    def backward(ctx, grad_out):
        return tuple(torch.zeros(shape, dtype=dtype, device=device) if needed else None
                     for (shape, dtype, device), needed in zip(ctx.inputs, ctx.needs_input_grad))


def nothing_visible(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The output of a call where every query is padded: zeros ``[B, Hq, Sq, Dv]``, still in the
    autograd graph of q, k and v (their gradients are zero)."""
    return _NothingVisible.apply(q, k, v)


def zero_rows(out: torch.Tensor, row_has_key: torch.Tensor) -> torch.Tensor:
    """Zero the output of query rows that see no key (zero gradient flows back through them).

    out: [B, H, Sq, D]; row_has_key: bool broadcastable to [B, H, Sq, 1].
    """
    return torch.where(row_has_key, out, torch.zeros((), dtype=out.dtype, device=out.device))


def masked_sdpa(q, k, v, attn_mask, **kwargs) -> torch.Tensor:
    """``F.scaled_dot_product_attention`` with an explicit ``attn_mask`` (a tensor, or SDPA's own
    ``CausalBias``, which becomes a tensor when flash and efficient refuse), kept off PyTorch's cuDNN
    attention kernel on CUDA: the SDPA kernels the caller has enabled, cuDNN's left out (memory-efficient
    for bf16/fp16/fp32; math for what it refuses; flash takes no mask).

    PyTorch 2.11+ puts its cuDNN kernel first on Hopper and Blackwell, and with a mask tensor its
    backward has returned wrong dQ: NaN for key lengths ``% 128 == 64`` when a row's logsumexp is very
    negative (pytorch/pytorch#196678, reproduced through this backend on an H100), and once dQ ~30x
    past the bf16 bound in a full GPU test run (300 keys, sliding window; not reproduced alone).  No
    mask tensor (``is_causal``, none) keeps PyTorch's own choice.  Grouped K/V heads are repeated
    first: the memory-efficient kernel takes no ``enable_gqa``.  If the caller enabled only cuDNN,
    their choice stands.  (``sdpa_kernel`` flags are process-wide, as in PyTorch itself.)
    """
    kernels = _enabled_without_cudnn() if q.is_cuda else []
    if not kernels:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, **kwargs)
    if kwargs.pop("enable_gqa", False):
        k, v = expand_kv(k, q.shape[1]), expand_kv(v, q.shape[1])  # [B, Hq, Skv, D]
    with sdpa_kernel(kernels):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, **kwargs)


def _enabled_without_cudnn() -> list:
    """The CUDA SDPA kernels enabled now, cuDNN's left out (``sdpa_kernel`` would enable any it lists)."""
    cuda = torch.backends.cuda
    enabled = ((SDPBackend.EFFICIENT_ATTENTION, cuda.mem_efficient_sdp_enabled()),
               (SDPBackend.FLASH_ATTENTION, cuda.flash_sdp_enabled()), (SDPBackend.MATH, cuda.math_sdp_enabled()))
    return [kernel for kernel, on in enabled if on]


class PerMaskCache:
    """What a backend derives from a mask object, per mask identity and call sizes (a small LRU).

    Masks are immutable; the layers of a model share one mask object per forward, and a training
    loop or a benchmark calls attention with the same one repeatedly: derive once, not once per call.
    The key includes :func:`anymask.masks.stamp`, so in-place edits of a ``dense`` tensor or of a
    tensor a ``custom`` mask_mod reads are seen.
    """

    def __init__(self, size: int = 4):
        self._lru = IdentityLRU(size)

    def get(self, p, build):
        sizes = (p.batch, p.q_heads, p.q_len, p.kv_len, str(p.device))
        return self._lru.get((p.mask,), (sizes, M.stamp(p.mask)), build)


_DENSE_CACHE = PerMaskCache()


@dataclass(frozen=True)
class DenseMask:
    """A mask materialised for kernels that take a dense bool mask.

    mask: ``[B, H|1, Sq, Skv]`` (True = may attend).  row_has_key: ``[B, H|1, Sq, 1]``, or None when
    every row sees a key.  unmasked_empty_rows: ``mask`` with empty rows opened up (SDPA returns NaN
    or garbage on fully masked rows; those rows are zeroed afterwards).
    """

    mask: torch.Tensor
    row_has_key: torch.Tensor | None
    unmasked_empty_rows: torch.Tensor


def dense_mask(p) -> DenseMask:
    """The problem's mask, dense (one head when it does not vary by head), cached per mask object:
    building ``S x S`` once per mask, not once per call, is what a user hand-writing SDPA would do.
    Masks with opaque terms are evaluated for every head once, and kept per head only if they
    really differ by head.
    """
    return _DENSE_CACHE.get(p, lambda: _build_dense(p))


def _build_dense(p) -> DenseMask:
    heads = 1 if p.structure.is_structured else p.q_heads
    mask = p.mask.to_dense(p.batch, heads, p.q_len, p.kv_len, device=p.device)  # [B, H|1, Sq, Skv]
    if heads > 1 and bool((mask == mask[:, :1]).all()):
        mask = mask[:, :1].contiguous()
    row_has_key = mask.any(dim=-1, keepdim=True)  # [B, H|1, Sq, 1]
    if bool(row_has_key.all()):
        return DenseMask(mask, None, mask)
    return DenseMask(mask, row_has_key, mask | ~row_has_key)
