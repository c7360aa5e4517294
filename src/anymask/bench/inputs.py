"""Rotating input sets: several fresh q/k/v (and output-gradient) tensors per problem, so that a
timed call never finds the previous call's inputs in a cache."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class InputSets:
    q: tuple[torch.Tensor, ...]  # each [B, Hq, S, D]
    k: tuple[torch.Tensor, ...]  # each [B, Hkv, S, D]
    v: tuple[torch.Tensor, ...]  # each [B, Hkv, S, D]
    dout: tuple[torch.Tensor, ...]  # each [B, Hq, S, D]; zero on query rows that see no key

    def __len__(self) -> int:
        return len(self.q)

    def with_grad(self, grad: bool) -> "InputSets":
        """The same storage as leaves that require grad (``grad=True``) or plain tensors."""
        lift = (lambda t: t.detach().requires_grad_(grad))
        return InputSets(tuple(map(lift, self.q)), tuple(map(lift, self.k)), tuple(map(lift, self.v)), self.dout)


LAYOUTS = ("bhsd", "bshd")


def make_inputs(batch: int, heads: int, kv_heads: int, q_len: int, kv_len: int, head_dim: int,
                dtype: torch.dtype, device, *, sets: int = 3, seed: int = 0,
                row_has_key: torch.Tensor | None = None, first=None, layout: str = "bhsd") -> InputSets:
    """``sets`` random input sets (standard normal) in ``dtype`` on ``device``.

    ``row_has_key`` (bool ``[B, H|1, Sq]``) zeroes the output gradient of rows that see no key, as
    a training loss over padded positions would.  ``first`` = ``(q, k, v)`` replaces set 0.
    ``layout``: ``bhsd`` contiguous ``[B, H, S, D]``; ``bshd`` ``[B, S, H, D]`` memory viewed as
    ``[B, H, S, D]`` (q, k, v and dO), as a Llama layer's projections give them.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose from {', '.join(LAYOUTS)}")
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(seed)  # on the device: no host-side generation

    def rand(b, h, s, d):  # [B, H, S, D]
        if layout == "bshd":
            return torch.randn(b, s, h, d, generator=gen, device=device, dtype=torch.float32).to(dtype).transpose(1, 2)
        return torch.randn(b, h, s, d, generator=gen, device=device, dtype=torch.float32).to(dtype)

    qs, ks, vs, dos = [], [], [], []
    for i in range(sets):
        if i == 0 and first is not None:
            q, k, v = (t.detach() for t in first)
        else:
            q = rand(batch, heads, q_len, head_dim)
            k = rand(batch, kv_heads, kv_len, head_dim)
            v = rand(batch, kv_heads, kv_len, head_dim)
        dout = rand(batch, heads, q_len, head_dim)
        if row_has_key is not None:
            dout.mul_(row_has_key.to(device)[..., None].to(dtype))  # in place: the layout stays
        qs.append(q), ks.append(k), vs.append(v), dos.append(dout)
    return InputSets(tuple(qs), tuple(ks), tuple(vs), tuple(dos))
