"""cuDNN fused attention through ``nvidia-cudnn-frontend`` graphs (bf16/fp16, CUDA).

How masks become cuDNN graphs (see :mod:`anymask.kernels.cudnn_graphs` for the graph semantics):

    full / causal / window       one dense graph; causal and windows bottom-right aligned when
                                 q_len < kv_len (top-left when square)
    documents and/or padding     ragged graphs, one batch entry per segment (:mod:`anymask.segments`)
                                 with its lengths, the base mask inside each segment; read in place
                                 where the layout allows (below), else packed into a THD copy
    prefix-LM                    two disjoint row blocks, no merge of softmax states:

        rows <  P   full attention over keys < P     (padding mask with per-batch lengths
                                                      when P differs between batch rows)
        rows >= P   causal, bottom-right aligned, over all keys (keys < P are already visible)

        # # . . . .      block A: rows 0-1, keys 0-1
        # # . . . .
        # # # . . .      block B: rows 2-5 (started at a multiple of 128 <= min P, so per-batch
        # # # # . .               P share graphs; rows of B below a batch row's P are dropped)
        # # # # # .
        # # # # # #

    When P is the same multiple of 128 in every batch row (and q, k, v are dense permutations),
    the blocks split the rows exactly and write views of one output (:class:`_RowBlocks`; for
    training, B is replaced by plain causal attention over all rows, see there); otherwise the
    rows both blocks cover are merged.

Ragged layouts, chosen per call from the inputs' strides (segments must be runs of positions):

    tokens   q, k, v laid out [B, S, H, D] (Hugging Face's layout, viewed as [B, H, S, D]): that is
             already THD; one entry per segment, offsets into the inputs themselves
    heads    q, k, v contiguous [B, H, S, D] without GQA: one-head graphs whose entries are (row,
             head, segment), each a run of S-major rows of one head

                 memory of k  [b0 h0: seg0 seg1 | b0 h1: seg0 seg1 | b1 h0: seg2 ...]
                 entries       e0   e1          e2   e3             e4  ...

             (with G > 1 query heads per kv head this takes G graphs, the j-th query head of
             every group each, whose dk, dv are summed: only when ``_TRANSPOSE_MIN_GROUP`` > G)
    transpose
             q, k, v contiguous [B, H, S, D] with G >= ``_TRANSPOSE_MIN_GROUP`` query heads per kv
             head: one transpose copy each into [B, S, H, D] memory (moved as 8-byte words,
             ``kernels/relayout.py``; so is dO in backward), then ``tokens``: one GQA graph
             instead of G; o, dq, dk, dv keep that memory (the result is a [B, H, S, D] view).
             Faster, but the copies cost memory: at 32:8, B 4, S 4096 the call peaks at 1.4 GB
             (0.7 GB in place)

    pack     anything else: rows copied into a packed THD tensor (gathered where padding leaves
             holes), one-token dummy entries filling the bucket

In place, positions in no segment (padding) are never written by cuDNN: those rows of o, dq (and
of dk, dv for padded keys) are zeroed (:func:`anymask.kernels.cudnn_graphs.alloc`).  Buckets are
filled with length-0 entries, which need a cuDNN backend that takes them (measured exact on 9.19;
older ones pack).

Every row given to cuDNN sees at least one key (a query always sees itself), so cuDNN's non-zero
output for fully masked rows never reaches the user: rows that see nothing are exactly the padded
queries, which repad fills with 0 (zero gradient).  Graph shapes are bucketed (segment count,
max segment length, token capacity, prefix blocks) so new packings reuse cached graphs.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache

import torch
from torch.autograd.function import once_differentiable

from .. import segments as SEG
from .._optional import probe
from ..kernels import relayout
from ..problem import Problem
from .base import Backend
from .common import PerMaskCache

_MIN_BACKEND = 90600  # GQA with ragged offsets, int64 offsets, bottom-right causal + windows
_ROW_BLOCK = 128  # prefix-LM block edges are multiples of this (graph reuse across prefixes)
_EMPTY_ENTRIES_MIN = 91900  # length-0 ragged entries measured exact (cudnn-probe/layout.jsonl, cuDNN 9.19)
# Contiguous GQA inputs are copied to [B, S, H, D] (one graph, not G).  On an H100 (B 4, S 4096, bf16
# fwd+bwd, nvidia-h100/cudnn-wide-copies/probe, copies in 8-byte words) at 32:8: documents 4.30 ->
# 3.60 ms, causal documents 3.20 -> 2.34, padding 4.97 -> 4.37; at 16:8 (groups of 2): 2.20 -> 1.85,
# 1.68 -> 1.28, 2.55 -> 2.23.  At 16:16 the copies lose even in 8-byte words (documents 1.72 -> 1.80
# ms, causal documents 1.19 -> 1.24: they cost 185 us, the tokens layout saves cuDNN about 125 us;
# nvidia-h100/cudnn-layouts-16h), so heads without GQA stay in place.
_TRANSPOSE_MIN_GROUP = 2


# bucketing ---------------------------------------------------------------------------------------


def pow2_bucket(n: int, minimum: int = 1) -> int:
    """Smallest power of two ``>= max(n, minimum)``."""
    n = max(int(n), minimum, 1)
    return 1 << (n - 1).bit_length()


def round_up(n: int, multiple: int) -> int:
    return -(-int(n) // multiple) * multiple


# planning (pure PyTorch, CPU-testable) -----------------------------------------------------------


@dataclass(frozen=True)
class Band:
    """cuDNN's diagonal band: alignment and bounds (``None`` = unbounded)."""

    bottom_right: bool = False
    left_bound: int | None = None
    right_bound: int | None = None


@dataclass(frozen=True, eq=False)
class Block:
    """One dense graph over query rows ``[row0, row1)`` and keys ``[0, kv1)``.

    ``seq_q``/``seq_kv`` (``[B]`` long, or None) are per-batch lengths within the block (padding
    mask); ``owns`` (``[B, row1 - row0]`` bool, or None = all) marks the rows whose output is used.
    """

    row0: int
    row1: int
    kv1: int
    band: Band
    seq_q: torch.Tensor | None = None
    seq_kv: torch.Tensor | None = None
    owns: torch.Tensor | None = None


@dataclass(frozen=True, eq=False)
class DensePlan:
    blocks: tuple[Block, ...]  # one block, or (A, B) for prefix-LM with A.row0 = 0, B.row0 <= A.row1


@dataclass(frozen=True, eq=False)
class RaggedPlan:
    """Segments as batch entries of a ragged graph; padded up to ``segments`` with one-token dummies."""

    layout: SEG.Layout
    band: Band
    segments: int  # N bucket
    q_len: int  # max segment length buckets
    kv_len: int
    total_q: int  # token capacity buckets (real tokens + dummies)
    total_kv: int
    on_device: dict = field(default_factory=dict)  # (device, heads, head dim) -> _RaggedTensors, on first use

    @property
    def dummies(self) -> int:
        return self.segments - self.layout.num_segments

    def seq_lengths(self) -> tuple[list[int], list[int]]:
        """Per-entry lengths, dummies (one token each) included."""
        return list(self.layout.q_lengths) + [1] * self.dummies, list(self.layout.k_lengths) + [1] * self.dummies

    def starts(self) -> tuple[list[int], list[int]]:
        """Token offsets ``[N + 1]`` of each entry in the packed q and k (dummy d sits at ``T + d``)."""
        lq, lk = self.seq_lengths()
        return _cumsum(lq), _cumsum(lk)


@dataclass(frozen=True)
class _RaggedTensors:
    """A ragged plan's per-call tensors for one input layout on one device, made once: host-to-device
    copies of pageable memory synchronise the stream, which cost more than the graphs on an H200."""

    mode: str  # "tokens" | "heads" | "pack" (module docstring)
    entries: int  # the graph's batch (entry bucket)
    heads: tuple[int, int]  # the graph's (query, kv) heads: 1, 1 for "heads"
    total: tuple[int, int]  # token capacity of the (query, kv) tensors the graph reads
    metas: tuple  # cudnn_graphs.Meta per graph call (one; "heads": one per query head of a group)
    q_index: torch.Tensor | None = None  # pack: [Tq + dummies] flat query rows (dummy d copies token 0)
    k_index: torch.Tensor | None = None  # pack: [Tk + dummies]
    q_whole: bool = False  # pack: the queries are every row of q in order (a transpose, no gather)
    k_whole: bool = False


@lru_cache(maxsize=None)
def _empty_entries_ok() -> bool:
    """Whether this cuDNN takes length-0 ragged entries (bucket filling without dummy tokens)."""
    found = probe("cudnn")
    return not isinstance(found, str) and found.backend_version() >= _EMPTY_ENTRIES_MIN


def layout_mode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, p: Problem, lay: SEG.Layout) -> str:
    """How a ragged plan reads ``q, k, v`` (each ``[B, H, S, D]``): ``tokens``, ``heads``,
    ``transpose`` or ``pack``."""
    if not lay.contiguous or any(t.data_ptr() % 16 for t in (q, k, v)) or not _empty_entries_ok():
        return "pack"
    if all(t.transpose(1, 2).is_contiguous() for t in (q, k, v)):
        return "tokens"
    if all(t.is_contiguous() for t in (q, k, v)):
        return "transpose" if p.q_heads // p.kv_heads >= _TRANSPOSE_MIN_GROUP else "heads"
    return "pack"


def _ragged_tensors(pl: RaggedPlan, p: Problem, device: torch.device, mode: str = "pack") -> _RaggedTensors:
    """The plan's tensors for ``p`` read in ``mode`` on ``device``; element offsets depend on the head
    counts and head dim, which the plan (a layout of tokens) does not, so they are part of the key."""
    key = (device, mode, p.q_heads, p.kv_heads, p.head_dim)
    hit = pl.on_device.get(key)
    if hit is None:
        hit = pl.on_device[key] = (_packed if mode == "pack" else _in_place)(pl, p, device, mode)
    return hit


def _column(values, dtype, device) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype).view(-1, 1, 1, 1).to(device)  # [N, 1, 1, 1]


def _in_place(pl: RaggedPlan, p: Problem, device: torch.device, mode: str) -> _RaggedTensors:
    """Entries over the inputs themselves: ``tokens`` one per segment over ``[B * S, H, D]``;
    ``heads`` one per (row, kv head, segment) over ``[B * H * S, 1, D]``, one graph call per query
    head of a group; length-0 entries fill the bucket."""
    from ..kernels import cudnn_graphs as G

    lay, D, Sq, Skv, Hq, Hk = pl.layout, p.head_dim, p.q_len, p.kv_len, p.q_heads, p.kv_heads
    cq, ck = lay.cu_seqlens_q.tolist(), lay.cu_seqlens_k.tolist()
    first_q = lay.q_index.cpu()[cq[:-1]].tolist() if lay.num_segments else []  # flat row b * Sq + s0
    first_k = lay.k_index.cpu()[ck[:-1]].tolist() if lay.num_segments else []
    if mode == "tokens":
        heads, unit_q, unit_k, calls = (Hq, Hk), Hq * D, Hk * D, 1
        order = [(n, 0) for n in range(lay.num_segments)]
        total = (pow2_bucket(p.batch * Sq, 64), pow2_bucket(p.batch * Skv, 64))  # graph reuse across lengths
    else:
        heads, unit_q, unit_k, calls = (1, 1), D, D, Hq // Hk
        rows: dict[int, list[int]] = {}
        for n, f in enumerate(first_q):
            rows.setdefault(f // Sq, []).append(n)
        order = [(n, h) for b in sorted(rows) for h in range(Hk) for n in rows[b]]  # memory order
        total = (pow2_bucket(p.batch * Hq * Sq, 64), pow2_bucket(p.batch * Hk * Skv, 64))

    def offsets(j: int) -> tuple[list[int], list[int]]:
        if mode == "tokens":
            return [first_q[n] * unit_q for n, _ in order], [first_k[n] * unit_k for n, _ in order]
        return ([((first_q[n] // Sq * Hq + h * calls + j) * Sq + first_q[n] % Sq) * D for n, h in order],
                [((first_k[n] // Skv * Hk + h) * Skv + first_k[n] % Skv) * D for n, h in order])

    lq = [lay.q_lengths[n] for n, _ in order]
    lk = [lay.k_lengths[n] for n, _ in order]
    entries = pow2_bucket(len(order))
    empty = entries - len(order)  # length 0, starting where the last entry ends
    seq_q = _column(lq + [0] * empty, torch.int32, device)
    seq_kv = _column(lk + [0] * empty, torch.int32, device)
    offs = [offsets(j) for j in range(calls)]
    rows_q = p.batch * Sq * (Hq if mode == "heads" else 1)  # first dim of the tensors the graphs read
    rows_k = p.batch * Skv * (Hk if mode == "heads" else 1)
    holes_q = _holes([o // unit_q for off_q, _ in offs for o in off_q], lq * calls, rows_q)  # no call's rows
    holes_kv = _holes([o // unit_k for o in offs[0][1]], lk, rows_k)  # every call has the same kv entries
    metas = []
    for off_q, off_k in offs:
        end_q = off_q[-1] + lq[-1] * unit_q if order else 0
        end_k = off_k[-1] + lk[-1] * unit_k if order else 0
        metas.append(G.Meta(seq_q, seq_kv, _column(off_q + [end_q] * (empty + 1), torch.int64, device),
                            _column(off_k + [end_k] * (empty + 1), torch.int64, device), holes_q, holes_kv))
    return _RaggedTensors(mode, entries, heads, total, tuple(metas))


def _holes(starts: list[int], lengths: list[int], rows: int) -> tuple[tuple[int, int], ...]:
    """The runs ``(start, stop)`` of ``range(rows)`` in no entry ``[start, start + length)``."""
    out, end = [], 0
    for start, n in sorted(zip(starts, lengths)):
        if n and start > end:
            out.append((end, start))
        end = max(end, start + n) if n else end
    if end < rows:
        out.append((end, rows))
    return tuple(out)


def _packed(pl: RaggedPlan, p: Problem, device: torch.device, mode: str) -> _RaggedTensors:
    """Rows copied into ``[T + dummies, H, D]``, one entry per segment, one-token dummies."""
    from ..kernels import cudnn_graphs as G

    lay = pl.layout
    pad_q = lay.q_index[:1].expand(pl.dummies) if lay.q_index.numel() else lay.q_index.new_zeros(pl.dummies)
    pad_k = lay.k_index[:1].expand(pl.dummies) if lay.k_index.numel() else lay.k_index.new_zeros(pl.dummies)
    lq, lk = pl.seq_lengths()
    sq, sk = pl.starts()
    D = p.head_dim
    meta = G.Meta(_column(lq, torch.int32, device), _column(lk, torch.int32, device),
                  _column([x * p.q_heads * D for x in sq], torch.int64, device),
                  _column([x * p.kv_heads * D for x in sk], torch.int64, device))

    def whole(index: torch.Tensor, rows: int) -> bool:
        return index.numel() == rows and torch.equal(index.cpu(), torch.arange(rows))

    return _RaggedTensors("pack", pl.segments, (p.q_heads, p.kv_heads), (pl.total_q, pl.total_kv), (meta,),
                          torch.cat([lay.q_index, pad_q]).to(device), torch.cat([lay.k_index, pad_k]).to(device),
                          whole(lay.q_index, p.batch * p.q_len), whole(lay.k_index, p.batch * p.kv_len))


class _PackRows(torch.autograd.Function):
    """``[B, H, S, D] -> [B * S + dummies, H, D]`` (THD), every row in order, dummies copying
    token 0: one copy (none on the way back: the gradient of the real rows is a view)."""

    @staticmethod
    def forward(ctx, x, dummies: int):
        B, H, S, D = x.shape
        out = x.new_empty(B * S + dummies, H, D)
        relayout.copy_(out[:B * S].view(B, S, H, D), x.transpose(1, 2))
        out[B * S:].copy_(x[0, :, 0].unsqueeze(0).expand(dummies, H, D))
        ctx.shape = (B, H, S, D)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        B, H, S, D = ctx.shape
        return grad[:B * S].reshape(B, S, H, D).transpose(1, 2), None  # dummies' gradient is 0


class _ToTokens(torch.autograd.Function):
    """``[B, H, S, D] -> [B * S, H, D]`` rows in new memory (one copy in wide words); the gradient
    goes back as a ``[B, H, S, D]`` view of the rows' gradient, without a copy."""

    @staticmethod
    def forward(ctx, x):
        ctx.shape = x.shape
        return relayout.tokens_major(x)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        B, H, S, D = ctx.shape
        return grad.reshape(B, S, H, D).transpose(1, 2)


class _TokensView(torch.autograd.Function):
    """``[B * S, H, D]`` rows -> their ``[B, H, S, D]`` view; the gradient, in whatever layout it
    comes (contiguous ``[B, H, S, D]`` after a transpose copy), goes back as ``[B * S, H, D]`` rows,
    copied in wide words when it is not laid out so already."""

    @staticmethod
    def forward(ctx, rows, batch: int):
        T, H, D = rows.shape
        return rows.view(batch, T // batch, H, D).transpose(1, 2)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        g = grad.transpose(1, 2)  # [B, S, H, D]
        if not g.is_contiguous():
            g = relayout.copy_(torch.empty(g.shape, dtype=g.dtype, device=g.device), g)
        return g.view(-1, *g.shape[2:]), None


def _cumsum(lengths: list[int]) -> list[int]:
    out = [0]
    for n in lengths:
        out.append(out[-1] + n)
    return out


def _band(p: Problem, bottom_right: bool) -> Band:
    """The base mask (full / causal / window) as a cuDNN band."""
    s = p.structure
    if s.base == "full":
        return Band()
    if s.base == "causal":
        return Band(bottom_right, None, 0)
    return Band(bottom_right, None if s.left is None else s.left + 1, s.right)


def plan(p: Problem):
    """The cuDNN calls for ``p`` (assumes :func:`reasons` is empty)."""
    s = p.structure
    if s.documents is not None or s.valid is not None:
        return _ragged_plan(p)
    if s.base == "prefix_lm":
        return _prefix_plan(p)
    return DensePlan((Block(0, p.q_len, p.kv_len, _band(p, p.q_len < p.kv_len)),))


def _ragged_plan(p: Problem) -> RaggedPlan:
    lay = SEG.layout(p.structure, p.batch, p.q_len, p.kv_len, device=p.device)
    n = max(lay.num_segments, 1)
    segments = pow2_bucket(n)
    dummies = segments - lay.num_segments
    tq = int(lay.cu_seqlens_q[-1]) + dummies
    tk = int(lay.cu_seqlens_k[-1]) + dummies
    return RaggedPlan(lay, _band(p, p.q_len < p.kv_len), segments,
                      pow2_bucket(lay.max_seqlen_q, 64), pow2_bucket(lay.max_seqlen_k, 64),
                      pow2_bucket(tq, 64), pow2_bucket(tk, 64))


def _prefix_plan(p: Problem) -> DensePlan:
    B, Sq, Skv = p.batch, p.q_len, p.kv_len
    prefix = p.structure.prefix.to("cpu").long().expand(B)  # [B] keys < P are visible to all
    rows = (prefix - (Skv - Sq)).clamp(0, Sq)  # [B] query rows inside the prefix
    lo, hi = int(rows.min()), int(rows.max())
    blocks = []
    if hi > 0:
        n_a = min(Sq, round_up(hi, _ROW_BLOCK))
        kv_a = min(Skv, round_up(int(prefix.max()), _ROW_BLOCK))
        exact = bool((rows == n_a).all()) and bool((prefix == kv_a).all())
        local = torch.arange(n_a)  # [nA]
        blocks.append(Block(0, n_a, kv_a, Band(),
                            None if exact else rows.clamp(min=1), None if exact else prefix.clamp(min=1),
                            local[None, :] < rows[:, None]))
    b0 = (lo // _ROW_BLOCK) * _ROW_BLOCK
    if lo < Sq:
        local = torch.arange(b0, Sq)  # [Sq - b0]
        owns = local[None, :] >= rows[:, None]  # [B, Sq - b0]
        blocks.append(Block(b0, Sq, Skv, Band(Sq - b0 < Skv, None, 0), owns=None if bool(owns.all()) else owns))
    return DensePlan(tuple(blocks))


def plan_to_dense(pl, batch: int, q_len: int, kv_len: int) -> torch.Tensor:
    """What a plan computes, as a bool mask ``[B, Sq, Skv]`` (cuDNN band semantics); the tests
    compare it with ``mask.to_dense``."""
    out = torch.zeros(batch, q_len, kv_len, dtype=torch.bool)
    if isinstance(pl, RaggedPlan):
        lay = pl.layout
        cq, ck = lay.cu_seqlens_q.tolist(), lay.cu_seqlens_k.tolist()
        qi, ki = lay.q_index.cpu(), lay.k_index.cpu()
        for n in range(lay.num_segments):
            rows, keys = qi[cq[n]:cq[n + 1]], ki[ck[n]:ck[n + 1]]  # flat positions
            grid = _band_grid(pl.band, len(rows), len(keys))  # [nq, nk]
            b = int(rows[0]) // q_len
            out[b, (rows % q_len)[:, None], (keys % kv_len)[None, :]] = grid
        return out
    for blk in pl.blocks:
        for b in range(batch):
            nq = blk.row1 - blk.row0 if blk.seq_q is None else min(int(blk.seq_q[b]), blk.row1 - blk.row0)
            nk = blk.kv1 if blk.seq_kv is None else min(int(blk.seq_kv[b]), blk.kv1)
            grid = torch.zeros(blk.row1 - blk.row0, kv_len, dtype=torch.bool)
            grid[:nq, :nk] = _band_grid(blk.band, nq, nk)
            owns = torch.ones(blk.row1 - blk.row0, dtype=torch.bool) if blk.owns is None else blk.owns[b]
            rows = torch.arange(blk.row0, blk.row1)[owns]
            out[b, rows] = grid[owns]
    return out


def _band_grid(band: Band, nq: int, nk: int) -> torch.Tensor:
    """cuDNN's band for one batch entry of ``nq`` rows and ``nk`` keys, bool ``[nq, nk]``."""
    i = torch.arange(nq)[:, None]
    j = torch.arange(nk)[None, :]
    d = nk - nq if band.bottom_right else 0
    ok = torch.ones(nq, nk, dtype=torch.bool)
    if band.right_bound is not None:
        ok &= j <= i + d + band.right_bound
    if band.left_bound is not None:
        ok &= j > i + d - band.left_bound
    return ok


# reasons -----------------------------------------------------------------------------------------


@lru_cache(maxsize=None)
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def _head_dim_ok(d: int, major: int) -> bool:
    return d % 8 == 0 and (d <= 128 or (d == 256 and major >= 9))


_FAILED: dict[tuple, str] = {}  # signature -> first cuDNN error seen for it (then a reason)


def _signature(p: Problem) -> tuple:
    """What a cuDNN graph failure is remembered by (coarser than a graph: one failure per kind)."""
    return (p.dtype, p.head_dim, p.q_heads, p.kv_heads, p.structure.kind(), p.q_len < p.kv_len, p.requires_grad)


def reasons(p: Problem) -> list[str]:
    """Why the cuDNN backend cannot run ``p`` (machine reasons aside)."""
    out = []
    s = p.structure
    if p.device_type != "cuda":
        return [f"inputs are on {p.device}; cuDNN attention runs on CUDA tensors"]
    if p.dtype not in (torch.bfloat16, torch.float16):
        out.append(f"cuDNN fused attention has no {p.dtype} kernels (fp16/bf16 only); use triton, sdpa or flex")
    major = _capability(p.device.index if p.device.index is not None else torch.cuda.current_device())[0]
    if not _head_dim_ok(p.head_dim, major):
        out.append(f"head dim {p.head_dim} unsupported by cuDNN SDPA (multiple of 8, <= 128, or 256 on Hopper+)")
    if s.general:
        out.append(f"mask has general terms ({', '.join(map(repr, s.general))}); cuDNN takes "
                   "documents/padding with full/causal/window, or prefix-LM")
        return out
    if s.base == "prefix_groups":
        out.append("packed prefix-LM (causal() | documents(groups)) has no cuDNN band or row-block plan; "
                   "use triton or flex")
        return out
    if s.base == "window" and (s.right is None or s.right > 0):
        out.append(f"window(left={s.left}, right={s.right}) looks ahead; the cuDNN backend takes causal "
                   "sliding windows (right=0) only")
    if s.documents is not None or s.valid is not None:
        if s.base == "prefix_lm":
            out.append("prefix-LM combined with documents/padding is not a per-segment band; use triton or flex")
        else:
            out.extend(SEG.reasons(s, p.batch, p.q_len, p.kv_len))
        if major < 9:
            out.append("cuDNN's ragged (THD) layout for documents/padding needs Hopper or newer")
    if p.requires_grad and p.q_len == 1 and p.kv_len == 1:
        out.append("cuDNN SDPA backward does not take q_len = kv_len = 1")
    failed = _FAILED.get(_signature(p))
    if failed:
        out.append(f"cuDNN failed on this kind of call earlier in this process: {failed}")
    return out


# execution ---------------------------------------------------------------------------------------


@contextmanager
def _remembered(sig: tuple):
    """Graph errors inside are remembered under ``sig`` (then a reason: ``auto`` skips cuDNN for
    this kind of call) and raised."""
    from ..kernels import cudnn_graphs as G

    try:
        yield
    except G.CudnnGraphError as exc:
        _FAILED.setdefault(sig, str(exc).splitlines()[0])
        raise


class _Attention(torch.autograd.Function):
    """One cuDNN graph call; backward through the cached backward graph.  A graph error is
    remembered under the problem's signature, so ``auto`` skips cuDNN for it afterwards."""

    @staticmethod
    def forward(ctx, q, k, v, spec, meta, training, sig):
        from ..kernels import cudnn_graphs as G

        with _remembered(sig):
            o, stats = G.forward(spec, q, k, v, meta, training)
        if training:
            ctx.save_for_backward(q, k, v, o, stats)
        ctx.spec, ctx.meta, ctx.sig = spec, meta, sig
        return o

    @staticmethod
    @once_differentiable
    def backward(ctx, do):
        from ..kernels import cudnn_graphs as G

        q, k, v, o, stats = ctx.saved_tensors
        if not ctx.spec.ragged:  # saved-tensor hooks (e.g. offloading) may hand back other strides
            declared = G.declared_strides(ctx.spec)
            q, k, v, o = (_with_strides(t, st) for t, st in zip((q, k, v, o), declared))
        with _remembered(ctx.sig):
            do = _with_strides(do, o.stride())  # laid out like o, 16-byte aligned base
            dq, dk, dv = G.backward(ctx.spec, q, k, v, o, do, stats, ctx.meta)
        return dq, dk, dv, None, None, None, None


class _HeadGroups(torch.autograd.Function):
    """``heads`` mode: one ragged graph call per query head of a kv group, all writing one output
    (disjoint entries); in backward their dq share one tensor, their dk, dv are summed in fp32."""

    @staticmethod
    def forward(ctx, q, k, v, spec, metas, training, sig):
        from ..kernels import cudnn_graphs as G

        o = G.alloc(q.shape, q.dtype, q.device, metas[0].holes_q)  # holes: rows of no call's entries
        stats = []
        with _remembered(sig):
            for meta in metas:
                stats.append(G.forward(spec, q, k, v, meta, training, out=o)[1])
        if training:
            ctx.save_for_backward(q, k, v, o, *stats)
        ctx.spec, ctx.metas, ctx.sig = spec, metas, sig
        return o

    @staticmethod
    @once_differentiable
    def backward(ctx, do):
        from ..kernels import cudnn_graphs as G

        q, k, v, o, *stats = ctx.saved_tensors
        calls, meta0 = len(ctx.metas), ctx.metas[0]
        dq = G.alloc(q.shape, q.dtype, q.device, meta0.holes_q)
        # [Tk, 1, D]; every call writes the same kv entries
        dk, dv = (G.alloc(t.shape, t.dtype, t.device, meta0.holes_kv) for t in (k, v))
        sums = None
        if calls > 1:  # the calls' dk, dv summed in (at least) fp32, rounded once
            acc = torch.promote_types(k.dtype, torch.float32)
            sums = (torch.zeros(k.shape, dtype=acc, device=k.device), torch.zeros(v.shape, dtype=acc, device=v.device))
        with _remembered(ctx.sig):
            do = _with_strides(do, o.stride())
            for j, meta in enumerate(ctx.metas):
                G.backward(ctx.spec, q, k, v, o, do, stats[j], meta, out=(dq, dk, dv))
                if sums is not None:
                    sums[0].add_(dk)
                    sums[1].add_(dv)
        if sums is not None:
            dk, dv = sums[0].to(k.dtype), sums[1].to(v.dtype)
        return dq, dk, dv, None, None, None, None


def _dense_ready(t: torch.Tensor) -> torch.Tensor:
    """A view cuDNN can read: dense last dim, no broadcast strides, 16-byte aligned base."""
    if t.stride(-1) != 1 or 0 in t.stride():
        return t.contiguous()
    if t.data_ptr() % 16:
        return t.clone(memory_format=torch.contiguous_format)  # a contiguous view: .contiguous() is itself
    return t


def _with_strides(t: torch.Tensor, stride: tuple[int, ...]) -> torch.Tensor:
    """``t`` laid out with ``stride`` (what a graph was built for), copied only when it is not."""
    if all(st == want or n == 1 for n, st, want in zip(t.shape, t.stride(), stride)) and t.data_ptr() % 16 == 0:
        return t
    return relayout.copy_(torch.empty_strided(t.shape, stride, dtype=t.dtype, device=t.device), t)


def _dense_permutation(t: torch.Tensor) -> bool:
    """True when ``t`` covers its storage span exactly in some dim order (e.g. a ``[B, S, H, D]``
    tensor viewed as ``[B, H, S, D]``), so ``empty_like(t)`` has its strides (views with gaps,
    such as most row slices, do not)."""
    expect = 1
    for dim in sorted(range(t.dim()), key=t.stride):
        if t.size(dim) != 1 and t.stride(dim) != expect:
            return False
        expect *= t.size(dim)
    return True


def _block_spec(q, k, v, p: Problem, blk: Block, keep_layout: bool | None = None):
    """The dense graph spec of ``blk`` over the views ``q[:, :, row0:row1]``, ``k/v[:, :, :kv1]``;
    outputs in the views' layout when they are dense permutations (``keep_layout=None``) or as told."""
    from ..kernels import cudnn_graphs as G

    qb = q[:, :, blk.row0:blk.row1]  # [B, Hq, rows, D]
    kb, vb = k[:, :, :blk.kv1], v[:, :, :blk.kv1]  # [B, Hkv, kv1, D]
    if keep_layout is None:
        keep_layout = all(map(_dense_permutation, (qb, kb, vb)))
    spec = G.Spec(p.dtype, p.batch, p.q_heads, p.kv_heads, blk.row1 - blk.row0, blk.kv1, p.head_dim, p.scale,
                  lengths=blk.seq_q is not None, bottom_right=blk.band.bottom_right,
                  left_bound=blk.band.left_bound, right_bound=blk.band.right_bound, q_stride=tuple(qb.stride()),
                  k_stride=tuple(kb.stride()), v_stride=tuple(vb.stride()), keep_layout=keep_layout,
                  device=q.device.index or 0)
    return spec, qb, kb, vb


def _run_block(q, k, v, p: Problem, blk: Block) -> torch.Tensor:
    from ..kernels import cudnn_graphs as G

    spec, qb, kb, vb = _block_spec(q, k, v, p, blk)
    meta = G.Meta()
    if spec.lengths:
        meta = G.Meta(blk.seq_q.to(q.device, torch.int32).view(-1, 1, 1, 1),
                      blk.seq_kv.to(q.device, torch.int32).view(-1, 1, 1, 1))
    return _Attention.apply(qb, kb, vb, spec, meta, p.requires_grad, _signature(p))  # [B, Hq, rows, D]


def _disjoint_blocks(q, k, v, pl: DensePlan) -> bool:
    """Prefix-LM blocks that split the rows exactly (the same prefix, a multiple of 128, in every
    batch row) over inputs that are dense permutations: run in place of one output."""
    if len(pl.blocks) != 2:
        return False
    a, b = pl.blocks
    return (a.seq_q is None and b.owns is None and b.row0 == a.row1
            and all(_dense_permutation(t) for t in (q, k, v)))


class _RowBlocks(torch.autograd.Function):
    """Prefix-LM rows split exactly at P (block A: rows < P over keys < P, full), in place of one
    output: a first block F over every key, then A on its rows.  F is B (rows >= P, causal
    bottom-right) for inference, and for training with P <= Sq / 2 it is C, plain causal over every
    row: C's backward gets dO zeroed on rows < P, which makes it exactly B's (a row with zero dO
    adds nothing to dq, dk, dv: its dP and rowsum(dO * O) are 0), and cuDNN's square causal
    backward is its fastest: 478 vs 332 TFLOP/s for B's band on the H200 at P = S / 4
    (``cudnn-probe/prefix.json``); C covers S^2 / 2 of the scores where B covers (S^2 - P^2) / 2, so
    past P ~ S / 2 it stops paying.  A's dk, dv are added to F's."""

    @staticmethod
    def forward(ctx, q, k, v, p, blocks, sig):
        from ..kernels import cudnn_graphs as G

        a, b = blocks
        first = b
        if p.requires_grad and 2 * a.row1 <= p.q_len:
            first = Block(0, p.q_len, p.kv_len, Band(p.q_len < p.kv_len, None, 0))  # C
        blocks = (first, a)  # A written last: over C's rows < P
        o = torch.empty_like(q)  # [B, Hq, Sq, D] in q's layout
        specs, stats = [], []
        with _remembered(sig):
            for blk in blocks:
                spec, qb, kb, vb = _block_spec(q, k, v, p, blk, True)
                specs.append(spec)
                stats.append(G.forward(spec, qb, kb, vb, G.Meta(), p.requires_grad, out=o[:, :, blk.row0:blk.row1])[1])
        if p.requires_grad:
            ctx.save_for_backward(q, k, v, o, *stats)
        ctx.specs, ctx.blocks, ctx.sig = specs, blocks, sig
        ctx.layout = (q.shape, k.shape, q.stride(), k.stride(), v.stride())
        return o

    @staticmethod
    @once_differentiable
    def backward(ctx, do):
        from ..kernels import cudnn_graphs as G

        (f, a), (spec_f, spec_a) = ctx.blocks, ctx.specs
        q_shape, k_shape, sq, sk, sv = ctx.layout
        # saved-tensor hooks (e.g. offloading) may hand back other strides: the graphs read raw memory
        q, k, v, o, *stats = ctx.saved_tensors
        q, o = _with_strides(q, sq), _with_strides(o, sq)
        k, v = _with_strides(k, sk), _with_strides(v, sv)
        do = _with_strides(do, sq)  # laid out like o
        do_f = do
        if f.row0 < a.row1:  # C: rows A owns must add nothing through C's backward
            do_f = torch.empty_strided(q_shape, sq, dtype=do.dtype, device=do.device).copy_(do)
            do_f[:, :, :a.row1] = 0
        dq = torch.empty_strided(q_shape, sq, dtype=q.dtype, device=q.device)
        dk = torch.empty_strided(k_shape, sk, dtype=k.dtype, device=k.device)
        dv = torch.empty_strided(k_shape, sv, dtype=v.dtype, device=v.device)
        rows_f, rows_a, keys = slice(f.row0, f.row1), slice(0, a.row1), slice(0, a.kv1)
        part_k = torch.empty_strided(k_shape, sk, dtype=k.dtype, device=k.device)[:, :, keys]
        part_v = torch.empty_strided(k_shape, sv, dtype=v.dtype, device=v.device)[:, :, keys]
        with _remembered(ctx.sig):
            G.backward(spec_f, q[:, :, rows_f], k, v, o[:, :, rows_f], do_f[:, :, rows_f], stats[0], G.Meta(),
                       out=(dq[:, :, rows_f], dk, dv))
            G.backward(spec_a, q[:, :, rows_a], k[:, :, keys], v[:, :, keys], o[:, :, rows_a],
                       do[:, :, rows_a], stats[1], G.Meta(), out=(dq[:, :, rows_a], part_k, part_v))
        dk[:, :, keys] += part_k
        dv[:, :, keys] += part_v
        return dq, dk, dv, None, None, None


def _run_dense(q, k, v, p: Problem, pl: DensePlan) -> torch.Tensor:
    q, k, v = _dense_ready(q), _dense_ready(k), _dense_ready(v)
    if _disjoint_blocks(q, k, v, pl):
        return _RowBlocks.apply(q, k, v, p, pl.blocks, _signature(p))
    outs = [_run_block(q, k, v, p, blk) for blk in pl.blocks]
    if len(pl.blocks) == 1:
        return outs[0]
    a, b = pl.blocks
    o_a, o_b = outs  # [B, Hq, nA, D], [B, Hq, Sq - b0, D]
    mid = o_a[:, :, b.row0:]  # rows [b0, nA): block A where it owns the row, else block B
    take_a = a.owns[:, b.row0:].to(q.device)[:, None, :, None]  # [B, 1, nA - b0, 1]
    mid = torch.where(take_a, mid, o_b[:, :, :a.row1 - b.row0])
    return torch.cat([o_a[:, :, :b.row0], mid, o_b[:, :, a.row1 - b.row0:]], dim=2)


def _run_ragged(q, k, v, p: Problem, pl: RaggedPlan) -> torch.Tensor:
    from ..kernels import cudnn_graphs as G

    lay, dev, B, D = pl.layout, q.device, p.batch, p.head_dim
    mode = layout_mode(q, k, v, p, lay)
    t = _ragged_tensors(pl, p, dev, "tokens" if mode == "transpose" else mode)
    if mode == "heads":
        qp, kp, vp = (x.view(-1, 1, D) for x in (q, k, v))  # [B * H * S, 1, D], no copy
    elif mode == "transpose":
        qp, kp, vp = (_ToTokens.apply(x) for x in (q, k, v))  # [B * S, H, D], one copy each
    elif mode == "tokens":
        qp, kp, vp = (x.transpose(1, 2).reshape(-1, x.shape[1], D) for x in (q, k, v))  # [B * S, H, D] views
    else:
        qp = _PackRows.apply(q, pl.dummies) if t.q_whole else SEG.unpad(q, t.q_index)  # [Tq', Hq, D]
        if t.k_whole:
            kp, vp = _PackRows.apply(k, pl.dummies), _PackRows.apply(v, pl.dummies)  # [Tk', Hkv, D]
        else:
            kp, vp = SEG.unpad(k, t.k_index), SEG.unpad(v, t.k_index)
    spec = G.Spec(p.dtype, t.entries, *t.heads, pl.q_len, pl.kv_len, D, p.scale,
                  ragged=True, lengths=True, bottom_right=pl.band.bottom_right, left_bound=pl.band.left_bound,
                  right_bound=pl.band.right_bound, total_q=t.total[0], total_kv=t.total[1],
                  device=dev.index or 0)
    if mode == "heads":
        op = _HeadGroups.apply(qp, kp, vp, spec, t.metas, p.requires_grad, _signature(p))  # [B * Hq * Sq, 1, D]
    else:
        op = _Attention.apply(qp, kp, vp, spec, t.metas[0], p.requires_grad, _signature(p))  # like qp
    if mode == "heads":
        return op.view(B, p.q_heads, p.q_len, D)
    if mode in ("tokens", "transpose"):
        return _TokensView.apply(op, B)
    real = op[:lay.q_index.numel()]  # dummies dropped: their gradient is 0
    if t.q_whole:  # [B, Hq, Sq, D] as a view of the packed rows (laid out like [B, Sq, Hq, D]); the
        # backward keeps them, so changing the result in place fails loudly in backward, as for SDPA
        return _TokensView.apply(real, B)
    return SEG.repad(real, t.q_index[:lay.q_index.numel()], B, p.q_len)  # padded rows 0


# The plan (segment layout, row blocks) costs host syncs: once per mask object and sizes, not once
# per call.  On the H200 (B=2, S=4096, packed documents) planning every call made the forward 3.9 ms
# against 1.2 ms with the plan made once (scripts/gpu_cudnn_check.py, "cudnn-preplanned").
_PLANS = PerMaskCache()


class Cudnn(Backend):
    name = "cudnn"
    summary = ("cuDNN fused attention graphs (nvidia-cudnn-frontend): documents/padding as ragged THD, "
               "causal sliding windows, prefix-LM by row blocks, GQA; bf16/fp16 on CUDA")

    def _machine_reasons(self) -> list[str]:
        try:
            if not torch.cuda.is_available():
                out = ["no CUDA device: cuDNN attention runs on NVIDIA GPUs"]
                if not _frontend_installed():
                    out.append("cudnn (nvidia-cudnn-frontend) is not installed; pip install 'anymask[cudnn]'")
                return out
            found = probe("cudnn")
            if isinstance(found, str):
                return [found]
            if found.backend_version() < _MIN_BACKEND:
                return [f"cuDNN backend {found.backend_version()} is older than 9.6 (needed for ragged GQA "
                        "and bottom-right causal windows)"]
        except Exception as exc:  # a broken install must not break reason listing
            return [f"cuDNN frontend probe failed ({type(exc).__name__}: {exc})"]
        return []

    def problem_reasons(self, p: Problem) -> list[str]:
        try:
            return reasons(p)
        except Exception as exc:
            return [f"could not plan cuDNN attention ({type(exc).__name__}: {exc})"]

    def run(self, q, k, v, p):
        pl = _PLANS.get(p, lambda: plan(p))
        if isinstance(pl, RaggedPlan):
            return _run_ragged(q, k, v, p, pl)
        return _run_dense(q, k, v, p, pl)


def _frontend_installed() -> bool:
    from importlib.util import find_spec

    return find_spec("cudnn") is not None
