"""``raw_fa4``: what a user hand-rolls with FlashAttention 4 (``pip install flash-attn-4``, CuTe DSL).

FA4 has no mask object: a user maps each mask onto one of its call forms, and this module does the
same, once per problem (outside the timed calls)::

    full / causal                flash_attn_func(window_size=(None, None) / (None, 0))
    window(l, r) [& causal]      flash_attn_func(window_size=(l, r))
    documents [& causal|window]  flash_attn_varlen_func: the rows' documents packed end to end,
    [& padding]                  one cu_seqlens entry per document; padded tokens gathered out
                                 first and their output rows left 0 (FA2's unpad/pad recipe)
    documents [& causal]         ... or the document mask_mod of FA4's docs (doc_ids[b, q] ==
                                 doc_ids[b, kv], an aux tensor) with block sparsity from
                                 create_block_mask: both forms are timed once, the faster is kept
    prefix_lm (one prefix)       flash_attn_func(mask_mod=kv <= q or kv < P) with block sparsity
                                 from FlexAttention's create_block_mask, as FA4's own tests do

    documents & causal, 2 rows:  row 0 = [doc 3][doc 5],  row 1 = [doc 8]
    cu_seqlens = [0, 3, 8, 16]   (tokens of row 0, then row 1, back to back)

Anything else (packed prefix-LM, per-row prefixes, custom masks, FP32, unequal q/kv lengths) is
skipped with the reason, as a user would have to write more than a call.  The gather/scatter of
the varlen recipe is inside the timed call, because the user's code pays for it too (for packed
documents without padding it is a copy of q, k and v that a user with packed inputs would not
make, so there the FA4 number is a little low).
"""

from __future__ import annotations

from functools import lru_cache

import torch

from .. import segments
from .._optional import probe
from ..backend import fa4 as fa4_backend
from ..backend.fa4_intervals import SPARSE_BLOCK, block_lists
from ..masks import Mask
from ..problem import Problem
from ..structure import Structure


def importable() -> bool:
    return not isinstance(probe("flash_attn.cute"), str)


def prepare(mask: Mask, p: Problem, sample: tuple[torch.Tensor, ...]):
    """``(f, label)`` with ``f(q, k, v) -> out`` on anymask's ``[B, H, S, D]`` views, or the reason
    FA4 cannot run this problem as one hand-rolled call.  ``sample`` (q, k, v) runs once here, so
    that FA4's JIT compile stays out of the timed calls."""
    fa4 = probe("flash_attn.cute")
    if isinstance(fa4, str):
        return fa4
    why = _not_supported(p)
    if why:
        return why
    s = p.structure
    if s.base == "prefix_lm":
        return _trial(_prefix_lm(fa4, s, p), sample, p)
    if s.documents is not None and s.valid is None and s.base in ("full", "causal"):
        return _faster([_call(p), _documents_mod(fa4, s, p)], sample, p)
    return _trial(_call(p), sample, p)


def _trial(prepared, sample, p: Problem):
    f, _ = prepared
    q, k, v = sample
    out = f(q, k, v)
    if p.requires_grad:
        torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    torch.cuda.synchronize(p.device)
    return prepared


def _faster(candidates, sample, p: Problem):
    """The candidate ``(f, label)`` with the lower median time on ``sample`` (interleaved calls
    of the bench's own timing), its label naming the other's time, as a user trying both forms
    would keep the faster.  A form that fails fails the peer, as its first call would."""
    from .timing import Settings, measure

    q, k, v = sample

    def timed(f):
        def call(_):
            out = f(q, k, v)
            if p.requires_grad:
                torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
        return call

    timings, _ = measure({label: timed(f) for f, label in candidates}, 1, p.device,
                         Settings(warmup=1, budget_s=0.05, max_iters=10, min_iters=5, interleave=True))
    failed = [f"{label}: {t}" for label, t in timings.items() if isinstance(t, str)]
    if failed:
        raise RuntimeError("; ".join(failed))
    best = min(timings, key=lambda label: timings[label].median_ms)
    others = ", ".join(f"{label} {t.median_ms:.2f} ms" for label, t in timings.items() if label != best)
    return dict((label, f) for f, label in candidates)[best], f"{best} (faster than {others})"


def _not_supported(p: Problem) -> str | None:
    s = p.structure
    if p.device_type != "cuda":
        return "FlashAttention 4 runs on CUDA only"
    if p.dtype not in fa4_backend.DTYPES:
        return f"FlashAttention 4 runs fp16/bf16 only, not {str(p.dtype).replace('torch.', '')}"
    if p.head_dim % 8 or p.head_dim > 256:
        return f"FlashAttention 4 takes head dims that are multiples of 8 up to 256, got {p.head_dim}"
    if p.q_len != p.kv_len:
        return "the hand-rolled FA4 call assumes q_len == kv_len"
    if s.base == "prefix_lm" and s.documents is None and s.valid is None and not s.general:
        if s.prefix.unique().numel() != 1:
            return "per-row prefixes need an aux tensor in FA4's mask_mod; hand-rolled here for one prefix only"
        return None
    why = segments.reasons(s, p.batch, p.q_len, p.kv_len)
    return f"no FA4 call form short of a hand-written mask_mod: {'; '.join(why)}" if why else None


def _call(p: Problem):
    """The mask's FA4 call, built once: window flags, or the varlen segment layout."""
    s = p.structure
    if s.documents is None and s.valid is None:
        return (lambda q, k, v: fa4_backend.attend(q, k, v, p)), f"fa4 {s.base}"
    fa4 = probe("flash_attn.cute")
    lay = segments.layout(s, p.batch, p.q_len, p.kv_len, device=p.device)
    window = fa4_backend.window_size(p)

    def packed(q, k, v):  # FA2's unpad -> varlen -> repad recipe
        out = fa4.flash_attn_varlen_func(
            segments.unpad(q, lay.q_index), segments.unpad(k, lay.k_index), segments.unpad(v, lay.k_index),
            cu_seqlens_q=lay.cu_seqlens_q, cu_seqlens_k=lay.cu_seqlens_k, max_seqlen_q=lay.max_seqlen_q,
            max_seqlen_k=lay.max_seqlen_k, softmax_scale=p.scale, window_size=window)  # [T, Hq, D]
        return segments.repad(fa4_backend.first_output(out), lay.q_index, p.batch, p.q_len)

    return packed, "fa4 varlen"


def _prefix_lm(fa4, s: Structure, p: Problem):
    """Prefix-LM as a mask_mod: kv <= q or kv < P, with P a compile-time constant (FA4 hashes the
    closure, so each prefix length compiles its own kernels; its runtime ``aux_scalars`` failed to
    compile in flash-attn-4 4.0.0b40 on sm90), and FA4's block sparsity built by FlexAttention's
    ``create_block_mask``, which skips the tiles above the diagonal and past the prefix."""
    import cutlass
    import cutlass.cute as cute
    from flash_attn.cute.utils import scalar_to_ssa
    from torch.nn.attention.flex_attention import create_block_mask

    prefix = int(s.prefix.reshape(-1)[0])

    @cute.jit
    def prefix_lm_mod(batch, head, q_idx, kv_idx, seqlen_info, aux_tensors):
        limit = scalar_to_ssa(prefix, cutlass.Int32)
        return (kv_idx <= q_idx) | (kv_idx < limit)

    def torch_mod(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) | (kv_idx < prefix)

    fwd, bwd = block_lists(create_block_mask(torch_mod, 1, 1, p.q_len, p.kv_len, device=p.device,
                                             BLOCK_SIZE=SPARSE_BLOCK))

    def f(q, k, v):
        out = fa4.flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), softmax_scale=p.scale,
                                  mask_mod=prefix_lm_mod, block_sparse_tensors=fwd, block_sparse_tensors_bwd=bwd)
        return fa4_backend.first_output(out).transpose(1, 2)

    return f, "fa4 mask_mod+sparse"


def _documents_mod(fa4, s: Structure, p: Problem):
    """Documents [& causal] as the document ``mask_mod`` FA4's docs show (document ids per token
    in an aux tensor, compared for the query and the key), with block sparsity from
    ``create_block_mask``."""
    from torch.nn.attention.flex_attention import create_block_mask

    ids = s.documents.to(p.device).expand(p.batch, p.kv_len).to(torch.int32).contiguous()  # [B, S]
    causal = s.base == "causal"

    def torch_mod(b, h, q_idx, kv_idx):
        same = ids[b, q_idx] == ids[b, kv_idx]
        return same & (kv_idx <= q_idx) if causal else same

    fwd, bwd = block_lists(create_block_mask(torch_mod, p.batch, 1, p.q_len, p.kv_len, device=p.device,
                                             BLOCK_SIZE=SPARSE_BLOCK))
    mod = _document_mods()[causal]

    def f(q, k, v):
        out = fa4.flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), softmax_scale=p.scale,
                                  mask_mod=mod, aux_tensors=[ids], block_sparse_tensors=fwd,
                                  block_sparse_tensors_bwd=bwd)
        return fa4_backend.first_output(out).transpose(1, 2)

    return f, "fa4 doc mask_mod+sparse"


@lru_cache(maxsize=1)
def _document_mods():
    """FA4's document mask_mods ``(bidirectional, causal)``, defined once (FA4 caches by source)."""
    import cutlass
    import cutlass.cute as cute
    from flash_attn.cute.utils import scalar_to_ssa

    @cute.jit
    def same_document(batch, head, q_idx, kv_idx, seqlen_info, aux_tensors):
        q_doc = scalar_to_ssa(aux_tensors[0][batch[0], q_idx[0]], cutlass.Int32)
        kv_doc = scalar_to_ssa(aux_tensors[0][batch[0], kv_idx[0]], cutlass.Int32)
        return q_doc == kv_doc

    @cute.jit
    def same_document_causal(batch, head, q_idx, kv_idx, seqlen_info, aux_tensors):
        q_doc = scalar_to_ssa(aux_tensors[0][batch[0], q_idx[0]], cutlass.Int32)
        kv_doc = scalar_to_ssa(aux_tensors[0][batch[0], kv_idx[0]], cutlass.Int32)
        return (q_doc == kv_doc) & (kv_idx <= q_idx)

    return same_document, same_document_causal
