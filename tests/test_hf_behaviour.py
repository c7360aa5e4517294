"""What a user of ``anymask.hf`` relies on: packed documents isolated, bidirectional really
bidirectional, padding content irrelevant, per-call overrides, clear errors."""

from __future__ import annotations

import pytest
import torch

from .test_hf_common import VOCAB, last_hidden, tiny_model, twin

import anymask.hf
from anymask import masks

LENGTHS = [5, 3, 6]


def _packed():
    torch.manual_seed(3)
    docs = [torch.randint(0, VOCAB, (n,)) for n in LENGTHS]
    ids = torch.cat(docs).unsqueeze(0)  # [1, 14]
    pos = torch.cat([torch.arange(n) for n in LENGTHS]).unsqueeze(0)
    cu = torch.tensor([0, *torch.tensor(LENGTHS).cumsum(0).tolist()], dtype=torch.int32)
    return docs, ids, pos, cu


@pytest.mark.parametrize("family", ["llama", "gemma3"])
@pytest.mark.parametrize("spec", ["causal", "bidirectional"])
@pytest.mark.parametrize("route", ["position_ids", "position_ids+use_cache", "cu_seq_lens"])
def test_packed_batch_equals_each_document_alone(family, spec, route):
    model = anymask.hf.set_mask(tiny_model(family), spec)
    docs, ids, pos, cu = _packed()
    if route == "cu_seq_lens":  # TRL DataCollatorWithFlattening kwargs
        n = max(LENGTHS)
        packed = last_hidden(model, input_ids=ids, position_ids=pos, use_cache=False, cu_seq_lens_q=cu,
                         cu_seq_lens_k=cu, max_length_q=n, max_length_k=n)
    else:
        packed = last_hidden(model, input_ids=ids, position_ids=pos, use_cache=route.endswith("use_cache"))
    alone = torch.cat([last_hidden(model, input_ids=d.unsqueeze(0)) for d in docs], dim=1)
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=1e-5)


def test_cu_seq_lens_alone_separate_documents():
    """Without position-id resets, TRL's cu_seq_lens still split the row: each document as if alone
    (positions keep counting across the row, so each is compared with its own positions)."""
    model = anymask.hf.set_mask(tiny_model("llama"), "bidirectional")
    docs, ids, _, cu = _packed()
    n = max(LENGTHS)
    split = last_hidden(model, input_ids=ids, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=n, max_length_k=n)
    starts = cu[:-1].tolist()
    alone = torch.cat([last_hidden(model, input_ids=d.unsqueeze(0), position_ids=torch.arange(s, s + len(d)).unsqueeze(0))
                       for d, s in zip(docs, starts)], dim=1)
    torch.testing.assert_close(split, alone, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(split, last_hidden(model, input_ids=ids), atol=1e-4)


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen3"])
def test_bidirectional_sees_later_tokens_and_causal_does_not(family):
    model = tiny_model(family)
    torch.manual_seed(4)
    a = torch.randint(0, VOCAB, (1, 10))
    b = a.clone()
    b[0, -1] = (a[0, -1] + 1) % VOCAB  # change only the last token
    anymask.hf.set_mask(model, "causal")
    torch.testing.assert_close(last_hidden(model, input_ids=a)[:, :-1], last_hidden(model, input_ids=b)[:, :-1])
    anymask.hf.set_mask(model, "bidirectional")
    ha, hb = last_hidden(model, input_ids=a), last_hidden(model, input_ids=b)
    # within the sliding window (Mistral: 4 tokens) earlier positions must move
    assert (ha[0, -3] - hb[0, -3]).abs().max() > 1e-4
    if family != "mistral":
        assert (ha[0, 0] - hb[0, 0]).abs().max() > 1e-4


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3"])
@pytest.mark.parametrize("spec", ["causal", "bidirectional", "prefix_lm"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_content_does_not_matter(family, spec, side):
    model = anymask.hf.set_mask(tiny_model(family), spec)
    torch.manual_seed(5)
    ids = torch.randint(0, VOCAB, (2, 9))
    valid = torch.ones(2, 9, dtype=torch.long)
    pads = slice(0, 4) if side == "left" else slice(5, 9)
    valid[0, pads] = 0
    other = ids.clone()
    other[0, pads] = (ids[0, pads] + 7) % VOCAB
    extra = {"prefix_lengths": [6, 3]} if spec == "prefix_lm" else {}
    h1 = last_hidden(model, input_ids=ids, attention_mask=valid, **extra)
    h2 = last_hidden(model, input_ids=other, attention_mask=valid, **extra)
    keep = valid.bool()
    torch.testing.assert_close(h1[keep], h2[keep])


def test_per_call_override_and_context_manager():
    model = anymask.hf.set_mask(tiny_model("llama"), "causal")
    ids = torch.randint(0, VOCAB, (1, 8))
    causal = last_hidden(model, input_ids=ids)
    bidir = last_hidden(model, input_ids=ids, anymask_mask="bidirectional")
    with anymask.hf.using(model, "bidirectional"):
        torch.testing.assert_close(last_hidden(model, input_ids=ids), bidir)
    assert anymask.hf.get_mask(model) == ("causal", "auto")
    torch.testing.assert_close(last_hidden(model, input_ids=ids), causal)
    full_mask = last_hidden(model, input_ids=ids, anymask_mask=masks.full())
    torch.testing.assert_close(full_mask, bidir)
    assert not torch.allclose(causal[:, 0], bidir[:, 0], atol=1e-4)


def test_prefix_from_token_type_ids_equals_prefix_lengths():
    model = anymask.hf.set_mask(tiny_model("qwen3"), "prefix_lm")
    ids = torch.randint(0, VOCAB, (2, 8))
    types = torch.zeros(2, 8, dtype=torch.long)
    types[0, 3:] = 1
    types[1, 6:] = 1
    a = last_hidden(model, input_ids=ids, prefix_lengths=[3, 6])
    b = last_hidden(model, input_ids=ids, token_type_ids=types)
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("types,both,match", [
    ([[0, 0, 0, 1, 1, 1, 1, 1, 1]], False, r"shape \[1, 9\] do not fit this call: give \[1, T\] with T = 10"),
    ([0, 0, 0, 1, 1, 1, 1, 1, 1, 1], False, r"shape \[10\] do not fit"),
    ([[0, 0, 0, 1, 1, 2, 1, 1, 1, 1]], False, "0 \\(prefix\\) and 1 \\(continuation\\) only, got 2"),
    ([[0, 0, 0, 1, 1, 1, 1, 1, 1, 1]], True, "prefix_lengths= or token_type_ids, not both"),
])
def test_token_type_ids_that_do_not_fit_are_refused(types, both, match):
    model = anymask.hf.set_mask(tiny_model("llama"), "prefix_lm")
    ids = torch.randint(0, VOCAB, (1, 10))
    extra = {"prefix_lengths": [2]} if both else {}
    with pytest.raises(ValueError, match=match):
        last_hidden(model, input_ids=ids, token_type_ids=torch.tensor(types), **extra)


def test_set_mask_switches_implementation_and_errors_are_clear():
    model = tiny_model("llama", attn="sdpa")
    anymask.hf.set_mask(model, "bidirectional", backend="eager")
    assert model.config._attn_implementation == "anymask"
    with pytest.raises(ValueError, match="unknown mask spec"):
        anymask.hf.set_mask(model, "bidrectional")
    with pytest.raises(TypeError, match="mask spec"):
        anymask.hf.set_mask(model, 3)
    anymask.hf.set_mask(model, "prefix_lm")
    model.train()
    with pytest.raises(ValueError, match="prefix_lengths"):
        model(torch.randint(0, VOCAB, (1, 6)))
    model.config.attention_dropout = 0.1
    for m in model.modules():
        if hasattr(m, "attention_dropout"):
            m.attention_dropout = 0.1
    with pytest.raises(ValueError, match="attention_dropout"):
        model(torch.randint(0, VOCAB, (1, 6)), prefix_lengths=[2])


@pytest.mark.parametrize("forced", ["eager", "sdpa", "flex"])
def test_forced_backend_is_used(forced, monkeypatch):
    """``set_mask(..., backend=X)`` runs every layer on X and nothing else (counted on the backends)."""
    from anymask.backend import get

    calls = []
    for name in ("eager", "sdpa", "flex", "varlen"):
        cls = type(get(name))
        monkeypatch.setattr(cls, "run", lambda self, *a, _run=cls.run, **kw: calls.append(self.name) or _run(self, *a, **kw))
    model = anymask.hf.set_mask(tiny_model("llama"), "causal", backend=forced)
    ids = torch.randint(0, VOCAB, (2, 7))
    ours = last_hidden(model, input_ids=ids)
    assert calls and set(calls) == {forced}, calls
    torch.testing.assert_close(ours, last_hidden(twin(model, "sdpa"), input_ids=ids), atol=1e-5, rtol=1e-5)


def test_any_mask_as_spec_matches_eager_with_that_mask():
    """A user Mask (here a band of width 5, on absolute key positions) plus padding, vs eager."""
    from .test_hf_common import as_eager_mask

    model = anymask.hf.set_mask(tiny_model("llama"), masks.window(2, 2))
    torch.manual_seed(6)
    ids = torch.randint(0, VOCAB, (2, 9))
    valid = torch.ones(2, 9, dtype=torch.long)
    valid[1, :2] = 0
    q, kv = torch.arange(9).view(9, 1), torch.arange(9).view(1, 9)
    band = ((q - kv).abs() <= 2).expand(2, 9, 9) & valid.bool()[:, None, :] & valid.bool()[:, :, None]
    eager = twin(model, "eager")
    ref = last_hidden(eager, input_ids=ids, attention_mask=as_eager_mask(eager, lambda w: band[:, None], torch.float32))
    keep = valid.bool()
    torch.testing.assert_close(last_hidden(model, input_ids=ids, attention_mask=valid)[keep], ref[keep],
                               atol=1e-5, rtol=1e-5)


def test_explicit_4d_mask_is_taken_as_given():
    model = tiny_model("qwen3")
    ids = torch.randint(0, VOCAB, (1, 7))
    allowed = torch.rand(1, 1, 7, 7) < 0.6
    allowed |= torch.eye(7, dtype=torch.bool)
    additive = torch.zeros(1, 1, 7, 7).masked_fill(~allowed, torch.finfo(torch.float32).min)
    eager = twin(model, "eager")
    torch.testing.assert_close(last_hidden(model, input_ids=ids, attention_mask=additive),
                               last_hidden(eager, input_ids=ids, attention_mask=additive), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("spec", ["causal", "bidirectional"])
def test_transformers_flattening_collator_batch(spec):
    """What ``DataCollatorWithFlattening(return_flash_attn_kwargs=True)`` (TRL's padding-free path)
    hands the model: one row, position_ids, cu_seq_lens_q/k, max_length_q/k, seq_idx, labels."""
    from transformers import DataCollatorWithFlattening

    model = anymask.hf.set_mask(tiny_model("qwen2"), spec)
    docs, _, _, _ = _packed()
    collate = DataCollatorWithFlattening(return_flash_attn_kwargs=True, return_position_ids=True, return_seq_idx=True)
    batch = collate([{"input_ids": d.tolist()} for d in docs])
    with torch.no_grad():
        packed = model(**batch, output_hidden_states=True).hidden_states[-1]
    alone = torch.cat([last_hidden(model, input_ids=d.unsqueeze(0)) for d in docs], dim=1)
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=1e-5)


def test_torch_compile_of_the_model_gives_the_same_result():
    """Users compile their models: anymask's attention must stay exact under torch.compile
    (it may graph-break where it reads host values; it must never change the result)."""
    model = tiny_model("llama")
    anymask.hf.set_mask(model, "bidirectional")
    torch.manual_seed(5)
    ids = torch.randint(0, VOCAB, (2, 16))
    valid = torch.ones(2, 16, dtype=torch.long)
    valid[1, :4] = 0
    expected = last_hidden(model, input_ids=ids, attention_mask=valid)
    torch._dynamo.reset()
    got = last_hidden(torch.compile(model), input_ids=ids, attention_mask=valid)
    torch._dynamo.reset()
    rows = valid.bool()
    torch.testing.assert_close(got[rows], expected[rows], rtol=1e-5, atol=1e-5)
