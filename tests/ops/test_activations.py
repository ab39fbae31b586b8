"""ReGELU2 / ReSiLU2 (``approxbp::step_act``) against independent references.

Op under test (schema as registered in approxbp_fx/ops/activations.py):
    approxbp::step_act(Tensor x, str fn, float[] thresholds, float[] levels) -> (Tensor y, Tensor code)

References: forward is ``F.gelu``/``F.silu`` (bitwise); backward is ``dy * sum_{i<=k} a_i`` with
k = #{i : x > c_i}, evaluated in float64 from the paper's constants, which are written out here
(Yang et al., ICML 2024, Table 1) rather than imported from the package.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from approxbp_fx import saved_activation_bytes
from approxbp_fx.ops import regelu2, resilu2

# Yang et al., ICML 2024 (Table 1): h(x) = sum_i a_i ReLU(x - c_i).
GELU_A = (-0.04922261145617846, 1.0979632065417297, -0.048740595085551286)
GELU_C = (-3.1858810036855245, -0.001178821281161997, 3.190832613414926)
SILU_A = (-0.04060357190528599, 1.080925428529668, -0.040321856624382146)
SILU_C = (-6.3050461001646445, -0.0008684942046214787, 6.325815242089708)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SHAPES = [(3, 5, 7), (1, 1, 33), (1000003,)]

# (name, op under test, torch reference forward, a, c)
ACTS = [
    ("gelu", lambda x: regelu2(x), lambda x: F.gelu(x), GELU_A, GELU_C),
    ("gelu_tanh", lambda x: regelu2(x, approximate="tanh"), lambda x: F.gelu(x, approximate="tanh"), GELU_A, GELU_C),
    ("silu", resilu2, F.silu, SILU_A, SILU_C),
]
ACT_IDS = [a[0] for a in ACTS]


def step_reference(x: torch.Tensor, dy: torch.Tensor, a, c) -> torch.Tensor:
    """dy * sum_{i : x > c_i} a_i, in float64."""
    xd = x.detach().double()
    level = torch.zeros_like(xd)
    for ai, ci in zip(a, c):
        level = level + ai * (xd > ci).double()
    return dy.double() * level


def make_input(shape, dtype, scale=4.0, device="cpu") -> torch.Tensor:
    # scale 4 puts many elements beyond the outer thresholds (|c| ~ 3.2 for GELU)
    return (torch.randn(shape) * scale).to(device=device, dtype=dtype)


# non-contiguous views: (base shape, view of the base)
LAYOUTS = {
    "transposed": ((9, 12, 7), lambda b: b.transpose(0, 2)),
    "strided_slice": ((9, 12, 7), lambda b: b[::2, 1::3, ::2]),
    "permuted_odd": ((5, 3, 11), lambda b: b.permute(2, 0, 1)[1:]),
    "1d_step_3": ((101,), lambda b: b[3:-2:3]),
}


def assert_backward_matches(grad: torch.Tensor, x: torch.Tensor, dy: torch.Tensor, a, c) -> None:
    ref = step_reference(x, dy, a, c)
    assert grad.dtype == x.dtype and grad.shape == x.shape
    if x.dtype == torch.float32:
        err = (grad.double() - ref).abs()
        bound = 1e-6 * ref.abs()
        bad = err > bound
        assert not bad.any(), (
            f"{int(bad.sum())} elements exceed rel 1e-6; worst x={x.detach().reshape(-1)[bad.reshape(-1)][:5].tolist()}"
        )
    else:
        # half: exact after rounding the float64 reference to the dtype
        torch.testing.assert_close(grad, ref.to(x.dtype), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("name,op,ref_fwd,a,c", ACTS, ids=ACT_IDS)
def test_forward_bitwise_and_backward_step(name, op, ref_fwd, a, c, shape, dtype, device):
    x = make_input(shape, dtype, device=device).requires_grad_()
    y = op(x)
    expected = ref_fwd(x.detach())
    assert y.dtype == expected.dtype and y.shape == expected.shape
    assert torch.equal(y, expected), f"{name} forward is not bitwise equal for {dtype} {shape}"

    dy = torch.randn(shape).to(device=device, dtype=dtype)
    y.backward(dy)
    assert_backward_matches(x.grad, x, dy, a, c)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("name,op,ref_fwd,a,c", ACTS, ids=ACT_IDS)
def test_non_contiguous_inputs(name, op, ref_fwd, a, c, layout, dtype, device):
    base_shape, view_of = LAYOUTS[layout]
    base = make_input(base_shape, dtype, device=device).requires_grad_()
    x = view_of(base)
    assert not x.is_contiguous()
    y = op(x)
    assert torch.equal(y, ref_fwd(x.detach())), f"{name} forward differs for {layout} {dtype}"
    dy = torch.randn(x.shape).to(device=device, dtype=dtype)
    y.backward(dy)
    # the gradient lands in the viewed elements of the base and nowhere else
    grad_x = view_of(base.grad)
    assert_backward_matches(grad_x, x, dy, a, c)
    outside = torch.ones(base_shape, dtype=torch.bool, device=device)
    view_of(outside).fill_(False)
    assert not base.grad[outside].any()


@pytest.mark.parametrize("name,op,ref_fwd,a,c", ACTS, ids=ACT_IDS)
def test_backward_through_strided_view_of_leaf(name, op, ref_fwd, a, c):
    """The view's gradient lands in the right elements of the base; untouched elements get zero."""
    base = make_input((8, 11), torch.float32).requires_grad_()
    view = base.t()[1::2, ::3]
    dy = torch.randn(view.shape)
    op(view).backward(dy)
    expected = torch.zeros(base.shape, dtype=torch.float64)
    expected.t()[1::2, ::3] = step_reference(view, dy, a, c)
    torch.testing.assert_close(base.grad.double(), expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name,op,ref_fwd,a,c", ACTS, ids=ACT_IDS)
def test_backward_at_threshold_boundaries(name, op, ref_fwd, a, c, dtype, device):
    """x exactly at (and one ulp around) each threshold, as representable in the dtype: the step is
    defined by x > c_i with c_i the float64 constant, whatever the input dtype."""
    xs = []
    for ci in c:
        t = torch.tensor(ci, dtype=torch.float64).to(dtype)
        for _ in range(3):
            t = torch.nextafter(t, torch.tensor(-1e9, dtype=dtype))
        for _ in range(7):
            xs.append(t.clone())
            t = torch.nextafter(t, torch.tensor(1e9, dtype=dtype))
    x = torch.stack(xs).to(device).requires_grad_()
    dy = torch.ones_like(x)
    op(x).backward(dy)
    assert_backward_matches(x.grad, x, dy, a, c)


def test_levels_follow_the_paper():
    """Sanity of the reference itself: GELU levels 0, -0.0492, 1.0487, 1.0000 (partial sums of the paper's a)."""
    x = torch.tensor([-10.0, -1.0, 1.0, 10.0], dtype=torch.float64)
    levels = step_reference(x, torch.ones_like(x), GELU_A, GELU_C)
    torch.testing.assert_close(levels, torch.tensor([0.0, -0.0492, 1.0487, 1.0], dtype=torch.float64), atol=1e-4, rtol=0)
    assert abs(sum(GELU_A) - 1) < 1e-12 and abs(sum(SILU_A) - 1) < 1e-12


def test_gradient_is_not_the_exact_derivative():
    """Backward really is the step function: it differs from autograd's GELU derivative in general."""
    x = torch.linspace(-4, 4, 101, requires_grad=True)
    regelu2(x).sum().backward()
    xe = x.detach().clone().requires_grad_()
    F.gelu(xe).sum().backward()
    assert not torch.allclose(x.grad, xe.grad)
    assert set(torch.unique(x.grad).tolist()) <= {
        0.0, *(torch.tensor([GELU_A[0], GELU_A[0] + GELU_A[1], sum(GELU_A)]).tolist())
    }


# --- saved bytes -----------------------------------------------------------------------------------

N = 1_000_003


def test_saved_bytes_eager(device):
    x = torch.randn(N, device=device, requires_grad=True)
    assert saved_activation_bytes(F.gelu, x) == 4 * N == 4_000_012
    assert saved_activation_bytes(regelu2, x) <= (N + 3) // 4 + 64 == 250_001 + 64
    assert saved_activation_bytes(resilu2, x) <= (N + 3) // 4 + 64
    assert saved_activation_bytes(lambda t: regelu2(t, approximate="tanh"), x) <= (N + 3) // 4 + 64


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_saved_bytes_compiled(backend, device, fresh_dynamo):
    n = 4099  # odd: not a multiple of 4
    x = torch.randn(n, device=device, requires_grad=True)
    compiled = torch.compile(lambda t: regelu2(t * 2), backend=backend)
    plain = torch.compile(lambda t: F.gelu(t * 2), backend=backend)
    y = compiled(x)
    assert torch.equal(y, F.gelu(x.detach() * 2))
    code_bytes = (n + 3) // 4
    assert saved_activation_bytes(compiled, x) <= code_bytes + 64
    # the baseline keeps a full-width fp32 tensor: the saving is real in this mode
    assert saved_activation_bytes(plain, x) >= 4 * n
    # and the compiled backward is still the step derivative
    dy = torch.randn(n, device=device)
    y.backward(dy)
    assert_backward_matches(x.grad, x, 2 * dy, GELU_A, [ci / 2 for ci in GELU_C])


# --- registration ----------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(3, 5, 7), (1, 1, 33)], ids=str)
def test_opcheck_step_act(shape, dtype, device):
    x = make_input(shape, dtype, device=device).requires_grad_()
    levels = [0.0, GELU_A[0], GELU_A[0] + GELU_A[1], sum(GELU_A)]
    torch.library.opcheck(torch.ops.approxbp.step_act.default, (x, "gelu", list(GELU_C), levels))
    levels = [0.0, SILU_A[0], SILU_A[0] + SILU_A[1], sum(SILU_A)]
    torch.library.opcheck(torch.ops.approxbp.step_act.default, (x.detach().transpose(0, -1).requires_grad_(), "silu", list(SILU_C), levels))


def test_invalid_arguments():
    with pytest.raises(ValueError):
        regelu2(torch.randn(4), approximate="bogus")
    with pytest.raises(TypeError):
        regelu2(torch.arange(4))
    with pytest.raises(TypeError):
        resilu2(torch.arange(4, dtype=torch.int32))
    with pytest.raises(TypeError):
        regelu2([1.0, 2.0])  # type: ignore[arg-type]
