"""Our own attention kernels (Triton) and the compact mask description they consume.

``mask_bounds`` is pure PyTorch (importable without Triton); ``triton_fwd`` / ``triton_bwd`` import
Triton and are loaded lazily by :mod:`anymask.backend.triton_backend`.
"""
