"""Shared pieces of the Hugging Face tests: tiny real models and an independent reference mask.

The reference mask is written here from the rules, with plain tensor comparisons, and handed to
transformers' own eager attention as an explicit 4-D mask; anymask's ``to_dense`` is not used.
"""

from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")
import anymask.hf  # noqa: E402  (registers "anymask")

VOCAB = 128
WINDOW = 4  # sliding window of the sliding-layer families (tokens, self included)
_TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=256, attention_dropout=0.0)


def _config(family: str):
    if family == "llama":
        return transformers.LlamaConfig(**_TINY), transformers.LlamaForCausalLM
    if family == "mistral":  # every layer sliding
        return transformers.MistralConfig(**_TINY, sliding_window=WINDOW), transformers.MistralForCausalLM
    if family == "qwen2":  # one sliding layer, one full
        cfg = transformers.Qwen2Config(**_TINY, use_sliding_window=True, sliding_window=WINDOW,
                                       layer_types=["sliding_attention", "full_attention"])
        return cfg, transformers.Qwen2ForCausalLM
    if family == "qwen3":
        return transformers.Qwen3Config(**_TINY, head_dim=16), transformers.Qwen3ForCausalLM
    if family == "gemma3":  # local (sliding) + global layer
        cfg = transformers.Gemma3TextConfig(**_TINY, head_dim=16, sliding_window=WINDOW,
                                            layer_types=["sliding_attention", "full_attention"])
        return cfg, transformers.Gemma3ForCausalLM
    raise ValueError(family)


FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma3")


def tiny_model(family: str, attn: str = "anymask", seed: int = 0):
    """A random-init tiny model of ``family`` (fp32, eval mode) with ``attn_implementation=attn``."""
    cfg, cls = _config(family)
    cfg._attn_implementation = attn
    torch.manual_seed(seed)
    model = cls(cfg)
    if model.config._attn_implementation != attn:
        model.set_attn_implementation(attn)
    return model.eval()


def twin(model, attn: str):
    """A deep copy of ``model`` running ``attn``."""
    other = copy.deepcopy(model)
    other.set_attn_implementation(attn)
    return other


def layer_windows(model) -> dict[str, int | None]:
    """Sliding window per layer type (``full_attention`` -> None)."""
    cfg = model.config
    types = getattr(cfg, "layer_types", None)
    w = getattr(cfg, "sliding_window", None)
    if not types:
        return {"all": w}
    return {t: (w if t == "sliding_attention" else None) for t in set(types)}


def reference_mask(mode: str, B: int, S: int, *, valid=None, docs=None, prefix=None, window=None) -> torch.Tensor:
    """``[B, 1, S, S]`` bool from the rules (queries and keys are the same S positions).

    mode: causal / bidirectional / prefix_lm.  valid: [B, S] 0/1 padding (hides keys; padded query
    rows see nothing).  docs: [B, S] document ids.  prefix: [B] prefix lengths.  window: tokens.
    """
    q = torch.arange(S).view(1, S, 1)
    kv = torch.arange(S).view(1, 1, S)
    if mode == "causal":
        ok = (kv <= q).expand(B, S, S)
    elif mode == "bidirectional":
        ok = torch.ones(B, S, S, dtype=torch.bool)
    elif mode == "prefix_lm":
        ok = (kv <= q) | (kv < torch.as_tensor(prefix).view(B, 1, 1))
    else:
        raise ValueError(mode)
    if window is not None:
        ok = ok & ((q - kv).abs() < window)
    if docs is not None:
        ok = ok & (docs[:, :, None] == docs[:, None, :])
    if valid is not None:
        v = valid.bool()
        ok = ok & v[:, None, :] & v[:, :, None]
    return ok[:, None]


def as_eager_mask(model, dense_by_window, dtype) -> torch.Tensor | dict:
    """Explicit additive 4-D mask(s) for transformers' eager path: one tensor, or one per layer type."""
    def additive(m):
        return torch.zeros(m.shape, dtype=dtype).masked_fill(~m, torch.finfo(dtype).min)

    wins = layer_windows(model)
    if "all" in wins:
        return additive(dense_by_window(wins["all"]))
    return {t: additive(dense_by_window(w)) for t, w in wins.items()}


ATTN_PROJ = ["q_proj", "k_proj", "v_proj", "o_proj"]


def lora(model, seed: int = 0, targets=ATTN_PROJ, init_lora_weights=False, r: int = 4):
    """peft LoRA; by default on q/k/v/o with random (non-zero) A and B so every LoRA weight gets a
    gradient."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(seed)
    cfg = peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(targets),
                          init_lora_weights=init_lora_weights, lora_dropout=0.0)
    return peft.get_peft_model(model, cfg)


def lora_grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().float().clone() for n, p in model.named_parameters()
            if p.requires_grad and p.grad is not None}


def low_precision_close(got: torch.Tensor, ref32: torch.Tensor, peers: list[torch.Tensor], factor: float = 2.0,
                        floor: float = 1e-2) -> None:
    """``got`` (low precision) is as close to the fp32 reference as transformers' own runs at that
    precision (``peers``, the worst counts), within ``factor``, plus a floor relative to the
    reference's scale."""
    err = (got.float() - ref32.float()).norm()
    peer_err = max((p.float() - ref32.float()).norm() for p in peers)
    bound = factor * peer_err + floor * ref32.float().norm()
    assert err <= bound, f"error {err:.4g} > bound {bound:.4g} (transformers' own error {peer_err:.4g})"


def last_hidden(model, **inputs):
    """The last layer's hidden states of ``model(**inputs)``, without grad."""
    with torch.no_grad():
        return model(**inputs, output_hidden_states=True).hidden_states[-1]
