"""The static preference (what ``auto`` runs before ``anymask tune`` has measured a machine)
follows the table in ``anymask.dispatch``'s docstring, for every row of it."""

import dataclasses

import pytest
import torch

from anymask import dispatch
from anymask import masks as M
from anymask.problem import describe

S = 64
DOCS = M.documents(lengths=[[20, 44]])
PAD = M.padding(torch.tensor([[True] * 50 + [False] * 14]))
CUSTOM = M.custom(lambda b, h, q, k: (q + k) % 3 != 0)

ROWS = [  # (device, dtype, mask, the order the docstring gives)
    ("cuda", torch.bfloat16, M.full(), ("sdpa", "flash_attn", "cudnn", "triton", "flex", "fa4")),
    ("cuda", torch.float16, M.causal(), ("sdpa", "flash_attn", "cudnn", "triton", "flex", "fa4")),
    ("cuda", torch.bfloat16, M.window(16, 0), ("cudnn", "triton", "flex", "flash_attn", "varlen", "sdpa", "fa4")),
    ("cuda", torch.bfloat16, DOCS, ("triton", "flex", "cudnn", "varlen", "flash_attn", "sdpa", "fa4")),
    ("cuda", torch.bfloat16, M.causal() & DOCS, ("triton", "flex", "cudnn", "varlen", "flash_attn", "sdpa", "fa4")),
    ("cuda", torch.bfloat16, M.window(16, 0) & PAD, ("triton", "flex", "cudnn", "varlen", "flash_attn", "sdpa", "fa4")),
    ("cuda", torch.bfloat16, M.prefix_lm(16), ("triton", "flex", "cudnn", "varlen", "flash_attn", "sdpa", "fa4")),
    ("cuda", torch.bfloat16, CUSTOM, ("flex", "sdpa")),
    ("cuda", torch.float32, M.causal(), ("triton", "sdpa", "varlen", "flex")),
    ("cuda", torch.float32, M.causal() & DOCS, ("triton", "varlen", "sdpa", "flex")),
    ("cuda", torch.float32, PAD, ("triton", "varlen", "sdpa", "flex")),
    ("cuda", torch.float32, M.prefix_lm(16), ("triton", "sdpa", "flex")),
    ("cuda", torch.float32, M.window(16, 0), ("triton", "sdpa", "flex")),
    ("cuda", torch.float32, CUSTOM, ("triton", "sdpa", "flex")),
    ("cpu", torch.float32, M.causal(), ("sdpa", "flex")),
    ("cpu", torch.float32, M.window(16, 0), ("sdpa", "flex")),  # S 64: below _CPU_SHORT
]


@pytest.mark.parametrize("device, dtype, mask, order", ROWS, ids=lambda x: getattr(x, "name", None) or str(x))
def test_static_preference_follows_the_documented_table(device, dtype, mask, order):
    q = torch.zeros(1, 2, S, 16, dtype=dtype)
    p = dataclasses.replace(describe(q, q, q, mask, None), device=torch.device(device))
    assert dispatch.static_preference(p) == (*order, "eager")
    for name in order:
        assert name in dispatch.__doc__


@pytest.mark.parametrize("mask", [DOCS, M.causal() & DOCS, M.window(16, 0) & PAD, M.prefix_lm(16) & PAD],
                         ids=["documents", "documents_causal", "padding_window", "padded_prefix_lm"])
def test_structured_bf16_at_head_dim_128_prefers_cudnn(mask):
    q = torch.zeros(1, 2, S, 128, dtype=torch.bfloat16)
    p = dataclasses.replace(describe(q, q, q, mask, None), device=torch.device("cuda"))
    assert dispatch.static_preference(p) == ("cudnn", "triton", "flex", "varlen", "flash_attn", "sdpa", "fa4", "eager")
    assert "bf16, head dim 128: cudnn, triton, flex," in dispatch.__doc__
    p16 = dataclasses.replace(describe(q.half(), q.half(), q.half(), mask, None), device=torch.device("cuda"))
    assert dispatch.static_preference(p16)[0] == "triton"  # fp16: not measured with cuDNN in place


@pytest.mark.parametrize("mask, order", [
    (M.full(), ("fa4", "sdpa", "flash_attn", "cudnn", "triton", "flex")),
    (M.causal(), ("fa4", "sdpa", "flash_attn", "cudnn", "triton", "flex")),
    (M.window(16, 0), ("fa4", "cudnn", "triton", "flex", "flash_attn", "varlen", "sdpa")),
    (M.prefix_lm(16), ("fa4", "cudnn", "triton", "flex", "varlen", "flash_attn", "sdpa")),
], ids=["full", "causal", "window", "prefix_lm"])
def test_bf16_at_head_dim_128_on_long_rows_prefers_fa4_where_it_won_on_the_h200(mask, order):
    q = torch.zeros(1, 1, dispatch._FA4_MIN_Q_LEN, 128, dtype=torch.bfloat16)
    p = dataclasses.replace(describe(q, q, q, mask, None), device=torch.device("cuda"))
    assert dispatch.static_preference(p) == (*order, "eager")
    assert "bf16, hd 128, q_len >= 2048" in dispatch.__doc__
    p16 = dataclasses.replace(describe(q.half(), q.half(), q.half(), mask, None), device=torch.device("cuda"))
    assert dispatch.static_preference(p16)[-2] == "fa4"  # fp16: not measured
    short = dataclasses.replace(describe(q[:, :, -1:], q, q, mask, None), device=torch.device("cuda"))
    assert dispatch.static_preference(short)[-2] == "fa4"  # decoding: FA4's host launch would dominate


@pytest.mark.parametrize("kv_len, order", [(1024, ("varlen", "flex", "sdpa")), (256, ("sdpa", "varlen", "flex"))])
def test_cpu_packed_preference_depends_on_length(kv_len, order):
    q = torch.zeros(1, 1, kv_len, 8)
    p = describe(q, q, q, M.documents(lengths=[[kv_len // 2, kv_len - kv_len // 2]]), None)
    assert dispatch.static_preference(p) == (*order, "eager")


@pytest.mark.parametrize("kv_len, order", [(1024, ("flex", "sdpa")), (256, ("sdpa", "flex"))])
@pytest.mark.parametrize("mask", [M.window(16, 0), M.prefix_lm(16), CUSTOM], ids=["window", "prefix_lm", "custom"])
def test_cpu_structured_preference_depends_on_length(mask, kv_len, order):
    q = torch.zeros(1, 1, kv_len, 8)
    assert dispatch.static_preference(describe(q, q, q, mask, None)) == (*order, "eager")


def test_auto_decides_again_after_an_in_place_edit_takes_its_backend_away():
    """auto's per-mask decision is keyed on the mask's tensors' versions: a hole punched in place into
    the padding of a windowed mask takes varlen (auto's CPU pick at 512 keys) away, and auto must not
    run it again (it did: error 2.1 against float64)."""
    import anymask

    S = 512
    valid = torch.ones(1, S, dtype=torch.bool)
    mask = M.padding(valid) & M.window(2) & M.causal()
    q, k, v = (torch.randn(1, 1, S, 8, dtype=torch.float64) for _ in range(3))
    assert anymask.which_backend(q, k, v, mask) == "varlen"  # precondition: the backend the edit breaks
    anymask.attention(q, k, v, mask)
    mask.terms[0].valid[0, 100] = False  # the copy the mask holds (constructors copy their input)
    assert anymask.backends(q, k, v, mask)["varlen"]["reasons"]
    assert anymask.which_backend(q, k, v, mask) != "varlen"
    want = anymask.attention(q, k, v, M.padding(mask.terms[0].valid.clone()) & M.window(2) & M.causal(),
                             backend="eager")
    torch.testing.assert_close(anymask.attention(q, k, v, mask), want)


def test_a_fallback_pinned_for_one_layout_leaves_the_other_alone(monkeypatch):
    """A backend that failed on ``[B, S, H, D]`` views (as Llama-style models pass them) was skipped
    for contiguous inputs too: auto's remembered fallback did not know the layout."""
    import warnings

    import anymask
    from anymask import backend as B

    mask = M.padding(torch.tensor([[True] * 12 + [False] * 4]))
    q, k, v = (torch.randn(1, 2, 16, 8) for _ in range(3))
    first = anymask.which_backend(q, k, v, mask)
    chosen = B.get(first)
    real_run = chosen.run

    def fails_on_seq_major(q, k, v, p):
        if q.stride(2) > q.stride(1):
            raise RuntimeError("this layout is not supported")
        return real_run(q, k, v, p)

    monkeypatch.setattr(chosen, "run", fails_on_seq_major)
    dispatch.forget_choices()
    q_t, k_t, v_t = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
    with pytest.warns(RuntimeWarning, match=f"backend {first!r} failed"):
        anymask.attention(q_t, k_t, v_t, mask)
    assert anymask.which_backend(q_t, k_t, v_t, mask) != first
    assert anymask.which_backend(q, k, v, mask) == first
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        anymask.attention(q, k, v, mask)
    dispatch.forget_choices()


@pytest.mark.parametrize("q_len, device, form", [(1, "cpu", "full"), (1, "cuda", "full"), (4, "cpu", "dense"),
                                                 (4, "cuda", "causal_lower_right"), (16, "cpu", "causal")])
def test_sdpa_hands_a_decoding_step_no_mask_and_cpu_no_causal_bias(q_len, device, form):
    """A decoding step (one query, causal) sees every key; SDPA's CausalBias took a slow path on CPU
    (0.4 ms a call against 0.01 ms without a mask, on a tiny problem)."""
    from anymask.backend.sdpa import native_form

    p = dataclasses.replace(describe(*(torch.randn(1, 2, n, 8) for n in (q_len, 16, 16)), M.causal(), None),
                            device=torch.device(device))
    assert native_form(p) == form
    import anymask

    q, k = torch.randn(1, 2, q_len, 8, dtype=torch.float64), torch.randn(1, 2, 16, 8, dtype=torch.float64)
    torch.testing.assert_close(anymask.attention(q, k, k, M.causal(), backend="sdpa"),
                               anymask.attention(q, k, k, M.causal(), backend="eager"), atol=1e-12, rtol=0)
