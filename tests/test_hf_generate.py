"""Generation with a KV cache, batched with left padding: causal (== transformers' sdpa, token for
token) and prefix-LM (bidirectional prompt, causal continuation; == a cache-free reference)."""

from __future__ import annotations

import pytest
import torch

from .test_hf_common import VOCAB, as_eager_mask, reference_mask, tiny_model, twin

import anymask.hf

NEW = 6


def _prompts():
    torch.manual_seed(7)
    ids = torch.randint(1, VOCAB, (3, 8))
    valid = torch.ones(3, 8, dtype=torch.long)
    valid[1, :3] = 0  # left padding
    valid[2, :5] = 0
    return ids, valid


def _greedy(model, ids, valid, **kw):
    with torch.no_grad():
        out = model.generate(ids, attention_mask=valid, max_new_tokens=NEW, do_sample=False, pad_token_id=0, **kw)
    return out[:, ids.shape[1]:]


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "gemma3"])
@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_causal_generation_matches_sdpa(family, cache):
    model = anymask.hf.set_mask(tiny_model(family), "causal")
    ids, valid = _prompts()
    extra = {"cache_implementation": "static"} if cache == "static" else {}
    ours = _greedy(model, ids, valid, **extra)
    theirs = _greedy(twin(model, "sdpa"), ids, valid, **extra)
    assert torch.equal(ours, theirs), f"\n{ours}\n{theirs}"


def _prefix_lm_reference(eager, ids, valid, P):
    """Greedy decoding without a cache: every step re-runs the whole sequence under an explicit
    prefix-LM mask (prefix = the padded prompt, P tokens) with generate's position ids."""
    seq, am = ids, valid
    for _ in range(NEW):
        B, S = seq.shape
        pos = (am.cumsum(-1) - 1).masked_fill(am == 0, 1)
        prefix = torch.full((B,), P)
        dense = lambda w: reference_mask("prefix_lm", B, S, valid=am, prefix=prefix, window=w)  # noqa: E731
        with torch.no_grad():
            logits = eager(seq, attention_mask=as_eager_mask(eager, dense, torch.float32), position_ids=pos).logits
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], dim=1)
        am = torch.cat([am, torch.ones_like(nxt)], dim=1)
    return seq[:, ids.shape[1]:]


@pytest.mark.parametrize("family", ["llama", "mistral", "gemma3"])
def test_prefix_lm_generation_bidirectional_prompt_causal_continuation(family):
    model = tiny_model(family)
    ids, valid = _prompts()
    with anymask.hf.using(model, "prefix_lm"):
        ours = _greedy(model, ids, valid)
    reference = _prefix_lm_reference(twin(model, "eager"), ids, valid, ids.shape[1])
    assert torch.equal(ours, reference), f"\n{ours}\n{reference}"
    assert anymask.hf.get_mask(model) is None


@pytest.mark.parametrize("backend", ["auto", "sdpa", "eager"])
def test_unpadded_generation_scores_match_sdpa(backend):
    """No padding: each cached decoding step is a plain causal call with fewer queries than keys
    (bottom-right aligned); its logits, step by step, equal transformers' sdpa."""
    model = anymask.hf.set_mask(tiny_model("llama"), "causal", backend=backend)
    ids, _ = _prompts()
    valid = torch.ones_like(ids)
    kw = dict(attention_mask=valid, max_new_tokens=NEW, do_sample=False, pad_token_id=0, output_logits=True,
              return_dict_in_generate=True)
    with torch.no_grad():
        ours, theirs = model.generate(ids, **kw), twin(model, "sdpa").generate(ids, **kw)
    assert torch.equal(ours.sequences, theirs.sequences)
    for a, b in zip(ours.logits, theirs.logits, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_prefix_lm_chunked_prefill_with_token_types_of_this_call_only():
    """Prompt fed in two cached calls, ``token_type_ids`` covering only each call's tokens: the second
    call's prompt tokens still see each other (and the first chunk), its answer tokens are causal."""
    model = anymask.hf.set_mask(tiny_model("llama"), "prefix_lm")
    eager = twin(model, "eager")
    torch.manual_seed(9)
    ids = torch.randint(1, VOCAB, (1, 9))
    types = torch.tensor([[0, 0, 0, 0, 0, 0, 1, 1, 1]])  # prompt of 6, answer of 3
    first, second = slice(0, 3), slice(3, 9)

    def allowed(q_from, q_to, prefix=6):  # [1, 1, q, kv]: keys < prefix, or causal
        q = torch.arange(q_from, q_to).view(-1, 1)
        kv = torch.arange(q_to).view(1, -1)
        return ((kv < min(prefix, q_to)) | (kv <= q)).view(1, 1, q_to - q_from, q_to)

    with torch.no_grad():
        head = model(ids[:, first], token_type_ids=types[:, first], use_cache=True)
        ours = model(ids[:, second], token_type_ids=types[:, second], past_key_values=head.past_key_values).logits
        head = eager(ids[:, first], attention_mask=as_eager_mask(eager, lambda w: allowed(0, 3, prefix=3), torch.float32),
                     use_cache=True)
        ref = eager(ids[:, second], attention_mask=as_eager_mask(eager, lambda w: allowed(3, 9), torch.float32),
                    past_key_values=head.past_key_values).logits
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


def test_prefix_lm_without_a_prefix_refuses_assisted_generation_and_its_mask_form_runs_it():
    """Assisted generation's first call is the prompt plus guessed tokens: the guesses joined the
    bidirectional prefix and greedy tokens changed with the guesses, silently."""
    model = anymask.hf.set_mask(tiny_model("llama"), "prefix_lm")
    torch.manual_seed(3)
    ids = torch.randint(1, VOCAB, (1, 4)).repeat(1, 3)  # [1, 12], repeating: prompt lookup finds guesses
    valid = torch.ones_like(ids)
    plain = _greedy(model, ids, valid)
    with pytest.raises(ValueError, match=r"assisted generation .* anymask.masks.prefix_lm\(n\)"):
        _greedy(model, ids, valid, prompt_lookup_num_tokens=3)
    anymask.hf.set_mask(model, anymask.masks.prefix_lm(ids.shape[1]))
    assert torch.equal(_greedy(model, ids, valid), plain)
    assert torch.equal(_greedy(model, ids, valid, prompt_lookup_num_tokens=3), plain)
