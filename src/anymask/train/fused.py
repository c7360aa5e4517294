"""Fused kernels for the non-attention part of a training step: Liger's (CUDA) and a fused LoRA.

``--kernels`` picks them::

    auto        liger where it applies (CUDA, liger-kernel installed, a Llama-family model) + lora
    liger+lora  both; an error saying why when Liger cannot apply
    liger       Liger's kernels only          lora   the fused LoRA only (any device)
    none        transformers' modules, peft's LoRA forward, logits + cross-entropy

``lora`` is :mod:`anymask.train.fused_lora` (the LoRA branch added inside the base GEMM's output).
What ``liger`` changes (in place, before LoRA is added; parameter names and adapters unchanged):

    every RMSNorm          -> liger_kernel LigerRMSNorm (same weight tensor, same eps, llama casting)
    every SwiGLU MLP       -> liger_kernel LigerSwiGLUMLP (same gate/up/down projections)
    head + cross-entropy   -> LigerFusedLinearCrossEntropyLoss: no [n, vocab] logits in memory
                              (not under FSDP2, whose sharded head weight lives only inside its forward)

RoPE is left to transformers: Liger patches it module-wide, which would change every other model
of the process too.
"""

from __future__ import annotations

import torch

from .._optional import MissingDependency, probe
from .config import KERNELS
LLAMA_FAMILY = ("llama", "mistral", "qwen2", "qwen3")  # RMSNorm without offset, SwiGLU MLP, plain linear head


def reason_unavailable(model, device: torch.device) -> str | None:
    """Why Liger's kernels cannot be used for ``model`` on ``device`` (``None``: they can)."""
    if device.type != "cuda":
        return f"Liger's kernels need a CUDA GPU (device is {device.type})"
    found = probe("liger_kernel")
    if isinstance(found, str):
        return found
    model_type = getattr(model.config, "model_type", None)
    if model_type not in LLAMA_FAMILY:
        return f"Liger's kernels are applied only to {', '.join(LLAMA_FAMILY)} models here, not {model_type!r}"
    return None


def resolve(kernels: str, model, device: torch.device) -> tuple[bool, bool]:
    """``(use Liger, use the fused LoRA)`` for a ``--kernels`` choice; asking for Liger where it
    cannot apply is an error, ``auto`` leaves it out and :func:`describe` says why."""
    if kernels not in KERNELS:
        raise ValueError(f"unknown kernels {kernels!r}; choose from {', '.join(KERNELS)}")
    parts = {"liger", "lora"} if kernels == "auto" else set(kernels.split("+")) - {"none"}
    liger = "liger" in parts
    if liger:
        reason = reason_unavailable(model, device)
        if reason and kernels != "auto":
            raise MissingDependency(f"--kernels {kernels}: {reason}")
        liger = reason is None
    return liger, "lora" in parts


def plain_head(model) -> bool:
    """True when the LM head is a plain ``nn.Linear`` (not LoRA-wrapped), so its weight can go to
    the fused loss as is."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return type(base.get_output_embeddings()) is torch.nn.Linear


def describe(kernels: str, liger: bool, lora: bool, fused_head: bool, model, device: torch.device) -> str:
    """One line for the log: which fused kernels run, and why Liger's do not when ``auto`` left them out."""
    used = []
    if liger:
        used.append("liger (RMSNorm, SwiGLU" + (", fused linear cross-entropy)" if fused_head else "; head unfused)"))
    if lora:
        used.append("fused LoRA")
    line = " + ".join(used) or "none (transformers' modules, peft's LoRA)"
    if kernels == "auto" and not liger:
        line += f"; no Liger: {reason_unavailable(model, device)}"
    return line


def apply_liger(model) -> dict[str, int]:
    """Swap ``model``'s RMSNorms and SwiGLU MLPs for Liger's (in place); returns how many of each.

    The new modules take over the old parameter tensors, so ``state_dict`` keys and values are the
    same and LoRA adapters trained with them load into an unfused model.
    """
    liger = probe("liger_kernel.transformers")
    if isinstance(liger, str):
        raise MissingDependency(liger)
    counts = {"rms_norm": 0, "swiglu": 0}
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child).__name__.endswith("RMSNorm") and _is_plain_rms_norm(child):
                norm = liger.LigerRMSNorm(child.weight.shape[0], eps=child.variance_epsilon, casting_mode="llama")
                norm.weight = child.weight
                setattr(parent, name, norm)
                counts["rms_norm"] += 1
            elif _is_swiglu(child, model.config):
                with torch.device("meta"):
                    mlp = liger.LigerSwiGLUMLP(model.config, intermediate_size=child.up_proj.out_features)
                mlp.gate_proj, mlp.up_proj, mlp.down_proj = child.gate_proj, child.up_proj, child.down_proj
                setattr(parent, name, mlp)
                counts["swiglu"] += 1
    return counts


def _is_plain_rms_norm(module) -> bool:
    return isinstance(getattr(module, "weight", None), torch.nn.Parameter) and hasattr(module, "variance_epsilon")


def _is_swiglu(module, config) -> bool:
    return (type(module).__name__.endswith("MLP") and getattr(config, "hidden_act", None) in ("silu", "swish")
            and all(isinstance(getattr(module, p, None), torch.nn.Linear) for p in ("gate_proj", "up_proj", "down_proj")))


def linear_cross_entropy_sum(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                             token_weight: torch.Tensor | None = None) -> torch.Tensor:
    """``sum_i w_i * CE(hidden_i @ weight.T, target_i)`` without the ``[n, vocab]`` logits.

    hidden ``[n, H]``, weight ``[V, H]``, target ``[n]``, token_weight ``[n]`` or ``None`` (all 1).
    Unweighted, Liger's fused loss computes the gradient during the forward (reduction ``sum``);
    weighted, it returns per-token losses (reduction ``none``) and recomputes the chunked logits in
    the backward, one more head GEMM.  (Calling it per weight group instead was measured 1.3x slower
    on a whole step: Liger sizes its chunks by the call's token count, so small calls make skinny GEMMs.)
    """
    liger = probe("liger_kernel.transformers")
    if isinstance(liger, str):
        raise MissingDependency(liger)
    if token_weight is None:
        return liger.LigerFusedLinearCrossEntropyLoss(reduction="sum")(weight, hidden, target).float()
    ce = liger.LigerFusedLinearCrossEntropyLoss(reduction="none")(weight, hidden, target)  # [n]
    return (ce.float() * token_weight).sum()
