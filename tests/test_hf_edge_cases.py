"""Edge cases of ``anymask.hf`` a user hits: inference mode, packed prefix-LM, sliding caches with
position-dependent masks, bidirectional decoding, odd 4-D masks, and what ``using`` restores."""

from __future__ import annotations

import pytest
import torch

from .test_hf_common import VOCAB, as_eager_mask, last_hidden, tiny_model, twin

import anymask.hf
from anymask import masks

LENGTHS, PROMPTS = [5, 3, 6], [2, 1, 4]


def _packed_prompts():
    torch.manual_seed(11)
    docs = [torch.randint(0, VOCAB, (n,)) for n in LENGTHS]
    ids = torch.cat(docs).unsqueeze(0)  # [1, 14]
    pos = torch.cat([torch.arange(n) for n in LENGTHS]).unsqueeze(0)
    types = torch.cat([(torch.arange(n) >= p).long() for n, p in zip(LENGTHS, PROMPTS)]).unsqueeze(0)
    return docs, ids, pos, types


@pytest.mark.parametrize("backend", ["auto", "sdpa", "flex"])
def test_inference_mode_forward_and_generate_match_sdpa(backend):
    model = anymask.hf.set_mask(tiny_model("llama"), "causal", backend=backend)
    sdpa = twin(model, "sdpa")
    torch.manual_seed(2)
    ids = torch.randint(0, VOCAB, (2, 9))
    valid = torch.ones(2, 9, dtype=torch.long)
    valid[1, :3] = 0  # left padding
    with torch.inference_mode():
        ours = model(ids, attention_mask=valid).logits
        ref = sdpa(ids, attention_mask=valid).logits
        tokens = model.generate(ids, attention_mask=valid, max_new_tokens=4, do_sample=False)
        ref_tokens = sdpa.generate(ids, attention_mask=valid, max_new_tokens=4, do_sample=False)
    keep = valid.bool()
    torch.testing.assert_close(ours[keep], ref[keep], atol=1e-5, rtol=1e-5)
    assert torch.equal(tokens, ref_tokens)


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_packed_prefix_lm_from_token_type_ids_equals_each_document_alone(family):
    model = anymask.hf.set_mask(tiny_model(family), "prefix_lm")
    docs, ids, pos, types = _packed_prompts()
    packed = last_hidden(model, input_ids=ids, position_ids=pos, token_type_ids=types)
    alone = torch.cat([last_hidden(model, input_ids=d.unsqueeze(0), prefix_lengths=[p])
                       for d, p in zip(docs, PROMPTS)], dim=1)
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=1e-5)
    causal = last_hidden(model, input_ids=ids, position_ids=pos, anymask_mask="causal")
    later_prompt = sum(LENGTHS[:2])  # first token of the third document: its prompt sees 3 more tokens
    assert not torch.allclose(packed[:, later_prompt], causal[:, later_prompt], atol=1e-4)


def test_several_prefixes_in_one_row_match_eager():
    """token_type_ids 0 0 1 1 0 0 0 1 without position resets: each prefix run is bidirectional."""
    model = anymask.hf.set_mask(tiny_model("qwen3"), "prefix_lm")
    torch.manual_seed(4)
    ids = torch.randint(0, VOCAB, (1, 8))
    types = torch.tensor([[0, 0, 1, 1, 0, 0, 0, 1]])
    run = torch.tensor([0, 0, -1, -2, 1, 1, 1, -3])
    q, kv = torch.arange(8).view(8, 1), torch.arange(8).view(1, 8)
    allowed = (kv <= q) | ((run[:, None] == run[None, :]) & (run[:, None] >= 0))  # [8, 8]
    eager = twin(model, "eager")
    ref = last_hidden(eager, input_ids=ids, attention_mask=as_eager_mask(eager, lambda w: allowed[None, None], torch.float32))
    torch.testing.assert_close(last_hidden(model, input_ids=ids, token_type_ids=types), ref, atol=1e-5, rtol=1e-5)


def test_prefix_lengths_where_they_cannot_apply_are_errors():
    model = anymask.hf.set_mask(tiny_model("llama"), "prefix_lm")
    _, ids, pos, _ = _packed_prompts()
    with pytest.raises(ValueError, match="token_type_ids"):
        model(ids, position_ids=pos, prefix_lengths=[3])
    anymask.hf.set_mask(model, "bidirectional")
    with pytest.raises(ValueError, match="applies to the 'prefix_lm' spec"):
        model(ids, prefix_lengths=[3])
    model(ids, anymask_mask="prefix_lm", prefix_lengths=[3])


def test_position_dependent_mask_on_a_sliding_cache_is_refused():
    """Mistral's sliding cache keeps the last WINDOW keys: a Mask on absolute positions no longer fits."""
    model = anymask.hf.set_mask(tiny_model("mistral"), masks.prefix_lm(5))
    torch.manual_seed(5)
    ids = torch.randint(0, VOCAB, (1, 9))
    with torch.no_grad():
        first = model(ids[:, :6], use_cache=True)
        with pytest.raises(ValueError, match="depends on absolute positions"):
            model(ids[:, 6:], past_key_values=first.past_key_values, use_cache=True)
    anymask.hf.set_mask(model, masks.causal() & masks.window(2))  # relative: fine on any cache
    with torch.no_grad():
        first = model(ids[:, :6], use_cache=True)
        step = model(ids[:, 6:], past_key_values=first.past_key_values, use_cache=True).logits
        whole = model(ids).logits
    torch.testing.assert_close(step, whole[:, 6:], atol=1e-5, rtol=1e-5)


def test_bidirectional_decoding_with_a_cache_warns_once():
    model = anymask.hf.set_mask(tiny_model("llama"), "bidirectional")
    ids = torch.randint(0, VOCAB, (1, 5))
    anymask.hf._warn_cached_bidirectional.cache_clear()
    with pytest.warns(UserWarning, match="decoding with a KV cache"):
        model.generate(ids, max_new_tokens=3, do_sample=False)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.generate(ids, max_new_tokens=2, do_sample=False, use_cache=False)


def test_integer_4d_mask_is_a_clear_error():
    model = tiny_model("llama")
    ids = torch.randint(0, VOCAB, (1, 6))
    with pytest.raises(TypeError, match="4-D attention_mask must be bool"):
        model(ids, attention_mask=torch.ones(6, 6, dtype=torch.long).tril()[None, None])


def test_unknown_backend_at_set_mask_and_using_restores_the_implementation():
    model = tiny_model("llama", attn="sdpa")
    with pytest.raises(ValueError, match="unknown backend 'bogus'"):
        anymask.hf.set_mask(model, "causal", backend="bogus")
    with anymask.hf.using(model, "bidirectional"):
        assert model.config._attn_implementation == "anymask"
    assert model.config._attn_implementation == "sdpa"


def test_using_in_two_threads_on_one_model_is_refused_and_nesting_in_one_is_not():
    """The first thread's exit switched the model back to sdpa under the second's forward (a TypeError
    deep in transformers) and left the second's policy on the model."""
    import threading

    model = tiny_model("llama", attn="sdpa")
    inside, leave, seen = threading.Event(), threading.Event(), []

    def first():
        with anymask.hf.using(model, "prefix_lm"):
            inside.set()
            leave.wait(30)

    thread = threading.Thread(target=first)
    thread.start()
    inside.wait(30)
    try:
        with pytest.raises(RuntimeError, match="another thread is inside using"):
            with anymask.hf.using(model, "bidirectional"):
                seen.append("entered")
    finally:
        leave.set()
        thread.join()
    assert not seen and model.config._attn_implementation == "sdpa" and anymask.hf.get_mask(model) is None
    with anymask.hf.using(model, "causal"):
        with anymask.hf.using(model, "bidirectional"):
            assert anymask.hf.get_mask(model) == ("bidirectional", "auto")
        assert anymask.hf.get_mask(model) == ("causal", "auto")
    assert model.config._attn_implementation == "sdpa" and anymask.hf.get_mask(model) is None
    with anymask.hf.using(model, "causal"):  # another thread may use it now
        pass

    def inside(spec):
        with anymask.hf.using(model, spec):
            yield

    first, second = inside("prefix_lm"), inside("bidirectional")
    next(first)
    next(second)
    first.close()  # out of order: the first one entered leaves first
    assert anymask.hf.get_mask(model) == ("bidirectional", "auto")  # the second is still open
    second.close()
    assert model.config._attn_implementation == "sdpa" and anymask.hf.get_mask(model) is None
    errors = []
    other = threading.Thread(target=lambda: errors.extend(_using_fails(model)))
    other.start()
    other.join()
    assert not errors  # no thread is inside using() any more


def _using_fails(model) -> list:
    try:
        with anymask.hf.using(model, "causal"):
            return []
    except RuntimeError as exc:
        return [exc]


def test_bad_prefix_lengths_and_padding_shapes_are_clear_errors():
    model = anymask.hf.set_mask(tiny_model("llama"), "prefix_lm")
    ids = torch.randint(0, VOCAB, (2, 6))
    with pytest.raises(TypeError, match="prefix_lengths must be integers"):
        model(ids, prefix_lengths=torch.tensor([2.5, 3.0]))
    with pytest.raises(ValueError, match="prefix_lengths must be >= 0"):
        model(ids, prefix_lengths=[-1, 2])
    with pytest.raises(ValueError, match=r"expected \[2, sequence length\]"):
        model(ids, prefix_lengths=[2, 2], attention_mask=torch.ones(1, 6, dtype=torch.long))


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_padding_in_the_middle_with_generate_positions_is_one_document(family):
    """``generate()`` gives a row ``1 1 1 0 0 1 1 1 1`` the positions ``0 1 2 1 1 3 4 5 6``; positions
    counting every slot (``arange``) are one document too: neither is packing."""
    model = anymask.hf.set_mask(tiny_model(family), "causal")
    sdpa = twin(model, "sdpa")
    torch.manual_seed(6)
    ids = torch.randint(3, VOCAB, (2, 9))
    valid = torch.tensor([[1, 1, 1, 0, 0, 1, 1, 1, 1], [1] * 9])
    counted = (valid.cumsum(-1) - 1).masked_fill(valid == 0, 1)
    keep = valid.bool()
    with torch.no_grad():
        for pos in (counted, torch.arange(9).expand(2, 9), None):
            ours = model(ids, attention_mask=valid, position_ids=pos).logits
            ref = sdpa(ids, attention_mask=valid, position_ids=pos).logits
            torch.testing.assert_close(ours[keep], ref[keep], atol=1e-5, rtol=1e-5)
        tokens = model.generate(ids, attention_mask=valid, max_new_tokens=5, do_sample=False)
        ref_tokens = sdpa.generate(ids, attention_mask=valid, max_new_tokens=5, do_sample=False)
    assert torch.equal(tokens, ref_tokens)


def test_packed_rows_with_padding_are_still_split():
    """Position resets between real tokens stay document boundaries when the row also has padding."""
    model = anymask.hf.set_mask(tiny_model("llama"), "causal")
    torch.manual_seed(7)
    docs = [torch.randint(3, VOCAB, (n,)) for n in (4, 3)]
    ids = torch.cat([*docs, torch.zeros(2, dtype=torch.long)]).unsqueeze(0)  # [1, 9]: two documents, 2 pads
    pos = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 0, 0]])
    valid = torch.tensor([[1] * 7 + [0, 0]])
    packed = last_hidden(model, input_ids=ids, position_ids=pos, attention_mask=valid)[:, :7]
    alone = torch.cat([last_hidden(model, input_ids=d.unsqueeze(0)) for d in docs], dim=1)
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=1e-5)


def test_float_4d_mask_with_a_bias_is_refused():
    model = anymask.hf.set_mask(tiny_model("llama"), "causal")
    ids = torch.randint(3, VOCAB, (1, 6))
    rows, cols = torch.arange(6).view(-1, 1), torch.arange(6).view(1, -1)
    bias = -0.5 * (rows - cols).abs().float()  # ALiBi-like: not a mask
    bias = bias.masked_fill(cols > rows, torch.finfo(torch.float32).min).view(1, 1, 6, 6)
    with pytest.raises(ValueError, match=r"holds a bias \(-0.5\)"):
        with torch.no_grad():
            model(ids, attention_mask=bias)
    causal = torch.ones(6, 6, dtype=torch.bool).tril().view(1, 1, 6, 6)
    for blocked in (-1e9, -1e4, float("-inf"), torch.finfo(torch.float16).min):
        additive = torch.zeros(1, 1, 6, 6).masked_fill(~causal, blocked)
        torch.testing.assert_close(last_hidden(model, input_ids=ids, attention_mask=additive),
                                   last_hidden(model, input_ids=ids, attention_mask=causal))


@pytest.mark.parametrize("as_float", [False, True], ids=["bool", "additive"])
def test_explicit_4d_mask_is_taken_as_given(as_float):
    """A 4-D mask replaces the policy (as in transformers): a random, non-causal one, vs eager."""
    model = anymask.hf.set_mask(tiny_model("llama"), "causal")
    torch.manual_seed(12)
    ids = torch.randint(3, VOCAB, (2, 7))
    allowed = (torch.rand(2, 1, 7, 7) < 0.5) | torch.eye(7, dtype=torch.bool)  # [B, 1, S, S], self always
    assert (allowed & ~torch.ones(7, 7, dtype=torch.bool).tril()).any()  # sees later tokens somewhere
    eager = twin(model, "eager")
    ref = last_hidden(eager, input_ids=ids, attention_mask=as_eager_mask(eager, lambda w: allowed, torch.float32))
    given = as_eager_mask(model, lambda w: allowed, torch.float32) if as_float else allowed
    torch.testing.assert_close(last_hidden(model, input_ids=ids, attention_mask=given), ref, atol=1e-5, rtol=1e-5)
    causal = last_hidden(model, input_ids=ids)
    assert not torch.allclose(causal, ref, atol=1e-4)


def test_attention_mask_shorter_than_the_input_is_refused():
    model = anymask.hf.set_mask(tiny_model("llama"), "causal")
    ids = torch.randint(3, VOCAB, (1, 9))
    with pytest.raises(ValueError, match="attention_mask covers 5 positions but this call reaches position 9"):
        with torch.no_grad():
            model(ids, attention_mask=torch.ones(1, 5, dtype=torch.long))


def test_position_resets_beside_an_attention_mask_split_with_a_warning():
    """transformers splits packed rows by position_ids only without an attention_mask; anymask
    splits beside one too (packed, then padded rows) and says that sdpa/eager would not."""
    import warnings

    import anymask.hf_masks as hm

    model = tiny_model("llama")
    ids = torch.randint(1, VOCAB, (1, 9))
    pos = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3, 4]])
    hm._warn_split_where_transformers_joins.cache_clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        packed = last_hidden(model, input_ids=ids, position_ids=pos, use_cache=False)  # no warning
    sdpa = twin(model, "sdpa")  # transformers splits without a cache (anymask with one too)
    torch.testing.assert_close(packed, last_hidden(sdpa, input_ids=ids, position_ids=pos, use_cache=False),
                               atol=1e-5, rtol=1e-5)
    with pytest.warns(UserWarning, match="split this call into packed documents"):
        split = last_hidden(model, input_ids=ids, position_ids=pos, attention_mask=torch.ones_like(ids))
    torch.testing.assert_close(split, packed)


def test_position_resets_in_a_call_with_a_cache_split_with_a_warning():
    """A plain forward makes a cache (use_cache defaults to True, also in train mode), and then
    transformers does not split packed rows: sdpa attends across them.  anymask splits, which was
    silent (a PoSE run in a custom loop got other losses than sdpa's without a word)."""
    import anymask.hf_masks as hm

    model = tiny_model("llama")
    ids = torch.randint(1, VOCAB, (1, 10))
    pos = torch.tensor([[0, 1, 2, 3, 4, 20, 21, 22, 23, 24]])
    hm._warn_split_where_transformers_joins.cache_clear()
    with pytest.warns(UserWarning, match="do not split here because the call has a cache"):
        ours = last_hidden(model, input_ids=ids, position_ids=pos)
    sdpa = twin(model, "sdpa")
    assert (ours - last_hidden(sdpa, input_ids=ids, position_ids=pos)).abs().max() > 1e-3
    torch.testing.assert_close(ours, last_hidden(sdpa, input_ids=ids, position_ids=pos, use_cache=False),
                               atol=1e-5, rtol=1e-5)


def test_prefix_lm_prompt_in_chunks_warns():
    """Without prefix_lengths=, prefix_lm's prefix is the first call's tokens: a chunked prefill makes
    the later chunks causal, which is said."""
    import warnings

    import anymask.hf_masks as hm

    model = tiny_model("llama")
    ids = torch.randint(1, VOCAB, (1, 12))

    def generate(**kw):
        with anymask.hf.using(model, "prefix_lm"), torch.no_grad():
            return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=3,
                                  do_sample=False, pad_token_id=0, **kw)

    hm._warn_prompt_in_chunks.cache_clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        generate()
    with pytest.warns(UserWarning, match="prefix_lm without prefix_lengths= takes a call's tokens as the prefix"):
        generate(prefill_chunk_size=4)
