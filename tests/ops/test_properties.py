"""Property-based tests (hypothesis) for the ops against float64 references written from the math.

Random shapes (including a normalized size of 1 and element counts not divisible by 4), eps, dtypes and
affine on/off. The inputs are drawn in the op's dtype; the reference runs in float64 on those same
values, so the only differences left are the op's own roundings. Errors are measured as relative L2
against the reference, with a dtype-dependent tolerance.

The ops' bodies run as plain torch code here (``APPROXBP_FX_KERNELS=eager``): each drawn shape would
otherwise compile a kernel. ``test_norms.py::test_compiled_kernels_match_eager_kernels`` ties the two.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor

from approxbp_fx.ops import linear_shared, ms_layer_norm, ms_rms_norm, regelu2, resilu2

# Yang et al. (ICML 2024), Table 1: (a, c) of h(x) = sum a_i ReLU(x - c_i); the derivative's levels are partial sums of a.
PAPER = {
    "gelu": ((-0.04922261145617846, 1.0979632065417297, -0.048740595085551286),
             (-3.1858810036855245, -0.001178821281161997, 3.190832613414926)),
    "silu": ((-0.04060357190528599, 1.080925428529668, -0.040321856624382146),
             (-6.3050461001646445, -0.0008684942046214787, 6.325815242089708)),
}

# relative L2 tolerance of the op's result vs the float64 reference, by the op's dtype
TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 3e-2}
DTYPES = list(TOL)
PROPERTY = settings(max_examples=25, deadline=None, derandomize=True)


@pytest.fixture(scope="module", autouse=True)
def _eager_kernels():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("APPROXBP_FX_KERNELS", "eager")
        yield


def rel_l2(actual: Tensor, expected: Tensor, floor: float = 0.0) -> float:
    diff = torch.linalg.vector_norm(actual.double() - expected.double()).item()
    scale = max(torch.linalg.vector_norm(expected.double()).item(), floor)
    return diff / scale if scale > 0 else diff


def assert_close(actual: Tensor | None, expected: Tensor | None, dtype: torch.dtype, what: str,
                 floor: float = 0.0) -> None:
    """Relative L2 within ``TOL[dtype]``; ``floor`` bounds the denominator from below where the exact
    result is a cancellation of larger terms (a norm's dx: rounding noise is relative to those terms)."""
    assert (actual is None) == (expected is None), f"{what}: gradient presence differs"
    if expected is None:
        return
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} vs {tuple(expected.shape)}"
    err = rel_l2(actual, expected, floor)
    assert err <= TOL[dtype], f"{what}: relative L2 {err:.2e} > {TOL[dtype]:.0e} ({dtype})"


shapes = st.lists(st.integers(1, 5), min_size=0, max_size=3).flatmap(
    lambda lead: st.integers(1, 33).map(lambda d: (*lead, d)))


def draw(shape, dtype, seed, scale=1.0, shift=0.0) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale + shift).to(dtype)


# --- activations ------------------------------------------------------------------------------------


def step_reference(x: Tensor, dy: Tensor, name: str) -> Tensor:
    a, c = PAPER[name]
    levels = torch.tensor([0.0, a[0], a[0] + a[1], a[0] + a[1] + a[2]], dtype=torch.float64)
    k = sum((x.double() > ci).long() for ci in c)
    return dy.double() * levels[k]


@PROPERTY
@given(shape=shapes, dtype=st.sampled_from(DTYPES), scale=st.sampled_from([0.1, 1.0, 4.0, 10.0]),
       name=st.sampled_from(["gelu", "gelu_tanh", "silu"]), seed=st.integers(0, 2**31 - 1))
def test_step_activations(shape, dtype, scale, name, seed) -> None:
    x = draw(shape, dtype, seed, scale).requires_grad_()
    dy = draw(shape, dtype, seed + 1)
    if name == "silu":
        y, ref = resilu2(x), F.silu(x.detach().double())
    else:
        approximate = "tanh" if name == "gelu_tanh" else "none"
        y, ref = regelu2(x, approximate), F.gelu(x.detach().double(), approximate=approximate)
    assert y.dtype == dtype
    assert_close(y.detach(), ref, dtype, "forward")
    (dx,) = torch.autograd.grad(y, x, dy)
    assert dx.dtype == dtype
    assert_close(dx, step_reference(x.detach(), dy, "silu" if name == "silu" else "gelu"), dtype, "backward")


# --- norms ----------------------------------------------------------------------------------------


def layer_norm_reference(x, weight, bias, eps):
    xd = x.double()
    mean = xd.mean(-1, keepdim=True)
    var = ((xd - mean) ** 2).mean(-1, keepdim=True)
    y = (xd - mean) / torch.sqrt(var + eps)
    z = y * weight if weight is not None else y
    return (z + bias if bias is not None else z), y


def rms_norm_reference(x, weight, eps, offset):
    xd = x.double()
    y = xd / torch.sqrt((xd**2).mean(-1, keepdim=True) + eps)
    return (y * (weight + offset) if weight is not None else y), y


def leaves(dtype, *tensors):
    """float64 copies of the op's inputs (same values) that require grad, for the reference."""
    return [None if t is None else t.detach().double().requires_grad_(t.requires_grad) for t in tensors]


def grads(out: Tensor, inputs, weight: Tensor) -> list[Tensor | None]:
    present = [t for t in inputs if t is not None and t.requires_grad]
    got = iter(torch.autograd.grad((out * weight.to(out.dtype)).sum(), present))
    return [next(got) if t is not None and t.requires_grad else None for t in inputs]


def cancellation_scale(x: Tensor, weight: Tensor | None, dz: Tensor, eps: float, rms: bool, offset: float = 0.0) -> float:
    """|| rstd * dy ||: the size of the terms whose difference is a norm's dx."""
    xd = x.detach()
    ms = (xd**2).mean(-1, keepdim=True) if rms else xd.var(-1, correction=0, keepdim=True)
    dy = dz * (weight.detach() + offset) if weight is not None else dz
    return torch.linalg.vector_norm(dy / torch.sqrt(ms + eps)).item()


EPS = st.sampled_from([1e-6, 1e-5, 1e-3, 0.1])


@PROPERTY
@given(shape=shapes, dtype=st.sampled_from(DTYPES), eps=EPS, has_weight=st.booleans(), has_bias=st.booleans(),
       shift=st.sampled_from([0.0, 3.0]), seed=st.integers(0, 2**31 - 1))
def test_ms_layer_norm(shape, dtype, eps, has_weight, has_bias, shift, seed) -> None:
    d = shape[-1]
    x = draw(shape, dtype, seed, 2.0, shift).requires_grad_()
    weight = (draw(d, dtype, seed + 1) * 0.5 + 1).requires_grad_() if has_weight else None
    bias = draw(d, dtype, seed + 2).requires_grad_() if has_bias else None
    out = ms_layer_norm(x, d, weight, bias, eps)
    xr, wr, br = leaves(dtype, x, weight, bias)
    z_ref, y_ref = layer_norm_reference(xr, wr, br, eps)
    assert out.z.dtype == dtype and out.y_hat.dtype == dtype
    assert_close(out.z.detach(), z_ref.detach(), dtype, "z")
    assert_close(out.y_hat.detach(), y_ref.detach(), dtype, "y_hat")
    assert_close(out.rstd.reshape(-1).detach(), 1 / torch.sqrt(xr.detach().var(-1, correction=0) + eps).reshape(-1),
                 dtype if dtype == torch.float64 else torch.float32, "rstd")
    dz = draw(shape, torch.float64, seed + 3)
    floor = cancellation_scale(xr, wr, dz, eps, rms=False)
    for what, got, ref in zip(("x", "weight", "bias"), grads(out.z, [x, weight, bias], dz),
                              grads(z_ref, [xr, wr, br], dz)):
        assert_close(got, ref, dtype, f"grad {what}", floor if what == "x" else 0.0)


@PROPERTY
@given(shape=shapes, dtype=st.sampled_from(DTYPES), eps=EPS, has_weight=st.booleans(),
       offset=st.sampled_from([0.0, 1.0]), seed=st.integers(0, 2**31 - 1))
def test_ms_rms_norm(shape, dtype, eps, has_weight, offset, seed) -> None:
    d = shape[-1]
    x = draw(shape, dtype, seed, 2.0).requires_grad_()
    weight = (draw(d, dtype, seed + 1) * 0.5 + 1 - offset).requires_grad_() if has_weight else None
    out = ms_rms_norm(x, d, weight, eps, weight_offset=offset)
    xr, wr = leaves(dtype, x, weight)
    z_ref, y_ref = rms_norm_reference(xr, wr, eps, offset)
    assert out.z.dtype == dtype
    assert_close(out.z.detach(), z_ref.detach(), dtype, "z")
    assert_close(out.y_hat.detach(), y_ref.detach(), dtype, "y_hat")
    dz = draw(shape, torch.float64, seed + 3)
    floor = cancellation_scale(xr, wr, dz, eps, rms=True, offset=offset)
    for what, got, ref in zip(("x", "weight"), grads(out.z, [x, weight], dz), grads(z_ref, [xr, wr], dz)):
        assert_close(got, ref, dtype, f"grad {what}", floor if what == "x" else 0.0)


@PROPERTY
@given(shape=shapes, dtype=st.sampled_from(DTYPES), eps=EPS, rms=st.booleans(), norm_affine=st.booleans(),
       has_bias=st.booleans(), out_features=st.integers(1, 9), frozen=st.booleans(),
       residual=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_norm_then_linear_shared(shape, dtype, eps, rms, norm_affine, has_bias, out_features, frozen, residual,
                                 seed) -> None:
    """norm -> linear_shared (and, with ``residual``, z also used directly) vs float64 norm -> F.linear."""
    d = shape[-1]
    x = draw(shape, dtype, seed, 2.0, 1.0).requires_grad_()
    gamma = (draw(d, dtype, seed + 1) * 0.5 + 1).requires_grad_() if norm_affine else None
    beta = draw(d, dtype, seed + 2).requires_grad_() if norm_affine and not rms else None
    w = draw((out_features, d), dtype, seed + 4, d**-0.5).requires_grad_(not frozen)
    b = draw(out_features, dtype, seed + 5).requires_grad_(not frozen) if has_bias else None
    if rms:
        norm = ms_rms_norm(x, d, gamma, eps)
    else:
        norm = ms_layer_norm(x, d, gamma, beta, eps)
    out = linear_shared(norm.z, norm.y_hat, w, b, gamma, beta)
    xr, gr, br, wr, bbr = leaves(dtype, x, gamma, beta, w, b)
    z_ref = rms_norm_reference(xr, gr, eps, 0.0)[0] if rms else layer_norm_reference(xr, gr, br, eps)[0]
    ref = F.linear(z_ref, wr, bbr)
    assert out.dtype == dtype
    assert_close(out.detach(), ref.detach(), dtype, "out")
    g_out = draw(ref.shape, torch.float64, seed + 6)
    loss, loss_ref = (out * g_out.to(dtype)).sum(), (ref * g_out).sum()
    if residual:
        g_z = draw(shape, torch.float64, seed + 7)
        loss, loss_ref = loss + (norm.z * g_z.to(dtype)).sum(), loss_ref + (z_ref * g_z).sum()
    inputs, inputs_ref = [x, gamma, beta, w, b], [xr, gr, br, wr, bbr]
    (dz,) = torch.autograd.grad(loss_ref, z_ref, retain_graph=True)
    floor = cancellation_scale(xr, gr, dz, eps, rms=rms)
    ones = torch.ones((), dtype=torch.float64)
    for what, got, want in zip(("x", "gamma", "beta", "weight", "bias"), grads(loss, inputs, ones),
                               grads(loss_ref, inputs_ref, ones)):
        assert_close(got, want, dtype, f"grad {what}", floor if what == "x" else 0.0)
