"""Copies between memory layouts of attention tensors, moved in wide words.

Changing a tensor's layout (say ``[B, H, S, D]`` memory into ``[B, S, H, D]`` memory, what the
cuDNN backend does for contiguous GQA inputs) is a strided copy. PyTorch runs a strided copy as a
generic elementwise kernel: it computes the offsets of every element and moves 2 bytes per bf16
element. Here each row of ``D`` values is viewed as wide words instead (8 bytes, ``int64``), so the
same bytes move with 4x fewer elements, at a much higher bandwidth on a GPU.
``scripts/gpu_relayout_probe.py`` times it.

    one head-dim row, bf16 D = 8      [ d0 d1 d2 d3 | d4 d5 d6 d7 ]   8 elements of 2 bytes
    the same row as words                [    w0     |     w1    ]   2 elements of 8 bytes

The bits are copied, not converted. Where the words do not fit (last dim not dense, a row's bytes
or a stride not a multiple of the word, an unaligned base), the copy falls back to PyTorch's own.
"""

from __future__ import annotations

import torch

WORD = torch.int64  # the word wide copies move (scripts/gpu_relayout_probe.py)


def _fits(t: torch.Tensor, size: int) -> bool:
    """Whether ``t`` can be viewed as words of ``size`` bytes along its last dim."""
    item = t.element_size()
    if t.dim() == 0 or t.stride(-1) != 1 or size % item or (t.size(-1) * item) % size:
        return False
    ratio = size // item
    divisible = all(st % ratio == 0 for st in t.stride()[:-1])  # size-1 dims too: view(dtype) checks them
    return divisible and t.storage_offset() % ratio == 0 and t.data_ptr() % size == 0


def as_words(t: torch.Tensor) -> torch.Tensor | None:
    """``t`` viewed as :data:`WORD` along its last dim (``[..., D * item / 8]``), or None."""
    size = WORD.itemsize
    if t.element_size() >= size or not _fits(t, size):
        return None
    return t.view(WORD)


def copy_(dst: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """``dst.copy_(src)`` for equal shapes and dtypes, in wide words where both allow; returns ``dst``."""
    if dst.shape != src.shape or dst.dtype != src.dtype:
        raise ValueError(f"copy_ needs equal shapes and dtypes, got {tuple(dst.shape)} {dst.dtype} "
                         f"and {tuple(src.shape)} {src.dtype}")
    wide_dst, wide_src = as_words(dst), as_words(src)
    if wide_dst is None or wide_src is None:
        return dst.copy_(src)
    wide_dst.copy_(wide_src)
    return dst


def tokens_major(x: torch.Tensor) -> torch.Tensor:
    """``x [B, H, S, D]`` copied into ``[B, S, H, D]`` memory, returned as ``[B * S, H, D]``."""
    B, H, S, D = x.shape
    out = x.new_empty(B, S, H, D)
    copy_(out, x.transpose(1, 2))
    return out.view(B * S, H, D)
