"""Process groups and model wrapping for ``--parallel {none,ddp,fsdp2}``, one code path for all.

Launch with ``torchrun --nproc-per-node N`` (or ``accelerate launch``): the environment variables
``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` select the process; without them the run is one process.
NCCL on CUDA, gloo on the CPU.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .config import ConfigError


@dataclass(frozen=True)
class Dist:
    """Where this process sits: ``rank`` of ``world``, and its device."""

    rank: int
    world: int
    device: torch.device
    mode: str  # "none" | "ddp" | "fsdp2"

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def sum(self, value: float) -> float:
        """``value`` summed over ranks (float64 on the wire)."""
        return self._reduce(value, dist.ReduceOp.SUM)

    def min(self, value: float) -> float:
        return self._reduce(value, dist.ReduceOp.MIN)

    def max(self, value: float) -> float:
        return self._reduce(value, dist.ReduceOp.MAX)

    def _reduce(self, value, op):
        if not self.active:
            return value
        t = torch.tensor([float(value)], dtype=torch.float64, device=self._comm_device())
        dist.all_reduce(t, op=op)
        return t.item()

    def gather(self, obj) -> list:
        """``obj`` from every rank, in rank order (on every rank)."""
        if not self.active:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def agree(self, failure: BaseException | None) -> None:
        """Raise on every rank when some rank failed (so nobody waits forever in a collective)."""
        failed = self.max(1.0 if failure is not None else 0.0)
        if failure is not None:
            raise failure
        if failed:
            raise RuntimeError("another rank failed while preparing the run (see its error)")

    def _comm_device(self) -> torch.device:
        return self.device if self.device.type == "cuda" else torch.device("cpu")


def setup(mode: str, device: str | None = None) -> Dist:
    """Initialise the process group when launched with several processes; pick the device."""
    if mode != "none" and "WORLD_SIZE" not in os.environ:
        raise ConfigError(f"--parallel {mode} needs a launcher that starts the processes: torchrun --nproc-per-node "
                          f"N -m anymask train ... --parallel {mode} (this is one process started without it; "
                          "use --parallel none to train in it)")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = f"cuda:{local}" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world > 1:
        if mode == "none":
            raise ConfigError(f"launched with {world} processes but --parallel none; use ddp or fsdp2")
        if not dist.is_initialized():
            dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", device_id=dev if dev.type == "cuda" else None)
    return Dist(rank, world, dev, mode if world > 1 else ("none" if mode == "none" else mode))


def wrap(module: torch.nn.Module, d: Dist, layers: list[torch.nn.Module]) -> torch.nn.Module:
    """DDP or FSDP2 (``fully_shard`` per decoder layer, then the root); unchanged for one process."""
    if not d.active:
        return module
    if d.mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [d.device.index] if d.device.type == "cuda" else None
        return DistributedDataParallel(module, device_ids=ids)
    from torch.distributed.fsdp import fully_shard

    for layer in layers:
        fully_shard(layer)
    fully_shard(module)
    return module


@contextlib.contextmanager
def no_sync(wrapped: torch.nn.Module, d: Dist, skip: bool):
    """Skip the gradient all-reduce / reduce-scatter for this micro-batch when ``skip``."""
    if not (skip and d.active):
        yield
        return
    if d.mode == "ddp":
        with wrapped.no_sync():
            yield
        return
    wrapped.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        wrapped.set_requires_gradient_sync(True)


def shutdown(d: Dist) -> None:
    if d.active and dist.is_initialized():
        dist.destroy_process_group()
