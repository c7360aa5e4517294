"""Optional dependencies, probed lazily in one place with an install hint each."""

from __future__ import annotations

import importlib
from functools import lru_cache
from types import ModuleType

from torch.torch_version import TorchVersion

INSTALL_HINTS = {
    "transformers": "pip install 'anymask[hf]'",
    "peft": "pip install 'anymask[hf]'",
    "gguf": "pip install 'anymask[hf]'",
    "flash_attn": "pip install flash-attn --no-build-isolation (a CUDA source build)",
    "xformers": "pip install xformers (a build matching your torch)",
    "triton": "pip install 'anymask[triton]' (triton ships with CUDA builds of torch)",
    "matplotlib": "pip install 'anymask[bench]'",
    "matplotlib.pyplot": "pip install 'anymask[bench]'",
    "cudnn": "pip install 'anymask[cudnn]' (nvidia-cudnn-frontend)",
    "flash_attn.cute": "pip install 'anymask[fa4]' (flash-attn-4: FlashAttention 4, CuTe DSL, Hopper+)",
    "liger_kernel": "pip install 'anymask[liger]'",
    "liger_kernel.transformers": "pip install 'anymask[liger]'",
    "liger_kernel.ops.fused_linear_cross_entropy": "pip install 'anymask[liger]'",
}


MIN_VERSIONS = {"transformers": "4.56"}  # anymask.hf registers through transformers' AttentionInterface


class MissingDependency(ImportError):
    """An optional dependency is not installed; the message says how to install it."""


@lru_cache(maxsize=None)
def probe(name: str) -> ModuleType | str:
    """Import ``name``; return the module, or the reason it cannot be imported (a module older than
    :data:`MIN_VERSIONS` says so)."""
    hint = INSTALL_HINTS.get(name, f"pip install {name}")
    try:
        module = importlib.import_module(name)
    except Exception as exc:  # broken installs raise more than ImportError (e.g. OSError, RuntimeError)
        missing = getattr(exc, "name", None) if isinstance(exc, ModuleNotFoundError) else None
        if missing and missing.split(".")[0] != name.split(".")[0]:  # installed, but a module it imports is not
            hint = f"{name} is installed but imports {missing}, which is missing (install it); else {hint}"
        return f"{name} is not importable ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); {hint}"
    least = MIN_VERSIONS.get(name)
    found = getattr(module, "__version__", None)
    if least and isinstance(found, str) and TorchVersion(found) < least:
        return f"{name} {found} is too old (anymask needs {name}>={least}); {hint}"
    return module


def require(name: str) -> ModuleType:
    """Import ``name`` or raise :class:`MissingDependency` with the install hint."""
    found = probe(name)
    if isinstance(found, str):
        raise MissingDependency(found)
    return found


def pyplot() -> ModuleType:
    """``matplotlib.pyplot`` on the headless Agg backend (files only), or :class:`MissingDependency`."""
    require("matplotlib").use("Agg")
    return require("matplotlib.pyplot")
