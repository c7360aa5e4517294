"""Fixtures shared by several test files."""

import pytest


@pytest.fixture
def private_cache(tmp_path, monkeypatch):
    """A fresh measured-choices cache (``ANYMASK_CACHE_DIR``) for one test, so a bench or tune run
    neither reads nor writes the user's."""
    from anymask import tuning

    monkeypatch.setenv("ANYMASK_CACHE_DIR", str(tmp_path / "cache"))
    tuning.reload()
    yield
    tuning.reload()


@pytest.fixture(autouse=True)
def dirty_gpu_memory(request):
    """Before a CUDA test, fill the caching allocator's free blocks with large finite values, so a
    kernel that reads past a tensor's end (padding of a last tile) or uses memory it never wrote
    fails here instead of passing on a fresh process's zeroed memory.  No-op without CUDA or for
    CPU-only tests.  (Added while chasing an order-dependent SDPA dQ error on an H100; dirty memory
    turned out not to be its cause, see benchmarks/results/nvidia-h100/checks-2026-12-07b.)"""
    import torch

    on_gpu = (request.node.get_closest_marker("gpu") is not None or "cuda" in request.node.name
              or getattr(request.module, "DEVICE", None) == "cuda")  # test_triton.py runs on its DEVICE
    if on_gpu and torch.cuda.is_available():
        torch.cuda.synchronize()
        held = [torch.full((nbytes // 2,), 3.0e3, device="cuda", dtype=torch.bfloat16)
                for nbytes, count in ((256 << 10, 64), (1 << 20, 32), (4 << 20, 16), (32 << 20, 8))
                for _ in range(count)]
        del held
        torch.cuda.synchronize()
    yield
