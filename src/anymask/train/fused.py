"""Liger's fused Triton kernels for the non-attention part of a training step (CUDA only).

``--kernels`` picks them::

    auto   Liger where it applies: CUDA, liger-kernel installed, a Llama-family model
    liger  the same, and an error saying why when it cannot apply
    none   transformers' own modules and anymask's logits + cross-entropy

What changes (in place, before LoRA is added; parameter names and adapters are unchanged):

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


def resolve(kernels: str, model, device: torch.device) -> bool:
    """Whether to use Liger: ``auto`` where possible, ``liger`` or an error, ``none`` never."""
    if kernels not in KERNELS:
        raise ValueError(f"unknown kernels {kernels!r}; choose from {', '.join(KERNELS)}")
    if kernels == "none":
        return False
    reason = reason_unavailable(model, device)
    if reason and kernels == "liger":
        raise MissingDependency(f"--kernels liger: {reason}")
    return reason is None


def plain_head(model) -> bool:
    """True when the LM head is a plain ``nn.Linear`` (not LoRA-wrapped), so its weight can go to
    the fused loss as is."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return type(base.get_output_embeddings()) is torch.nn.Linear


def describe(kernels: str, liger: bool, fused_head: bool, model, device: torch.device) -> str:
    """One line for the log: which fused kernels run, or why none do."""
    if liger:
        return "liger (RMSNorm, SwiGLU" + (", fused linear cross-entropy)" if fused_head else "; head unfused)")
    if kernels == "none":
        return "none (transformers' modules; --kernels none)"
    return f"none ({reason_unavailable(model, device)})"


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
    Liger's fused loss computes the gradient during the forward for a summed loss; weighted tokens
    are summed per distinct weight (one group per document for ``diffusion``).
    """
    liger = probe("liger_kernel.transformers")
    if isinstance(liger, str):
        raise MissingDependency(liger)
    loss_fn = liger.LigerFusedLinearCrossEntropyLoss(reduction="sum")
    if token_weight is None:
        return loss_fn(weight, hidden, target).float()
    values, group = torch.unique(token_weight, return_inverse=True)  # [G], [n]
    total = hidden.new_zeros((), dtype=torch.float32)
    for g, w in enumerate(values.tolist()):
        rows = (group == g).nonzero().squeeze(1)  # [n_g]
        total = total + w * loss_fn(weight, hidden[rows], target[rows]).float()
    return total
