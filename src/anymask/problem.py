"""A frozen description of one attention call: what every backend decides on."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field

import torch

from .masks import Mask, check_not_meta
from .structure import Structure, analyse


@dataclass(frozen=True, eq=False)
class Problem:
    batch: int
    q_heads: int
    kv_heads: int
    q_len: int
    kv_len: int
    head_dim: int
    dtype: torch.dtype
    device: torch.device
    requires_grad: bool
    scale: float
    mask: Mask = field(repr=False)
    structure: Structure = field(repr=False)
    # q's, k's and v's strides: the layout (``[B, H, S, D]`` contiguous, or ``[B, S, H, D]`` viewed
    # as it, as Llama-style models pass them); auto's remembered fallbacks are kept apart per layout
    strides: tuple[tuple[int, ...], ...] = ()
    # under a torch.func transform (grad, vmap, jvp, ...) or forward-mode AD: only backends made of
    # plain PyTorch ops run there (custom autograd Functions and compiled kernels do not)
    transformed: bool = False

    @property
    def is_gqa(self) -> bool:
        return self.q_heads != self.kv_heads

    @property
    def device_type(self) -> str:
        return self.device.type


_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_scale(scale) -> float:
    """``scale``: a finite number > 0 (a Python or NumPy float, or a one-element tensor)."""
    number = isinstance(scale, numbers.Real) or isinstance(scale, torch.Tensor) and scale.numel() == 1
    if isinstance(scale, bool) or not number:
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
    if isinstance(scale, torch.Tensor) and scale.requires_grad and torch.is_grad_enabled():
        raise TypeError("scale is a tensor that requires grad: anymask takes a fixed scale and would drop its "
                        "gradient; to learn a temperature, multiply q by it instead")
    value = float(scale)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"scale must be a finite number > 0, got {value}")
    return value


def autocast_device(q, k, v) -> str | None:
    """The device type whose ``torch.autocast`` is on for this call, or None."""
    if not all(isinstance(t, torch.Tensor) for t in (q, k, v)):
        return None  # describe says what is wrong
    try:
        return q.device.type if torch.is_autocast_enabled(q.device.type) else None
    except RuntimeError:  # a device type autocast does not know (meta)
        return None


def autocast_inputs(q, k, v) -> tuple:
    """``q, k, v`` as ``torch.autocast`` hands them to an op on its lower-precision list (SDPA):
    floating point ones but float64 in its dtype; unchanged where autocast is off."""
    device_type = autocast_device(q, k, v)
    if device_type is None:
        return q, k, v
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(t.to(dtype) if t.is_floating_point() and t.dtype != torch.float64 else t for t in (q, k, v))


def describe(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Mask, scale: float | None) -> Problem:
    """Validate the inputs of ``attention`` and describe the call; clear errors on bad input."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must have shape [B, H, S, D] (4 dims), got {list(t.shape)}")
        if t.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
        if t.layout != torch.strided:
            raise TypeError(f"{name} must be a dense (strided) tensor, got layout {t.layout}; "
                            "call .to_dense() first")
    if not isinstance(mask, Mask):
        raise TypeError(f"mask must be an anymask Mask (e.g. anymask.masks.causal()), got {type(mask).__name__}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    B, Hq, Sq, D = q.shape
    if k.shape != v.shape:
        why = (" (a value head dim other than the key's, as in DeepSeek's MLA, is not supported)"
               if k.shape[:-1] == v.shape[:-1] else "")
        raise ValueError(f"k and v must have the same shape, got {list(k.shape)} and {list(v.shape)}{why}")
    Bk, Hkv, Skv, Dk = k.shape
    if Bk != B:
        raise ValueError(f"k/v batch ({Bk}) differs from q batch ({B})")
    if Dk != D:
        raise ValueError(f"k/v head dim ({Dk}) differs from q head dim ({D})")
    if min(B, Hq, Sq, D, Hkv, Skv) == 0:
        raise ValueError(f"empty input: q {list(q.shape)}, k {list(k.shape)}")
    if Hq % Hkv:
        raise ValueError(f"q heads ({Hq}) must be a multiple of k/v heads ({Hkv}) for grouped-query attention")
    if Sq > Skv:
        raise ValueError(f"q_len ({Sq}) must not exceed kv_len ({Skv}): queries are the last q_len positions")
    if scale is None:
        scale = D ** -0.5
    else:
        scale = _check_scale(scale)
    if q.is_meta:
        raise ValueError("q, k, v are meta tensors: attention needs their values (masks are analysed from data)")
    try:
        mask.validate(B, Hq, Sq, Skv)
        structure = analyse(mask.to(q.device))
    except (RuntimeError, NotImplementedError):
        check_not_meta(mask)  # the clear error where that is the cause (checked only then: host time)
        raise
    requires_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    return Problem(B, Hq, Hkv, Sq, Skv, D, q.dtype, q.device, requires_grad, float(scale),
                   mask, structure, (q.stride(), k.stride(), v.stride()), _transformed(q, k, v))


def _transformed(*tensors: torch.Tensor) -> bool:
    """Whether a ``torch.func`` transform wraps any of ``tensors``, or one carries a forward-mode
    AD tangent."""
    functorch = torch._C._functorch
    forward_ad = torch.autograd.forward_ad
    level = getattr(functorch, "maybe_current_level", None)
    if level is not None and level() is None and getattr(forward_ad, "_current_level", 0) < 0:
        return False  # no transform and no forward AD level is active: the common case, ~0.1 us
    wrapped = getattr(functorch, "is_functorch_wrapped_tensor", None)
    if wrapped is not None and any(wrapped(t) for t in tensors):
        return True
    return getattr(forward_ad, "_current_level", 0) >= 0 and any(
        forward_ad.unpack_dual(t).tangent is not None for t in tensors)
