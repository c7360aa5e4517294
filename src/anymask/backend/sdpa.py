"""``torch.nn.functional.scaled_dot_product_attention``.

Native forms: no mask (full), ``is_causal`` (square causal), bottom-right causal
(``causal_lower_right`` when ``q_len < kv_len``).  Everything else becomes a dense bool mask:
O(S^2) memory, and no tile skipping.  Rows that see no key are unmasked before the call (SDPA
would return NaN or garbage there) and zeroed after it.  Calls with a mask tensor stay off PyTorch's
cuDNN attention kernel on CUDA (see :func:`.common.masked_sdpa`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from .base import Backend
from .common import dense_mask, expand_kv, masked_sdpa, zero_rows


def native_form(p) -> str:
    """'full', 'causal', 'causal_lower_right' or 'dense': how SDPA will receive this mask.

    Causal with one query (a decoding step) sees every key: full.  Bottom-right causal with more
    (a chunked prefill) is SDPA's ``CausalBias`` on CUDA, whose kernels align it natively; on CPU
    that bias takes a slow path (0.4-0.8 ms a call on a tiny problem, against 0.04 for a bool
    mask), so there it is a dense mask."""
    s = p.structure
    if s.is_structured and s.documents is None and s.valid is None:
        if s.base == "full" or (s.base == "causal" and p.q_len == 1):
            return "full"
        if s.base == "causal":
            if p.q_len == p.kv_len:
                return "causal"
            return "causal_lower_right" if p.device_type == "cuda" else "dense"
    return "dense"


class Sdpa(Backend):
    name = "sdpa"
    summary = "torch SDPA: is_causal / lower-right causal / no mask natively, else a dense bool mask"
    runs_under_transforms = True

    def run(self, q, k, v, p):
        if p.transformed:  # the math kernel is plain ops that jvp and vmap see through (fused ones: no forward AD)
            with sdpa_kernel(SDPBackend.MATH):
                return self._run(q, k, v, p)
        return self._run(q, k, v, p)

    def _run(self, q, k, v, p):
        form = native_form(p)
        gqa = {"enable_gqa": True} if p.is_gqa else {}
        if form == "full":
            return F.scaled_dot_product_attention(q, k, v, scale=p.scale, **gqa)
        if form == "causal":
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=p.scale, **gqa)
        if form == "causal_lower_right":
            from torch.nn.attention.bias import causal_lower_right

            bias = causal_lower_right(p.q_len, p.kv_len)
            k, v = expand_kv(k, p.q_heads), expand_kv(v, p.q_heads)
            return masked_sdpa(q, k, v, bias, scale=p.scale)  # SDPA builds a mask tensor if flash/efficient refuse
        dense = dense_mask(p)
        out = masked_sdpa(q, k, v, dense.unmasked_empty_rows, scale=p.scale, **gqa)
        return out if dense.row_has_key is None else zero_rows(out, dense.row_has_key)
