"""The README's API example, as written, on CPU."""

import pytest
import torch

import anymask
from anymask import masks


def test_readme_api_example():
    B, H, S, D = 2, 4, 1024, 32
    q, k, v = (torch.randn(B, H, S, D) for _ in range(3))
    attention_mask = torch.ones(B, S, dtype=torch.long)
    attention_mask[1, 700:] = 0
    examples = [
        masks.documents(lengths=[300, 700, 24]) & masks.causal(),
        masks.prefix_lm(torch.tensor([128, 64])),
        masks.padding(attention_mask) & masks.full(),
    ]
    for m in examples:
        out = anymask.attention(q, k, v, m)
        ref = anymask.attention(q, k, v, m, backend="eager")
        assert out.shape == (B, H, S, D)
        torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)
        assert anymask.which_backend(q, k, v, m) in anymask.backends()
    assert (anymask.attention(q, k, v, examples[2])[1, :, 700:] == 0).all()
    info = anymask.backends()
    assert all(set(entry) == {"available", "reasons", "summary"} for entry in info.values())


def test_readme_forced_backend_error_lists_reasons():
    q, k, v = (torch.randn(1, 2, 16, 8) for _ in range(3))
    unavailable = [n for n, e in anymask.backends().items() if not e["available"]]
    if not unavailable:
        pytest.skip("every backend runs here")
    with pytest.raises(anymask.BackendUnavailable, match="cannot run this call"):
        anymask.attention(q, k, v, masks.causal(), backend=unavailable[0])
