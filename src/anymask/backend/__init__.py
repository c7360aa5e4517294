"""Backend registry: one module per backend, listed here in no particular order.

Backend modules import their heavy or optional libraries lazily, so importing this package is
cheap and never probes a device.
"""

from __future__ import annotations

from importlib import import_module

from .base import Backend, BackendUnavailable

_MODULES = {
    "eager": ("eager", "Eager"),
    "sdpa": ("sdpa", "Sdpa"),
    "flex": ("flex", "Flex"),
    "varlen": ("varlen", "Varlen"),
    "flash_attn": ("flash_attn", "FlashAttn"),
    "xformers": ("xformers", "Xformers"),
    "triton": ("triton_backend", "TritonBackend"),
    "cudnn": ("cudnn", "Cudnn"),
    "fa4": ("fa4", "Fa4"),
}

_INSTANCES: dict[str, Backend] = {}


def names() -> list[str]:
    """Every registered backend whose module exists in this install."""
    return [n for n in _MODULES if get(n, missing_ok=True) is not None]


def get(name: str, *, missing_ok: bool = False) -> Backend | None:
    if name not in _MODULES:
        raise ValueError(f"unknown backend {name!r}; known: {', '.join(['auto', *_MODULES])}")
    if name not in _INSTANCES:
        module, cls = _MODULES[name]
        try:
            mod = import_module(f"{__name__}.{module}")
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{module}" or not missing_ok:
                raise
            return None
        _INSTANCES[name] = getattr(mod, cls)()
    return _INSTANCES[name]


__all__ = ["Backend", "BackendUnavailable", "get", "names"]
