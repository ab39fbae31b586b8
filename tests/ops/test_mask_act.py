"""Exact masks for piecewise-linear activations (``approxbp::mask_act``) against torch's own ops.

Op under test (schema as registered in approxbp_fx/ops/activations.py):
    approxbp::mask_act(Tensor x, str fn, float[] params) -> (Tensor y, Tensor mask)

Reference: torch itself. The forward must be torch's bit for bit; the backward must be torch's autograd
bit for bit, on inputs that hold the kinks exactly (0, -0, each bound, one ulp either side), infinities
and NaN, with incoming gradients that hold inf, NaN and -0 (where the derivative is 0, torch gives +0).
Two freedoms, both where torch disagrees with itself: NaNs may carry different payload bits, and at
x = NaN hardtanh/relu6 are not compared (torch's hardtanh backward passes dy at NaN in its scalar loop,
which handles a tensor's last few elements, and gives 0 in its vectorised loop; the mask gives 0).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from approxbp_fx import saved_activation_bytes
from approxbp_fx.ops.activations import mask_activation

INF = math.inf
# (id, record name, params, torch's own op)
CASES = [
    ("relu", "relu", (), torch.relu),
    ("leaky_relu_0.01", "leaky_relu", (0.01,), lambda x: F.leaky_relu(x, 0.01)),
    ("leaky_relu_0.2", "leaky_relu", (0.2,), lambda x: F.leaky_relu(x, 0.2)),
    ("relu6", "relu6", (), F.relu6),
    ("hardtanh_-2_3", "hardtanh", (-2.0, 3.0), lambda x: F.hardtanh(x, -2, 3)),
    ("hardtanh_default", "hardtanh", (-1.0, 1.0), F.hardtanh),
    ("clamp_min_0", "clamp", (0.0, INF), lambda x: torch.clamp(x, min=0)),
    ("clamp_-2_3", "clamp", (-2.0, 3.0), lambda x: torch.clamp(x, -2, 3)),
    ("clamp_max_3", "clamp", (-INF, 3.0), lambda x: x.clamp_max(3)),
]
IDS = [c[0] for c in CASES]
DTYPES = [torch.float32, torch.bfloat16, torch.float64]
SHAPES = [(7,), (3, 5, 7), (2, 1, 33)]


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def assert_same_bits(actual: torch.Tensor, expected: torch.Tensor, what: str,
                     ignore: torch.Tensor | None = None) -> None:
    """Bit for bit equal, except that NaNs (in the same places) may differ in payload; ``ignore``: elements
    not compared."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, what
    if ignore is not None:
        actual, expected = actual[~ignore], expected[~ignore]
    nan = expected.isnan()
    assert torch.equal(actual.isnan(), nan), f"{what}: NaN in different places"
    differ = (_bits(actual) != _bits(expected)) & ~nan
    assert not differ.any(), (
        f"{what}: {int(differ.sum())} elements differ, e.g. {actual[differ][:4].tolist()} vs {expected[differ][:4].tolist()}")


def _kinks(params: tuple[float, ...], dtype: torch.dtype) -> torch.Tensor:
    """0, -0, every finite bound and 0, each with its neighbours one ulp away, infinities and NaN."""
    points = [0.0] + [p for p in params if math.isfinite(p)]
    out = [-0.0, math.inf, -math.inf, math.nan]
    for p in points:
        t = torch.tensor(p, dtype=torch.float64).to(dtype)
        out += [t.item(), torch.nextafter(t, torch.tensor(-INF, dtype=dtype)).item(),
                torch.nextafter(t, torch.tensor(INF, dtype=dtype)).item()]
    return torch.tensor(out, dtype=torch.float64).to(dtype)


def make_input(shape, params, dtype, seed=0) -> torch.Tensor:
    """Random values (about half beyond the bounds) with every kink point placed in, shuffled."""
    g = torch.Generator().manual_seed(seed)
    n = math.prod(shape)
    x = (torch.randn(n, generator=g, dtype=torch.float64) * 4).to(dtype)
    kinks = _kinks(params, dtype)
    k = min(n, kinks.numel())
    x[:k] = kinks[:k]
    return x[torch.randperm(n, generator=g)].reshape(shape)


def make_grad(shape, dtype, seed=1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    dy = (torch.randn(math.prod(shape), generator=g, dtype=torch.float64) * 3).to(dtype)
    dy[0:12:4], dy[1:12:4], dy[2:12:4] = math.inf, math.nan, -0.0
    return dy[torch.randperm(dy.numel(), generator=g)].reshape(shape)


def check_against_torch(name, params, torch_op, x, dy) -> None:
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    y, expected = mask_activation(a, name, params), torch_op(b)
    assert_same_bits(y, expected, f"{name}{params} forward")
    y.backward(dy)
    expected.backward(dy)
    ignore = x.isnan() if name in ("hardtanh", "relu6") else None  # torch disagrees with itself (module docstring)
    assert_same_bits(a.grad, b.grad, f"{name}{params} backward", ignore)


# each combination compiles its own kernels: a few cover what the compiler could change (half types'
# casts, the slope's product, each mask's comparisons); the plain bodies below cover all of them
COMPILED = [("relu", torch.float32), ("leaky_relu_0.01", torch.bfloat16), ("hardtanh_-2_3", torch.bfloat16),
            ("clamp_min_0", torch.float32)]


@pytest.mark.parametrize("case,dtype", COMPILED, ids=[f"{c}-{d}" for c, d in COMPILED])
def test_bit_for_bit_compiled_kernels(case, dtype):
    """Compiled kernels (the default), one shape that holds every kink point."""
    _, name, params, torch_op = CASES[IDS.index(case)]
    shape = (5, 13)
    check_against_torch(name, params, torch_op, make_input(shape, params, dtype), make_grad(shape, dtype))


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES + [torch.float16], ids=str)
@pytest.mark.parametrize("name,params,torch_op", [c[1:] for c in CASES], ids=IDS)
def test_bit_for_bit_shapes_and_dtypes(name, params, torch_op, dtype, shape, eager_kernels):
    """The same bodies as plain torch code, over shapes whose size is not a multiple of 8 (padding)."""
    check_against_torch(name, params, torch_op, make_input(shape, params, dtype), make_grad(shape, dtype))


@pytest.mark.parametrize("name,params,torch_op", [c[1:] for c in CASES], ids=IDS)
def test_non_contiguous_input(name, params, torch_op, eager_kernels):
    base = make_input((9, 12, 7), params, torch.float32)
    x = base.transpose(0, 2)[1:, ::3]
    assert not x.is_contiguous()
    check_against_torch(name, params, torch_op, x, make_grad(x.shape, torch.float32))


@pytest.mark.parametrize("name,params,torch_op", [c[1:] for c in CASES], ids=IDS)
def test_double_backward_equals_torch(name, params, torch_op, eager_kernels):
    """dx is linear in dy and independent of x: second derivatives (through dy, and in x: zero) are torch's."""
    x = make_input((4, 9), params, torch.float64)
    x = torch.where(x.isfinite(), x, 0.5)  # autograd's own second derivative at inf/NaN is not the point here
    results = []
    for op in (lambda t: mask_activation(t, name, params), torch_op):
        xi = x.clone().requires_grad_()
        dy = torch.randn(x.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3)).requires_grad_()
        (gx,) = torch.autograd.grad(op(xi), xi, dy, create_graph=True)
        w = torch.randn(x.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
        d_dy, d_x = torch.autograd.grad((gx * w).sum(), (dy, xi), allow_unused=True, materialize_grads=True)
        results.append((gx.detach(), d_dy, d_x))
    for got, want, what in zip(results[0], results[1], ("dx", "d(dx)/d(dy)", "d(dx)/dx")):
        assert_same_bits(got, want, f"{name}{params} {what}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name,params", [("relu", ()), ("hardtanh", (-2.0, 3.0)), ("leaky_relu", (0.2,))])
def test_keeps_one_bit_per_element(name, params, dtype, eager_kernels):
    x = torch.randn(1001, 13, dtype=dtype, requires_grad=True)
    kept = saved_activation_bytes(lambda t: mask_activation(t, name, params), x)
    assert kept == (x.numel() + 7) // 8


@pytest.mark.parametrize("name,params", [("relu", ()), ("leaky_relu", (0.2,)), ("hardtanh", (-2.0, 3.0)),
                                         ("clamp", (0.0, INF))])
def test_opcheck(name, params, eager_kernels):
    x = torch.randn(3, 11, requires_grad=True)
    torch.library.opcheck(torch.ops.approxbp.mask_act.default, (x, name, list(params)))


def test_bad_arguments_name_the_problem():
    x = torch.randn(4)
    with pytest.raises(ValueError, match="unknown exact activation 'gelu'"):
        mask_activation(x, "gelu")
    with pytest.raises(TypeError, match="floating-point"):
        mask_activation(torch.arange(4), "relu")
    with pytest.raises(ValueError, match="takes 2 parameter"):
        mask_activation(x, "hardtanh", (1.0,))
    with pytest.raises(ValueError, match="not exact in torch.float32"):
        mask_activation(x, "hardtanh", (-0.1, 0.1))
