"""Wide-word layout copies: bit-exact against PyTorch's own copy, for every dtype and layout, with
the fallback taken wherever the words do not fit."""

import pytest
import torch

from anymask.kernels import relayout

DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8)


@pytest.mark.parametrize("dtype", DTYPES)
def test_tokens_major_is_the_transposed_copy(dtype):
    x = torch.randn(2, 5, 7, 16).to(dtype)  # [B, H, S, D]
    rows = relayout.tokens_major(x)  # [B * S, H, D]
    assert rows.shape == (14, 5, 16) and rows.is_contiguous()
    assert relayout.as_words(x.transpose(1, 2)) is not None  # the wide path, not the fallback
    assert torch.equal(_bits(rows), _bits(x.transpose(1, 2).reshape(14, 5, 16)))


@pytest.mark.parametrize("dtype", DTYPES)
def test_copy_keeps_every_bit_including_nan_payloads(dtype):
    src = torch.randn(3, 4, 32).to(dtype)
    src.view(-1)[::7] = float("nan")
    src.view(-1)[1::11] = float("-inf")
    dst = torch.empty(4, 3, 32, dtype=dtype).transpose(0, 1)  # a strided destination
    assert relayout.as_words(dst) is not None and relayout.as_words(src) is not None
    relayout.copy_(dst, src)
    assert torch.equal(_bits(dst), _bits(src))


@pytest.mark.parametrize("make", [
    lambda: torch.randn(2, 3, 6, 5),  # fp32 row of 5: 20 bytes, not a multiple of 8
    lambda: torch.randn(2, 3, 6, 16).to(torch.bfloat16)[..., 1:9],  # unaligned base
    lambda: torch.randn(2, 3, 16, 6).to(torch.bfloat16).transpose(-1, -2),  # last dim not dense
    lambda: torch.randn(2, 3, 6, 6).to(torch.bfloat16),  # 12-byte rows
    lambda: torch.randn(2, 3, 6, 8, dtype=torch.float64),  # already word-sized
    lambda: torch.zeros(64).to(torch.bfloat16).as_strided((1, 3, 8), (5, 8, 1)),  # size-1 dim, odd stride
])
def test_fallback_where_words_do_not_fit(make):
    src = make()
    assert relayout.as_words(src) is None
    dst = torch.empty(src.shape, dtype=src.dtype)
    relayout.copy_(dst, src)
    assert torch.equal(_bits(dst), _bits(src))


def test_words_view_is_the_same_memory():
    x = torch.randn(4, 8).to(torch.bfloat16)
    words = relayout.as_words(x)
    assert words.shape == (4, 2) and words.dtype == relayout.WORD
    assert words.data_ptr() == x.data_ptr()


@pytest.mark.parametrize("dst", [torch.empty(2, 4, 8), torch.empty(2, 3, 8, dtype=torch.float16)])
def test_copy_refuses_mismatched_tensors(dst):
    with pytest.raises(ValueError, match="equal shapes and dtypes"):
        relayout.copy_(dst, torch.randn(2, 3, 8))
