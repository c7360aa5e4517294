"""Make Triton's CPU interpreter work with NumPy >= 2.4 (tests only; no effect on the GPU path).

The interpreter (Triton 3.6) turns a scalar loaded from memory into a loop bound with
``int(handle.data)`` on a one-element 1-D array, which NumPy 2.4 rejects.  We wrap its tensor patch
so ``__index__`` reads the single element instead.
"""

from __future__ import annotations


def apply() -> None:
    """Install the fix once (idempotent); call only when ``TRITON_INTERPRET=1``."""
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor
    if getattr(original, "_anymask_fixed", False):
        return

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched._anymask_fixed = True
    interpreter._patch_lang_tensor = patched
