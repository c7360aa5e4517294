"""FlexAttention (``torch.nn.attention.flex_attention``), compiled once, BlockMask from tiles.

The BlockMask comes from :func:`anymask.tiles.tile_classes` through ``BlockMask.from_kv_blocks``
(never ``create_block_mask`` over ``S x S``): EMPTY tiles are skipped, FULL tiles run without
mask math, PARTIAL tiles call a ``mask_mod``.  Structured masks share three ``mask_mod`` s that read
captured O(B * S) int32 tensors: bidirectional packed documents compare document starts
(``qdoc[b, q] == kdoc[b, kv]``), the rest per-row key intervals ``lo[b, q] <= kv <= hi[b, q]``
(and, with padding, valid keys ``valid[b, kv]``), so every structured mask runs one of three
compiled kernels; other masks wrap their own ``mask_mod``.  flex hands
``mask_mod`` query indices relative to the call (``0 .. q_len - 1``) and, in the last block,
indices past the ends: the interval tensors are indexed by the relative query and padded to
whole blocks (padded rows see nothing, padded keys are invalid); custom masks get absolute,
clamped positions (left unmapped when ``q_len == kv_len`` fills whole blocks).  The
last column of tiles is never FULL when ``kv_len`` is not a multiple of the block, so keys past
the end are always masked by ``mask_mod`` whatever the kernel does with them.  GQA goes through
``enable_gqa=True``.  Rows that see no key come out exactly 0 with zero gradient (tested on CPU
and on an H200), so no fix-up is applied.  Masks are taken as immutable: the compiled form is
cached by mask identity and shapes (LRU of 32, of which at most 4 that call an opaque mask's
``mask_mod`` and so keep it alive).

Compilation: on CUDA ``dynamic=None`` (a second sequence length compiles one dynamic kernel that
serves every later length).  On CPU, dynamic shapes hit an Inductor C++ codegen bug in torch 2.13
(``cur_kvSplitSize9 was not declared``: the flex CPU template renames size symbols with a plain
string replace, so ``ks1`` also rewrites ``ks19``), so CPU compiles static shapes and pads
``q_len`` and ``kv_len`` up to powers of two (at least 32: shorter blocks gave NaN, see
``_CPU_MIN_LEN``): one compile per length bucket, not per length.
The variants (mask_mod kind x dtype x head dim x length bucket) may exceed dynamo's default
recompile limit of 8, after which flex would silently run unfused; calls here raise it to 64.

Not supported (see ``problem_reasons``): backward on CPU, float64 (CPU template: fp32/fp16/bf16
only; CUDA: Triton compilation error), and on CUDA head dims below 16 or above 256.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from typing import Callable

import torch

from .. import masks as M, tiles
from .._identity_cache import IdentityLRU
from ..structure import document_bounds
from .base import Backend

BLOCK = 128  # sparse block size (both directions), flex's default
_CACHE_SIZE = 32
_HOLDING_SIZE = 4  # of which plans that keep their mask (and its tensors) alive
_RECOMPILE_LIMIT = 64  # compiled variants of flex_attention (mask_mod kind x dtype x shapes) before eager

_COMPILED: dict[str, Callable] = {}


def compiled_flex(device_type: str) -> Callable:
    """``torch.compile(flex_attention)``, created on first use (one per device type)."""
    if device_type not in _COMPILED:
        from torch.nn.attention.flex_attention import flex_attention

        _COMPILED[device_type] = torch.compile(flex_attention, dynamic=False if device_type == "cpu" else None)
    return _COMPILED[device_type]


# torch 2.13's CPU flex kernel returned NaN in rows of short calls, at random: 32 of 60 calls with 8
# tokens in blocks of 8, 4 of 60 with 16 tokens in blocks of 8, none with blocks of 16 or more (a
# window mask; tests/test_flex.py::test_short_cpu_calls_never_nan).  CPU lengths are padded to 32+.
_CPU_MIN_LEN = 32


def _bucket(n: int) -> int:
    """Next power of two >= n, and at least ``_CPU_MIN_LEN`` (CPU only)."""
    return max(_CPU_MIN_LEN, 1 << (n - 1).bit_length())


@dataclass(frozen=True)
class Plan:
    """A compiled form of one (mask, shapes, device): the BlockMask and the padded lengths."""

    block_mask: object  # torch.nn.attention.flex_attention.BlockMask
    q_len: int  # padded query length the kernel sees
    kv_len: int  # padded key length the kernel sees
    holds_mask: bool = False  # the mask_mod calls the mask itself (which may hold a large dense tensor)


def _interval_mod(lo: torch.Tensor, hi: torch.Tensor, valid: torch.Tensor | None):
    """mask_mod for structured masks: ``lo[b, q] <= kv <= hi[b, q]`` (and ``valid[b, kv] != 0``).

    lo, hi: int32 ``[B, Sq']`` indexed by flex's relative query index; valid: int32 ``[B, Skv']``
    or None without padding.  Both are padded to whole blocks, so flex's indices in the last
    block never run past them and need no clamp.  Measured on an H200 (torch 2.11, S 16384,
    GQA 32:8, head dim 64): a key-side *bool* load made the forward 8x slower (17.2 ms against
    2.6 ms), so keys are int32 and the load is left out entirely when there is no padding.
    """
    if valid is None:
        def interval_mod(b, h, q_idx, kv_idx):
            return (kv_idx >= lo[b, q_idx]) & (kv_idx <= hi[b, q_idx])
        return interval_mod

    def interval_valid_mod(b, h, q_idx, kv_idx):
        return (kv_idx >= lo[b, q_idx]) & (kv_idx <= hi[b, q_idx]) & (valid[b, kv_idx] != 0)
    return interval_valid_mod


def _is_plain_documents(s) -> bool:
    """Documents on a full base, nothing else: the bidirectional packed case (when structured)."""
    return s.base == "full" and s.documents is not None and s.valid is None and not s.general


def _documents_mod(s, batch: int, q_len: int, kv_len: int, q_rows: int, kv_cols: int, device):
    """mask_mod for packed bidirectional documents: same document start on both sides.

    One query-side and one key-side int32 load, the form of a hand-rolled ``ids[q] == ids[kv]``;
    on an H200 (S 16384, GQA 32:8, head dim 64) it ran the forward in 1.8 ms against 2.6 ms for
    the interval form.  Document starts (not the user's ids, which may be any integers) keep the
    padding sentinels apart: padded rows hold -2, padded keys -1, real positions 0 .. S-1.
    """
    start, _ = document_bounds(s.documents.to(device).expand(batch, kv_len))  # [B, Skv]
    q_doc = tiles.pad_dim(start[:, kv_len - q_len:].to(torch.int32), 1, q_rows, -2).contiguous()  # [B, Sq']
    k_doc = tiles.pad_dim(start.to(torch.int32), 1, kv_cols, -1).contiguous()  # [B, Skv']

    def documents_mod(b, h, q_idx, kv_idx):
        return q_doc[b, q_idx] == k_doc[b, kv_idx]
    return documents_mod


def _bare_mod(mask):
    """mask_mod that calls ``mask.mask_mod`` as it is, for calls with ``q_len == kv_len`` in whole
    blocks: flex's indices are then the absolute positions and never run past the ends.  This is
    the hand-rolled call; the mapping of :func:`_general_mod` (three scalar loads and two compares
    per element) made a cheap custom mask 2x slower on an H200 (7.2 vs 3.7 ms fwd+bwd, B=4 S=4096).
    """
    def bare_mod(b, h, q_idx, kv_idx):
        return mask.mask_mod(b, h, q_idx, kv_idx)
    return bare_mod


def _general_mod(mask, q_len: int, kv_len: int, device):
    """mask_mod wrapping ``mask.mask_mod`` with absolute, clamped positions."""
    info = torch.tensor([kv_len - q_len, q_len - 1, kv_len - 1], device=device)  # offset, last q, last kv

    def general_mod(b, h, q_idx, kv_idx):
        q_abs = torch.minimum(q_idx, info[1]) + info[0]
        kc = torch.minimum(kv_idx, info[2])
        return mask.mask_mod(b, h, q_abs, kc) & (q_idx <= info[1]) & (kv_idx <= info[2])
    return general_mod


def _compact(sel: torch.Tensor):
    """Selected kv blocks of each row of tiles: counts int32 [B, H, nQ], indices int32 [B, H, nQ, nK]."""
    num = sel.sum(-1, dtype=torch.int32)
    idx = torch.argsort(sel.to(torch.int8), dim=-1, descending=True, stable=True).to(torch.int32)
    return num, idx


def block_mask_from_tiles(classes: torch.Tensor, block: tuple[int, int], seq_lengths: tuple[int, int],
                          mask_mod):
    """``BlockMask.from_kv_blocks`` from tile classes ``int8 [B, H|1, nQ, nK]``."""
    from torch.nn.attention.flex_attention import BlockMask

    kv_num, kv_idx = _compact(classes == tiles.PARTIAL)
    full_num, full_idx = _compact(classes == tiles.FULL)
    return BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=block,
                                    mask_mod=mask_mod, seq_lengths=seq_lengths)


class Flex(Backend):
    name = "flex"
    summary = "FlexAttention, compiled once; BlockMask from the mask's tiles (skips empty tiles)"
    traces_mask_mod = True

    def __init__(self, block: int = BLOCK):
        self.block = block
        # plans that keep their mask (and its tensors) alive are capped apart: a model given a new
        # dense 4-D mask every forward
        self._plans = IdentityLRU(_CACHE_SIZE, at_most=(lambda plan: plan.holds_mask, _HOLDING_SIZE))

    # reasons ---------------------------------------------------------------------------------
    def _machine_reasons(self) -> list[str]:
        try:
            import torch.nn.attention.flex_attention  # noqa: F401
        except ImportError:
            return [f"torch {torch.__version__} has no torch.nn.attention.flex_attention (needs torch >= 2.5)"]
        if not torch._dynamo.is_dynamo_supported():
            return [f"torch.compile (dynamo) is not supported on this Python with torch {torch.__version__}"]
        return []

    def problem_reasons(self, p) -> list[str]:
        if p.device_type == "cpu":
            return _cpu_reasons(p)
        if p.device_type != "cuda":
            return [f"flex is wired for cpu and cuda here, not {p.device_type}"]
        return _cuda_reasons(p)

    # compiled form ---------------------------------------------------------------------------
    def plan(self, p) -> Plan:
        """The cached compiled form of ``p``'s mask (LRU of 32, keyed by mask identity, shapes and
        :func:`anymask.masks.stamp`)."""
        key = (p.batch, p.q_heads, p.q_len, p.kv_len, str(p.device), self.block, M.stamp(p.mask))
        return self._plans.get((p.mask,), key, lambda: self._build(p))

    def _build(self, p) -> Plan:
        cpu = p.device_type == "cpu"
        sq, skv = (_bucket(p.q_len), _bucket(p.kv_len)) if cpu else (p.q_len, p.kv_len)
        bq, bk = (min(self.block, sq), min(self.block, skv)) if cpu else (self.block, self.block)
        classes = tiles.tile_classes(p.mask, p.batch, p.q_heads, p.q_len, p.kv_len, (bq, bk),
                                     device=p.device, structure=p.structure)  # [B, H|1, nQ, nK]
        if p.kv_len % bk:  # the last column of tiles holds keys past kv_len: never run it unmasked
            last = classes[..., -1]
            last[last == tiles.FULL] = tiles.PARTIAL
        classes = tiles.pad_dim(tiles.pad_dim(classes, 2, -(-sq // bq), tiles.EMPTY), 3, -(-skv // bk), tiles.EMPTY)
        q_rows, kv_cols = classes.shape[2] * bq, classes.shape[3] * bk  # whole blocks
        structured = tiles.is_structured(p.structure)  # contiguity: a host sync, checked once
        whole = p.q_len == p.kv_len == q_rows == kv_cols
        if structured and p.structure.base == "prefix_groups" and whole:
            # packed prefix-LM: per-row intervals ran 242 TFLOP/s fwd+bwd where hand-rolled flex (the
            # mask's own mask_mod) ran 255; with that mask_mod, 256 = 256 (H200, bf16, B=4 S=4096 16
            # heads; benchmarks/results/nvidia-h200/parts/flex-packed-prefix/); whole blocks: no offsets
            mask_mod = _bare_mod(p.mask.to(p.device))
            structured = False  # the mask_mod holds the mask
        elif structured and _is_plain_documents(p.structure):
            mask_mod = _documents_mod(p.structure, p.batch, p.q_len, p.kv_len, q_rows, kv_cols, p.device)
        elif structured:
            lo, hi, valid = tiles.row_bounds(p.structure, p.batch, p.q_len, p.kv_len, p.device)  # [B, Sq]
            lo = tiles.pad_dim(lo.to(torch.int32), 1, q_rows, skv).contiguous()  # padded rows see nothing
            hi = tiles.pad_dim(hi.to(torch.int32), 1, q_rows, -1).contiguous()  # [B, Sq']
            if valid is not None:
                valid = tiles.pad_dim(valid.to(torch.int32), 1, kv_cols, 0).contiguous()  # [B, Skv']
            mask_mod = _interval_mod(lo, hi, valid)
        elif whole:
            mask_mod = _bare_mod(p.mask.to(p.device))  # whole blocks, no offset: nothing to map
        else:
            mask_mod = _general_mod(p.mask.to(p.device), p.q_len, p.kv_len, p.device)
        return Plan(block_mask_from_tiles(classes, (bq, bk), (sq, skv), mask_mod), sq, skv, not structured)

    # run -------------------------------------------------------------------------------------
    def run(self, q, k, v, p):
        plan = self.plan(p)
        if not p.requires_grad:  # flex refuses requires_grad inputs on CPU even under no_grad
            q, k, v = q.detach(), k.detach(), v.detach()
        q_ = tiles.pad_dim(q, 2, plan.q_len, 0)  # [B, Hq, Sq', D]
        k_ = tiles.pad_dim(k, 2, plan.kv_len, 0)  # [B, Hkv, Skv', D]
        v_ = tiles.pad_dim(v, 2, plan.kv_len, 0)
        with torch._dynamo.config.patch(recompile_limit=_RECOMPILE_LIMIT):
            out = compiled_flex(p.device_type)(q_, k_, v_, block_mask=plan.block_mask, scale=p.scale,
                                               enable_gqa=True)  # [B, Hq, Sq', D]
        return out[:, :, :p.q_len] if plan.q_len != p.q_len else out


def _cuda_reasons(p) -> list[str]:
    """Limits of flex's Triton kernels, as seen on an H200 with torch 2.11."""
    reasons = []
    if p.dtype == torch.float64:
        reasons.append("compiled FlexAttention does not build float64 kernels on CUDA (Triton compilation "
                       "error with torch 2.11); use float32 or eager")
    if p.head_dim < 16:
        reasons.append(f"FlexAttention on CUDA needs head dim >= 16, got {p.head_dim}")
    if p.head_dim > 256:
        reasons.append(f"head dim {p.head_dim} > 256: flex's Triton kernels exceed shared memory (H200, torch 2.11)")
    return reasons


def _cpu_reasons(p) -> list[str]:
    reasons = []
    if p.requires_grad:
        reasons.append(f"FlexAttention has no backward on CPU (torch {torch.__version__}: 'FlexAttention "
                       "does not support backward on CPU'); use sdpa or eager to train on CPU")
    if p.dtype == torch.float64:
        reasons.append("compiled FlexAttention on CPU supports float32, float16 and bfloat16, not float64")
    reasons.extend(_cpu_machine_reasons())
    return reasons


_CPU_MACHINE: list[str] | None = None


def _cpu_machine_reasons() -> list[str]:
    """Why compiled flex cannot run on this CPU at all (probed once)."""
    global _CPU_MACHINE
    if _CPU_MACHINE is None:
        _CPU_MACHINE = []
        if not torch.cpu._is_avx2_supported() or os.getenv("ATEN_CPU_CAPABILITY") == "default":
            _CPU_MACHINE.append("compiled FlexAttention on CPU needs AVX2 (and ATEN_CPU_CAPABILITY != default)")
        from torch._inductor import config

        cxx = config.cpp.cxx[-1] if isinstance(config.cpp.cxx, tuple) else config.cpp.cxx
        if cxx and not shutil.which(cxx):
            _CPU_MACHINE.append(f"torch.compile on CPU needs a C++ compiler; {cxx!r} is not on PATH")
    return _CPU_MACHINE
