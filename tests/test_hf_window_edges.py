"""What a model's own attention asks beyond the mask: where its sliding window ends (transformers
draws the bidirectional window inclusive, the causal one exclusive) and attention sinks, which
anymask refuses rather than drops."""

from __future__ import annotations

import pytest
import torch

from .test_hf_common import _TINY, VOCAB, WINDOW, last_hidden, twin

transformers = pytest.importorskip("transformers")


def _bidirectional_windowed(kind: str):
    """A tiny eager model whose own mask is a bidirectional sliding window.

    mistral: ``|q - kv| <= 4`` (transformers' ``create_bidirectional_sliding_window_mask``);
    modernbert: local layers, ``local_attention=8`` -> ``|q - kv| <= 4``; gemma3: its
    ``use_bidirectional_attention`` overlay, ``|q - kv| < 4``.
    """
    if kind == "mistral":
        cfg = transformers.MistralConfig(**_TINY, sliding_window=WINDOW, is_causal=False)
        cls = transformers.MistralModel
    elif kind == "modernbert":
        cfg = transformers.ModernBertConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                                            num_hidden_layers=3, num_attention_heads=4,
                                            local_attention=2 * WINDOW, global_attn_every_n_layers=3,
                                            pad_token_id=0, bos_token_id=1, eos_token_id=2, cls_token_id=1,
                                            sep_token_id=2)
        cls = transformers.ModernBertModel
    else:
        cfg = transformers.Gemma3TextConfig(**_TINY, head_dim=16, sliding_window=WINDOW,
                                            use_bidirectional_attention=True,
                                            layer_types=["sliding_attention", "full_attention"])
        cls = transformers.Gemma3TextModel
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    return cls(cfg).eval()


@pytest.mark.parametrize("kind", ["mistral", "modernbert", "gemma3"])
def test_bidirectional_sliding_window_ends_where_the_models_own_mask_does(kind):
    eager = _bidirectional_windowed(kind)
    ours = twin(eager, "anymask")
    torch.manual_seed(1)
    ids = torch.randint(3, VOCAB, (2, 13))
    am = torch.ones_like(ids)
    am[1, 10:] = 0  # right padding: a second row whose keys stop early
    want = last_hidden(eager, input_ids=ids, attention_mask=am)
    got = last_hidden(ours, input_ids=ids, attention_mask=am)
    real = am.bool()
    torch.testing.assert_close(got[real], want[real], rtol=1e-5, atol=1e-5)


def test_attention_sinks_are_refused_not_dropped():
    cfg = transformers.GptOssConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                    num_local_experts=4, num_experts_per_tok=2, sliding_window=WINDOW,
                                    layer_types=["sliding_attention", "full_attention"],
                                    max_position_embeddings=256, pad_token_id=0, eos_token_id=2, bos_token_id=1)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    model = transformers.GptOssForCausalLM(cfg).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.sinks.normal_()  # trained sinks are not zero
    ours = twin(model, "anymask")
    with pytest.raises(ValueError, match=r"attention sinks \(s_aux"):
        ours(torch.randint(3, VOCAB, (1, 8)))
