"""Dropout that keeps a 1-bit mask for backward.

    before:  y = F.dropout(x, p, training=True)        saves its mask: CPU a float tensor scaled by
                                                          1/(1-p) (4 bytes/elem), CUDA a bool (1 byte/elem)
    after:   y, mask = approxbp::dropout_packed(x, p)   saves the mask packed 8 per byte (1 bit/elem)

The forward draws exactly what torch's dropout draws for the same RNG state, so y is bit for bit
torch's: on devices with a fused dropout kernel (CUDA, XPU) ``native_dropout``; elsewhere (CPU) a
tensor like x filled by ``bernoulli_(1 - p)``, divided by (1 - p), times x.

The packed mask is also what a linear reading y keeps to rebuild y in backward instead of keeping y
(``approxbp::linear_shared``'s ``mask``): ``mask_multiply(t, mask, scale)`` is ``t * mask * scale``.
"""

from __future__ import annotations

import struct

import torch
from torch import Tensor

from ._fused import is_tracing
from .activations import _code_bytes, _const, _decode_mul, _encode, _planes
from .spec import SAVED, OpSpec, define_op

__all__ = ["dropout_packed", "mask_multiply", "mask_bytes", "dropout_scale"]

_PER_BYTE = 8  # one bit per element
_FUSED_DEVICES = ("cuda", "xpu")


def mask_bytes(t: Tensor) -> int:
    """Bytes of the packed 1-bit mask of a tensor shaped like ``t``."""
    return _code_bytes(t, 1)


def _f32(v: float) -> float:
    return struct.unpack("f", struct.pack("f", v))[0]


def dropout_scale(p: float, dtype: torch.dtype) -> float:
    """The value torch's dropout multiplies kept elements by, as its CPU kernel computes it
    (``noise.div_(1 - p)`` on a tensor of x's dtype): 1 / (1 - p) in float32 arithmetic (float64 for
    float64), rounded to ``dtype``. Pure Python: it also runs while a tracer holds fake tensors."""
    if dtype == torch.float64:
        return 1.0 / (1 - p)
    scale = _f32(1.0 / _f32(1 - p))  # one rounding of an exact quotient: float32 division
    if dtype == torch.float16:
        return struct.unpack("e", struct.pack("e", scale))[0]
    if dtype == torch.bfloat16:  # round to nearest even on the upper 16 bits of the float32
        bits = struct.unpack("I", struct.pack("f", scale))[0]
        bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
        return struct.unpack("f", struct.pack("I", bits))[0]
    return scale


def _pack(keep: Tensor) -> Tensor:
    """keep (0/1 values, any dtype) -> uint8 [ceil(numel / 8)], element e in bit e // m of byte e % m."""
    return _encode(_planes(keep, _PER_BYTE), (0.5,))


def mask_multiply(t: Tensor, mask: Tensor, scale: float) -> Tensor:
    """``t * mask * scale`` for a packed 1-bit ``mask`` of t's elements, rounded once to t's dtype (the
    product torch's dropout forms with its scaled mask). Differentiable in t when run with grad mode on."""
    levels = _const((0.0, scale), t, torch.float64 if t.dtype == torch.float64 else torch.float32)
    decode = _decode_mul.__wrapped__ if torch.is_grad_enabled() and not is_tracing(t) else _decode_mul
    return decode(_planes(t, _PER_BYTE), mask, levels).reshape(-1)[: t.numel()].view(t.shape)


def _dropout_forward(form, x: Tensor, p: float) -> tuple[Tensor, Tensor]:
    if x.device.type in _FUSED_DEVICES:
        y, keep = torch.native_dropout(x, p, True)
        with form.tag(SAVED):
            return y, _pack(keep)
    noise = torch.empty_like(x).bernoulli_(1 - p)
    with form.tag(SAVED):
        mask = _pack(noise)
    return x * noise.div_(1 - p), mask


def _dropout_fake(x: Tensor, p: float) -> tuple[Tensor, Tensor]:
    return torch.empty_like(x), x.new_empty(mask_bytes(x), dtype=torch.uint8)


def _dropout_setup(ctx, inputs, output) -> None:
    x, p = inputs
    ctx.scale = dropout_scale(p, x.dtype)
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(output[1])


def _dropout_backward(ctx, grad_y: Tensor, _grad_mask: Tensor | None):
    (mask,) = ctx.saved_tensors
    return mask_multiply(grad_y, mask, ctx.scale), None


define_op(OpSpec(
    "approxbp::dropout_packed", "(Tensor x, float p) -> (Tensor, Tensor)",
    _dropout_forward, _dropout_fake, _dropout_setup, _dropout_backward,
))


def dropout_packed(x: Tensor, p: float) -> tuple[Tensor, Tensor]:
    """``F.dropout(x, p, training=True)`` (bit for bit, same RNG draws) and its packed 1-bit mask; backward
    keeps only the mask."""
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise TypeError(f"dropout_packed expects a floating-point tensor, got "
                        f"{getattr(x, 'dtype', type(x).__name__)}")
    if not 0.0 < p < 1.0:
        raise ValueError(f"dropout probability must be in (0, 1) for dropout_packed, got {p}")
    y, mask = torch.ops.approxbp.dropout_packed(x, float(p))
    return y, mask
