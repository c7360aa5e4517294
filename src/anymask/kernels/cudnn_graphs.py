"""cuDNN fused-attention graphs (``nvidia-cudnn-frontend``): built once per spec, cached, executed.

A :class:`Spec` fixes everything a cuDNN graph bakes in; tensors that vary per call (lengths,
ragged offsets, data) are bound at execution.  Two layouts:

    dense   q ``[B, Hq, Sq, D]`` with its own strides (last dim dense); optional per-batch lengths
            (padding mask: query rows ``>= seq_q[b]`` and keys ``>= seq_kv[b]`` are ignored); with
            ``keep_layout`` (inputs that are dense permutations, e.g. ``[B, S, H, D]`` transposed)
            o, dO and the gradients share their inputs' strides, else they are contiguous
    ragged  packed q ``[T, Hq, D]`` (THD); batch entry ``n`` of the graph starts at the element
            offset ``off_q[n]`` and has ``seq_q[n]`` rows; the graph's dims ``[N, H, S_max, D]``
            are buckets, so new packings reuse the graph

Masks inside a graph (cuDNN's diagonal band, per batch entry when lengths are given)::

    d = 0 (top-left) or seq_kv - seq_q (bottom-right)
    q row i may see key j   iff   j <= i + d + right_bound      (right_bound 0 = causal)
                            and   j >  i + d - left_bound       (sliding window)

Softmax stats (training) are fp32 ``[N, Hq, S_max, 1]``, never ragged (accepted by every cuDNN 9
version for THD backward).  Rows outside the lengths are garbage: callers never read them.
"""

from __future__ import annotations

import dataclasses
import threading
from array import array
from dataclasses import dataclass

import torch

from .._optional import require

_Q, _K, _V, _O, _STATS, _DO, _DQ, _DK, _DV, _SEQ_Q, _SEQ_KV, _OFF_Q, _OFF_KV = range(1, 14)
_CACHE_MAX = 256


class CudnnGraphError(RuntimeError):
    """A cuDNN graph could not be built or run; the message names the stage and the spec."""


@dataclass(frozen=True)
class Spec:
    """What one cuDNN SDPA graph is specialised on (hashable: the cache key)."""

    dtype: torch.dtype
    batch: int  # B (dense) or N, the segment bucket (ragged)
    q_heads: int
    kv_heads: int
    q_len: int  # Sq (dense) or the max-length bucket (ragged)
    kv_len: int
    head_dim: int
    scale: float
    ragged: bool = False
    lengths: bool = False  # per-batch seq_q/seq_kv + padding mask (always on when ragged)
    bottom_right: bool = False
    left_bound: int | None = None
    right_bound: int | None = None
    q_stride: tuple[int, ...] = ()  # dense only: element strides of q, k, v
    k_stride: tuple[int, ...] = ()
    v_stride: tuple[int, ...] = ()
    keep_layout: bool = False  # dense only: o, dO, dq like q; dk like k; dv like v
    total_q: int = 0  # ragged backward: token capacity buckets (max_total_seq_len_*)
    total_kv: int = 0
    device: int = 0

    def forward_key(self) -> "Spec":
        """The forward graph does not depend on the token capacity: share it across buckets."""
        return dataclasses.replace(self, total_q=0, total_kv=0)


@dataclass(frozen=True, eq=False)
class Meta:
    """Per-call tensors: lengths ``[N, 1, 1, 1]`` int32, ragged offsets ``[N + 1, 1, 1, 1]`` int64;
    ``holes_q`` / ``holes_kv``: the runs ``(start, stop)`` of rows (first dim) of the ragged q / k
    tensors in no entry (padding read in place).  cuDNN writes entries only, so those rows of o,
    dq / dk, dv must be zeroed: see :func:`alloc`."""

    seq_q: torch.Tensor | None = None
    seq_kv: torch.Tensor | None = None
    off_q: torch.Tensor | None = None  # element offsets into q, o, dO, dQ
    off_kv: torch.Tensor | None = None  # element offsets into k, v, dK, dV
    holes_q: tuple[tuple[int, int], ...] = ()
    holes_kv: tuple[tuple[int, int], ...] = ()


_MAX_HOLE_FILLS = 8


def _outputs_like(spec: Spec, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Dense outputs laid out like ``tensors``: zeroed when the graph has per-batch lengths, whose
    rows past ``seq_q`` / ``seq_kv`` cuDNN need not write (a kernel may skip tiles there), uninitialised
    otherwise (every row written).  Prefix-LM's block A has lengths whenever the prefix differs across
    rows or is not a multiple of 128, and autograd adds its whole dq / dk / dv views."""
    make = torch.zeros_like if spec.lengths else torch.empty_like
    return tuple(make(t) for t in tensors)


def alloc(shape, dtype: torch.dtype, device: torch.device, holes: tuple[tuple[int, int], ...]) -> torch.Tensor:
    """An uninitialised tensor whose rows in ``holes`` (runs along dim 0) are zero.

    A few runs (``[B, S, H, D]`` inputs with right padding: one per batch row) are zeroed one by
    one; many (``[B, H, S, D]``: one per row and head) zero the whole tensor, one fill.  On the H200
    (bench padding, B=4, S=4096): four whole fills take 83 us per fwd+bwd, the 12 runs 37 us
    (``mask-profile/padding_bshd_run_fills.jsonl``), and ``index_fill_`` over just the padded rows
    137 us (``checks/cudnn_host_2026-12-04``)."""
    if len(holes) > _MAX_HOLE_FILLS:
        return torch.zeros(shape, dtype=dtype, device=device)
    out = torch.empty(shape, dtype=dtype, device=device)
    for start, stop in holes:
        out[start:stop].zero_()
    return out


@dataclass(frozen=True, eq=False)
class _Launch:
    """The built plan's raw-pointer execute: the buffers' addresses in ascending uid order.

    ``graph.execute`` inspects every buffer in Python on each call (26 us forward, 42 us backward
    on the H200 host, against 15 and 37 this way, same results: ``checks/cudnn_execute_paths``).
    The graph's strides are ours, derived from the tensors we pass, so nothing is lost by not
    re-reading them."""

    uids: tuple[int, ...]
    run: object  # the lowered graph's _execute_with_raw_ptrs(ptrs, n, workspace, handle, plan)
    plan: int


@dataclass(frozen=True, eq=False)
class _Built:
    graph: object
    workspace: int
    note: str = ""  # how it was built when the first attempt failed
    launch: _Launch | None = None  # None: this frontend has no raw path; graph.execute it is


_cache: dict[tuple, _Built] = {}
_lock = threading.Lock()
_tls = threading.local()


def cudnn():
    """The frontend module (imported after torch so it finds torch's libcudnn)."""
    return require("cudnn")


def version() -> str:
    """``frontend x.y.z, backend NNNNN`` for logs."""
    c = cudnn()
    return f"frontend {getattr(c, '__version__', '?')}, backend {c.backend_version()}"


def handle(device: int):
    """This thread's cuDNN handle for ``device``, bound to torch's current stream (rebound only
    when that stream changes: a call costs host time that short attention calls cannot hide)."""
    handles = _tls.__dict__.setdefault("handles", {})
    stream = _current_stream(device)
    entry = handles.get(device)
    if entry is None:
        with torch.cuda.device(device):
            entry = handles[device] = [cudnn().create_handle(), None]
    if entry[1] != stream:
        cudnn().set_stream(handle=entry[0], stream=stream)
        entry[1] = stream
    return entry[0]


def _current_stream(device: int) -> int:
    """The raw ``cudaStream_t`` torch is enqueueing on (without building a Stream object)."""
    raw = getattr(torch._C, "_cuda_getCurrentRawStream", None)
    return raw(device) if raw is not None else torch.cuda.current_stream(device).cuda_stream


def cache_size() -> int:
    return len(_cache)


def clear_cache() -> None:
    with _lock:
        _cache.clear()


# layout ------------------------------------------------------------------------------------------


def _contiguous_stride(shape) -> tuple[int, ...]:
    out, acc = [], 1
    for n in reversed(shape):
        out.append(acc)
        acc *= n
    return tuple(reversed(out))


def _token_major(n: int, h: int, s: int, d: int) -> tuple[int, ...]:
    """THD descriptor stride for dims ``[N, H, S, D]`` (the ragged offset gives each entry's base)."""
    return (s * h * d, d, h * d, 1)


def declared_strides(spec: Spec):
    """Strides the graphs are built with for (q, k, v, o/dO, dq, dk, dv)."""
    B, Hq, Hk, Sq, Sk, D = spec.batch, spec.q_heads, spec.kv_heads, spec.q_len, spec.kv_len, spec.head_dim
    if spec.ragged:
        sq, sk = _token_major(B, Hq, Sq, D), _token_major(B, Hk, Sk, D)
        return sq, sk, sk, sq, sq, sk, sk
    if spec.keep_layout:
        return spec.q_stride, spec.k_stride, spec.v_stride, spec.q_stride, spec.q_stride, spec.k_stride, spec.v_stride
    so, sk = _contiguous_stride((B, Hq, Sq, D)), _contiguous_stride((B, Hk, Sk, D))
    return spec.q_stride, spec.k_stride, spec.v_stride, so, so, sk, sk


def _io_type(c, dtype: torch.dtype):
    if dtype == torch.bfloat16:
        return c.data_type.BFLOAT16
    if dtype == torch.float16:
        return c.data_type.HALF
    raise CudnnGraphError(f"cuDNN SDPA takes bf16/fp16, not {dtype}")


# graph building ----------------------------------------------------------------------------------


def _inputs(c, g, spec: Spec, io):
    """Declare q, k, v (+ lengths, ragged offsets); returns (q, k, v, extra sdpa kwargs, offsets)."""
    B, Hq, Hk, Sq, Sk, D = spec.batch, spec.q_heads, spec.kv_heads, spec.q_len, spec.kv_len, spec.head_dim
    sq, sk, sv = declared_strides(spec)[:3]
    q = g.tensor(name="q", dim=[B, Hq, Sq, D], stride=list(sq), data_type=io, uid=_Q)
    k = g.tensor(name="k", dim=[B, Hk, Sk, D], stride=list(sk), data_type=io, uid=_K)
    v = g.tensor(name="v", dim=[B, Hk, Sk, D], stride=list(sv), data_type=io, uid=_V)
    kwargs: dict = {"attn_scale": spec.scale}
    offsets = (None, None)
    if spec.lengths or spec.ragged:
        one = [1, 1, 1, 1]
        kwargs["use_padding_mask"] = True
        kwargs["seq_len_q"] = g.tensor(name="seq_q", dim=[B, 1, 1, 1], stride=one, data_type=c.data_type.INT32, uid=_SEQ_Q)
        kwargs["seq_len_kv"] = g.tensor(name="seq_kv", dim=[B, 1, 1, 1], stride=one, data_type=c.data_type.INT32, uid=_SEQ_KV)
    if spec.ragged:
        one = [1, 1, 1, 1]
        off_q = g.tensor(name="off_q", dim=[B + 1, 1, 1, 1], stride=one, data_type=c.data_type.INT64, uid=_OFF_Q)
        off_kv = g.tensor(name="off_kv", dim=[B + 1, 1, 1, 1], stride=one, data_type=c.data_type.INT64, uid=_OFF_KV)
        q.set_ragged_offset(off_q)
        k.set_ragged_offset(off_kv)
        v.set_ragged_offset(off_kv)
        offsets = (off_q, off_kv)
    if spec.left_bound is not None or spec.right_bound is not None:
        align = c.diagonal_alignment
        kwargs["diagonal_alignment"] = align.BOTTOM_RIGHT if spec.bottom_right else align.TOP_LEFT
        if spec.left_bound is not None:
            kwargs["diagonal_band_left_bound"] = spec.left_bound
        if spec.right_bound is not None:
            kwargs["diagonal_band_right_bound"] = spec.right_bound
    return q, k, v, kwargs, offsets


def _output(t, uid: int, dim, stride, dtype, offset=None) -> None:
    t.set_uid(uid).set_output(True).set_dim(list(dim)).set_stride(list(stride)).set_data_type(dtype)
    if offset is not None:
        t.set_ragged_offset(offset)


def _finish(c, g, spec: Spec, what: str) -> _Built:
    stage = "validate"
    try:
        g.validate()
        stage = "build_operation_graph"
        g.build_operation_graph()
        stage = "create_execution_plans"
        g.create_execution_plans([c.heur_mode.A, c.heur_mode.FALLBACK])
        stage = "check_support"
        g.check_support()
        stage = "build_plans"
        g.build_plans()
        return _Built(g, int(g.get_workspace_size()), launch=_raw_launch(g))
    except Exception as exc:
        raise CudnnGraphError(f"cuDNN {what} graph failed at {stage}: {type(exc).__name__}: {exc}\n  spec: {spec}") from exc


def _raw_launch(g) -> _Launch | None:
    """The built graph's raw-pointer execute, where this frontend has one (1.32's lowered graph)
    and the selected plan is cuDNN's own (not one of the frontend's Python engines)."""
    try:
        if g.selected_engine is not None:
            return None
        run = g._lowered_graph._execute_with_raw_ptrs
        uids = tuple(int(u) for u in g._variant_pack_uids())
        cfg = g._materialize_backend_plan(g._plan_index) if g._plans else None
    except Exception:  # another frontend's internals: the public execute still works
        return None
    plan = -1 if cfg is None or cfg.cpp_index is None else int(cfg.cpp_index)
    return _Launch(uids, run, plan)


def _build_forward(spec: Spec, training: bool) -> _Built:
    c = cudnn()
    io = _io_type(c, spec.dtype)
    f32 = c.data_type.FLOAT
    g = c.pygraph(io_data_type=io, intermediate_data_type=f32, compute_data_type=f32, handle=handle(spec.device))
    q, k, v, kwargs, (off_q, _) = _inputs(c, g, spec, io)
    o, stats = g.sdpa(name="sdpa", q=q, k=k, v=v, generate_stats=training, **kwargs)
    B, Hq, Sq, D = spec.batch, spec.q_heads, spec.q_len, spec.head_dim
    _output(o, _O, (B, Hq, Sq, D), declared_strides(spec)[3], io, off_q)
    if training:
        _output(stats, _STATS, (B, Hq, Sq, 1), (Hq * Sq, Sq, 1, 1), f32)
    return _finish(c, g, spec, "forward")


def _build_backward(spec: Spec) -> _Built:
    c = cudnn()
    io = _io_type(c, spec.dtype)
    f32 = c.data_type.FLOAT
    g = c.pygraph(io_data_type=io, intermediate_data_type=f32, compute_data_type=f32, handle=handle(spec.device))
    q, k, v, kwargs, (off_q, off_kv) = _inputs(c, g, spec, io)
    B, Hq, Hk, Sq, Sk, D = spec.batch, spec.q_heads, spec.kv_heads, spec.q_len, spec.kv_len, spec.head_dim
    _, _, _, so, sdq, sdk, sdv = declared_strides(spec)
    o = g.tensor(name="o", dim=[B, Hq, Sq, D], stride=list(so), data_type=io, uid=_O)
    do = g.tensor(name="dO", dim=[B, Hq, Sq, D], stride=list(so), data_type=io, uid=_DO)
    stats = g.tensor(name="stats", dim=[B, Hq, Sq, 1], stride=[Hq * Sq, Sq, 1, 1], data_type=f32, uid=_STATS)
    if spec.ragged:
        o.set_ragged_offset(off_q)
        do.set_ragged_offset(off_q)
        kwargs["max_total_seq_len_q"] = spec.total_q
        kwargs["max_total_seq_len_kv"] = spec.total_kv
    dq, dk, dv = g.sdpa_backward(name="sdpa_backward", q=q, k=k, v=v, o=o, dO=do, stats=stats, **kwargs)[:3]
    _output(dq, _DQ, (B, Hq, Sq, D), sdq, io, off_q)
    _output(dk, _DK, (B, Hk, Sk, D), sdk, io, off_kv)
    _output(dv, _DV, (B, Hk, Sk, D), sdv, io, off_kv)
    return _finish(c, g, spec, "backward")


def _with_fallback(build, spec: Spec, *args) -> _Built:
    """Build on the spec's device (current while planning: a model split over GPUs calls from
    another); an unmasked graph that cuDNN declines is retried with a band that hides nothing
    (``right_bound = kv_len``: every key is visible), which takes cuDNN's banded path."""
    with torch.cuda.device(spec.device):
        return _build_or_widen(build, spec, *args)


def _build_or_widen(build, spec: Spec, *args) -> _Built:
    try:
        return build(spec, *args)
    except CudnnGraphError as first:
        if spec.left_bound is not None or spec.right_bound is not None:
            raise
        try:
            built = build(dataclasses.replace(spec, right_bound=spec.kv_len), *args)
        except CudnnGraphError as second:
            raise CudnnGraphError(f"{first}\n  retried with an all-visible band: {second}") from first
        return dataclasses.replace(built, note=f"all-visible band (unmasked graph declined: {str(first)[:200]})")


def _get(key: tuple, build) -> _Built:
    hit = _cache.get(key)
    if hit is not None:
        return hit
    with _lock:
        hit = _cache.get(key)
        if hit is None:
            hit = _cache[key] = build()
            while len(_cache) > _CACHE_MAX:
                _cache.pop(next(iter(_cache)))
    return hit


# execution ---------------------------------------------------------------------------------------


def _meta_pack(spec: Spec, meta: Meta) -> dict:
    pack = {}
    if spec.lengths or spec.ragged:
        pack[_SEQ_Q], pack[_SEQ_KV] = meta.seq_q, meta.seq_kv
    if spec.ragged:
        pack[_OFF_Q], pack[_OFF_KV] = meta.off_q, meta.off_kv
    return pack


_raw_launch_works = [True]  # False after the raw call refused its arguments: graph.execute from then on


def _execute(built: _Built, spec: Spec, pack: dict, what: str, device: torch.device) -> None:
    """Run on ``device`` made current (cuDNN launches on the current device's context)."""
    with torch.cuda.device(device):
        _execute_here(built, spec, pack, what, device)


def _execute_here(built: _Built, spec: Spec, pack: dict, what: str, device: torch.device) -> None:
    workspace = torch.empty(max(built.workspace, 1), dtype=torch.uint8, device=device)
    h = handle(spec.device)
    try:
        launch = built.launch if _raw_launch_works[0] else None
        if launch is not None:
            ptrs = array("q", [pack[uid].data_ptr() for uid in launch.uids])
            try:
                launch.run(ptrs.buffer_info()[0], len(ptrs), workspace.data_ptr(), h.backend_handle, launch.plan)
                return
            except TypeError:  # a frontend whose private call takes other arguments: nothing ran
                _raw_launch_works[0] = False
        built.graph.execute(pack, workspace, handle=h)
    except Exception as exc:
        raise CudnnGraphError(f"cuDNN {what} graph failed at execute: {type(exc).__name__}: {exc}\n  spec: {spec}") from exc


def forward(spec: Spec, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: Meta, training: bool,
            out: torch.Tensor | None = None):
    """Run the forward graph.  Dense: q ``[B, Hq, Sq, D]`` -> o ``[B, Hq, Sq, D]`` (q's layout with
    ``keep_layout``, else contiguous); ragged: q ``[T, Hq, D]`` -> o ``[T, Hq, D]``, written into
    ``out`` when given (several ragged graphs filling one output).  Returns ``(o, stats or None)``."""
    fkey = spec.forward_key()
    built = _get((fkey, "fwd", training), lambda: _with_fallback(_build_forward, fkey, training))
    if out is not None:
        o = out
    elif spec.keep_layout:
        o = _outputs_like(spec, q)[0]  # [B, Hq, Sq, D] with q's strides
    else:
        o = alloc(q.shape if spec.ragged else (spec.batch, spec.q_heads, spec.q_len, spec.head_dim),
                  q.dtype, q.device, meta.holes_q)
    pack = {_Q: q, _K: k, _V: v, _O: o, **_meta_pack(spec, meta)}
    stats = None
    if training:
        stats = torch.empty(spec.batch, spec.q_heads, spec.q_len, 1, dtype=torch.float32, device=q.device)
        pack[_STATS] = stats
    _execute(built, fkey, pack, "forward", q.device)
    return o, stats


def backward(spec: Spec, q, k, v, o, do, stats, meta: Meta, out: tuple | None = None):
    """Run the backward graph; ``do`` laid out like ``o``.  Returns ``(dq, dk, dv)`` shaped like
    q, k, v (laid out like them with ``keep_layout``, else contiguous), or written into ``out``."""
    built = _get((spec, "bwd"), lambda: _with_fallback(_build_backward, spec))
    if out is not None:
        dq, dk, dv = out
    elif spec.keep_layout:
        dq, dk, dv = _outputs_like(spec, q, k, v)
    elif spec.lengths and not spec.ragged:
        dq, dk, dv = (torch.zeros(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v))
    else:
        dq, dk, dv = (alloc(t.shape, t.dtype, t.device, holes)
                      for t, holes in ((q, meta.holes_q), (k, meta.holes_kv), (v, meta.holes_kv)))
    pack = {_Q: q, _K: k, _V: v, _O: o, _DO: do, _STATS: stats, _DQ: dq, _DK: dk, _DV: dv,
            **_meta_pack(spec, meta)}
    _execute(built, spec, pack, "backward", q.device)
    return dq, dk, dv
