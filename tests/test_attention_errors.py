"""Bad input gets a clear ValueError/TypeError naming the argument, never a deep stack trace."""

import pytest
import torch

import anymask
from anymask import masks as M


def qkv(B=1, Hq=2, Hkv=2, Sq=8, Skv=8, D=4, dtype=torch.float32):
    return (torch.randn(B, Hq, Sq, D, dtype=dtype), torch.randn(B, Hkv, Skv, D, dtype=dtype),
            torch.randn(B, Hkv, Skv, D, dtype=dtype))


def test_mask_is_required():
    q, k, v = qkv()
    with pytest.raises(TypeError):
        anymask.attention(q, k, v)
    with pytest.raises(TypeError, match="mask must be an anymask Mask"):
        anymask.attention(q, k, v, None)
    with pytest.raises(TypeError, match="mask must be an anymask Mask"):
        anymask.attention(q, k, v, torch.ones(8, 8, dtype=torch.bool))


@pytest.mark.parametrize("args, error, match", [
    (lambda: (torch.randn(2, 8, 4),) + qkv()[1:], ValueError, r"q must have shape \[B, H, S, D\]"),
    (lambda: qkv()[:2] + (torch.randn(1, 2, 8),), ValueError, "v must have shape"),
    (lambda: qkv(Hq=3, Hkv=2), ValueError, "multiple of k/v heads"),
    (lambda: (qkv()[0].double(),) + qkv()[1:], TypeError, "share a dtype"),
    (lambda: (qkv()[0].long(),) + qkv()[1:], TypeError, "q must be float16"),
    (lambda: (qkv()[0].to("meta"),) + qkv()[1:], ValueError, "one device"),
    (lambda: (qkv()[0],) + qkv(B=2)[1:], ValueError, "batch"),
    (lambda: (qkv(D=8)[0],) + qkv()[1:], ValueError, "head dim"),
    (lambda: qkv()[:2] + (qkv(D=8)[2],), ValueError, "value head dim other than the key's"),
    (lambda: qkv(Sq=9, Skv=8), ValueError, "must not exceed kv_len"),
    (lambda: ("q",) + qkv()[1:], TypeError, "q must be a torch.Tensor"),
    (lambda: (qkv()[0].to_sparse(),) + qkv()[1:], TypeError, "q must be a dense"),
])
def test_bad_tensors(args, error, match):
    with pytest.raises(error, match=match):
        anymask.attention(*args(), M.causal())


@pytest.mark.parametrize("mask, match", [
    (M.documents(lengths=[3, 3]), "kv_len=8"),
    (M.documents(torch.zeros(3, 8, dtype=torch.long)), "batch 3"),
    (M.padding(torch.ones(1, 7)), r"expected \[1, 8\]"),
    (M.prefix(10), "exceeds"),
    (M.dense(torch.ones(8, 9, dtype=torch.bool)), "does not broadcast"),
])
def test_masks_that_do_not_fit_the_call(mask, match):
    with pytest.raises(ValueError, match=match):
        anymask.attention(*qkv(), mask)


def test_unknown_backend_is_a_value_error():
    with pytest.raises(ValueError, match="unknown backend 'nope'"):
        anymask.attention(*qkv(), M.causal(), backend="nope")


def test_forced_backend_that_cannot_run_lists_its_reasons():
    info = anymask.backends()
    unavailable = [name for name, entry in info.items() if not entry["available"]]
    if not unavailable:
        pytest.skip("every backend can run on this machine")
    name = unavailable[0]
    with pytest.raises(anymask.BackendUnavailable, match=name) as err:
        anymask.attention(*qkv(), M.causal(), backend=name)
    assert info[name]["reasons"][0] in str(err.value)


def test_bad_scale():
    with pytest.raises(TypeError, match="scale"):
        anymask.attention(*qkv(), M.causal(), scale="big")


def test_backends_takes_all_inputs_or_none():
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(TypeError, match="all of q, k, v and mask"):
        anymask.backends(q)
    with pytest.raises(TypeError, match="all of q, k, v and mask"):
        anymask.backends(q, q, q)
    assert anymask.backends(q, q, q, M.causal())["eager"]["available"]


@pytest.mark.parametrize("scale", [0.0, -1.0, float("nan"), float("inf")])
def test_scale_must_be_finite_and_positive(scale):
    q, k, v = qkv()
    with pytest.raises(ValueError, match="scale must be a finite number > 0"):
        anymask.attention(q, k, v, M.causal(), scale=scale)


def test_scale_as_numpy_float_or_one_element_tensor():
    np = pytest.importorskip("numpy")
    q, k, v = qkv()
    ref = anymask.attention(q, k, v, M.causal(), scale=0.5)
    for scale in (np.float32(0.5), torch.tensor(0.5)):
        torch.testing.assert_close(anymask.attention(q, k, v, M.causal(), scale=scale), ref)
    with pytest.raises(TypeError, match="scale must be a float"):
        anymask.attention(q, k, v, M.causal(), scale="0.5")


def test_meta_tensors_are_refused_clearly():
    q, k, v = (t.to("meta") for t in qkv())
    with pytest.raises(ValueError, match="meta tensors"):
        anymask.attention(q, k, v, M.causal())


class _Broken:
    def __call__(self, b, h, q, kv):
        return torch.arange(4).view(3)[0] + q >= kv  # RuntimeError: the user's own bug


def _broken(b, h, q, kv):
    return torch.arange(4).view(3)[0] + q >= kv


@pytest.mark.parametrize("fn", [_broken, _Broken()], ids=["function", "callable"])
def test_a_custom_mask_mods_own_error_is_raised_without_trying_every_backend(fn):
    """auto warned 'backend sdpa failed ... falling back' once per backend, then raised the same error."""
    import warnings

    q, k, v = qkv()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(RuntimeError, match=r"shape '\[3\]' is invalid"):
            anymask.attention(q, k, v, M.custom(fn) & M.causal())


@pytest.mark.parametrize("mask", [
    lambda: M.padding(torch.ones(1, 8, dtype=torch.bool)),
    lambda: M.documents(torch.zeros(1, 8, dtype=torch.long)) & M.causal(),
    lambda: M.dense(torch.ones(8, 8, dtype=torch.bool)),
], ids=["padding", "documents", "dense"])
def test_a_mask_of_meta_tensors_is_refused_clearly(mask):
    """It failed inside: ``Tensor.item() cannot be called on meta tensors``, ``Cannot copy out of meta tensor``."""
    q, k, v = qkv()
    with pytest.raises(ValueError, match="holds meta tensors"):
        anymask.attention(q, k, v, mask().to("meta"))
    with pytest.raises(ValueError, match="holds meta tensors"):
        mask().to("meta").to_dense(1, 1, 8, 8)


@pytest.mark.parametrize("make", [
    lambda t: M.padding(t.bool()), lambda t: M.padding(t.long()), lambda t: M.prefix(t[0, :1].long()),
    lambda t: M.documents(t.long()), lambda t: M.documents(lengths=t[0, :2].long()), lambda t: M.dense(t.bool()),
], ids=["padding-bool", "padding-int", "prefix", "documents", "documents-lengths", "dense"])
def test_mask_constructors_refuse_meta_tensors(make):
    """padding (0/1 ints), prefix and documents(lengths=) failed inside on their value checks."""
    with pytest.raises(ValueError, match="got a meta tensor; a mask needs its values"):
        make(torch.ones(1, 8, device="meta"))


def test_a_mask_mod_returning_no_bool_is_raised_at_once_by_auto():
    """auto warned 'backend sdpa failed ... falling back' once per backend before raising it."""
    import warnings

    q, k, v = qkv()
    for wrong in (lambda b, h, qi, kv: (kv <= qi).int(), lambda b, h, qi, kv: True):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with pytest.raises(TypeError, match="must return a bool tensor"):
                anymask.attention(q, k, v, M.custom(wrong))


def test_to_dense_sizes_take_any_integer_but_not_a_bool():
    import numpy as np

    assert M.causal().to_dense(np.int64(2), 1, np.int32(3), 4).shape == (2, 1, 3, 4)
    with pytest.raises(ValueError, match="batch must be a positive int, got True"):
        M.causal().to_dense(True, 1, 2, 2)


def test_a_non_mask_on_the_left_of_and_or_gets_the_clear_error():
    with pytest.raises(TypeError, match="cannot combine a Mask with int using '&'"):
        3 & M.full()
    with pytest.raises(TypeError, match="cannot combine a Mask with NoneType using '|'"):
        None | M.full()


def test_a_mask_mod_that_fails_only_when_traced_still_falls_back():
    """Flex calls a mask_mod under vmap, where ``.item()`` fails; sdpa evaluates it on plain index
    grids, where it runs.  The shortcut for the user's own errors raised ``unhashable type: 'dict'``
    (compiled frames' code objects) instead of falling back."""
    import warnings

    q, k, v = qkv(Sq=512, Skv=512, D=16)
    mask = M.custom(lambda b, h, q_idx, kv_idx: kv_idx <= q_idx + int(q_idx.min().item()) * 0)
    if anymask.which_backend(q, k, v, mask) != "flex":
        pytest.skip("auto does not start with flex here")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = anymask.attention(q, k, v, mask)
    assert any("backend 'flex' failed" in str(w.message) and w.filename == __file__ for w in caught)
    torch.testing.assert_close(out, anymask.attention(q, k, v, M.causal(), backend="eager"), atol=1e-5, rtol=0)


def test_a_scale_tensor_that_requires_grad_is_fine_without_grad():
    q, k, v = qkv()
    with torch.no_grad():
        anymask.attention(q, k, v, M.causal(), scale=torch.tensor(0.5, requires_grad=True))


def test_tile_counts_take_numpy_sizes():
    import numpy as np

    from anymask import tiles

    assert tiles.visible_pairs(M.custom(lambda b, h, q, k: k <= q), np.int64(1), np.int64(2), np.int64(4),
                               np.int64(4)) == 20
