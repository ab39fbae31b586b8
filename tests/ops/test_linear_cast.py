"""approxbp::linear_cast: bit for bit what F.linear (and GPT-2's addmm) computes under bf16 autocast, forward
and gradients, while backward keeps the parameter instead of its bf16 copy.

The reference is plain autograd of F.linear / torch.addmm inside ``torch.autocast("cpu", bfloat16)``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from approxbp_fx.ops.linears import linear_autocast, linear_cast
from approxbp_fx.ops.spec import traceable_forms

IN, OUT = 24, 40
CASES = [
    pytest.param(shape, bias, x_dtype, trainable, transposed,
                 id=f"{len(shape)}d-{'bias' if bias else 'nobias'}-{str(x_dtype)[6:]}-"
                    f"{'trainable' if trainable else 'frozen'}{'-transposed' if transposed else ''}")
    for shape in [(9, IN), (2, 7, IN)] for bias in (True, False) for x_dtype in (torch.float32, torch.bfloat16)
    for trainable in (True, False) for transposed in (False, True)
    if not (transposed and not bias)  # GPT-2's Conv1D always has a bias
]


def _operands(shape, bias, x_dtype, trainable, transposed, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn((IN, OUT) if transposed else (OUT, IN), generator=g).requires_grad_(trainable)
    b = torch.randn(OUT, generator=g, requires_grad=True) if bias else None
    x = torch.randn(shape, generator=g).to(x_dtype).requires_grad_()
    grad = torch.randn(*shape[:-1], OUT, generator=g).to(torch.bfloat16)
    return x, w, b, grad


def _reference(x, w, b, transposed):
    if transposed:
        return torch.addmm(b, x.reshape(-1, IN), w).view(*x.shape[:-1], OUT)
    return F.linear(x, w, b)


def _run(fn, x, w, b, grad):
    """Output and gradients of every operand that needs one, inside bf16 autocast; and the tensors saved."""
    saved = []
    wanted = [t for t in (x, w, b) if t is not None and t.requires_grad]
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = fn()
    return out, torch.autograd.grad(out, wanted, grad), saved


@pytest.mark.parametrize(("shape", "bias", "x_dtype", "trainable", "transposed"), CASES)
def test_bit_for_bit_autocast_linear(shape, bias, x_dtype, trainable, transposed) -> None:
    x, w, b, grad = _operands(shape, bias, x_dtype, trainable, transposed)
    ref, ref_grads, ref_saved = _run(lambda: _reference(x, w, b, transposed), x, w, b, grad)
    out, grads, saved = _run(lambda: linear_autocast(x, w, b, weight_transposed=transposed), x, w, b, grad)
    assert out.dtype == ref.dtype == torch.bfloat16
    assert torch.equal(out, ref)
    for got, want in zip(grads, ref_grads):
        assert got.dtype == want.dtype and torch.equal(got, want)
    # autocast keeps a bf16 copy of the weight (it needs it for x's gradient); the op keeps the weight itself
    # (in whatever layout: F.linear keeps its transpose)
    assert any(t.dtype == torch.bfloat16 and t.numel() == w.numel() for t in ref_saved)
    assert not any(t.dtype == torch.bfloat16 and t.numel() == w.numel() for t in saved)
    assert any(t is w for t in saved)
    # what the weight's gradient needs (x in bf16) is kept only when the weight trains, as autocast does
    assert any(t.shape == x.shape and t.dtype == torch.bfloat16 for t in saved) == trainable


def test_traceable_form_matches() -> None:
    """The form the inductor inner traces computes and differentiates the same (run eagerly here)."""
    x, w, b, grad = _operands((2, 7, IN), True, torch.float32, True, False)
    traced = traceable_forms()[torch.ops.approxbp.linear_cast.default]
    ref, ref_grads, _ = _run(lambda: _reference(x, w, b, False), x, w, b, grad)
    out, grads, _ = _run(lambda: traced(x.to(torch.bfloat16), w, b, False, "region"), x, w, b, grad)
    assert torch.equal(out, ref)
    assert all(torch.equal(g1, g2) for g1, g2 in zip(grads, ref_grads))


def test_outside_autocast_casts_to_x() -> None:
    """Without autocast the op is F.linear of the operands cast to x's dtype (float64 against a float64 reference)."""
    x, w, b, grad = _operands((5, IN), True, torch.float64, True, False)
    out = linear_cast(x, w, b)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, F.linear(x, w.double(), b.double()), rtol=0, atol=0)


def test_opcheck() -> None:
    x, w, b, _ = _operands((3, 4, IN), True, torch.bfloat16, True, False)
    torch.library.opcheck(torch.ops.approxbp.linear_cast.default, (x, w, b, False))
    x, w, b, _ = _operands((6, IN), True, torch.bfloat16, False, True)
    torch.library.opcheck(torch.ops.approxbp.linear_cast.default, (x, w, b, True))


def test_bad_input() -> None:
    x, w, b, _ = _operands((3, IN), True, torch.float32, True, False)
    with pytest.raises(ValueError, match="input features"):
        linear_cast(x[:, :5], w, b)
    with pytest.raises(ValueError, match="bias"):
        linear_cast(x, w, b[:3])
    with pytest.raises(ValueError, match="2-D"):
        linear_cast(x, w[0], b)
    with pytest.raises(TypeError, match="floating-point"):
        linear_cast(x.long(), w, b)
    with pytest.raises(ValueError, match="dtype"):
        linear_autocast(x, w, b, dtype=torch.int8)
