"""MS-LayerNorm / MS-RMSNorm and the consumer linear (``approxbp::norm_shared``, ``approxbp::linear_shared``).

References: ``torch.autograd.gradcheck`` in float64 (finite differences, independent of the hand-written
backwards), ``F.layer_norm``/``F.linear`` and a hand-written RMSNorm for the forward, plain autograd
for the frozen-weight gradients, and byte counts computed from shapes for what is kept.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from approxbp_fx import saved_activation_bytes
from approxbp_fx.ops import linear_shared, ms_layer_norm, ms_rms_norm
from approxbp_fx.ops.dropout import dropout_packed, dropout_scale

SHAPES = [(3, 5, 7), (1, 1, 33)]
OUT = 4  # the linear's out_features


def rand(*shape, dtype=torch.float64, requires_grad=True):
    return torch.randn(*shape, dtype=dtype).requires_grad_(requires_grad)


def rms_norm_reference(x, weight=None, eps=1e-6, offset=0.0):
    """HF LLaMA-style RMSNorm, written out (offset=1 is Gemma's ``1 + weight``)."""
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if weight is not None:
        y = y * (weight.to(y.dtype) + offset)
    return y.to(x.dtype)


def layer_norm_reference(x, weight=None, bias=None, eps=1e-5):
    """F.layer_norm written out (aten's own double backward fails for a bias without a weight)."""
    var, mean = torch.var_mean(x, -1, correction=0, keepdim=True)
    y = (x - mean) * torch.rsqrt(var + eps)
    y = y if weight is None else y * weight
    return y if bias is None else y + bias


# --- norm configurations: (id, builder(D) -> (norm params, fn(x, *params) -> SharedNorm, linear kwargs));
# fn.reference(x, *params) is the same norm's z by plain torch ops ---

def _layer(has_w, has_b):
    def build(d):
        params = [rand(d) if has_w else None, rand(d) if has_b else None]

        def norm(x, w, b):
            return ms_layer_norm(x, x.shape[-1], w, b)

        norm.reference = layer_norm_reference

        def link(w, b):
            return {"norm_weight": w, "norm_bias": b}

        return params, norm, link
    return build


def _rms(has_w, offset):
    def build(d):
        params = [rand(d) if has_w else None]

        def norm(x, w):
            return ms_rms_norm(x, x.shape[-1], w, weight_offset=offset)

        norm.reference = lambda x, w: rms_norm_reference(x, w, offset=offset)

        def link(w):
            return {"norm_weight": w, "norm_weight_offset": offset}

        return params, norm, link
    return build


NORMS = {
    "ln": _layer(True, True),
    "ln_no_affine": _layer(False, False),
    "ln_weight_only": _layer(True, False),
    "ln_bias_only": _layer(False, True),
    "rms": _rms(True, 0.0),
    "rms_gemma": _rms(True, 1.0),
    "rms_no_weight": _rms(False, 0.0),
}


def on(device, *tensors):
    """The tensors as leaves on ``device`` (None stays None, requires_grad kept)."""
    return [None if t is None else t.detach().to(device).requires_grad_(t.requires_grad) for t in tensors]


def _gradcheck(fn, inputs):
    present = [t for t in inputs if t is not None]
    assert torch.autograd.gradcheck(lambda *ts: fn(*_refill(inputs, ts)), present, eps=1e-6, atol=1e-7, rtol=1e-5)


def _refill(template, present):
    it = iter(present)
    return [None if t is None else next(it) for t in template]


@pytest.mark.usefixtures("eager_kernels")
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("norm_id", sorted(NORMS))
def test_gradcheck_norm(norm_id, shape):
    params, norm, _ = NORMS[norm_id](shape[-1])
    x = rand(*shape)
    _gradcheck(lambda x, *p: norm(x, *p).z, [x, *params])


@pytest.mark.usefixtures("eager_kernels")
def test_gradcheck_layer_norm_over_two_dims():
    x, w, b = rand(3, 5, 7), rand(5, 7), rand(5, 7)
    _gradcheck(lambda x, w, b: ms_layer_norm(x, (5, 7), w, b).z, [x, w, b])
    _gradcheck(lambda x: ms_rms_norm(x, (5, 7)).z, [x])


LINEAR_CASES = list(itertools.product([True, False], [False, True], [False, True]))  # bias, transposed, frozen
LINEAR_IDS = [f"{'bias' if b else 'nobias'}-{'WT' if t else 'W'}-{'frozen' if f else 'trainable'}"
              for b, t, f in LINEAR_CASES]


@pytest.mark.usefixtures("eager_kernels")
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("has_bias,transposed,frozen", LINEAR_CASES, ids=LINEAR_IDS)
@pytest.mark.parametrize("norm_id", sorted(NORMS))
def test_gradcheck_norm_then_linear(norm_id, has_bias, transposed, frozen, shape, device):
    d = shape[-1]
    params, norm, link = NORMS[norm_id](d)
    x, weight, bias, *params = on(device, rand(*shape), rand(*((d, OUT) if transposed else (OUT, d)),
                                  requires_grad=not frozen), rand(OUT) if has_bias else None, *params)

    def chain(x, w_lin, b_lin, *p):
        z, y_hat, _ = norm(x, *p)
        out = linear_shared(z, y_hat, w_lin, b_lin, weight_transposed=transposed, **link(*p))
        return out, z  # z also used directly (a residual): both paths must be right

    if frozen:
        _gradcheck(lambda x, b, *p: chain(x, weight, b, *p), [x, bias, *params])
    else:
        _gradcheck(chain, [x, weight, bias, *params])


@pytest.mark.usefixtures("eager_kernels")
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("norm_id", sorted(NORMS))
def test_gradgradcheck_norm_then_linear(norm_id, transposed, device):
    """Exact rewrites stay exact under create_graph=True: second derivatives of norm -> linear against
    plain autograd of the same layers (a Hessian-vector product) and against finite differences of the
    first derivatives (gradgradcheck, which also covers y_hat and rstd used directly)."""
    d = 5
    params, norm, link = NORMS[norm_id](d)
    x, weight, bias, *params = on(device, rand(2, 3, d), rand(*((d, OUT) if transposed else (OUT, d))), rand(OUT),
                                  *params)

    def chain(x, w_lin, b_lin, *p):
        z, y_hat, rstd = norm(x, *p)
        out = linear_shared(z, y_hat, w_lin, b_lin, weight_transposed=transposed, **link(*p))
        return out, z, y_hat, rstd

    def plain(x, w_lin, b_lin, *p):
        z = norm.reference(x, *p)
        return (z @ w_lin if transposed else F.linear(z, w_lin)) + b_lin

    inputs = [x, weight, bias, *params]
    present = [t for t in inputs if t is not None]
    hvp = [_hessian_vector(lambda *ts: fn(*_refill(inputs, ts)), present) for fn in (lambda *a: chain(*a)[0], plain)]
    for ours, ref in zip(*hvp):
        torch.testing.assert_close(ours, ref, rtol=1e-9, atol=1e-10)
    _gradcheck(chain, inputs)
    assert torch.autograd.gradgradcheck(lambda *ts: chain(*_refill(inputs, ts)), present, eps=1e-6, atol=1e-6,
                                        rtol=1e-4)


def _hessian_vector(fn, inputs):
    """d/d inputs of sum(g^2) where g = d/d inputs of sum(fn(inputs)^2) (taken with create_graph=True)."""
    grads = torch.autograd.grad(fn(*inputs).pow(2).sum(), inputs, create_graph=True)
    return torch.autograd.grad(sum(g.pow(2).sum() for g in grads), inputs)


@pytest.mark.usefixtures("eager_kernels")
@pytest.mark.parametrize("transposed", [False, True])
def test_gradcheck_linear_alone(transposed):
    """The consumer with z computed outside from a detached y_hat: grads of z, W, b (and gamma, beta via z)."""
    y_hat = torch.randn(3, 5, 7, dtype=torch.float64)
    gamma, beta = rand(7), rand(7)
    weight = rand(*((7, OUT) if transposed else (OUT, 7)))
    bias = rand(OUT)

    def fn(gamma, beta, weight, bias):
        z = y_hat * gamma + beta
        return linear_shared(z, y_hat, weight, bias, gamma, beta, weight_transposed=transposed)

    _gradcheck(fn, [gamma, beta, weight, bias])


# --- forward numerics --------------------------------------------------------------------------------

def _rel_close(actual, expected, rtol=1e-5):
    err = (actual.double() - expected.double()).abs().max().item()
    scale = expected.double().abs().max().item()
    assert err <= rtol * scale, f"max abs err {err:.3g} vs scale {scale:.3g}"


@pytest.mark.parametrize("shape", SHAPES + [(2, 3, 256)], ids=str)
def test_forward_layer_norm_and_linear_match_torch(shape, device):
    d = shape[-1]
    x, w, b, weight, bias = on(device, torch.randn(shape) * 3 + 1, torch.randn(d), torch.randn(d),
                               torch.randn(OUT, d), torch.randn(OUT))
    z, y_hat, rstd = ms_layer_norm(x, d, w, b)
    ref = F.layer_norm(x, (d,), w, b)
    assert z.dtype == y_hat.dtype == torch.float32 and z.shape == y_hat.shape == x.shape
    _rel_close(z, ref)
    _rel_close(y_hat, F.layer_norm(x, (d,)))
    _rel_close(rstd.reshape(-1), torch.rsqrt(x.var(-1, unbiased=False) + 1e-5).reshape(-1))
    _rel_close(linear_shared(z, y_hat, weight, bias, w, b), F.linear(ref, weight, bias))
    _rel_close(linear_shared(z, y_hat, weight.t().contiguous(), bias, w, b, weight_transposed=True),
               torch.addmm(bias, ref.reshape(-1, d), weight.t()).reshape(*shape[:-1], OUT))


@pytest.mark.parametrize("offset", [0.0, 1.0])
@pytest.mark.parametrize("shape", SHAPES + [(2, 3, 256)], ids=str)
def test_forward_rms_norm_matches_hand_written(shape, offset, device):
    d = shape[-1]
    x, w, weight = on(device, torch.randn(shape) * 3, torch.randn(d), torch.randn(OUT, d))
    z, y_hat, _ = ms_rms_norm(x, d, w, weight_offset=offset)
    ref = rms_norm_reference(x, w, offset=offset)
    _rel_close(z, ref)
    _rel_close(y_hat, rms_norm_reference(x))
    _rel_close(linear_shared(z, y_hat, weight, None, w, norm_weight_offset=offset), F.linear(ref, weight))


def test_invalid_arguments():
    x = torch.randn(2, 3, 4)
    with pytest.raises(ValueError):
        ms_layer_norm(x, 5)
    with pytest.raises(ValueError):
        ms_rms_norm(x, (3, 5))
    with pytest.raises(TypeError):
        ms_layer_norm(torch.ones(2, 4, dtype=torch.int64), 4)
    z, y_hat, _ = ms_layer_norm(x, 4, torch.ones(4))
    with pytest.raises(ValueError):
        linear_shared(z, y_hat[:1], torch.randn(3, 4))


# --- registration -------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_opcheck_norm_shared(shape, device):
    d = shape[-1]
    x, w, b = on(device, torch.randn(shape, requires_grad=True), torch.randn(d, requires_grad=True),
                 torch.randn(d, requires_grad=True))
    f32 = torch.float32
    op = torch.ops.approxbp.norm_shared.default
    torch.library.opcheck(op, (x, w, b, 0.0, 1, 1e-5, False, f32, f32, False))
    torch.library.opcheck(op, (x, w, None, 1.0, 1, 1e-6, True, f32, f32, False))
    torch.library.opcheck(op, (x, None, None, 0.0, 1, 1e-6, True, torch.bfloat16, f32, False))
    torch.library.opcheck(op, (x, w, None, 0.0, 1, 1e-6, True, torch.bfloat16, torch.bfloat16, True))


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_opcheck_linear_shared(shape, transposed):
    d = shape[-1]
    w, b = torch.randn(d, requires_grad=True), torch.randn(d, requires_grad=True)
    z, y_hat, _ = ms_layer_norm(torch.randn(shape), d, w, b)
    z = z.detach().requires_grad_()  # a leaf: opcheck runs backward several times
    weight = torch.randn(*((d, OUT) if transposed else (OUT, d)), requires_grad=True)
    bias = torch.randn(OUT, requires_grad=True)
    op = torch.ops.approxbp.linear_shared.default
    torch.library.opcheck(op, (z, y_hat, weight, bias, w, b, 0.0, transposed, None, None, 1.0, None))
    torch.library.opcheck(op, (z, y_hat, weight.detach(), None, None, None, 0.0, transposed, None, None, 1.0, None))


def test_opcheck_linear_shared_rows_and_mask():
    """An expert's gathered rows after dropout: index and packed mask arguments."""
    d = 16
    w, b = torch.randn(d, requires_grad=True), torch.randn(d, requires_grad=True)
    z, y_hat, _ = ms_layer_norm(torch.randn(3, 5, d), d, w, b)
    index = torch.tensor([4, 0, 14, 4, 9])
    rows, mask = dropout_packed(z.detach().reshape(-1, d)[index], 0.25)
    rows = rows.requires_grad_()
    weight, bias = torch.randn(OUT, d, requires_grad=True), torch.randn(OUT, requires_grad=True)
    torch.library.opcheck(torch.ops.approxbp.linear_shared.default,
                          (rows, y_hat, weight, bias, w, b, 0.0, False, index, mask, dropout_scale(0.25, torch.float32), None))


@pytest.mark.parametrize("dropout", [False, True])
@pytest.mark.parametrize("rms", [False, True])
def test_linear_on_gathered_rows_matches_autograd(rms, dropout):
    """norm -> rows out[index] (a mixture-of-experts gather) -> [dropout] -> linear, against plain autograd in
    float64: every gradient, with the rows rebuilt in backward from y_hat, the index and the 1-bit mask."""
    d, p = 16, 0.3
    x = torch.randn(2, 7, d, dtype=torch.float64, requires_grad=True)
    gamma = (torch.rand(d, dtype=torch.float64) + 0.5).requires_grad_()
    beta = None if rms else (torch.rand(d, dtype=torch.float64) - 0.5).requires_grad_()
    weight = torch.randn(OUT, d, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(OUT, dtype=torch.float64, requires_grad=True)
    index = torch.tensor([13, 2, 2, 0, 8, 11, 5])
    params = [t for t in (x, gamma, beta, weight, bias) if t is not None]

    def reference():
        z = F.rms_norm(x, (d,), gamma, 1e-6) if rms else F.layer_norm(x, (d,), gamma, beta)
        rows = z.reshape(-1, d)[index]
        torch.manual_seed(5)
        return F.linear(F.dropout(rows, p, True) if dropout else rows, weight, bias)

    def ours():
        n = ms_rms_norm(x, d, gamma, 1e-6) if rms else ms_layer_norm(x, d, gamma, beta)
        rows, mask = n.z.reshape(-1, d)[index], None
        torch.manual_seed(5)
        if dropout:
            rows, mask = dropout_packed(rows, p)
        # without a mask, mask_scale is a constant the rows were multiplied by: 1 here
        return linear_shared(rows, n.y_hat, weight, bias, gamma, beta, index=index, mask=mask,
                             mask_scale=dropout_scale(p, x.dtype) if dropout else 1.0)

    grad = torch.randn(index.numel(), OUT, dtype=torch.float64)
    expected, actual = reference(), ours()
    torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-12)
    for e, a in zip(torch.autograd.grad(expected, params, grad), torch.autograd.grad(actual, params, grad)):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12)


def test_linear_shared_rejects_rows_that_do_not_match():
    d = 8
    z, y_hat, _ = ms_layer_norm(torch.randn(6, d), d)
    with pytest.raises(ValueError, match="rows of y_hat"):
        linear_shared(z[:3], y_hat, torch.randn(4, d), index=torch.tensor([0, 1]))
    with pytest.raises(TypeError, match="index must be"):
        linear_shared(z[:2], y_hat, torch.randn(4, d), index=torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="packed uint8 mask"):
        linear_shared(z, y_hat, torch.randn(4, d), mask=torch.zeros(3, dtype=torch.uint8))


# --- what is kept for backward ------------------------------------------------------------------------

class QKV(nn.Module):
    """LayerNorm -> q, k, v, built from the ops (and the same block from torch ops for comparison)."""

    def __init__(self, d: int, shared: bool = True):
        super().__init__()
        self.shared = shared
        self.norm = nn.LayerNorm(d)
        nn.init.normal_(self.norm.weight)
        nn.init.normal_(self.norm.bias)
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x):
        if not self.shared:
            z = self.norm(x)
            return self.q(z), self.k(z), self.v(z)
        n = self.norm
        z, y_hat, _ = ms_layer_norm(x, n.normalized_shape, n.weight, n.bias, n.eps)
        return tuple(linear_shared(z, y_hat, lin.weight, lin.bias, n.weight, n.bias) for lin in (self.q, self.k, self.v))


B, T, D = 2, 16, 64


def expected_shared_bytes(dtype_bytes=4):
    """One y_hat [B, T, D] plus rstd [B, T, 1] (fp32)."""
    return B * T * D * dtype_bytes + B * T * 4


def test_saved_bytes_qkv_eager():
    x = torch.randn(B, T, D, requires_grad=True)
    shared = QKV(D)
    assert saved_activation_bytes(shared, x) == expected_shared_bytes()
    # the unrewritten block keeps x, mean, rstd and z
    plain = QKV(D, shared=False)
    assert saved_activation_bytes(plain, x) == 2 * B * T * D * 4 + 2 * B * T * 4


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_saved_bytes_qkv_compiled(backend, device, fresh_dynamo):
    x = torch.randn(B, T, D, device=device, requires_grad=True)
    model = QKV(D).to(device)
    compiled = torch.compile(model, backend=backend)
    got = saved_activation_bytes(compiled, x)
    assert abs(got - expected_shared_bytes()) <= 0.01 * expected_shared_bytes(), got
    # same numbers and gradients as eager
    out_c, out_e = compiled(x), model(x)
    for a, b in zip(out_c, out_e):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    g_c = torch.autograd.grad(sum(o.square().sum() for o in out_c), [x, *model.parameters()])
    g_e = torch.autograd.grad(sum(o.square().sum() for o in out_e), [x, *model.parameters()])
    for a, b in zip(g_c, g_e):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_frozen_weight_gets_no_grad_and_rest_matches_autograd():
    shared, plain = QKV(D), QKV(D, shared=False)
    plain.load_state_dict(shared.state_dict())
    for m in (shared, plain):
        for lin in (m.q, m.k, m.v):
            lin.weight.requires_grad_(False)
    x = torch.randn(B, T, D)
    xs, xp = x.clone().requires_grad_(), x.clone().requires_grad_()
    dys = [torch.randn(B, T, D) for _ in range(3)]
    torch.autograd.backward(shared(xs), dys)
    torch.autograd.backward(plain(xp), dys)
    for lin in (shared.q, shared.k, shared.v):
        assert lin.weight.grad is None
    torch.testing.assert_close(xs.grad, xp.grad, rtol=1e-4, atol=1e-5)
    for (name, ps), pp in zip(shared.named_parameters(), plain.parameters()):
        if ps.requires_grad:
            torch.testing.assert_close(ps.grad, pp.grad, rtol=1e-4, atol=1e-4, msg=name)



# --- the compiled kernels -----------------------------------------------------------------------------

def _norm_linear_grads(x, params, norm, link, weight, bias):
    x = x.detach().requires_grad_()
    z, y_hat, _ = norm(x, *params)
    out = linear_shared(z, y_hat, weight, bias, **link(*params))
    leaves = [t for t in (x, weight, bias, *params) if t is not None and t.requires_grad]
    grads = torch.autograd.grad((out.square().sum() + z.sum()), leaves)
    return (z, out, *grads)


@pytest.mark.parametrize("norm_id", ["ln", "rms_gemma"])
def test_compiled_kernels_match_eager_kernels(norm_id, monkeypatch):
    """The same bodies, compiled (default) and run as plain torch code, agree in float32."""
    d = 33
    params, norm, link = NORMS[norm_id](d)
    params = [p.detach().float().requires_grad_() for p in params]
    x = torch.randn(3, 5, d)
    weight, bias = torch.randn(OUT, d, requires_grad=True), torch.randn(OUT, requires_grad=True)
    compiled = _norm_linear_grads(x, params, norm, link, weight, bias)
    monkeypatch.setenv("APPROXBP_FX_KERNELS", "eager")
    eager = _norm_linear_grads(x, params, norm, link, weight, bias)
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@torch._dynamo.config.patch(recompile_limit=2)  # (monkeypatch would delete the config entry on undo)
def test_ops_survive_dynamos_recompile_limit(fresh_dynamo):
    """More argument combinations in one process than Dynamo will compile variants of a kernel for
    (bias or not, W trainable or frozen, transposed or not ...) must still run, not raise."""
    d = 8
    for transposed, has_bias, w_grad in itertools.product([False, True], repeat=3):
        gamma, beta = torch.randn(d), torch.randn(d)
        z, y_hat, _ = ms_layer_norm(torch.randn(3, d), d, gamma, beta)
        z = z.detach().requires_grad_()
        weight = torch.randn(*((d, OUT) if transposed else (OUT, d)), requires_grad=w_grad)
        bias = torch.randn(OUT, requires_grad=True) if has_bias else None
        linear_shared(z, y_hat, weight, bias, gamma, beta, weight_transposed=transposed).sum().backward()
        assert z.grad is not None


@pytest.mark.parametrize("rms", [False, True], ids=["layer_norm", "rms_norm"])
def test_eager_output_may_be_modified_in_place(rms):
    """The eager form's z is no view among the op's outputs: code after a graph break may modify it in place
    (Switch Transformers' router jitter, ``h *= noise``), and gradients are those of plain autograd."""
    from approxbp_fx.ops.spec import eager_forms

    norm_shared = eager_forms()[torch.ops.approxbp.norm_shared.default]
    x, w, b = rand(2, 3, 8), rand(8), None if rms else rand(8)
    z, _, _ = norm_shared(x, w, b, 0.0, 1, 1e-6 if rms else 1e-5, rms, torch.float64, torch.float64, False)
    z.mul_(2.0)
    ref = 2.0 * (rms_norm_reference(x, w) if rms else layer_norm_reference(x, w, b))
    torch.testing.assert_close(z, ref)
    grads = torch.autograd.grad(z.sum(), [t for t in (x, w, b) if t is not None])
    ref_grads = torch.autograd.grad(ref.sum(), [t for t in (x, w, b) if t is not None])
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r)
