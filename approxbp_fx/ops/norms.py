"""MS-BP: a norm and the linear layers after it share one saved tensor, the normalized y_hat.

    before:  z = layer_norm(x, gamma, beta)         saves x, mean, rstd
             q = linear(z, Wq, bq); k = ...         each saves z
    after:   z, y_hat, rstd = approxbp::norm_shared(x, gamma, beta)     saves y_hat, rstd
             q = approxbp::linear_shared(z, y_hat, Wq, bq, gamma, beta)  saves y_hat (the same tensor)

The norm's backward is computed from its output (Yang et al., ICML 2024, MS-LN / MS-RMSNorm):
    LayerNorm: dx = rstd * (dy - mean(dy) - y_hat * mean(dy * y_hat))
    RMSNorm:   dx = rstd * (dy - y_hat * mean(dy * y_hat)),   dy = dz * gamma
and the norm's affine stays in its own backward (d gamma = sum dz * y_hat, d beta = sum dz), so the
user's parameters are never folded or copied. The linear's forward uses z exactly as before; its
backward rebuilds z = y_hat * (gamma + offset) + beta when (and only when) the weight needs a gradient.

A norm's output scaled per sample before its linears (an adaptive norm: ``z * (1 + scale) + shift``) shares
y_hat too: ``mul_shared`` is the multiply, keeping y_hat where ``z * s`` keeps z, and ``linear_shared`` takes
the modulation folded into a broadcast affine (weight ``gamma * s``, bias ``beta * s + shift``).

Forwards are opaque custom ops, so AOTAutograd's partitioner cannot recompute y_hat and keep x
instead; their traceable twins (``ops/spec.py``) tag y_hat and rstd as kept and z as rebuilt.
Backwards are plain torch code that the partitioner hands to inductor for fusion.

Double backward is exact: y_hat and rstd are differentiable outputs (a linear's weight gradient is a
function of y_hat), and the norm's backward also takes their gradients, using that both norms' rstd
depends on x only through y_hat: d rstd / dx = -rstd^2 * y_hat / D. With create_graph=True the
backwards run as plain differentiable torch ops (no fused kernels).
"""

from __future__ import annotations

import contextlib
import functools
from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .._compat import HAS_FUSED_RMS_NORM, annotate, fused_rms_norm
from ._fused import fused, is_tracing
from .dropout import mask_bytes, mask_multiply
from .spec import RECOMPUTE, SAVED, TAG, OpSpec, define_op

__all__ = ["SharedNorm", "ms_layer_norm", "ms_rms_norm", "linear_shared", "mul_shared"]


class SharedNorm(NamedTuple):
    """Outputs of an MS norm: ``z`` (what the original norm returned), ``y_hat`` (shared), ``rstd``."""

    z: Tensor
    y_hat: Tensor
    rstd: Tensor


def _as(t: Tensor, dtype: torch.dtype) -> Tensor:
    """t in dtype; t itself when it already is (a no-op ``to`` still costs a dispatch per call, on hot paths)."""
    return t if t.dtype == dtype else t.to(dtype)


def _compute_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _affine(y_hat: Tensor, weight: Tensor | None, bias: Tensor | None, offset: float, out_dtype: torch.dtype) -> Tensor:
    """z = y_hat * (weight + offset) + bias, computed in the compute dtype and rounded once to out_dtype.

    May return y_hat itself (no affine, no cast)."""
    if weight is not None and offset:
        weight = weight + offset
    if all(t is None or t.dtype == out_dtype for t in (y_hat, weight, bias)):
        # one kernel; for half dtypes torch computes each element in float32 and rounds once
        if weight is not None and bias is not None:
            return torch.addcmul(bias, y_hat, weight)
        if weight is not None:
            return y_hat * weight
        return y_hat + bias if bias is not None else y_hat
    z = y_hat.to(_compute_dtype(y_hat))
    if weight is not None:
        z = z * weight.to(z.dtype)
    if bias is not None:
        z = z + bias.to(z.dtype)
    return z.to(out_dtype)


@fused
def _norm_forward(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, offset: float, eps: float, rms: bool,
    y_dtype: torch.dtype, z_dtype: torch.dtype, y_rounded: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """x is [..., D]; returns z, y_hat [..., D] and rstd [..., 1] (float32 or float64)."""
    y, rstd = normalize(x, eps, rms)
    y_hat = y.to(y_dtype)
    # z as the unrewritten norm rounds it: a native norm applies its affine to the unrounded y, a norm
    # written out (LLaMA's RMSNorm) casts y to y_dtype first
    return _affine(y_hat if y_rounded else y, weight, bias, offset, z_dtype), y_hat, rstd


def normalize(x: Tensor, eps: float, rms: bool) -> tuple[Tensor, Tensor]:
    """Rows of x normalized (in float32, or float64 for float64 input) and rstd [rows, 1]."""
    xf = x.to(_compute_dtype(x))
    if rms:
        rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        return xf * rstd, rstd
    var, mean = torch.var_mean(xf, -1, correction=0, keepdim=True)
    rstd = torch.rsqrt(var + eps)
    return (xf - mean) * rstd, rstd


@fused
def _norm_backward(
    grad_z: Tensor | None, y_hat: Tensor, rstd: Tensor, weight: Tensor | None, offset: float, rms: bool,
    need_x: bool, need_w: bool, need_b: bool, x_dtype: torch.dtype,
    grad_y: Tensor | None = None, grad_r: Tensor | None = None,
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Gradients of x, weight, bias from the output (all [rows, D] / [D]; rstd [rows, 1]).

    ``grad_y`` and ``grad_r`` (gradients of the y_hat and rstd outputs) only arrive when differentiating
    a second time: the linears read y_hat without giving it a gradient of its own."""
    y = y_hat.to(rstd.dtype)
    dz = None if grad_z is None else grad_z.to(rstd.dtype)
    grad_w = (dz * y).sum(0) if need_w and dz is not None else None
    grad_b = dz.sum(0) if need_b and dz is not None else None
    if not need_x:
        return None, grad_w, grad_b
    # y_hat's vector-Jacobian product, applied to everything that reached y_hat (through z and directly)
    dy = None if dz is None else (dz * (weight.to(dz.dtype) + offset) if weight is not None else dz)
    if grad_y is not None:
        dy = grad_y.to(rstd.dtype) if dy is None else dy + grad_y.to(rstd.dtype)
    grad_x = None
    if dy is not None:
        inner = dy - y * (dy * y).mean(-1, keepdim=True)
        if not rms:
            inner = inner - dy.mean(-1, keepdim=True)
        grad_x = rstd * inner
    if grad_r is not None:
        # d rstd / dx = -rstd^2 * y_hat / D, for LayerNorm (shift invariance) and RMSNorm alike
        from_rstd = (grad_r.to(rstd.dtype) * rstd * rstd / y.shape[-1]) * y
        grad_x = -from_rstd if grad_x is None else grad_x - from_rstd
    return (None if grad_x is None else grad_x.to(x_dtype)), grad_w, grad_b


def _layer_norm_backward_aten(
    grad_z: Tensor, y_hat: Tensor, rstd: Tensor, weight: Tensor | None, offset: float, rms: bool,
    need_x: bool, need_w: bool, need_b: bool, x_dtype: torch.dtype,
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """The MS-LN backward by aten's LayerNorm backward: given y_hat as its input with mean 0 and rstd 1,
    it returns (dy - mean(dy) - y_hat * mean(dy * y_hat)), sum(dz * y_hat) and sum(dz); times rstd
    that is dx. One fused kernel instead of a compiled graph call (eager mode only)."""
    rows = y_hat.shape[0]
    ones = rstd.new_ones(rows, 1)
    w = None if weight is None else (weight + offset if offset else weight)
    d = y_hat.shape[1]
    # aten reads bias only for its shape, and fails without one when asked for its gradient
    bias_like = grad_z.new_empty(d) if need_b else None
    w_like = w if w is not None or not need_w else grad_z.new_ones(d)
    dx, dw, db = torch.ops.aten.native_layer_norm_backward(
        grad_z, y_hat, [d], ones.new_zeros(rows, 1), ones, w_like, bias_like, [need_x, need_w, need_b])
    # dx is aten's fresh output: scaled in place (a new [rows, D] tensor here cost more than the multiply)
    return (None if dx is None else _as(dx.mul_(rstd), x_dtype)), dw, db


def _norm_shared_forward(
    form, x: Tensor, weight: Tensor | None, bias: Tensor | None, weight_offset: float, normalized_ndim: int,
    eps: float, rms: bool, y_dtype: torch.dtype, z_dtype: torch.dtype, y_rounded: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    d = _row_size(x, normalized_ndim)
    rows = x.reshape(-1, d)
    # z made in x's own shape where the norm is over the last dim: not a view, since a view among a
    # Function's several outputs may not be modified in place, and a graph that returns z (a graph break
    # before its linears) hands it to code that may (Switch Transformers' router jitter: ``h *= noise``)
    shaped = x if normalized_ndim == 1 else rows
    flat = [None if t is None else t.reshape(-1) for t in (weight, bias)]
    if form.traced:
        # y_hat and rstd are what backward keeps; z is rebuilt from y_hat, so it must be computed from it
        with form.tag(SAVED):
            y, rstd = normalize(rows, eps, rms)
            y_hat = y.to(y_dtype)
        with form.tag(RECOMPUTE):
            z = _affine(y_hat, *flat, weight_offset, z_dtype)
    elif x.dtype in (torch.float32, torch.float64) and y_dtype == x.dtype and (HAS_FUSED_RMS_NORM or not rms):
        # aten's own fused kernels (no compile, no guard overhead): y_hat and rstd in one pass
        if rms:
            y_hat, rstd = fused_rms_norm(rows, d, eps)
        else:
            # a weight of ones: without a weight aten's CPU kernel took 3x as long (measured on [1040, 256]
            # fp32: 250 vs 77 us); with ones it computes the same y_hat
            y_hat, _mean, rstd = torch.native_layer_norm(rows, [d], filled(d, 1.0, x.device, x.dtype), None, eps)
        z = _affine(y_hat.view(shaped.shape), *flat, weight_offset, z_dtype)
    else:
        # A written-out norm (y_rounded) runs as the same eager ops the model runs, LLaMA's RMSNorm bit for
        # bit; a compiled kernel reduces in another order, and in bf16 a last-bit difference in y becomes a
        # different rounding of y_hat, which float32 adapters after the norm would see.
        body = _norm_forward.__wrapped__ if y_rounded else _norm_forward
        z, y_hat, rstd = body(shaped, *flat, weight_offset, eps, rms, y_dtype, z_dtype, y_rounded)
    if not form.traced and (z is y_hat or z._base is y_hat):  # no affine, no cast: a custom op's outputs must not alias
        z = z.clone()
    stat_shape = x.shape[: x.dim() - normalized_ndim] + (1,) * normalized_ndim
    return (z if z.shape == x.shape else z.view(x.shape)), y_hat.view(x.shape), rstd.view(stat_shape)


@functools.lru_cache(maxsize=16)
def filled(d: int, value: float, device: torch.device, dtype: torch.dtype) -> Tensor:
    """A [d] vector of one value, made once per arguments (a cached tensor: never written to). Real tensors
    only: a tracer's run makes its own."""
    return torch.full((d,), value, device=device, dtype=dtype)


def _norm_shared_fake(x, weight, bias, weight_offset, normalized_ndim, eps, rms, y_dtype, z_dtype, y_rounded):
    stat_shape = x.shape[: x.dim() - normalized_ndim] + (1,) * normalized_ndim
    return (
        x.new_empty(x.shape, dtype=z_dtype),
        x.new_empty(x.shape, dtype=y_dtype),
        x.new_empty(stat_shape, dtype=_compute_dtype(x)),
    )


def _row_size(x: Tensor, ndim: int) -> int:
    size = 1
    for s in x.shape[x.dim() - ndim:]:
        size = size * s
    return size


def _rows(t: Tensor | None, n: int) -> Tensor | None:
    return None if t is None else t.reshape(-1, n)


def _norm_setup(ctx, inputs, output) -> None:
    x, weight, bias, offset, ndim, _eps, rms, _y, _z, _rounded = inputs
    _z_out, y_hat, rstd = output
    # y_hat and rstd stay differentiable outputs (a linear's weight gradient is a function of y_hat, so
    # create_graph=True differentiates through them); unused, their gradients arrive as None, not zeros.
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(y_hat, rstd, weight)
    ctx.offset, ctx.ndim, ctx.rms, ctx.x_dtype = offset, ndim, rms, x.dtype
    ctx.has_bias = bias is not None


def _norm_backward_autograd(ctx, grad_z: Tensor | None, grad_y: Tensor | None, grad_r: Tensor | None):
    y_hat, rstd, weight = ctx.saved_tensors
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    d = _row_size(y_hat, ctx.ndim)
    gz, gy, gr = _rows(grad_z, d), _rows(grad_y, d), _rows(grad_r, 1)
    args = (y_hat.reshape(-1, d), rstd.reshape(-1, 1), None if weight is None else weight.reshape(-1),
            ctx.offset, ctx.rms, need_x, need_w and weight is not None, need_b and ctx.has_bias, ctx.x_dtype)
    tracing = is_tracing(y_hat)
    if (torch.is_grad_enabled() and not tracing) or grad_z is None or grad_y is not None or grad_r is not None:
        # create_graph=True or a second-order pass: the formula as plain, differentiable torch ops
        grad_x, grad_w, grad_b = _norm_backward.__wrapped__(gz, *args, gy, gr)
    elif not ctx.rms and y_hat.dtype == grad_z.dtype == rstd.dtype and not tracing:
        grad_x, grad_w, grad_b = _layer_norm_backward_aten(gz, *args)
    else:
        grad_x, grad_w, grad_b = _norm_backward(gz, *args)
    if grad_x is not None:
        grad_x = grad_x.view(y_hat.shape)
    if grad_w is not None:
        grad_w = _as(grad_w.view(weight.shape), weight.dtype)
    if grad_b is not None:
        grad_b = grad_b.view(weight.shape if weight is not None else y_hat.shape[y_hat.dim() - ctx.ndim:])
    return grad_x, grad_w, grad_b, None, None, None, None, None, None, None


define_op(OpSpec(
    "approxbp::norm_shared",
    "(Tensor x, Tensor? weight, Tensor? bias, float weight_offset, int normalized_ndim, float eps, bool rms, "
    "ScalarType y_dtype, ScalarType z_dtype, bool y_rounded) -> (Tensor, Tensor, Tensor)",
    _norm_shared_forward, _norm_shared_fake, _norm_setup, _norm_backward_autograd,
    # AOTAutograd refuses double backward anyway: keep y_hat and rstd out of the joint graph's gradients
    traced_non_differentiable=(1, 2),
))


def _linear_shared_forward(
    form, z: Tensor, y_hat: Tensor, weight: Tensor, bias: Tensor | None, norm_weight: Tensor | None,
    norm_bias: Tensor | None, norm_weight_offset: float, weight_transposed: bool, index: Tensor | None,
    mask: Tensor | None, mask_scale: float, norm_dtype: torch.dtype | None,
) -> Tensor:
    device = z.device.type
    if not torch.is_autocast_enabled(device):
        return linear_forward(z, weight, bias, weight_transposed)
    # Autocast's own casts of z and of the weight would be new tensors a partitioner keeps for backward;
    # made here, they are tagged to be rebuilt (from y_hat, from the parameter). Same values as F.linear
    # under autocast, which casts all three operands to the autocast dtype.
    dtype = torch.get_autocast_dtype(device)
    with form.tag(RECOMPUTE):
        z_cast, w_cast = z.to(dtype), weight.to(dtype)
    with torch.autocast(device, enabled=False):
        return linear_forward(z_cast, w_cast, None if bias is None else bias.to(dtype), weight_transposed)


def linear_forward(z: Tensor, weight: Tensor, bias: Tensor | None, transposed: bool) -> Tensor:
    if transposed:  # GPT-2's Conv1D: addmm(bias, z, W) with W of shape [in, out]
        out = z.reshape(-1, z.shape[-1]) @ weight
        if bias is not None:
            out = out + bias
        return out.view(*z.shape[:-1], weight.shape[1])
    return F.linear(z, weight, bias)


def _linear_shared_fake(z, y_hat, weight, bias, norm_weight, norm_bias, norm_weight_offset, weight_transposed, index,
                        mask, mask_scale, norm_dtype):
    out_features = weight.shape[1] if weight_transposed else weight.shape[0]
    return z.new_empty((*z.shape[:-1], out_features))


def _linear_setup(ctx, inputs, output) -> None:
    z, y_hat, weight, bias, norm_weight, norm_bias, offset, transposed, index, mask, mask_scale, norm_dtype = inputs
    # z itself is not saved: backward rebuilds it from the shared y_hat (and the index and mask, which
    # the gather and the dropout before the linear keep anyway).
    ctx.save_for_backward(y_hat, weight, norm_weight, norm_bias, index, mask)
    ctx.offset, ctx.transposed, ctx.z_dtype, ctx.mask_scale = offset, transposed, z.dtype, mask_scale
    ctx.norm_dtype = norm_dtype
    ctx.bias_dtype = None if bias is None else bias.dtype
    # Under autocast the forward's matmul ran in a lower precision than z and the weight: the
    # backward runs its matmuls in that dtype too (backward usually runs outside the autocast region).
    ctx.compute_dtype = output.dtype


def rebuild_input(
    y_hat: Tensor, norm_weight: Tensor | None, norm_bias: Tensor | None, offset: float, z_dtype: torch.dtype,
    index: Tensor | None = None, mask: Tensor | None = None, mask_scale: float = 1.0,
    norm_dtype: torch.dtype | None = None,
) -> Tensor:
    """The linear's input rows from the shared y_hat [rows, in]: the norm's affine (rounded to
    ``norm_dtype``, the dtype of the norm's output, then cast exactly to the linear's wider ``z_dtype``: a
    PEFT adapter's float32 upcast of a bf16 norm), then the rows the linear read (``index``: an expert's
    gathered tokens), then the dropout mask applied to them, or without a mask a constant the output was
    multiplied by (``mask_scale``: T5's ``z * d_model**-0.5``)."""
    if index is not None:
        y_hat = y_hat[index]  # advanced indexing, as the gather itself: negative indices count from the end
    z = _affine(y_hat, norm_weight, norm_bias, offset, norm_dtype or z_dtype)
    if z.dtype != z_dtype:
        z = z.to(z_dtype)  # a widening cast: exact, as the model's own
    if mask is not None:
        z = mask_multiply(z, mask, mask_scale)
    elif mask_scale != 1.0:
        z = z * mask_scale  # the same op as the model's: one rounding, in z's dtype
    return z


def _linear_backward(
    grad: Tensor, y_hat: Tensor, weight: Tensor, norm_weight: Tensor | None, norm_bias: Tensor | None,
    offset: float, transposed: bool, z_dtype: torch.dtype, compute_dtype: torch.dtype, need_z: bool, need_w: bool,
    need_b: bool, index: Tensor | None = None, mask: Tensor | None = None, mask_scale: float = 1.0,
    norm_dtype: torch.dtype | None = None,
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """grad is [rows, out], y_hat [rows, in] (before ``index``); matmuls in ``compute_dtype``."""
    grad_z = grad_w = None
    grad = _as(grad, compute_dtype)
    grad_b = grad.sum(0) if need_b else None
    if need_z:
        w = _as(weight, compute_dtype)
        grad_z = grad @ w.t() if transposed else grad @ w
    if need_w and _affine_in_weight_space(grad, y_hat, norm_weight, norm_bias, z_dtype, index, mask, mask_scale,
                                          norm_dtype):
        grad_w = _weight_grad_of_affine(grad, y_hat, norm_weight, norm_bias, offset, transposed, grad_b)
    elif need_w:
        # traced (inductor), the rebuild is tagged to be recomputed in backward: where y_hat is a graph input
        # (handed on from the previous graph), a partitioner would otherwise keep the rebuilt z as well
        with (annotate({TAG: RECOMPUTE}) if is_tracing(grad) else contextlib.nullcontext()):
            z = _as(rebuild_input(y_hat, norm_weight, norm_bias, offset, z_dtype, index, mask, mask_scale,
                                  norm_dtype), compute_dtype)
        grad_w = z.t() @ grad if transposed else grad.t() @ z
    return grad_z, grad_w, grad_b


def _affine_in_weight_space(
    grad: Tensor, y_hat: Tensor, norm_weight: Tensor | None, norm_bias: Tensor | None, z_dtype: torch.dtype,
    index: Tensor | None, mask: Tensor | None, mask_scale: float, norm_dtype: torch.dtype | None,
) -> bool:
    """Whether the weight gradient may apply the norm's affine to ``grad^T y_hat`` instead of rebuilding z:
    a plain norm -> linear in float32/float64 (no gather, mask, scale or cast, whose rounding z's own
    order fixes), run for real (a tracer fuses the rebuild itself) and not differentiated again."""
    # cheapest checks first: this runs once per linear per backward
    if index is not None or mask is not None or mask_scale != 1.0 or norm_dtype not in (None, z_dtype) \
            or z_dtype not in (torch.float32, torch.float64) or torch.is_grad_enabled():
        return False
    for t in (grad, y_hat, norm_weight, norm_bias):
        # one dtype throughout, and a [D] affine (not a modulation's broadcast rows)
        if t is not None and (t.dtype != z_dtype or (t is norm_weight or t is norm_bias) and t.dim() != 1):
            return False
    return not is_tracing(grad)


def _weight_grad_of_affine(grad: Tensor, y_hat: Tensor, norm_weight: Tensor | None, norm_bias: Tensor | None,
                           offset: float, transposed: bool, grad_sum: Tensor | None = None) -> Tensor:
    """``grad^T z`` for z = y_hat * (w + offset) + b without z: ``(grad^T y_hat) * (w + offset) + outer(sum
    grad, b)``, work on the weight's size instead of a new input-sized tensor per linear (equal to
    rounding; measured on a ViT layer, each rebuilt z took longer than the matmul's share it saves)."""
    grad_w = y_hat.t() @ grad if transposed else grad.t() @ y_hat  # [in, out] or [out, in]
    if norm_weight is not None:
        w = norm_weight + offset if offset else norm_weight
        grad_w.mul_(w[:, None] if transposed else w)
    if norm_bias is not None:
        grad_sum = grad.sum(0) if grad_sum is None else grad_sum  # the linear's own bias gradient, if it has one
        if transposed:
            grad_w.addr_(norm_bias, grad_sum)
        else:
            grad_w.addr_(grad_sum, norm_bias)
    return grad_w


def _affine_rows(t: Tensor | None, y_hat: Tensor) -> Tensor | None:
    """A norm weight or bias as it multiplies rows [-1, D] of y_hat: a [D] one as it is, a broadcast one (a
    per-sample modulation folded into the affine, [B, 1, D]) expanded to y_hat's shape first (a transient
    of backward, never kept)."""
    if t is None or t.dim() <= 1:
        return t
    return t.expand(y_hat.shape).reshape(-1, y_hat.shape[-1])


def _linear_backward_autograd(ctx, grad: Tensor):
    # plain torch ops: with create_graph=True they record a graph (through y_hat into the norm's backward)
    y_hat, weight, norm_weight, norm_bias, index, mask = ctx.saved_tensors
    need_z, _, need_w, need_b = ctx.needs_input_grad[:4]
    norm_weight, norm_bias = _affine_rows(norm_weight, y_hat), _affine_rows(norm_bias, y_hat)
    grad_z, grad_w, grad_b = _linear_backward(
        grad.reshape(-1, grad.shape[-1]), y_hat.reshape(-1, y_hat.shape[-1]), weight, norm_weight, norm_bias,
        ctx.offset, ctx.transposed, ctx.z_dtype, ctx.compute_dtype, need_z, need_w, need_b and ctx.bias_dtype is not None,
        index, mask, ctx.mask_scale, ctx.norm_dtype,
    )
    if grad_z is not None:
        grad_z = _as(grad_z.view(*grad.shape[:-1], y_hat.shape[-1]), ctx.z_dtype)  # z: rows of y_hat
    if grad_w is not None:
        grad_w = _as(grad_w, weight.dtype)
    if grad_b is not None:
        grad_b = _as(grad_b, ctx.bias_dtype)
    return grad_z, None, grad_w, grad_b, None, None, None, None, None, None, None, None


define_op(OpSpec(
    "approxbp::linear_shared",
    "(Tensor z, Tensor y_hat, Tensor weight, Tensor? bias, Tensor? norm_weight, Tensor? norm_bias, "
    "float norm_weight_offset, bool weight_transposed, Tensor? index, Tensor? mask, float mask_scale, "
    "ScalarType? norm_dtype) -> Tensor",
    _linear_shared_forward, _linear_shared_fake, _linear_setup, _linear_backward_autograd,
))


def _mul_shared_forward(form, h: Tensor, y_hat: Tensor, scale: Tensor, norm_weight: Tensor | None,
                        norm_bias: Tensor | None, norm_weight_offset: float) -> Tensor:
    return h * scale


def _mul_shared_fake(h, y_hat, scale, norm_weight, norm_bias, norm_weight_offset):
    return h.new_empty(h.shape, dtype=torch.result_type(h, scale))


def _mul_setup(ctx, inputs, output) -> None:
    h, y_hat, scale, norm_weight, norm_bias, offset = inputs
    # h itself is not saved: the scale's gradient rebuilds it from the shared y_hat (only that gradient
    # needs h, as autograd's mul keeps its input only for the other operand's gradient)
    need_scale = ctx.needs_input_grad[2]
    ctx.save_for_backward(scale, *((y_hat, norm_weight, norm_bias) if need_scale else (None, None, None)))
    ctx.offset, ctx.h_dtype = offset, h.dtype


def _mul_backward(ctx, grad: Tensor):
    scale, y_hat, norm_weight, norm_bias = ctx.saved_tensors
    need_h, _, need_scale = ctx.needs_input_grad[:3]
    grad_h = _as(grad * scale, ctx.h_dtype) if need_h else None
    grad_scale = None
    if need_scale:
        h = _affine(y_hat, norm_weight, norm_bias, ctx.offset, ctx.h_dtype)
        grad_scale = (grad * h).to(scale.dtype).sum_to_size(scale.shape)
    return grad_h, None, grad_scale, None, None, None


define_op(OpSpec(
    "approxbp::mul_shared",
    "(Tensor h, Tensor y_hat, Tensor scale, Tensor? norm_weight, Tensor? norm_bias, float norm_weight_offset) "
    "-> Tensor",
    _mul_shared_forward, _mul_shared_fake, _mul_setup, _mul_backward,
))


def _check_normalized_shape(x: Tensor, normalized_shape: Sequence[int] | int) -> int:
    shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise TypeError(f"expected a floating-point tensor, got {getattr(x, 'dtype', type(x).__name__)}")
    if len(shape) == 0 or tuple(x.shape[x.dim() - len(shape):]) != shape:
        raise ValueError(f"normalized_shape {shape} does not match the trailing dims of input {tuple(x.shape)}")
    return len(shape)


def ms_layer_norm(
    x: Tensor, normalized_shape: Sequence[int] | int, weight: Tensor | None = None, bias: Tensor | None = None,
    eps: float = 1e-5,
) -> SharedNorm:
    """``F.layer_norm`` whose backward needs only its normalized output (saves y_hat and rstd).

    ``z`` is the usual output; pass ``z`` and ``y_hat`` (with this norm's weight/bias) to
    :func:`linear_shared` so the linear layers after the norm keep y_hat instead of their own copy of z.
    """
    ndim = _check_normalized_shape(x, normalized_shape)
    return SharedNorm(*torch.ops.approxbp.norm_shared(x, weight, bias, 0.0, ndim, eps, False, x.dtype, x.dtype, False))


def ms_rms_norm(
    x: Tensor, normalized_shape: Sequence[int] | int, weight: Tensor | None = None, eps: float = 1e-6,
    weight_offset: float = 0.0, y_dtype: torch.dtype | None = None, z_dtype: torch.dtype | None = None,
    round_y: bool = False,
) -> SharedNorm:
    """RMSNorm, ``z = y_hat * (weight + weight_offset)`` with ``y_hat = x * rsqrt(mean(x^2) + eps)``.

    Statistics are computed in float32 (HF's LLaMA/T5 convention); ``weight_offset=1.0`` expresses
    Gemma's ``(1 + weight)``. ``y_dtype``/``z_dtype`` (default: x's dtype) set what y_hat is stored in
    and what z is returned in, to reproduce a model's casts. The weight multiplies the float32 y, rounded
    once to ``z_dtype`` (as ``F.rms_norm`` does), or with ``round_y=True`` y rounded to ``y_dtype`` first
    (as LLaMA's RMSNorm, ``weight * y.to(input_dtype)``, does).
    """
    ndim = _check_normalized_shape(x, normalized_shape)
    return SharedNorm(*torch.ops.approxbp.norm_shared(
        x, weight, None, float(weight_offset), ndim, eps, True, y_dtype or x.dtype, z_dtype or x.dtype, round_y))


def linear_shared(
    z: Tensor, y_hat: Tensor, weight: Tensor, bias: Tensor | None = None, norm_weight: Tensor | None = None,
    norm_bias: Tensor | None = None, norm_weight_offset: float = 0.0, weight_transposed: bool = False,
    index: Tensor | None = None, mask: Tensor | None = None, mask_scale: float = 1.0,
    norm_dtype: torch.dtype | None = None,
) -> Tensor:
    """``F.linear(z, weight, bias)`` that keeps the norm's ``y_hat`` for backward instead of ``z``.

    ``norm_weight``/``norm_bias``/``norm_weight_offset`` must be those that produced ``z`` from
    ``y_hat``; they are only read to rebuild z for the weight gradient. ``weight_transposed=True``
    takes a ``[in, out]`` weight (GPT-2's Conv1D: ``addmm(bias, z, weight)``).

    z may also be rows of the norm's output, and/or that output after dropout: ``index`` (1-D, int64)
    says which rows of ``y_hat.reshape(-1, in)`` z holds (``z = out[index]``, as a mixture-of-experts
    block feeds an expert), ``mask``/``mask_scale`` the dropout applied to them last (the 1-bit mask of
    ``approxbp_fx.ops.dropout.dropout_packed`` and the value kept elements were scaled by). Without a
    mask, ``mask_scale`` is a constant the norm's output was multiplied by before the linear.

    ``norm_dtype`` is the dtype of the norm's output when z is a widening cast of it (a bf16 norm read by
    a float32 adapter: ``z = out.to(torch.float32)``); backward rebuilds the output in that dtype and
    casts it, as the model did. y_hat may then be kept in the narrow dtype.

    ``norm_weight``/``norm_bias`` may also broadcast to y_hat's shape (``[B, 1, D]`` for y_hat ``[B, T, D]``):
    the norm's affine with a per-sample scale and shift folded in (a diffusion transformer's adaptive norm,
    ``z * (1 + scale) + shift``: weight ``(gamma + offset) * (1 + scale)``, bias ``beta * (1 + scale) + shift``).
    z then holds y_hat's rows in y_hat's order (no ``index``).
    """
    for name, t in (("norm_weight", norm_weight), ("norm_bias", norm_bias)):
        if t is not None and t.dim() > 1 and (index is not None or _broadcasts_to(t, y_hat) is not None):
            raise ValueError(f"{name} {tuple(t.shape)} must be [{y_hat.shape[-1]}] or broadcast to y_hat "
                             f"{tuple(y_hat.shape)} (without an index)")
    rows = y_hat.reshape(-1, y_hat.shape[-1])
    expected = (rows.shape[0] if index is None else index.numel(), y_hat.shape[-1])
    if z.dim() == 0 or (z.numel() // z.shape[-1], z.shape[-1]) != expected:
        raise ValueError(f"z {tuple(z.shape)} does not hold {expected[0]} rows of y_hat {tuple(y_hat.shape)}"
                         + ("" if index is None else f" selected by index {tuple(index.shape)}"))
    if index is not None and (index.dim() != 1 or index.dtype not in (torch.int32, torch.int64)):
        raise TypeError(f"index must be a 1-D int32/int64 tensor, got {index.dtype} of shape {tuple(index.shape)}")
    if mask is not None and (mask.dtype != torch.uint8 or mask.numel() != mask_bytes(z)):
        raise ValueError(f"mask must be the packed uint8 mask of z ({mask_bytes(z)} bytes), got {mask.dtype} "
                         f"of shape {tuple(mask.shape)}")
    return torch.ops.approxbp.linear_shared(
        z, y_hat, weight, bias, norm_weight, norm_bias, float(norm_weight_offset), weight_transposed, index, mask,
        float(mask_scale), norm_dtype)


def _broadcasts_to(t: Tensor, target: Tensor) -> str | None:
    """None when t broadcasts to target's shape, else why not."""
    try:
        shape = torch.broadcast_shapes(t.shape, target.shape)
    except RuntimeError as e:
        return str(e)
    return None if shape == target.shape else f"broadcasting gives {tuple(shape)}"


def mul_shared(
    h: Tensor, y_hat: Tensor, scale: Tensor, norm_weight: Tensor | None = None, norm_bias: Tensor | None = None,
    norm_weight_offset: float = 0.0,
) -> Tensor:
    """``h * scale`` for h = y_hat * (norm_weight + offset) + norm_bias (a norm's output, or its output
    already modulated, with that modulation folded into norm_weight/norm_bias), keeping the shared
    ``y_hat`` for backward instead of h. ``scale`` (a per-sample scale, ``1 + scale[:, None]``) broadcasts to
    h's shape; the scale's gradient rebuilds h from y_hat."""
    for name, t in (("h", h), ("y_hat", y_hat), ("scale", scale)):
        if not isinstance(t, Tensor) or not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {getattr(t, 'dtype', type(t).__name__)}")
    if y_hat.shape != h.shape:
        raise ValueError(f"y_hat {tuple(y_hat.shape)} must have h's shape {tuple(h.shape)}")
    for name, t in (("scale", scale), ("norm_weight", norm_weight), ("norm_bias", norm_bias)):
        why = None if t is None else _broadcasts_to(t, h)
        if why is not None:
            raise ValueError(f"{name} {tuple(t.shape)} does not broadcast to h {tuple(h.shape)}: {why}")
    return torch.ops.approxbp.mul_shared(h, y_hat, scale, norm_weight, norm_bias, float(norm_weight_offset))
