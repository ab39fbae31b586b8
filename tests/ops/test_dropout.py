"""``approxbp::dropout_packed``: torch's dropout bit for bit, a 1-bit mask kept for backward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from approxbp_fx import saved_activation_bytes
from approxbp_fx.ops.dropout import dropout_packed, dropout_scale, mask_bytes, mask_multiply

SHAPES = [(7,), (4, 33, 17), (2, 3, 8, 8)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("p", [0.1, 0.9])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_same_draws_output_and_gradient_as_torch(shape, p, dtype, device):
    x = torch.randn(shape, device=device).to(dtype).requires_grad_()
    grad = torch.randn(shape, device=device).to(dtype)
    state = torch.random.get_rng_state(), (torch.cuda.get_rng_state() if device == "cuda" else None)
    expected = F.dropout(x, p, training=True)
    torch.random.set_rng_state(state[0])
    if device == "cuda":
        torch.cuda.set_rng_state(state[1])
    actual, mask = dropout_packed(x, p)
    assert torch.equal(actual, expected)
    assert mask.dtype == torch.uint8 and mask.numel() == mask_bytes(x)
    (g_expected,) = torch.autograd.grad(expected, x, grad)
    (g_actual,) = torch.autograd.grad(actual, x, grad)
    assert torch.equal(g_actual, g_expected)


def test_mask_multiply_is_the_scaled_mask():
    """Unpacking against an independent reference: the bits of the packed mask, written out by hand."""
    t = torch.randn(3, 11)
    keep = torch.rand(3, 11) > 0.3
    _, mask = dropout_packed(keep.float(), 0.5)  # any packed mask will do; derive its bits below
    flat_keep = keep.reshape(-1)
    m = (flat_keep.numel() + 7) // 8
    padded = torch.cat([flat_keep, flat_keep.new_zeros(8 * m - flat_keep.numel())]).view(8, m)
    packed = sum(padded[j].to(torch.int32) << j for j in range(8)).to(torch.uint8)
    out = mask_multiply(t, packed, 2.5)
    torch.testing.assert_close(out, t * keep * 2.5, rtol=0, atol=0)
    assert mask.numel() == m


def test_keeps_one_bit_per_element():
    x = torch.randn(64, 256, requires_grad=True)
    plain = saved_activation_bytes(lambda: F.dropout(x, 0.1, True))
    packed = saved_activation_bytes(lambda: dropout_packed(x, 0.1)[0])
    assert plain == x.numel() * 4  # CPU: a float mask
    assert packed == x.numel() // 8


def test_scale_is_torchs():
    for p in (0.1, 0.3, 1 / 3):
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            noise = torch.ones(4, dtype=dtype).div_(1 - p)
            assert dropout_scale(p, dtype) == noise[0].item()


def test_double_backward_matches_torch():
    x = torch.randn(5, 9, dtype=torch.float64, requires_grad=True)
    torch.manual_seed(1)
    y_ref = F.dropout(x, 0.4, True)
    torch.manual_seed(1)
    y, _ = dropout_packed(x, 0.4)
    v = torch.randn(5, 9, dtype=torch.float64, requires_grad=True)
    (g_ref,) = torch.autograd.grad(y_ref, x, v, create_graph=True)
    (g,) = torch.autograd.grad(y, x, v, create_graph=True)
    assert torch.equal(g, g_ref)
    w = torch.randn(5, 9, dtype=torch.float64)
    assert torch.equal(torch.autograd.grad(g, v, w)[0], torch.autograd.grad(g_ref, v, w)[0])


def test_opcheck():
    x = torch.randn(4, 10, requires_grad=True)
    torch.library.opcheck(torch.ops.approxbp.dropout_packed.default, (x, 0.2),
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))


@pytest.mark.parametrize("p", [0.0, 1.0, -0.1, 1.5])
def test_rejects_probabilities_outside_open_interval(p):
    with pytest.raises(ValueError, match="dropout probability"):
        dropout_packed(torch.randn(3), p)


def test_rejects_integer_input():
    with pytest.raises(TypeError, match="floating-point"):
        dropout_packed(torch.arange(4), 0.1)
