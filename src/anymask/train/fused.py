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
    head + cross-entropy   -> Liger's fused linear cross-entropy: no [n, vocab] logits in memory
                              (not under FSDP2, whose sharded head weight lives only inside its forward)

RoPE is left to transformers: Liger patches it module-wide, which would change every other model
of the process too.
"""

from __future__ import annotations

import os

import torch
from torch.autograd.function import once_differentiable

from .._optional import MissingDependency, probe
from .config import KERNELS, ConfigError
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


def resolve(kernels: str, model, device: torch.device, lora_dropout: float = 0.0) -> tuple[bool, bool]:
    """``(use Liger, use the fused LoRA)`` for a ``--kernels`` choice; asking for Liger where it
    cannot apply is an error, ``auto`` leaves it out and :func:`describe` says why.  The fused LoRA
    has no dropout, so ``auto`` leaves it out when ``lora_dropout > 0`` (the config refuses asking for it)."""
    if kernels not in KERNELS:
        raise ConfigError(f"unknown kernels {kernels!r}; choose from {', '.join(KERNELS)}")
    parts = {"liger", "lora"} if kernels == "auto" else set(kernels.split("+")) - {"none"}
    liger = "liger" in parts
    if liger:
        reason = reason_unavailable(model, device)
        if reason and kernels != "auto":
            raise MissingDependency(f"--kernels {kernels}: {reason}")
        liger = reason is None
    return liger, "lora" in parts and not lora_dropout


def plain_head(model) -> bool:
    """True when the LM head is a plain, frozen ``nn.Linear`` (not LoRA-wrapped, not trained), so
    its weight can go to the fused loss as is."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = base.get_output_embeddings()
    return type(head) is torch.nn.Linear and head.bias is None and not head.weight.requires_grad


def fused_head(model, liger: bool, parallel: str = "none") -> bool:
    """Whether the LM head + cross-entropy go through Liger's fused kernel: with Liger, a plain
    frozen head, and not under FSDP2 (its sharded head weight exists only inside its forward)."""
    return liger and parallel != "fsdp2" and plain_head(model)


def describe(kernels: str, liger: bool, lora: bool, fused_head: bool, model, device: torch.device,
             lora_dropout: float = 0.0) -> str:
    """One line for the log: which fused kernels run, and why ``auto`` left any out."""
    used = []
    if liger:
        used.append("liger (RMSNorm, SwiGLU" + (", fused linear cross-entropy)" if fused_head else "; head unfused)"))
    if lora:
        used.append("fused LoRA")
    line = " + ".join(used) or "none (transformers' modules, peft's LoRA)"
    if kernels == "auto" and not liger:
        line += f"; no Liger: {reason_unavailable(model, device)}"
    if kernels == "auto" and not lora:
        line += f"; no fused LoRA: lora_dropout {lora_dropout} (peft's LoRA runs the dropout)"
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
    """``sum_i w_i * CE(hidden_i @ weight.T, target_i)`` (float32) without the ``[n, vocab]`` logits.

    hidden ``[n, H]``, weight ``[V, H]`` (frozen: no gradient), target ``[n]``, token_weight ``[n]``
    or ``None`` (all 1).  Liger's chunked forward computes the input gradient as it goes, with the
    token weights folded into each chunk's logits gradient, so the backward is one multiply.  (Its
    ``reduction="none"`` module recomputes the logits in the backward instead, one more head GEMM;
    calling the summed module once per weight was slower still: it sizes its chunks by the call's
    token count, and small calls make skinny GEMMs.)
    """
    if weight.requires_grad:
        raise ValueError("the fused LM head computes no gradient for the head weight; it must be frozen")
    if hidden.shape[0] == 0:  # no loss position in this row (Liger divides by the token count)
        return hidden.sum(dtype=torch.float32) * 0.0  # still in the graph: DDP sees every parameter
    ops = probe("liger_kernel.ops.fused_linear_cross_entropy")
    if isinstance(ops, str):
        raise MissingDependency(ops)
    return _LinearCrossEntropy.apply(hidden, weight, target, token_weight, CHUNK_MEM)


CHUNK_MEM = int(os.environ.get("ANYMASK_CE_CHUNK_MEM", "1"))  # Liger's transient-logits budget, x [n, H]


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, target, token_weight, chunk_mem: int):
        from liger_kernel.ops.fused_linear_cross_entropy import fused_linear_cross_entropy_forward

        w = None if token_weight is None else token_weight.float()
        loss_1d, _, _, _, grad_hidden, _, _ = fused_linear_cross_entropy_forward(
            _input=hidden, weight=weight, target=target, reduction="none", token_grad_output=w,
            compute_gradients=hidden.requires_grad, weight_requires_grad=False, chunk_mem_const=chunk_mem)
        ctx.save_for_backward(grad_hidden if hidden.requires_grad else None)
        return loss_1d.sum() if w is None else (loss_1d * w).sum()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        (grad_hidden,) = ctx.saved_tensors
        # the float32 scale (e.g. 1 / loss units) multiplies without being rounded to bf16 first
        return None if grad_hidden is None else grad_hidden * grad_out, None, None, None, None
