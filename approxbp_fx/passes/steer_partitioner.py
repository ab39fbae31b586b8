"""Keep the paper's saved set under inductor without making the ops opaque to it.

Opaque custom ops pin what AOTAutograd saves, but inductor cannot fuse across them (measured: 1.13-1.24x
the step time of plain torch.compile on a small pre-LN transformer). For the inductor inner the ops are
therefore lowered to traceable ``autograd.Function``s whose forwards tag their values with
``torch.fx.traceback.annotate``; the partitioner below turns the tags into recompute policies:

    before (after the rewrite passes):  z, y_hat, r = approxbp::norm_shared(x, ...)       (opaque)
    after:                              z, y_hat, r = NormShared.apply(x, ...)            (traced, tagged)
                                        y_hat, r: MUST_SAVE   (region "saved:<n>" outputs)
                                        z:        PREFER_RECOMPUTE (rebuilt from y_hat in backward)

Without the tags the partitioner merges the backward's rebuilt z with the forward's z and saves z as
well as y_hat (the whole MS-BP saving lost). The 2-bit code needs no tag to be kept (its 16x smaller
than its input, the partitioner's reduction rule keeps it) but gets one anyway so nothing depends on
that heuristic.
"""

from __future__ import annotations

import itertools
import pathlib
from typing import Any

import torch
import torch.fx as fx
from torch import Tensor
from torch._functorch.partitioners import min_cut_rematerialization_partition
from torch._inductor.custom_graph_pass import CustomPartitionerFn, get_hash_for_files
from torch.fx.traceback import annotate
from torch.utils.checkpoint import CheckpointPolicy

from ..ops import activations as act
from ..ops import norms

__all__ = ["lower_to_traceable", "SteeringPartitioner"]

_PACKAGE = pathlib.Path(__file__).resolve().parents[1]
_TAG = "approxbp"
_RECOMPUTE = "recompute"
_region_ids = itertools.count()


def _region() -> dict[str, str]:
    return {_TAG: f"saved:{next(_region_ids)}"}


class _StepAct(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, y: Tensor | None, fn: str, thresholds: list[float], levels: list[float]) -> Tensor:
        step = act.StepDerivative(tuple(thresholds), tuple(levels))
        with annotate(_region()):
            code = act._encode(act._planes(x, 8 // step.bits), act._thresholds(thresholds, x))
        ctx.save_for_backward(code)
        ctx.levels, ctx.bits = tuple(levels), step.bits
        return act.ACTIVATIONS[fn](x) if y is None else y.clone()

    @staticmethod
    def backward(ctx: Any, grad_y: Tensor):
        return act._step_act_backward(ctx, grad_y, None)[0], None, None, None, None


class _NormShared(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor | None, bias: Tensor | None, offset: float, ndim: int,
                eps: float, rms: bool, y_dtype: torch.dtype, z_dtype: torch.dtype):
        rows = x.reshape(-1, norms._row_size(x, ndim))
        with annotate(_region()):
            y, rstd = norms.normalize(rows, eps, rms)
            y_hat = y.to(y_dtype)
        with annotate({_TAG: _RECOMPUTE}):
            z = norms._affine(y_hat, *(None if t is None else t.reshape(-1) for t in (weight, bias)), offset, z_dtype)
        stat_shape = x.shape[: x.dim() - ndim] + (1,) * ndim
        z, y_hat, rstd = z.view(x.shape), y_hat.view(x.shape), rstd.view(stat_shape)
        norms._norm_setup(ctx, (x, weight, bias, offset, ndim, eps, rms, y_dtype, z_dtype), (z, y_hat, rstd))
        # AOTAutograd refuses double backward anyway: keep y_hat and rstd out of the joint graph's gradients
        ctx.mark_non_differentiable(y_hat, rstd)
        return z, y_hat, rstd

    @staticmethod
    def backward(ctx: Any, grad_z: Tensor | None, _grad_y: Tensor | None, _grad_r: Tensor | None):
        return norms._norm_backward_autograd(ctx, grad_z, None, None)


class _LinearShared(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, z: Tensor, y_hat: Tensor, weight: Tensor, bias: Tensor | None, norm_weight: Tensor | None,
                norm_bias: Tensor | None, offset: float, transposed: bool) -> Tensor:
        inputs = (z, y_hat, weight, bias, norm_weight, norm_bias, offset, transposed)
        device = z.device.type
        if torch.is_autocast_enabled(device):
            # Autocast's own casts of z and of the weight would be new tensors the partitioner keeps for
            # backward; made here, they are tagged to be rebuilt (from y_hat, from the parameter).
            dtype = torch.get_autocast_dtype(device)
            with annotate({_TAG: _RECOMPUTE}):
                z_cast, w_cast = z.to(dtype), weight.to(dtype)
            with torch.autocast(device, enabled=False):
                out = norms.linear_forward(z_cast, w_cast, None if bias is None else bias.to(dtype), transposed)
        else:
            out = norms.linear_forward(z, weight, bias, transposed)
        norms._linear_setup(ctx, inputs, out)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor):
        return norms._linear_backward_autograd(ctx, grad)


def _step_act(x, fn, thresholds, levels):
    return _StepAct.apply(x, None, fn, thresholds, levels), None


def _step_attach(x, y, thresholds, levels):
    return _StepAct.apply(x, y, "gelu", thresholds, levels), None


_TRACEABLE = {
    torch.ops.approxbp.step_act.default: _step_act,
    torch.ops.approxbp.step_attach.default: _step_attach,
    torch.ops.approxbp.norm_shared.default: _NormShared.apply,
    torch.ops.approxbp.linear_shared.default: _LinearShared.apply,
}


def lower_to_traceable(gm: fx.GraphModule) -> fx.GraphModule:
    """Swap the approxbp custom-op calls for their traceable, tagged ``autograd.Function`` forms."""
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target in _TRACEABLE:
            n.target = _TRACEABLE[n.target]
    gm.recompile()
    return gm


def _tag(n: fx.Node) -> str | None:
    custom = n.meta.get("custom")
    return custom.get(_TAG) if isinstance(custom, dict) else None


class SteeringPartitioner(CustomPartitionerFn):
    """min-cut partitioning after turning the forwards' tags into recompute policies."""

    def __call__(self, gm: fx.GraphModule, joint_inputs: Any, **kwargs: Any):
        for n in gm.graph.nodes:
            tag = _tag(n)
            if n.op != "call_function" or tag is None:
                continue
            if tag == _RECOMPUTE:
                n.meta["recompute"] = CheckpointPolicy.PREFER_RECOMPUTE
            elif any(_tag(u) != tag for u in n.users):  # a value leaving its region: what backward keeps
                n.meta["recompute"] = CheckpointPolicy.MUST_SAVE
        return min_cut_rematerialization_partition(gm, joint_inputs, **kwargs)

    def uuid(self) -> bytes:
        # Part of inductor's cache key: hash every source of the package, since the ops' backward
        # code (not only this file) decides what a compiled graph computes.
        return get_hash_for_files(tuple(str(p) for p in sorted(_PACKAGE.rglob("*.py"))))
