"""Hugging Face transformers integration: ``attn_implementation="anymask"``.

::

    import anymask.hf
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="anymask")
    anymask.hf.set_mask(model, "bidirectional")   # "causal" | "bidirectional" | "prefix_lm" | a Mask
    out = model(input_ids, attention_mask=am)      # padding always honoured
    out = model(input_ids, position_ids=pos)       # packed documents isolated (causal or not)

Importing this module registers ``"anymask"`` with transformers' ``AttentionInterface`` (the
attention function) **and** ``AttentionMaskInterface`` (the mask function; without it transformers
passes ``attention_mask=None`` even when the batch is padded).  The mask function builds nothing
dense: it hands the attention function a :class:`~anymask.hf_masks.LayerKeys` (the 2-D padding
of this layer's keys plus offsets and the sliding window), and the attention function assembles
an anymask Mask from structure::

    mask = base (set_mask / per call)  &  window  &  documents (position_ids / cu_seq_lens)  &  padding

Per call, these keyword arguments of ``model(...)`` reach the attention function:

- ``anymask_mask=`` a spec name or Mask, overriding ``set_mask`` for this forward;
- ``prefix_lengths=`` (one per row) or ``token_type_ids`` (0 = prefix, 1 = continuation; a
  prefix per packed document) for ``prefix_lm``, and only there (``prefix_lengths`` with another
  spec is an error);
- ``position_ids`` resets and TRL's ``cu_seq_lens_q/k`` + ``max_length_q/k`` mark packed documents.

``generate`` rejects unknown keyword arguments, so for generation use :func:`using` (a context
manager) instead of ``anymask_mask=``.  ``prefix_lm`` without a given prefix treats a call with no
cache past (the prompt) as the prefix and continues causally: bidirectional prompt, causal answer
(keep the cache on: with ``use_cache=False`` every step is a call with no past, so the answer so
far would count as prompt too)::

    prompt (prefill, q = kv = 4)      then one token per call
        # # # #                           # # # # #
        # # # #                           # # # # # #
        # # # #
        # # # #

Which rule applies, first match wins: ``anymask_mask=`` on the call, ``set_mask``/``using``, an
``is_causal`` keyword (a model's or the caller's), ``module.is_causal``.  An explicit 4-D
``attention_mask`` given to the model is taken as given (transformers skips mask creation then).
Sliding-window layers (Mistral, Qwen2/3 sliding layers, Gemma 2/3 local layers) keep their window
``w`` as ``|q - kv| < w`` on top of any rule (``kv <= q`` already bounds it on the right when
causal), or as ``|q - kv| <= w`` where transformers' own mask for the layer is its inclusive
bidirectional one (ModernBERT's local layers, ``config.is_causal=False``).  Attention dropout,
logit soft-capping (Gemma 2 runs with ``attn_logit_softcapping=None``), attention sinks
(``s_aux``, GPT-OSS) and additive score biases (T5's ``position_bias``) are refused with a clear
error; ``output_attentions=True`` warns once and returns no weights.

Not read: the overlays transformers composes into its own ``mask_function`` (image-token blocks of
vision-language models, ``block_sequence_ids``): describe those with a Mask.  Where the model's
default rule would drop one that opens pairs (transformers' mask lets a causal model's query see
the next key, or a bidirectional model's neighbours see each other one way only: Gemma 3 with
images, PaliGemma), the call is refused; one that only hides pairs both ways (a model's own
``and_mask_function``, such as ESM's chain ids) is not detected.  Also refused: chunked attention
(Llama 4), the decoder of encoder-decoder models (BART, Whisper: nothing in the call says which
layer is cross-attention; their encoders run), and attention modules that do not say whether they
are causal (no ``is_causal``: Mllama's cross-attention).

Supported: transformers >= 4.56 (tested with 4.56.2, 4.57.6, 5.0.0 and 5.24.0), Llama, Mistral,
Qwen2, Qwen3, Gemma 3 and every decoder that calls ``ALL_ATTENTION_FUNCTIONS`` the same way.
"""

from __future__ import annotations

import functools
import threading
import warnings
import weakref
from contextlib import contextmanager
from dataclasses import replace

import torch

from .attention import attention as _attend
from . import masks
from ._optional import require
from .hf_masks import LayerKeys, build_mask, check_spec

NAME = "anymask"
_POLICY_ATTR = "_anymask_policy"
MIN_TRANSFORMERS = "4.56"


def anymask_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                              value: torch.Tensor, attention_mask, dropout: float = 0.0,
                              scaling: float | None = None, **kwargs):
    """transformers attention function.  Returns ``(attn_output [B, Sq, Hq, D], None)``.

    query: ``[B, Hq, Sq, D]``; key, value: ``[B, Hkv, Skv, D]`` (after the cache update).
    """
    if dropout:
        raise ValueError(f"anymask attention has no attention dropout (got {dropout} in training mode): set the "
                         "config's attention dropout to 0 (attention_dropout, attn_pdrop or "
                         "attention_probs_dropout_prob, by model) or call model.eval()")
    _refuse_score_changes(module, kwargs)
    if kwargs.get("output_attentions"):
        _warn_no_attention_weights()
    if getattr(getattr(module, "config", None), "is_encoder_decoder", False) and getattr(module, "is_decoder", True):
        raise NotImplementedError(
            f"anymask.hf does not support the decoder of encoder-decoder models ({type(module).__name__}): its "
            "cross-attention queries are not the last positions of its keys, and nothing in the call says which "
            "layer is cross-attention; use attn_implementation='sdpa' or 'eager' for this model (its encoder "
            "alone runs with anymask)")
    spec, backend, default = _call_policy(module, kwargs)
    keys = attention_mask if isinstance(attention_mask, LayerKeys) else _keys_from_tensor(attention_mask, key)
    if default and isinstance(keys, LayerKeys):
        _refuse_overlay(module, spec, keys.own_rule)
    if isinstance(keys, LayerKeys) and keys.q_offset > 0 and spec == "bidirectional":
        _warn_cached_bidirectional()
    if isinstance(keys, torch.Tensor):  # an explicit 4-D mask passed to the model: take it as given
        mask = masks.dense(keys)
    else:
        key, value, keys = _trim_static_cache(key, value, keys, query.shape[-2])
        mask = build_mask(spec, keys, query.shape[-2], key.shape[-2], query.shape[0],
                          reach=_window_reach(module, keys, kwargs), training=module.training, kwargs=kwargs)
    out = _attend(query, key, value, mask, backend=backend, scale=scaling)  # [B, Hq, Sq, D]
    return out.transpose(1, 2).contiguous(), None


def anymask_mask_interface(batch_size: int, cache_position: torch.Tensor | None = None,
                           kv_length: int | None = None, kv_offset: int = 0, mask_function=None,
                           attention_mask: torch.Tensor | None = None, local_size: int | None = None,
                           q_length: int | None = None, q_offset=None, **kwargs) -> LayerKeys:
    """transformers mask function: describe this layer's keys instead of building a 4-D mask.

    ``mask_function`` (transformers' own causal / sliding / packed rule) is deliberately not
    followed: the attention function decides the rule from ``set_mask`` and the call.  Only the
    edge of a sliding window is read from it (see :func:`_sees_window_edge`).  Accepts the 4.56
    signature (``cache_position``) and the 5.x one (``q_length``, ``q_offset``).
    """
    if isinstance(attention_mask, LayerKeys):  # prepared in advance by generate (static cache)
        return attention_mask
    if getattr(kwargs.get("config"), "attention_chunk_size", None) is not None:
        raise NotImplementedError("anymask.hf does not support chunked attention (attention_chunk_size, "
                                  "Llama 4); transformers would pass the chunk size as a window")
    if q_length is None:
        q_length = int(cache_position.shape[0])
        q_offset = cache_position[0] if q_offset is None else q_offset
    q_offset = int(q_offset) if q_offset is not None else 0
    kv_offset = int(kv_offset)
    padding = None
    if attention_mask is not None:
        if attention_mask.dim() != 2 or attention_mask.shape[0] != batch_size:
            raise ValueError(f"attention_mask has shape {list(attention_mask.shape)}; expected [{batch_size}, "
                             "sequence length] (one row of 1 = token, 0 = padding per batch row)")
        if attention_mask.shape[-1] < q_offset + q_length:
            raise ValueError(f"attention_mask covers {attention_mask.shape[-1]} positions but this call reaches "
                             f"position {q_offset + q_length} ({q_offset} cached + {q_length} new tokens): it "
                             "needs one entry per token, past and new")
        valid = attention_mask.bool()  # [B, past + q_len]
        end = kv_offset + kv_length
        if valid.shape[-1] < end:
            valid = torch.nn.functional.pad(valid, (0, end - valid.shape[-1]))
        valid = valid[:, kv_offset:end]
        padding = None if bool(valid.all()) else valid
    # the probes' index tensors go where transformers' own tensors (token types, packed ids) live
    device = kwargs.get("device") or next((t.device for t in (attention_mask, cache_position) if t is not None),
                                          torch.device("cpu"))
    inclusive = local_size is not None and mask_function is not None and _sees_window_edge(
        mask_function, batch_size, q_offset, q_length, kv_offset, int(kv_length), int(local_size), device)
    own_rule = frozenset() if mask_function is None else _own_rule(mask_function, batch_size, q_offset, q_length,
                                                                   kv_offset, int(kv_length), device)
    return LayerKeys(padding, batch_size, q_length, int(kv_length), q_offset, kv_offset, local_size, inclusive,
                     own_rule, attention_mask is not None, mask_function)


def _ask(mask_function, batch: int, q: torch.Tensor, kv: torch.Tensor, what: str) -> torch.Tensor | None:
    """``[B, pairs]`` bool: which (query, key) pairs (absolute positions, ``[pairs]`` each, on the
    device of transformers' tensors) its ``mask_function`` lets attend, on every row; None (with a
    warning) where it cannot take index tensors."""
    rows = torch.arange(batch, device=q.device).view(batch, 1)
    head = torch.zeros((), dtype=torch.long, device=q.device)
    try:
        seen = mask_function(rows, head, q.view(1, -1), kv.view(1, -1))
    except Exception as err:  # a model's own overlay that takes no index tensors
        warnings.warn(f"could not ask transformers' mask function {what} ({err!r})", stacklevel=5)
        return None
    return torch.as_tensor(seen, dtype=torch.bool).expand(batch, q.numel())


def _own_rule(mask_function, batch: int, q_offset: int, q_length: int, kv_offset: int,
              kv_length: int, device: torch.device) -> frozenset[str]:
    """What transformers' ``mask_function`` does between neighbouring tokens of this call, asked on
    every row: ``"sees-later"`` (some query sees the key right after it: not causal) and
    ``"one-way"`` (some neighbouring pair is seen one way only: not bidirectional).  Documents and
    windows only remove pairs, both ways; an overlay shows::

        image-token block (Gemma 3)        prefix block, causal rest (PaliGemma)
        # . . . .                          # # # . .
        # # . . .                          # # # . .
        # # # # .   <- sees a later key    # # # . .
        # # # # .                          # # # # .   <- sees the key before it,
        # # # # #                          # # # # #      not the one after
    """
    import transformers.masking_utils as rules

    if any(mask_function is getattr(rules, name, None) for name in ("causal_mask_function",
                                                                  "bidirectional_mask_function")):
        return frozenset()  # the plain rules: nothing added
    q = torch.arange(max(q_offset, kv_offset), min(q_offset + q_length, kv_offset + kv_length) - 1,
                     device=device)  # [pairs]
    if q.numel() == 0:
        return frozenset()
    later = _ask(mask_function, batch, q, q + 1, "whether it adds an overlay")
    earlier = None if later is None else _ask(mask_function, batch, q + 1, q, "whether it adds an overlay")
    if later is None or earlier is None:
        return frozenset()
    found = torch.stack([later.any(), (later != earlier).any()]).tolist()  # one host sync for both
    return frozenset(name for name, hit in zip(("sees-later", "one-way"), found) if hit)


def _refuse_overlay(module, spec: str, own_rule: frozenset[str]) -> None:
    """Raise where the model's default policy (``spec``, from ``is_causal``) would drop an overlay
    transformers adds to it (image tokens, a prompt block)."""
    if spec == "causal" and "sees-later" in own_rule:
        shape = "lets queries see later keys"
    elif spec == "bidirectional" and "one-way" in own_rule:
        shape = "is causal in places"
    else:
        return
    raise ValueError(
        f"anymask.hf: transformers' mask for {type(module).__name__} {shape} (an overlay such as image-token "
        f"blocks or a prompt block), which anymask does not read; its default policy here, {spec!r}, would "
        "drop it. Describe the mask with anymask.hf.set_mask(model, ...) (an anymask Mask, or 'prefix_lm' "
        "with prefix_lengths= on each call) or use attn_implementation='sdpa'")


def _sees_window_edge(mask_function, batch: int, q_offset: int, q_length: int, kv_offset: int,
                      kv_length: int, local_size: int, device: torch.device) -> bool:
    """Whether transformers' ``mask_function`` lets some query see a key exactly ``local_size`` away.

    Its bidirectional sliding mask (``create_bidirectional_sliding_window_mask``) keeps
    ``|q - kv| <= w``, its causal one (and Gemma 3's bidirectional overlay) ``q - kv < w``.  Every
    pair at that distance in this call is asked, on every row; where none is seen (or none exists:
    short inputs, packed documents shorter than ``w``), the two rules give the same mask.
    """
    q = torch.arange(q_offset, q_offset + q_length)  # [q_len] absolute query positions, on the host
    for kv in (q - local_size, q + local_size):
        present = (kv >= kv_offset) & (kv < kv_offset + kv_length)
        if not bool(present.any()):
            continue
        seen = _ask(mask_function, batch, q[present].to(device), kv[present].to(device),
                    f"where this sliding window ends; anymask keeps |q - kv| < {local_size}")
        if seen is None:
            return False
        if bool(seen.any()):
            return True
    return False


def register() -> None:
    """Register ``"anymask"`` with transformers (done on import; calling again is harmless)."""
    require("transformers")
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    # Opaque to torch.compile (one graph break per call, see anymask.attention): the mask is
    # assembled from host values, and tracing it splits each layer into many small graphs.
    AttentionInterface.register(NAME, torch.compiler.disable(anymask_attention_forward, recursive=True))
    AttentionMaskInterface.register(NAME, torch.compiler.disable(anymask_mask_interface, recursive=True))


def set_mask(model: torch.nn.Module, spec, backend: str = "auto") -> torch.nn.Module:
    """Set the attention mask policy of ``model`` (and switch it to ``attn_implementation="anymask"``).

    ``spec``: ``"causal"``, ``"bidirectional"``, ``"prefix_lm"`` or any anymask Mask (absolute
    positions over the keys).  Padding, packed documents and sliding windows are added per call.
    ``backend`` forces an anymask backend (default: dispatch picks).  Returns ``model``.
    """
    check_spec(spec)
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string, got {type(backend).__name__}")
    if backend != "auto":
        from .backend import get

        get(backend, missing_ok=True)  # ValueError naming the known backends
    _ensure_anymask(model)
    found = 0
    for m in model.modules():
        if _is_attention(m):
            setattr(m, _POLICY_ATTR, (spec, backend))
            found += 1
    if not found:
        raise ValueError(f"found no attention modules in {type(model).__name__} to set a mask on")
    return model


def get_mask(model: torch.nn.Module):
    """The ``(spec, backend)`` policy ``set_mask`` stored (None when never set)."""
    for m in model.modules():
        if _is_attention(m):
            return getattr(m, _POLICY_ATTR, None)
    return None


@contextmanager
def using(model: torch.nn.Module, spec, backend: str = "auto"):
    """``with anymask.hf.using(model, "prefix_lm"): model.generate(...)`` — a temporary policy.
    On exit the model gets back its policy and its attention implementation (``sdpa``, say).

    The policy is the model's, seen by every thread: a ``using`` on a model that another thread is
    inside ``using`` of raises ``RuntimeError`` (its exit would switch the model under the other
    thread's calls).  For concurrent calls with different masks, ``set_mask`` once and pass
    ``anymask_mask=`` per call."""
    me = threading.get_ident()
    with _USING_LOCK:
        owner, entries = _USING.get(model, (me, []))
        if owner != me:
            raise RuntimeError("anymask.hf.using: another thread is inside using() on this model, and using() "
                               "changes the model for every thread (its mask policy and attention implementation); "
                               "for concurrent calls with different masks, set_mask(model, ...) once and pass "
                               "anymask_mask=... to each call")
        mine = {"policies": [(m, getattr(m, _POLICY_ATTR, None)) for m in model.modules() if _is_attention(m)],
                "implementation": getattr(getattr(model, "config", None), "_attn_implementation", None)}
        _USING[model] = (me, [*entries, mine])
    try:
        set_mask(model, spec, backend)
        yield model
    finally:
        with _USING_LOCK:
            owner, entries = _USING[model]
            at = next(i for i, e in enumerate(entries) if e is mine)
            # leaving before a using() entered after it (generators): that one restores what this one would
            if at + 1 < len(entries):
                entries[at + 1].update(policies=mine["policies"], implementation=mine["implementation"])
            else:
                _restore(model, mine)
            entries = [e for e in entries if e is not mine]
            if entries:
                _USING[model] = (owner, entries)
            else:
                _USING.pop(model, None)


def _restore(model, saved: dict) -> None:
    """Put back the policies and attention implementation ``using`` saved on entry."""
    for m, policy in saved["policies"]:
        if policy is None:
            m.__dict__.pop(_POLICY_ATTR, None)
        else:
            setattr(m, _POLICY_ATTR, policy)
    if saved["implementation"] not in (None, NAME):
        model.set_attn_implementation(saved["implementation"])


_USING: "weakref.WeakKeyDictionary[torch.nn.Module, tuple[int, list]]" = weakref.WeakKeyDictionary()  # model ->
_USING_LOCK = threading.Lock()  # (thread inside using(), what each open using() restores, oldest first)


# helpers ----------------------------------------------------------------------------------------


def _refuse_score_changes(module: torch.nn.Module, kwargs: dict) -> None:
    """Refuse what a model hands the attention function to change its scores: anymask computes
    ``softmax(q k^T * scale + mask)`` exactly and nothing else."""
    name = type(module).__name__
    if kwargs.get("softcap") is not None:
        raise ValueError("anymask attention does not support attention logit soft-capping "
                         "(Gemma 2's attn_logit_softcapping); set it to None or use another implementation")
    for sink in ("s_aux", "sinks"):
        if kwargs.get(sink) is not None:
            raise ValueError(f"anymask attention does not support attention sinks ({sink}, the learned per-head "
                             f"logit of {name}, e.g. GPT-OSS): they change every softmax; use "
                             "attn_implementation='eager' or 'sdpa' for this model")
    biases = [key for key, value in kwargs.items() if isinstance(value, torch.Tensor) and value.is_floating_point()
              and (value.dim() == 4 or key in ("position_bias", "head_mask"))]  # [B, H, Sq, Skv]-like: on the scores
    if biases:
        raise ValueError(f"anymask attention does not add score biases or head masks ({', '.join(biases)} given to "
                         f"{name}: relative position biases of T5, LayoutLMv3 and the like); use attn_implementation="
                         "'eager' or 'sdpa' for this model")


@functools.lru_cache(maxsize=1)
def _warn_no_attention_weights() -> None:
    """Once per process: ``output_attentions=True`` gets no weights from anymask."""
    warnings.warn("anymask.hf: output_attentions=True returns no attention weights (anymask never forms the "
                  "attention matrix); load the model with attn_implementation='eager' to get them", stacklevel=3)


@functools.lru_cache(maxsize=1)
def _warn_cached_bidirectional() -> None:
    """Once per process: decoding a bidirectional model with a KV cache is not bidirectional."""
    warnings.warn("anymask.hf: a bidirectional model is decoding with a KV cache: the cached keys were "
                  "computed without the tokens after them, so each step differs from recomputing the whole "
                  "sequence bidirectionally (generate(..., use_cache=False) does that)", stacklevel=3)


def _is_attention(m: torch.nn.Module) -> bool:
    return hasattr(m, "is_causal") and hasattr(m, "config")


def _ensure_anymask(model) -> None:
    config = getattr(model, "config", None)
    current = getattr(config, "_attn_implementation", None)
    if current == NAME:
        return
    if not hasattr(model, "set_attn_implementation"):
        raise ValueError(f"model uses attn_implementation={current!r}; load it with "
                         f"attn_implementation='{NAME}'")
    model.set_attn_implementation(NAME)


def _call_policy(module, kwargs):
    """``(spec, backend, default)``: ``anymask_mask=`` > ``set_mask`` > ``is_causal`` kwarg >
    ``module.is_causal``; ``default`` when the spec came from the model (the last two), not the user."""
    spec, backend = getattr(module, _POLICY_ATTR, None) or (None, "auto")
    override = kwargs.get("anymask_mask")
    if override is not None:
        check_spec(override)
        spec = override
    if spec is not None:
        return spec, backend, False
    is_causal = kwargs.get("is_causal")
    if is_causal is None:
        if not hasattr(module, "is_causal"):
            raise ValueError(
                f"anymask.hf: {type(module).__name__} does not say whether it is causal (no is_causal attribute "
                "or keyword), so anymask cannot tell its mask (cross-attention, as in Mllama, is not supported); "
                "use attn_implementation='sdpa' for this model")
        is_causal = module.is_causal
    return ("causal" if is_causal else "bidirectional"), backend, True


_BLOCKED = -1e4  # an additive mask value at or below this hides the key


def _keys_from_tensor(attention_mask, key):
    """A mask that did not come from our mask function: None, 2-D padding, or an explicit 4-D mask."""
    if attention_mask is None:
        return None
    if attention_mask.dim() == 2:  # [B, S] padding
        S = key.shape[-2]
        valid = attention_mask.bool()
        return LayerKeys(None if bool(valid.all()) else valid, valid.shape[0], S, S, 0, 0, mask_given=True)
    if attention_mask.dim() == 4:  # [B, 1|H, Sq, Skv]: bool, or additive float (0 = attend)
        if attention_mask.dtype == torch.bool:
            return attention_mask
        if not attention_mask.is_floating_point():
            raise TypeError(f"a 4-D attention_mask must be bool (True = attend) or an additive float mask "
                            f"(0 = attend, large negative = not), got {attention_mask.dtype}")
        blocked = attention_mask <= _BLOCKED  # finfo.min, -1e9, -1e4, -inf: exp() of them is 0
        if bool(((attention_mask != 0) & ~blocked).any()):  # one host sync, on this explicit-mask path only
            shown = attention_mask[(attention_mask != 0) & ~blocked][0].item()
            raise ValueError(f"a float 4-D attention_mask holds a bias ({shown:g}): anymask runs masks, not "
                             f"additive biases; give 0 (attend) or <= {_BLOCKED:g} / -inf (not) only, or a bool mask")
        return ~blocked
    raise ValueError(f"unexpected attention_mask of shape {list(attention_mask.shape)}")


def _window_reach(module, keys: LayerKeys | None, kwargs) -> int | None:
    """The farthest key (``|q - kv|``) a query of this sliding layer sees, or None (full attention).

    A window of ``w`` tokens, self included, reaches ``w - 1``; ``w`` where transformers' own rule
    for the layer is its inclusive bidirectional one (``LayerKeys.local_inclusive``).
    """
    if keys is not None and keys.local_size is not None:
        return int(keys.local_size) - (0 if keys.local_inclusive else 1)
    if "sliding_window" in kwargs:
        w = kwargs["sliding_window"]
    else:
        w = getattr(module, "sliding_window", None)
    return int(w) - 1 if w is not None else None


def _trim_static_cache(key, value, keys: LayerKeys | None, q_len: int):
    """A static cache hands over all its slots; keep the keys up to the last query."""
    if keys is None or keys.kv_length != key.shape[-2]:
        return key, value, keys
    end = keys.q_offset + q_len - keys.kv_offset  # keys after this are empty slots
    if 0 < end < key.shape[-2]:
        padding = None if keys.padding is None else keys.padding[:, :end]
        keys = replace(keys, padding=padding, kv_length=end)
        return key[:, :, :end], value[:, :, :end], keys
    return key, value, keys


register()
