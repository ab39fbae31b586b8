"""A grouped matmul (mixture-of-experts experts) on rows of a norm's output, keeping the norm's y_hat.

    before:  z = rms_norm(x, gamma)                          (any norm ``norm_shared`` rewrites)
             rows = z.view(-1, D)[index]                     a gather: a new tensor
             out = grouped_mm(rows, W, offs)                 keeps rows (and W)
    after:   z, y_hat, rstd = approxbp::norm_shared(x, gamma, ...)
             rows = z.view(-1, D)[index]                     computed, no longer kept
             out = approxbp::grouped_mm_shared(rows, y_hat.view(-1, D), index, W, offs, gamma, ...)
                                                             keeps y_hat (shared), index, offs and W

``W`` is ``[E, D, N]`` (one matrix per expert) and ``offs`` the cumulative row counts per expert (int32,
``[E]``): rows ``offs[e-1]:offs[e]`` go through expert e, rows past ``offs[-1]`` are not computed.
The forward calls the op the model called (``impl``: transformers' ``grouped_mm_fallback``,
torch's private ``_grouped_mm`` or ``F.grouped_mm``), so its values are the model's bit for bit. The backward is
the grouped matmul's: per expert, ``grad_rows = grad @ W_e^T`` and ``grad_W_e = rows^T @ grad`` with the
rows rebuilt from y_hat (the norm's affine, the gather's index and, if a dropout sat between, its 1-bit
mask: ``norms.rebuild_input``).

The per-expert loop depends on the values in ``offs``, which no tracer can follow: the op has no
traceable form and stays opaque under every inner, and its backward is an opaque op of its own, so
AOTAutograd does not trace into the loop either.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from .._compat import grouped_mm
from .dropout import mask_bytes
from .norms import rebuild_input
from .spec import OpSpec, define_op

__all__ = ["GROUPED_MM_IMPLS", "grouped_mm_shared"]


def _transformers_fallback(rows: Tensor, weight: Tensor, offs: Tensor) -> Tensor:
    return torch.ops.transformers.grouped_mm_fallback(rows, weight, offs=offs)


def _aten(rows: Tensor, weight: Tensor, offs: Tensor) -> Tensor:
    return grouped_mm(rows, weight, offs=offs)


def _functional(rows: Tensor, weight: Tensor, offs: Tensor) -> Tensor:
    return F.grouped_mm(rows, weight, offs=offs)


#: impl name -> the grouped matmul the model called (the op's forward calls the same)
GROUPED_MM_IMPLS: dict[str, Callable[[Tensor, Tensor, Tensor], Tensor]] = {
    "transformers": _transformers_fallback,
    "aten": _aten,
    "functional": _functional,
}


def _forward(
    form, rows: Tensor, y_hat: Tensor, index: Tensor | None, weight: Tensor, offs: Tensor, norm_weight: Tensor | None,
    norm_bias: Tensor | None, norm_weight_offset: float, mask: Tensor | None, mask_scale: float, impl: str,
) -> Tensor:
    return GROUPED_MM_IMPLS[impl](rows, weight, offs)


def _fake(rows, y_hat, index, weight, offs, norm_weight, norm_bias, norm_weight_offset, mask, mask_scale, impl):
    return rows.new_empty(rows.shape[0], weight.shape[2])


def _setup(ctx, inputs, output) -> None:
    rows, y_hat, index, weight, offs, norm_weight, norm_bias, offset, mask, mask_scale, _impl = inputs
    # rows are not saved: backward rebuilds them from the shared y_hat (index and mask are kept anyway,
    # by the gather's and the dropout's own backwards)
    ctx.save_for_backward(y_hat, index, weight, offs, norm_weight, norm_bias, mask)
    ctx.offset, ctx.mask_scale, ctx.rows_dtype = offset, mask_scale, rows.dtype


def _backward(ctx, grad: Tensor):
    y_hat, index, weight, offs, norm_weight, norm_bias, mask = ctx.saved_tensors
    need_rows, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[3]
    grad_rows, grad_w = torch.ops.approxbp.grouped_mm_shared_backward(
        grad, y_hat, index, weight, offs, norm_weight, norm_bias, ctx.offset, mask, ctx.mask_scale, ctx.rows_dtype,
        need_rows, need_w)
    return (grad_rows if need_rows else None, None, None, grad_w if need_w else None, None, None, None, None, None,
            None, None)


define_op(OpSpec(
    "approxbp::grouped_mm_shared",
    "(Tensor rows, Tensor y_hat, Tensor? index, Tensor weight, Tensor offs, Tensor? norm_weight, Tensor? norm_bias, "
    "float norm_weight_offset, Tensor? mask, float mask_scale, str impl) -> Tensor",
    _forward, _fake, _setup, _backward, traceable=False,
))


# The backward is an op of its own (no autograd: the grouped matmul is differentiated once), so that a
# tracer of the backward sees one opaque call instead of the per-expert loop.
@torch.library.custom_op("approxbp::grouped_mm_shared_backward", mutates_args=())
def _grouped_backward(
    grad: Tensor, y_hat: Tensor, index: Tensor | None, weight: Tensor, offs: Tensor, norm_weight: Tensor | None,
    norm_bias: Tensor | None, norm_weight_offset: float, mask: Tensor | None, mask_scale: float,
    rows_dtype: torch.dtype, need_rows: bool, need_weight: bool,
) -> tuple[Tensor, Tensor]:
    """(grad of rows, grad of weight); an unneeded one is an empty tensor."""
    grad_rows = grad.new_zeros(grad.shape[0], weight.shape[1]) if need_rows else grad.new_empty(0)
    grad_w = torch.zeros_like(weight, memory_format=torch.contiguous_format) if need_weight else weight.new_empty(0)
    rows = None
    if need_weight:
        rows = rebuild_input(y_hat.reshape(-1, y_hat.shape[-1]), norm_weight, norm_bias, norm_weight_offset,
                             rows_dtype, index, mask, mask_scale)
    start = 0
    for e, end in enumerate(offs.tolist()):  # one device sync for all experts
        if end > start:
            g = grad[start:end]
            if need_rows:
                torch.mm(g, weight[e].t(), out=grad_rows[start:end])
            if need_weight:
                torch.mm(rows[start:end].t(), g, out=grad_w[e])
        start = max(start, end)
    return grad_rows, grad_w


@_grouped_backward.register_fake
def _grouped_backward_fake(grad, y_hat, index, weight, offs, norm_weight, norm_bias, norm_weight_offset, mask,
                           mask_scale, rows_dtype, need_rows, need_weight):
    return (grad.new_empty(grad.shape[0], weight.shape[1]) if need_rows else grad.new_empty(0),
            torch.empty_like(weight, memory_format=torch.contiguous_format) if need_weight else weight.new_empty(0))


def grouped_mm_shared(
    rows: Tensor, y_hat: Tensor, weight: Tensor, offs: Tensor, index: Tensor | None = None,
    norm_weight: Tensor | None = None, norm_bias: Tensor | None = None, norm_weight_offset: float = 0.0,
    mask: Tensor | None = None, mask_scale: float = 1.0, impl: str = "aten",
) -> Tensor:
    """``grouped_mm(rows, weight, offs)`` that keeps the norm's ``y_hat`` for backward instead of ``rows``.

    ``rows`` [S, D] must be ``z.reshape(-1, D)[index]`` (all rows of z when ``index`` is None), then the
    dropout of ``mask``/``mask_scale`` if given (without a mask, ``mask_scale`` is a constant the rows were
    multiplied by), where z is ``y_hat`` through ``norm_weight``/``norm_bias``/``norm_weight_offset`` (as
    ``linear_shared`` takes them). ``weight`` is [E, D, N], ``offs`` [E] the
    cumulative row counts (int32). ``impl`` names the grouped matmul the forward calls
    (``GROUPED_MM_IMPLS``)."""
    if impl not in GROUPED_MM_IMPLS:
        raise ValueError(f"impl must be one of {tuple(GROUPED_MM_IMPLS)}, got {impl!r}")
    if rows.dim() != 2 or weight.dim() != 3 or rows.shape[1] != weight.shape[1]:
        raise ValueError(f"rows [S, D] and weight [E, D, N] expected, got {tuple(rows.shape)} and {tuple(weight.shape)}")
    if offs.dim() != 1 or offs.numel() != weight.shape[0] or offs.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"offs must be a 1-D int32/int64 tensor of {weight.shape[0]} offsets, got {offs.dtype} of "
                        f"shape {tuple(offs.shape)}")
    if index is not None and (index.dim() != 1 or index.dtype not in (torch.int32, torch.int64)):
        raise TypeError(f"index must be a 1-D int32/int64 tensor, got {index.dtype} of shape {tuple(index.shape)}")
    d = y_hat.shape[-1]
    expected = y_hat.numel() // d if index is None else index.numel()
    if y_hat.dim() == 0 or d != rows.shape[1] or rows.shape[0] != expected:
        raise ValueError(f"rows {tuple(rows.shape)} are not {expected} rows of y_hat {tuple(y_hat.shape)}"
                         + ("" if index is None else f" selected by index {tuple(index.shape)}"))
    if mask is not None and (mask.dtype != torch.uint8 or mask.numel() != mask_bytes(rows)):
        raise ValueError(f"mask must be the packed uint8 mask of rows ({mask_bytes(rows)} bytes), got {mask.dtype} "
                         f"of shape {tuple(mask.shape)}")
    return torch.ops.approxbp.grouped_mm_shared(
        rows, y_hat, index, weight, offs, norm_weight, norm_bias, float(norm_weight_offset), mask, float(mask_scale),
        impl)
