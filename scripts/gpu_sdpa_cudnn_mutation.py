"""tests/test_sdpa_gpu.py with PyTorch's cuDNN attention allowed again for calls with a mask tensor
(anymask's guard undone): on a GPU where that kernel's dQ is wrong, these tests must fail."""
import sys

import pytest
from torch.nn.attention import SDPBackend

import anymask.backend.common as common

common._enabled_without_cudnn = lambda: [SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                                        SDPBackend.FLASH_ATTENTION, SDPBackend.MATH]
sys.exit(pytest.main(["-q", "-p", "no:cacheprovider", "tests/test_sdpa_gpu.py", *sys.argv[1:]]))
