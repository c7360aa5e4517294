"""FlexAttention backend against eager in float64, with tolerances relative to SDPA's own error.

Fresh random inputs every run.  Compilation dominates the CPU time, so the shapes are chosen to
share compiled kernels (CPU pads lengths to powers of two: 33..64 all run one kernel).
"""

from __future__ import annotations

import random

import pytest
import torch

from anymask import attention, masks, tiles
from anymask.backend import get
from anymask.backend.flex import Flex
from anymask.problem import describe

from .tolerances import assert_close_to_reference, sdpa_error

flex = get("flex")
pytestmark = pytest.mark.skipif(bool(flex.machine_reasons), reason="; ".join(flex.machine_reasons))

CUDA = torch.cuda.is_available()


def make(B, Hq, Hkv, Sq, Skv, D, dtype, device="cpu", grad=False):
    """Fresh random q [B, Hq, Sq, D], k, v [B, Hkv, Skv, D]."""
    shapes = ((B, Hq, Sq, D), (B, Hkv, Skv, D), (B, Hkv, Skv, D))
    return [torch.randn(s, dtype=dtype, device=device).requires_grad_(grad) for s in shapes]


def forward(backend, q, k, v, mask, dout=None):
    """Output (and input grads when ``dout`` is given) of ``backend`` (a name or a Backend)."""
    if isinstance(backend, str):
        out = attention(q, k, v, mask, backend=backend)
    else:
        out = backend.run(q, k, v, describe(q, k, v, mask, None))
    if dout is None:
        return [out]
    grads = torch.autograd.grad(out, (q, k, v), dout.to(out.dtype))
    return [out, *grads]


def check(mask, B=2, Hq=4, Hkv=2, Sq=37, Skv=37, D=16, dtype=torch.float32, device="cpu",
          backend=flex, grad=False):
    """flex vs eager64, within 2 x SDPA's error + a small absolute term; empty rows exactly 0."""
    q, k, v = make(B, Hq, Hkv, Sq, Skv, D, dtype, device, grad)
    dout = torch.randn(B, Hq, Sq, D, dtype=torch.float64, device=device) if grad else None
    ref = forward("eager", *[t.detach().double().requires_grad_(grad) for t in (q, k, v)], mask, dout)
    got = forward(backend, q, k, v, mask, dout)
    base = forward("sdpa", q, k, v, mask, dout)
    for name, r, g, s in zip(("out", "dq", "dk", "dv"), ref, got, base):
        assert_close_to_reference(g, r, sdpa_error(s, r), what=f"flex {name} ({mask!r})")
    empty = ~mask.to_dense(B, Hq, Sq, Skv, device=device).any(-1)  # [B, Hq, Sq]
    assert (got[0][empty] == 0).all(), "rows that see no key must output exactly 0"
    if grad:
        assert (got[1][empty] == 0).all(), "rows that see no key must get zero gradient"
    return got[0]


def head_batch_mask():
    """A general mask reading b and h (the captures DESIGN.md warns about on CPU)."""
    return masks.custom(lambda b, h, q, kv: ((q + 2 * b + h) % 3 != 0) & (kv <= q + b))


def per_head_dense(B, H, S):
    return masks.dense(torch.rand(B, H, S, S) > 0.4)


# CPU ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", sorted(masks.CATALOGUE))
def test_catalogue(name, dtype):
    check(masks.CATALOGUE[name](2, 37), dtype=dtype)


def test_q_shorter_than_kv():
    for name in sorted(masks.CATALOGUE):
        check(masks.CATALOGUE[name](2, 37), Sq=5)
    for name in ("documents_causal", "padding"):  # one query: decoding with a KV cache
        check(masks.CATALOGUE[name](2, 37), Sq=1)


def test_bidirectional_documents_use_the_document_start_mod():
    ids = torch.tensor([[0] * 10 + [7] * 20 + [-3] * 7, [5] * 37, [-1] * 3 + [2] * 30 + [9] * 4])  # [3, 37]
    mask = masks.documents(ids)
    q, k, v = make(3, 4, 2, 37, 37, 16, torch.float32)
    assert flex.plan(describe(q, k, v, mask, None)).block_mask.mask_mod.__name__ == "documents_mod"
    check(mask, B=3)
    check(mask, B=3, Sq=5)  # queries are the last 5 positions
    assert flex.plan(describe(q, k, v, masks.documents(ids) & masks.causal(), None)).block_mask.mask_mod.__name__ \
        == "interval_mod"


WHOLE_BLOCK_MASKS = {  # mask, its mask_mod in whole blocks, with queries offset (q_len < kv_len)
    "custom": (lambda: masks.custom(lambda b, h, q, kv: ((q - kv) % 3 == 0) & (kv <= q))
               & masks.padding((torch.arange(64) < 50).expand(2, 64)), "general_mod"),
    # as hand-rolled flex runs it: measured faster than per-row intervals on the H200
    "packed_prefix_lm": (lambda: masks.CATALOGUE["packed_prefix_lm"](2, 64), "interval_mod"),
}


@pytest.mark.parametrize("name", list(WHOLE_BLOCK_MASKS))
def test_whole_blocks_call_the_masks_own_mask_mod_unmapped(name):
    make_mask, offset_mod = WHOLE_BLOCK_MASKS[name]
    mask = make_mask()
    for sq, mod in ((64, "bare_mod"), (8, offset_mod)):
        q, k, v = make(2, 4, 2, sq, 64, 16, torch.float32)
        assert flex.plan(describe(q, k, v, mask, None)).block_mask.mask_mod.__name__ == mod
        check(mask, Sq=sq, Skv=64)


def test_short_cpu_calls_never_nan():
    """Calls of 3-16 tokens, repeated: torch 2.13's CPU kernel gave NaN at random with 8-token blocks
    (``_CPU_MIN_LEN``); each call must match eager."""
    for _ in range(8):
        for s in (3, 5, 8, 16):
            for mask in (masks.window(4) & masks.causal(), masks.causal(), masks.full()):
                check(mask, B=1, Sq=s, Skv=s)
    for s in (3, 5, 8, 16):
        assert flex.plan(describe(*make(1, 4, 2, s, s, 16, torch.float32), masks.causal(), None)).q_len >= 32


def test_no_gqa_and_odd_head_dim():
    for name in ("documents_causal", "custom"):
        check(masks.CATALOGUE[name](2, 37), Hq=3, Hkv=3, D=24)


def test_odd_lengths_small_blocks_one_kernel_per_bucket():
    """Tiles of 16 with every class present; odd lengths 33..63 share one compiled kernel."""
    small = Flex(block=16)
    from torch._dynamo.utils import counters

    def sweep():
        for _ in range(3):
            skv = random.randrange(33, 64, 2)
            sq = random.choice([skv, random.randrange(33, skv + 1)])
            valid = torch.rand(2, skv) > 0.3
            valid[1] = False  # a batch row that is all padding
            for mask in (masks.CATALOGUE["documents_causal"](2, skv), masks.CATALOGUE["sliding_window"](2, skv),
                         masks.prefix_lm([sq // 3, skv // 2]),
                         masks.padding(valid) & masks.window(7, 3) & masks.documents(lengths=[skv // 2, skv - skv // 2])):
                check(mask, Sq=sq, Skv=skv, backend=small)
            check(head_batch_mask(), Sq=sq, Skv=skv, backend=small)

    sweep()
    graphs = counters["stats"]["unique_graphs"]
    sweep()
    assert counters["stats"]["unique_graphs"] == graphs, "a new odd length recompiled flex"


def test_per_head_and_per_batch_general_masks():
    for Sq, Skv in ((37, 37), (33, 45)):
        check(head_batch_mask(), Sq=Sq, Skv=Skv)
    check(per_head_dense(2, 4, 41), Sq=41, Skv=41, backend=Flex(block=16))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_fully_masked_rows(dtype):
    valid = torch.ones(2, 37, dtype=torch.bool)
    valid[0, 20:] = False
    valid[1] = False
    for mask in (masks.padding(valid) & masks.causal(), ~masks.full(),
                 masks.custom(lambda b, h, q, kv: (q % 4 != 1) & (kv <= q))):
        out = check(mask, dtype=dtype)
        assert not out.isnan().any()


def test_block_mask_expands_to_the_oracle():
    """FULL tiles, plus mask_mod on PARTIAL tiles, over the padded grid == to_dense, exactly."""
    valid = torch.rand(3, 45) > 0.2
    cases = [masks.CATALOGUE[n](3, 45) for n in sorted(masks.CATALOGUE)]
    cases += [masks.padding(valid) & masks.prefix_lm([3, 20, 44]), head_batch_mask(), per_head_dense(3, 2, 45)]
    for backend in (flex, Flex(block=16)):
        for mask in cases:
            for sq in (45, 19, 1):
                if sq != 45 and isinstance(mask, masks.Dense):
                    continue
                q, k, v = make(3, 2, 2, sq, 45, 8, torch.float32)
                p = describe(q, k, v, mask, None)
                bm = backend.plan(p).block_mask
                assert torch.equal(_expand(bm, 3, 2)[:, :, :sq, :45], mask.to_dense(3, 2, sq, 45)), (mask, sq)
                assert not _expand(bm, 3, 2)[:, :, :sq, 45:].any(), "padded keys must stay hidden"


def _expand(bm, B, H) -> torch.Tensor:
    """What flex computes from a BlockMask: bool [B, H, Sq', Skv'] over the padded grid."""
    bq, bk = bm.BLOCK_SIZE
    sq, skv = bm.seq_lengths
    b = torch.arange(B).view(-1, 1, 1, 1)
    h = torch.arange(H).view(1, -1, 1, 1)
    qi = torch.arange(sq).view(1, 1, -1, 1)
    kvi = torch.arange(skv).view(1, 1, 1, -1)
    mod = bm.mask_mod(b, h, qi, kvi).expand(B, H, sq, skv)
    cls = torch.zeros(bm.kv_num_blocks.shape[0], bm.kv_num_blocks.shape[1], -(-sq // bq), -(-skv // bk),
                      dtype=torch.int8)
    for num, idx, value in ((bm.kv_num_blocks, bm.kv_indices, tiles.PARTIAL),
                            (bm.full_kv_num_blocks, bm.full_kv_indices, tiles.FULL)):
        keep = torch.arange(idx.shape[-1]) < num[..., None]  # [B, H, nQ, nK]
        cls.scatter_add_(-1, (idx * keep).long(), torch.where(keep, value, 0).to(torch.int8))
    cls = cls.expand(B, H, -1, -1).repeat_interleave(bq, 2).repeat_interleave(bk, 3)[:, :, :sq, :skv]
    return (cls == tiles.FULL) | ((cls == tiles.PARTIAL) & mod)


def test_plan_cache_is_small_and_keyed_by_identity():
    backend = Flex()
    q, k, v = make(1, 2, 2, 9, 9, 8, torch.float32)
    m1, m2 = masks.causal(), masks.causal()
    p1, p2 = describe(q, k, v, m1, None), describe(q, k, v, m2, None)
    assert backend.plan(p1) is backend.plan(describe(q, k, v, m1, None))
    assert backend.plan(p1) is not backend.plan(p2)
    for _ in range(40):
        backend.plan(describe(q, k, v, masks.full(), None))
    assert len(backend._plans) <= 32
    for _ in range(10):  # a new dense mask per call (an HF model given a 4-D mask): few stay alive
        backend.plan(describe(q, k, v, masks.dense(torch.rand(1, 1, 9, 9) > 0.5), None))
    assert sum(plan.holds_mask for _, plan in backend._plans.values()) == 4
    assert len(backend._plans) <= 32


def test_cpu_reasons_are_accurate():
    q, k, v = make(2, 4, 2, 37, 37, 16, torch.float32, grad=True)
    reasons = flex.not_supported_reasons(describe(q, k, v, masks.causal(), None))
    assert any("backward on CPU" in r for r in reasons)
    from torch.nn.attention.flex_attention import flex_attention

    with pytest.raises(NotImplementedError, match="backward on CPU"):
        flex_attention(q, k, v)
    q64, k64, v64 = make(1, 2, 2, 9, 9, 8, torch.float64)
    assert any("float64" in r for r in flex.not_supported_reasons(describe(q64, k64, v64, masks.causal(), None)))
    with torch.no_grad():  # requires_grad inputs under no_grad run fine
        assert attention(q, k, v, masks.causal(), backend="flex").shape == (2, 4, 37, 16)


# GPU ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(masks.CATALOGUE))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_gpu_catalogue_forward_backward(dtype, name):
    for Sq, Skv in ((37, 37), (61, 389), (256, 256)):  # 256: whole blocks (the mask's own mask_mod)
        check(masks.CATALOGUE[name](2, Skv), Sq=Sq, Skv=Skv, D=64, dtype=dtype, device="cuda", grad=True)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_gpu_reasons():
    for D, dtype, words in ((8, torch.float32, "head dim >= 16"), (512, torch.bfloat16, "shared memory"),
                            (64, torch.float64, "float64")):
        q, k, v = make(1, 2, 2, 9, 9, D, dtype, "cuda")
        assert any(words in r for r in flex.not_supported_reasons(describe(q, k, v, masks.causal(), None)))


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_gpu_fully_masked_rows_and_general_masks():
    valid = torch.ones(2, 301, dtype=torch.bool)
    valid[0, 150:] = False
    valid[1] = False
    for mask in (masks.padding(valid) & masks.causal(), ~masks.full(), head_batch_mask(),
                 per_head_dense(2, 4, 301)):
        check(mask.to("cuda"), Sq=301, Skv=301, D=64, device="cuda", grad=True)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_gpu_new_lengths_do_not_recompile():
    from torch._dynamo.utils import counters

    mask = masks.CATALOGUE["documents_causal"]
    for s in (129, 257):
        check(mask(2, s), Sq=s, Skv=s, D=64, device="cuda", grad=True)
    graphs = counters["stats"]["unique_graphs"]
    for s in (311, 515, 1001):
        check(mask(2, s), Sq=s, Skv=s, D=64, device="cuda", grad=True)
    assert counters["stats"]["unique_graphs"] == graphs
