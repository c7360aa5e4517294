"""What a bench case times, side by side:

    <backend>        every available anymask backend, forced: ``attention(..., backend=name)``
    auto             ``attention(..., backend="auto")``; the row records which backend it chose
    raw_sdpa_dense   what users write today: SDPA with a dense bool mask they built once
                     (rows that see no key unmasked, as transformers does)
    raw_flex         what users write today: ``torch.compile(flex_attention)`` with a BlockMask
                     from ``create_block_mask`` (not on CPU for fwd+bwd: no backward there)
    raw_fa4          FlashAttention 4 (flash-attn-4) called the way its docs and tests show for
                     each mask (see :mod:`anymask.bench.fa4_peer`); only where it is installed

``prepare`` returns a :class:`Prepared` call, or a reason string when the variant cannot run the
case.  Raw variants promise nothing on rows that see no key, so their error is taken over the
other rows (see :mod:`anymask.bench.errors`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from .. import backend as B
from ..attention import attention
from ..dispatch import choose
from ..masks import Mask
from ..problem import Problem
from ..tiles import is_head_invariant
from . import fa4_peer
from .inputs import InputSets

RAW = ("raw_sdpa_dense", "raw_flex", "raw_fa4")
EAGER_LIMIT = {"cpu": 1 << 22, "cuda": 1 << 28}  # score elements [B, H, Sq, Skv] eager may materialise


@dataclass(frozen=True)
class Prepared:
    fn: Callable[[int], tuple]  # set index -> (out [B, Hq, S, D], (dq, dk, dv) or None)
    backend: str  # what actually runs (auto: its choice)
    setup_s: float  # one-time preparation outside the timed calls (dense mask, BlockMask)
    raw: bool


def available() -> tuple[list[str], dict[str, list[str]]]:
    """Anymask backends that can run on this machine, and the others with their reasons."""
    ok, unavailable = [], {}
    for name in B._MODULES:
        try:
            backend = B.get(name, missing_ok=True)
            if backend is None:
                continue
            reasons = list(backend.machine_reasons)
        except Exception as exc:  # a backend whose module fails to import is a result too
            reasons = [f"module failed to import: {type(exc).__name__}: {exc}"]
        if reasons:
            unavailable[name] = reasons
        else:
            ok.append(name)
    return ok, unavailable


def names(requested: list[str] | None = None) -> list[str]:
    """Variants to run: every available backend, ``auto`` and the raw calls, or ``requested``."""
    ok, _ = available()
    every = [*ok, "auto", *(r for r in RAW if r != "raw_fa4" or fa4_peer.importable())]
    if not requested:
        return every
    known = [*B._MODULES, "auto", *RAW]
    for name in requested:
        if name not in known:
            raise ValueError(f"unknown backend {name!r}; known: {', '.join(known)}")
    return list(dict.fromkeys(requested))


def _runner(f, inputs: InputSets, grad: bool):
    if not grad:
        return lambda i: (f(inputs.q[i], inputs.k[i], inputs.v[i]), None)

    def run(i):
        q, k, v = inputs.q[i], inputs.k[i], inputs.v[i]
        out = f(q, k, v)
        return out, torch.autograd.grad(out, (q, k, v), inputs.dout[i])

    return run


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def prepare(name: str, mask: Mask, inputs: InputSets, p: Problem, *, forced: bool = False) -> Prepared | str:
    """A timed call of variant ``name`` for problem ``p``, or why it cannot run.  ``forced``:
    asked for by name, so size limits (eager) do not apply."""
    grad = p.requires_grad
    if name == "auto":
        chosen = choose(p, "auto").name
        f = (lambda q, k, v: attention(q, k, v, mask, scale=p.scale))
        return Prepared(_runner(f, inputs, grad), chosen, 0.0, False)
    if name == "raw_sdpa_dense":
        return _raw_sdpa(mask, inputs, p)
    if name == "raw_flex":
        return _raw_flex(mask, inputs, p)
    if name == "raw_fa4":
        return _raw_fa4(mask, inputs, p)
    backend = B.get(name, missing_ok=True)
    if backend is None:
        return f"backend {name!r} is not part of this install"
    reasons = backend.not_supported_reasons(p)
    if name == "eager" and not reasons and not forced:
        elements = p.batch * p.q_heads * p.q_len * p.kv_len
        limit = EAGER_LIMIT.get(p.device_type, EAGER_LIMIT["cuda"])
        if elements > limit:
            reasons = [f"the eager reference materialises [B, H, Sq, Skv] scores: {elements:.2e} "
                       f"elements > {limit:.2e} on {p.device_type} (force it with --backends eager)"]
    if reasons:
        return "; ".join(reasons)
    f = (lambda q, k, v: attention(q, k, v, mask, backend=name, scale=p.scale))
    return Prepared(_runner(f, inputs, grad), name, 0.0, False)


def same_for_every_head(mask: Mask, p: Problem, rows: int = 64) -> bool:
    """Whether ``mask`` ignores the head, as its author would know: from the mask's terms, else a
    probe of ``rows`` evenly spaced query rows (a user writing a raw call builds one head then)."""
    if is_head_invariant(mask):
        return True
    m = mask.to(p.device)
    b = torch.arange(p.batch, device=p.device).view(-1, 1, 1, 1)
    h = torch.arange(p.q_heads, device=p.device).view(1, -1, 1, 1)
    q = torch.linspace(0, p.q_len - 1, min(rows, p.q_len), device=p.device).round().long().view(1, 1, -1, 1)
    kv = torch.arange(p.kv_len, device=p.device).view(1, 1, 1, -1)
    grid = m.mask_mod(b, h, q + p.kv_len - p.q_len, kv).expand(p.batch, p.q_heads, q.shape[2], p.kv_len)
    return bool((grid == grid[:, :1]).all())


def _raw_sdpa(mask: Mask, inputs: InputSets, p: Problem) -> Prepared:
    t0 = time.perf_counter()
    heads = 1 if same_for_every_head(mask, p) else p.q_heads
    dense = mask.to_dense(p.batch, heads, p.q_len, p.kv_len, device=p.device)  # [B, H|1, Sq, Skv]
    dense = dense | ~dense.any(dim=-1, keepdim=True)  # rows with no key would give NaN
    _sync(p.device)
    gqa = {"enable_gqa": True} if p.is_gqa else {}
    # What a user hand-rolls: PyTorch picks the kernel, its cuDNN one included (anymask's ``sdpa``
    # backend keeps masked calls off that one: ``backend.common.masked_sdpa``).
    f = (lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=dense, scale=p.scale, **gqa))
    return Prepared(_runner(f, inputs, p.requires_grad), "sdpa(dense mask)", time.perf_counter() - t0, True)


_COMPILED_FLEX = {}


def _compiled_flex():
    """One ``torch.compile(flex_attention, dynamic=False)`` per process, as users write it; the
    recompile limit is raised so that a grid of shapes and masks does not fall back to eager."""
    if "fn" not in _COMPILED_FLEX:
        from torch.nn.attention.flex_attention import flex_attention

        config = torch._dynamo.config
        for knob in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit",
                     "accumulated_cache_size_limit"):
            if hasattr(config, knob):
                setattr(config, knob, max(getattr(config, knob), 1024))
        _COMPILED_FLEX["fn"] = torch.compile(flex_attention, dynamic=False)
    return _COMPILED_FLEX["fn"]


def _raw_flex(mask: Mask, inputs: InputSets, p: Problem) -> Prepared | str:
    try:
        from torch.nn.attention.flex_attention import create_block_mask
    except ImportError as exc:
        return f"FlexAttention is not importable: {exc}"
    if p.device_type == "cpu" and p.requires_grad:
        return "FlexAttention has no backward on CPU"
    if p.q_len != p.kv_len:
        return "the raw flex call assumes q_len == kv_len"
    t0 = time.perf_counter()
    m = mask.to(p.device)
    heads = None if same_for_every_head(mask, p) else p.q_heads

    def mask_mod(b, h, q_idx, kv_idx):
        return m.mask_mod(b, h, q_idx, kv_idx)

    block_mask = create_block_mask(mask_mod, p.batch, heads, p.q_len, p.kv_len, device=p.device)
    _sync(p.device)
    compiled = _compiled_flex()
    gqa = {"enable_gqa": True} if p.is_gqa else {}
    f = (lambda q, k, v: compiled(q, k, v, block_mask=block_mask, scale=p.scale, **gqa))
    return Prepared(_runner(f, inputs, p.requires_grad), "flex_attention", time.perf_counter() - t0, True)


def _raw_fa4(mask: Mask, inputs: InputSets, p: Problem) -> Prepared | str:
    t0 = time.perf_counter()
    try:
        prepared = fa4_peer.prepare(mask, p, (inputs.q[0], inputs.k[0], inputs.v[0]))
    except Exception as exc:  # FA4 rejects or fails on this problem: a result, not a crash
        return f"FlashAttention 4 failed on its first call: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    if isinstance(prepared, str):
        return prepared
    f, label = prepared
    return Prepared(_runner(f, inputs, p.requires_grad), label, time.perf_counter() - t0, True)
