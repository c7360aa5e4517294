"""Which CUDA SDPA kernels a masked call may use (``common._enabled_without_cudnn``): those the caller
has enabled, cuDNN's never.  The flags are plain process state, so this runs on CPU too; the GPU
behaviour itself is in test_sdpa_gpu.py."""

from torch.nn.attention import SDPBackend, sdpa_kernel

from anymask.backend.common import _enabled_without_cudnn

EFFICIENT, FLASH, MATH, CUDNN = (SDPBackend.EFFICIENT_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.MATH,
                                 SDPBackend.CUDNN_ATTENTION)


def test_all_but_cudnn_by_default():
    with sdpa_kernel([EFFICIENT, FLASH, MATH, CUDNN]):
        assert _enabled_without_cudnn() == [EFFICIENT, FLASH, MATH]


def test_kernels_the_caller_turned_off_stay_off():
    with sdpa_kernel([EFFICIENT, CUDNN]):
        assert _enabled_without_cudnn() == [EFFICIENT]
    with sdpa_kernel([MATH]):
        assert _enabled_without_cudnn() == [MATH]


def test_cudnn_alone_leaves_nothing_so_the_callers_choice_stands():
    with sdpa_kernel([CUDNN]):
        assert _enabled_without_cudnn() == []
