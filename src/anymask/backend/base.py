"""The backend protocol: a name, reasons it cannot run a problem, and ``run``.

An empty reason list means the backend can run the problem.  Reasons are the documentation: a
user asking ``backend="flex"`` for a problem flex cannot run gets them in the error message.
"""

from __future__ import annotations

from functools import cached_property

import torch

from ..problem import Problem


class Backend:
    name: str = ""
    summary: str = ""
    runs_under_transforms: bool = False  # plain PyTorch ops only: torch.func transforms see through it
    traces_mask_mod: bool = False  # calls a custom mask_mod under vmap/compile, not on plain index grids

    @cached_property
    def machine_reasons(self) -> tuple[str, ...]:
        """Why this backend cannot run on this machine at all (missing library, no GPU...)."""
        return tuple(self._machine_reasons())

    def _machine_reasons(self) -> list[str]:
        return []

    def problem_reasons(self, p: Problem) -> list[str]:
        """Why this backend cannot run this particular problem (mask, dtype, grad, shapes)."""
        return []

    def not_supported_reasons(self, p: Problem) -> list[str]:
        if self.machine_reasons:
            return list(self.machine_reasons)
        if p.transformed and not self.runs_under_transforms:
            return [f"{self.name} cannot run under torch.func transforms (grad, vmap, jvp, ...) or forward-mode "
                    "AD: its custom autograd Functions or compiled kernels have no rules for them; eager and sdpa can"]
        return self.problem_reasons(p)

    def run(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, p: Problem) -> torch.Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<backend {self.name}>"


class BackendUnavailable(ValueError):
    """A forced backend cannot run this problem; the message lists its reasons."""
