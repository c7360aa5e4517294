"""A fused forward/backward for peft's plain LoRA linear layers (training only; pure PyTorch).

peft computes ``y = base(x) + lora_B(lora_A(dropout(x))) * scaling`` op by op: besides the GEMMs,
every layer writes the ``[N, out]`` LoRA branch, scales it in a second pass and adds it in a third
(and the backward mirrors that), which on a 1B model at 16k tokens costs more memory traffic than
the attention kernels.  Here the LoRA branch goes into the base GEMM's output through ``addmm_``
(one read and write of ``[N, out]``, scaling inside the GEMM), and its input gradient into the
base's ``dx`` the same way::

    forward   y   = x W^T (+ b);   y  += s * (x A^T) B^T                 [N, out]
    backward  dx  = dy W;          dx += (s * dy B) A                     [N, in]
              dB  = s * dy^T (x A^T),   dA = (s * dy B)^T x               [out, r], [r, in]

Only the plain case is taken over: one active adapter, not merged, no dropout, no DoRA or other
variant, a frozen ``nn.Linear`` base, no autocast, inputs in the base's dtype and adapters in it or
fp32 (master weights: cast to the input's dtype per call, gradients back in fp32); anything else
(checked at every call) runs peft's own forward.  Same parameters, same adapters on disk.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F


class _LoraLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scaling: float):
        x2 = x.reshape(-1, x.shape[-1])  # [N, in]
        xa = x2 @ lora_a.t()  # [N, r]
        y = F.linear(x2, weight, bias)  # [N, out]
        y.addmm_(xa, lora_b.t(), alpha=scaling)
        ctx.save_for_backward(x2, xa, weight, lora_a, lora_b)
        ctx.scaling = scaling
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        x2, xa, weight, lora_a, lora_b = ctx.saved_tensors
        s = ctx.scaling
        dy2 = dy.reshape(-1, dy.shape[-1])  # [N, out]
        dxa = (dy2 @ lora_b).mul_(s)  # [N, r]
        d_lora_b = torch.mm(dy2.t(), xa).mul_(s)  # [out, r]
        d_lora_a = torch.mm(dxa.t(), x2)  # [r, in]
        dx = None
        if ctx.needs_input_grad[0]:
            dx = (dy2 @ weight).addmm_(dxa, lora_a)  # [N, in]
            dx = dx.view(*dy.shape[:-1], dx.shape[-1])
        return dx, None, None, d_lora_a, d_lora_b, None


def _plain_adapter(layer, x: torch.Tensor) -> str | None:
    """The one active adapter of ``layer`` if the fused path computes exactly what peft would."""
    if layer.disable_adapters or layer.merged or torch.is_autocast_enabled(x.device.type):
        return None
    active = [a for a in layer.active_adapters if a in layer.lora_A]
    if len(active) != 1:
        return None
    name = active[0]
    base = layer.base_layer
    a, b = layer.lora_A[name], layer.lora_B[name]
    plain = (type(base) is torch.nn.Linear and not base.weight.requires_grad
             and (base.bias is None or not base.bias.requires_grad)
             and type(a) is torch.nn.Linear and type(b) is torch.nn.Linear and a.bias is None and b.bias is None
             and isinstance(layer.lora_dropout[name], torch.nn.Identity)
             and name not in getattr(layer, "lora_variant", {}) and not getattr(layer, "use_dora", {}).get(name, False)
             and x.dtype == base.weight.dtype and a.weight.dtype == b.weight.dtype
             and a.weight.dtype in (x.dtype, torch.float32))  # fp32 master adapters compute in x's dtype
    return name if plain else None


def _forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    name = None if args or kwargs else _plain_adapter(self, x)
    if name is None:
        return type(self).forward(self, x, *args, **kwargs)
    base = self.base_layer
    lora_a = self.lora_A[name].weight.to(x.dtype)  # [r, in]; autograd takes dA back to the master's dtype
    lora_b = self.lora_B[name].weight.to(x.dtype)  # [out, r]
    return _LoraLinear.apply(x, base.weight, base.bias, lora_a, lora_b, float(self.scaling[name]))


def apply(peft_model) -> int:
    """Give every peft LoRA ``Linear`` of ``peft_model`` the fused forward; returns how many."""
    from peft.tuners.lora import Linear

    count = 0
    for module in peft_model.modules():
        if type(module) is Linear:
            module.forward = types.MethodType(_forward, module)
            count += 1
    return count
