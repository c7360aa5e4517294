"""Model kinds whose attention anymask cannot read from the call: refused, not silently wrong.

Encoder-decoder cross-attention (BART), attention modules that do not say whether they are causal
(Mllama's cross-attention), and masks where transformers adds an overlay to the model's causal or
bidirectional rule (Gemma 3's image-token blocks, PaliGemma's prompt block).  Where the user
describes the mask (``set_mask`` + ``prefix_lengths``), the model matches transformers' eager
attention; where there is no overlay to drop (text only, a bidirectional Gemma 3), it runs as before.
"""

from __future__ import annotations

import pytest
import torch

from tests.test_hf_common import VOCAB, _TINY, transformers, twin

import anymask.hf

IMAGE = 100
_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=16,
               patch_size=4)


def _eager(model):
    model.config._attn_implementation = "eager"
    return model.eval()


def _gemma3_vlm():
    text = transformers.Gemma3TextConfig(**_TINY, head_dim=16, sliding_window=4,
                                         layer_types=["sliding_attention", "full_attention"])
    cfg = transformers.Gemma3Config(text_config=text.to_dict(), vision_config=_VISION, mm_tokens_per_image=4,
                                    image_token_index=IMAGE, boi_token_index=101, eoi_token_index=102)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    return transformers.Gemma3ForConditionalGeneration(cfg).eval()


def _paligemma():
    cfg = transformers.PaliGemmaConfig(text_config=dict(model_type="gemma", **_TINY, head_dim=16),
                                       vision_config={**_VISION, "projection_dim": 64}, image_token_index=IMAGE,
                                       projection_dim=64)
    cfg.text_config.num_image_tokens = 16
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    return transformers.PaliGemmaForConditionalGeneration(cfg).eval()


def _close(ours, eager):
    assert (ours - eager).abs().max().item() < 1e-5


def test_encoder_decoder_models_are_refused():
    cfg = transformers.BartConfig(vocab_size=VOCAB, d_model=32, encoder_layers=1, decoder_layers=1,
                                  encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64,
                                  decoder_ffn_dim=64, max_position_embeddings=64)
    torch.manual_seed(0)
    model = twin(_eager(transformers.BartForConditionalGeneration(cfg)), "anymask")
    ids = torch.randint(3, VOCAB, (1, 12))
    with pytest.raises(NotImplementedError, match="encoder-decoder"), torch.no_grad():
        model(input_ids=ids, decoder_input_ids=ids[:, :6])


def test_the_encoder_of_an_encoder_decoder_model_still_runs():
    cfg = transformers.BartConfig(vocab_size=VOCAB, d_model=32, encoder_layers=1, decoder_layers=1,
                                  encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64,
                                  decoder_ffn_dim=64, max_position_embeddings=64)
    torch.manual_seed(0)
    eager = _eager(transformers.BartModel(cfg)).get_encoder()
    ours = twin(eager, "anymask")
    ids = torch.randint(3, VOCAB, (2, 12))
    valid = torch.ones_like(ids)
    valid[1, :4] = 0  # left padding
    with torch.no_grad():
        got = ours(input_ids=ids, attention_mask=valid).last_hidden_state
        want = eager(input_ids=ids, attention_mask=valid).last_hidden_state
    _close(got[valid.bool()], want[valid.bool()])


def test_a_relative_position_bias_is_refused_not_dropped():
    """T5's encoder hands its relative position bias to the attention function as ``position_bias``:
    dropping it ran the encoder, wrong by 0.23 against eager."""
    cfg = transformers.T5Config(vocab_size=VOCAB, d_model=32, d_ff=64, num_layers=1, num_heads=2, d_kv=16,
                                dropout_rate=0.0)
    torch.manual_seed(0)
    model = twin(_eager(transformers.T5EncoderModel(cfg)), "anymask")
    ids = torch.randint(3, VOCAB, (2, 12))
    with pytest.raises(ValueError, match="score biases.*position_bias"), torch.no_grad():
        model(input_ids=ids)


def test_output_attentions_warns_that_no_weights_come_back(monkeypatch):
    anymask.hf._warn_no_attention_weights.cache_clear()
    torch.manual_seed(0)
    model = twin(_eager(transformers.LlamaForCausalLM(transformers.LlamaConfig(**_TINY))), "anymask")
    with pytest.warns(UserWarning, match="output_attentions=True returns no attention weights"), torch.no_grad():
        out = model(torch.randint(3, VOCAB, (1, 8)), output_attentions=True)
    assert all(a is None for a in out.attentions)


def test_the_overlay_probe_asks_on_the_device_of_transformers_tensors():
    """transformers 4.56-5.0 index CUDA token types inside ``torch.where``: CPU probe indices raised
    there, the probe was skipped with a warning, and the overlay dropped.  ``meta`` stands in for a
    second device."""
    from transformers.masking_utils import causal_mask_function

    devices = []

    def rule(b, h, q, kv):  # sees nothing, recording where its index tensors live
        devices.append((b.device.type, q.device.type, kv.device.type))
        return torch.tensor(False)

    keys = anymask.hf.anymask_mask_interface(batch_size=1, q_length=6, kv_length=6, q_offset=0, mask_function=rule,
                                             device=torch.device("meta"))
    assert devices and set(devices) == {("meta", "meta", "meta")} and keys.own_rule == frozenset()
    plain = anymask.hf.anymask_mask_interface(batch_size=1, q_length=6, kv_length=6, q_offset=0,
                                              mask_function=causal_mask_function)
    assert plain.own_rule == frozenset()


def test_an_attention_module_without_is_causal_is_refused():
    """Mllama's text cross-attention has no ``is_causal``: anymask would have guessed causal."""
    cfg = transformers.MllamaTextConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, cross_attention_layers=[1],
                                        max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = twin(_eager(transformers.MllamaForCausalLM(cfg)), "anymask")
    ids = torch.randint(3, VOCAB, (1, 6))
    states = torch.randn(1, 20, 64)  # [B, vision tokens, hidden]
    with pytest.raises(ValueError, match="MllamaTextCrossAttention does not say whether it is causal"), \
            torch.no_grad():
        model(input_ids=ids, cross_attention_states=states)


def test_gemma3_image_tokens_are_refused_under_the_default_policy():
    eager = _gemma3_vlm()
    ours = twin(eager, "anymask")
    ids = torch.tensor([[5, 6, 101, IMAGE, IMAGE, IMAGE, IMAGE, 102, 7, 8, 9, 10]])
    with pytest.raises(ValueError, match="lets queries see later keys"), torch.no_grad():
        ours(input_ids=ids, token_type_ids=(ids == IMAGE).long(), pixel_values=torch.randn(1, 3, 16, 16))


def test_gemma3_text_only_still_matches_eager():
    eager = _gemma3_vlm()
    ours = twin(eager, "anymask")
    ids = torch.randint(0, IMAGE - 1, (2, 10))
    with torch.no_grad():
        _close(ours(input_ids=ids, token_type_ids=torch.zeros_like(ids)).logits,
               eager(input_ids=ids, token_type_ids=torch.zeros_like(ids)).logits)


def test_bidirectional_gemma3_with_its_own_overlay_still_matches_eager():
    """EmbeddingGemma-style: transformers ORs "everything" into the causal rule; the module says
    bidirectional, so nothing is dropped."""
    cfg = transformers.Gemma3TextConfig(**_TINY, head_dim=16, sliding_window=4, use_bidirectional_attention=True,
                                        layer_types=["sliding_attention", "full_attention"])
    torch.manual_seed(0)
    eager = _eager(transformers.Gemma3TextModel(cfg))
    ours = twin(eager, "anymask")
    ids = torch.randint(0, VOCAB, (2, 12))
    valid = torch.ones_like(ids)
    valid[1, :3] = 0
    with torch.no_grad():
        got = ours(input_ids=ids, attention_mask=valid).last_hidden_state
        want = eager(input_ids=ids, attention_mask=valid).last_hidden_state
    _close(got[valid.bool()], want[valid.bool()])


def test_paligemma_prompt_block_is_refused_by_default_and_matches_eager_as_prefix_lm():
    eager = _paligemma()
    ours = twin(eager, "anymask")
    ids = torch.tensor([[IMAGE] * 16 + [1, 5, 6, 7, 8, 9, 10, 11]])
    types = torch.zeros_like(ids)
    types[0, -4:] = 1  # the last four tokens are the answer: causal
    pixels = torch.randn(1, 3, 16, 16)
    with pytest.raises(ValueError, match="is causal in places"), torch.no_grad():
        ours(input_ids=ids, token_type_ids=types, pixel_values=pixels)
    anymask.hf.set_mask(ours, "prefix_lm")
    with torch.no_grad():
        _close(ours(input_ids=ids, pixel_values=pixels, prefix_lengths=torch.tensor([20])).logits,
               eager(input_ids=ids, token_type_ids=types, pixel_values=pixels).logits)
