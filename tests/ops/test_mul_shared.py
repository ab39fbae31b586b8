"""``approxbp::mul_shared`` (``h * scale`` keeping the norm's y_hat instead of h) and ``linear_shared`` with a
broadcast affine (a modulation folded into the norm's weight and bias), against plain autograd in float64."""

from __future__ import annotations

import pytest
import torch

from approxbp_fx.ops import linear_shared, mul_shared
from approxbp_fx import saved_tensors

B, T, D = 3, 5, 8


def _y_hat(dtype=torch.float64):
    x = torch.randn(B, T, D, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    return torch.nn.functional.layer_norm(x, (D,)).to(dtype)


def _leaf(shape, seed, dtype=torch.float64):
    return torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)).to(dtype).requires_grad_()


@pytest.mark.parametrize("scale_shape", [(B, 1, D), (D,), (B, T, 1)])
@pytest.mark.parametrize("affine", [False, True])
def test_mul_shared_matches_autograd(scale_shape, affine):
    y_hat = _y_hat()
    gamma, beta = (_leaf((D,), 1), _leaf((D,), 2)) if affine else (None, None)
    offset = 1.0 if affine else 0.0
    scale = _leaf(scale_shape, 3)
    h = y_hat * (gamma + offset) + beta if affine else y_hat.clone().requires_grad_()
    grad = torch.randn(B, T, D, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    ref = h * scale
    ref_grads = torch.autograd.grad(ref, (h, scale), grad)
    out = mul_shared(h, y_hat, scale, gamma, beta, offset)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    got = torch.autograd.grad(out, (h, scale), grad)
    for g, r in zip(got, ref_grads):
        torch.testing.assert_close(g, r)


def test_mul_shared_promotes_like_mul():
    """A bf16 output times a float32 scale is float32, as ``h * scale``; the gradients come back in each
    operand's dtype."""
    y_hat = _y_hat(torch.bfloat16)
    h = y_hat.clone().requires_grad_()
    scale = _leaf((B, 1, D), 3, torch.float32)
    out = mul_shared(h, y_hat, scale)
    ref = h * scale
    assert out.dtype == ref.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    grad = torch.randn(B, T, D, generator=torch.Generator().manual_seed(4))
    got, want = torch.autograd.grad(out, (h, scale), grad), torch.autograd.grad(ref, (h, scale), grad)
    assert [g.dtype for g in got] == [torch.bfloat16, torch.float32]
    for g, r in zip(got, want):
        torch.testing.assert_close(g, r, rtol=1e-2, atol=1e-2)


def test_mul_shared_keeps_y_hat_not_h():
    y_hat = _y_hat(torch.float32)
    h = (y_hat * 2).requires_grad_()
    scale = _leaf((B, 1, D), 3, torch.float32)
    saved = saved_tensors(mul_shared, h, y_hat, scale, torch.full((D,), 2.0))
    ptrs = {t.untyped_storage().data_ptr() for t in saved}
    assert y_hat.untyped_storage().data_ptr() in ptrs and h.untyped_storage().data_ptr() not in ptrs


@pytest.mark.parametrize("bad, error", [
    (lambda y, s: dict(h=y, y_hat=y[:, :1], scale=s), ValueError),
    (lambda y, s: dict(h=y, y_hat=y, scale=torch.ones(B, 2, D)), ValueError),
    (lambda y, s: dict(h=y, y_hat=y, scale=s.to(torch.int64)), TypeError),
])
def test_mul_shared_rejects_bad_input(bad, error):
    y = _y_hat(torch.float32)
    with pytest.raises(error):
        mul_shared(**bad(y, torch.ones(B, 1, D)))


def test_linear_shared_with_a_folded_modulation_matches_autograd():
    """linear(y_hat * W + Bias) with W, Bias [B, 1, D]: the weight gradient rebuilds the modulated input."""
    y_hat = _y_hat()
    w_mod, b_mod = _leaf((B, 1, D), 1), _leaf((B, 1, D), 2)
    weight, bias = _leaf((6, D), 3), _leaf((6,), 4)
    z = (y_hat * w_mod + b_mod).detach().requires_grad_()
    grad = torch.randn(B, T, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    ref = torch.nn.functional.linear(z, weight, bias)
    want = torch.autograd.grad(ref, (z, weight, bias), grad)
    out = linear_shared(z, y_hat, weight, bias, w_mod.detach(), b_mod.detach())
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    for g, r in zip(torch.autograd.grad(out, (z, weight, bias), grad), want):
        torch.testing.assert_close(g, r)


def test_linear_shared_rejects_a_modulation_that_does_not_broadcast():
    y_hat = _y_hat(torch.float32)
    with pytest.raises(ValueError, match="norm_weight"):
        linear_shared(y_hat, y_hat, torch.ones(6, D), None, torch.ones(B, 2, D))
