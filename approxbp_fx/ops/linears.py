"""A linear layer under autocast that keeps its parameter for backward instead of the parameter's cast copy.

    before (inside torch.autocast, dtype bf16; W and b float32 parameters):
             out = F.linear(x, W, b)      autocast casts x, W, b to bf16; backward keeps W.to(bf16)
                                          (a new weight-sized tensor; for a trainable W the autocast
                                          cache's copy) and, if W is trainable, x.to(bf16)
    after:   x16 = x.to(bf16)                                  (x itself if it already is bf16)
             out = approxbp::linear_cast(x16, W, b, False)     keeps W itself (the model keeps it anyway)
                                                               and, if W is trainable, x16; backward
                                                               casts W to bf16 again

The forward is autocast's linear operation for operation: the weight and the bias are cast to x's dtype
and the linear runs with autocast off, so the output is bit for bit ``F.linear`` under autocast. The
backward runs the matmuls autograd runs for that linear (``grad @ W16`` and ``grad^T @ x16``, bias:
``grad.sum(0)``), so the gradients are bit for bit too, and the weight's and bias's gradients come back in
their own dtypes (autograd's cast backward does the same).

``weight_transposed=True`` takes GPT-2's Conv1D layout: ``addmm(b, x, W)`` with W of shape [in, out].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .spec import RECOMPUTE, OpSpec, define_op

__all__ = ["linear_cast", "linear_autocast"]


def _cast(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    return None if t is None else t.to(dtype)


def _matmul(x: Tensor, weight: Tensor, bias: Tensor | None, transposed: bool) -> Tensor:
    """The linear in the operands' dtype, with autocast off (the operands already have the autocast dtype)."""
    with torch.autocast(x.device.type, enabled=False):
        if not transposed:
            return F.linear(x, weight, bias)
        # GPT-2's Conv1D: one addmm, as the unrewritten graph computes it (a matmul and a separate add
        # would round twice in a half dtype)
        rows = x.reshape(-1, x.shape[-1])
        out = torch.addmm(bias, rows, weight) if bias is not None else rows @ weight
        return out.view(*x.shape[:-1], weight.shape[1])


def _linear_cast_forward(form, x: Tensor, weight: Tensor, bias: Tensor | None, weight_transposed: bool) -> Tensor:
    with form.tag(RECOMPUTE):
        # the cast copies: rebuilt from the parameters in backward instead of kept
        w, b = weight.to(x.dtype), _cast(bias, x.dtype)
    return _matmul(x, w, b, weight_transposed)


def _linear_cast_fake(x: Tensor, weight: Tensor, bias: Tensor | None, weight_transposed: bool) -> Tensor:
    out_features = weight.shape[1] if weight_transposed else weight.shape[0]
    return x.new_empty((*x.shape[:-1], out_features))


def _linear_cast_setup(ctx, inputs, output) -> None:
    x, weight, bias, transposed = inputs
    need_x, need_w = ctx.needs_input_grad[:2]
    # What autocast's linear keeps, with the parameter in place of its cast copy: the weight for x's
    # gradient, x for the weight's gradient (autograd keeps each only when the other needs a gradient).
    ctx.save_for_backward(x if need_w else None, weight if need_x else None)
    ctx.transposed, ctx.x_dtype, ctx.weight_dtype = transposed, x.dtype, weight.dtype
    ctx.bias_dtype = None if bias is None else bias.dtype


def _linear_cast_backward(ctx, grad: Tensor):
    # Backward may run inside the autocast region (or be traced there by AOTAutograd): the casts are
    # explicit, so autocast must not add its own (a traced one of the weight would be hoisted and kept).
    with torch.autocast(grad.device.type, enabled=False):
        return _linear_cast_grads(ctx, grad)


def _linear_cast_grads(ctx, grad: Tensor):
    x, weight = ctx.saved_tensors
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    rows = grad.reshape(-1, grad.shape[-1]).to(ctx.x_dtype)
    grad_x = grad_w = grad_b = None
    if need_x:
        w = weight.to(ctx.x_dtype)  # the cast copy, rebuilt
        grad_x = (rows @ w.t() if ctx.transposed else rows @ w).view(*grad.shape[:-1], -1)
    if need_w:
        x_rows = x.reshape(-1, x.shape[-1])
        grad_w = (x_rows.t() @ rows if ctx.transposed else rows.t() @ x_rows).to(ctx.weight_dtype)
    if need_b and ctx.bias_dtype is not None:
        grad_b = rows.sum(0).to(ctx.bias_dtype)
    return grad_x, grad_w, grad_b, None


define_op(OpSpec(
    "approxbp::linear_cast", "(Tensor x, Tensor weight, Tensor? bias, bool weight_transposed) -> Tensor",
    _linear_cast_forward, _linear_cast_fake, _linear_cast_setup, _linear_cast_backward,
))


def _check(x: Tensor, weight: Tensor, bias: Tensor | None, weight_transposed: bool) -> None:
    for name, t in (("x", x), ("weight", weight), ("bias", bias)):
        if t is not None and (not isinstance(t, Tensor) or not t.is_floating_point()):
            raise TypeError(f"{name} must be a floating-point tensor, got {getattr(t, 'dtype', type(t).__name__)}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D, got shape {tuple(weight.shape)}")
    in_features, out_features = weight.shape if weight_transposed else weight.shape[::-1]
    if x.dim() == 0 or x.shape[-1] != in_features:
        raise ValueError(f"x {tuple(x.shape)} does not end in the weight's {in_features} input features "
                         f"(weight {tuple(weight.shape)}{', transposed' if weight_transposed else ''})")
    if bias is not None and tuple(bias.shape) != (out_features,):
        raise ValueError(f"bias must have shape ({out_features},), got {tuple(bias.shape)}")


def linear_cast(x: Tensor, weight: Tensor, bias: Tensor | None = None, weight_transposed: bool = False) -> Tensor:
    """``F.linear(x, weight.to(x.dtype), bias.to(x.dtype))`` with autocast off, keeping ``weight`` itself
    (not its cast copy) for backward. ``weight_transposed=True`` takes a ``[in, out]`` weight (GPT-2's
    Conv1D: ``addmm(bias, x, weight)``)."""
    _check(x, weight, bias, weight_transposed)
    return torch.ops.approxbp.linear_cast(x, weight, bias, weight_transposed)


def linear_autocast(x: Tensor, weight: Tensor, bias: Tensor | None = None, dtype: torch.dtype | None = None,
                    weight_transposed: bool = False) -> Tensor:
    """What ``F.linear(x, weight, bias)`` computes under ``torch.autocast`` with ``dtype`` (default: the
    current autocast dtype of x's device), bit for bit, but backward keeps ``weight`` instead of its cast
    copy and rebuilds the copy when it needs it."""
    if dtype is None:
        dtype = torch.get_autocast_dtype(x.device.type)
    if dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise ValueError(f"dtype must be a floating-point dtype, got {dtype}")
    return linear_cast(x.to(dtype), weight, bias, weight_transposed)
