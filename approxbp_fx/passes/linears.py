"""Linear layers under autocast keep their parameter for backward, not its cast copy (exact).

    before (traced under torch.autocast(dtype=bf16); W, b float32 parameters):
             out = linear(x, W, b)           (nn.Linear, F.linear, or GPT-2's addmm(b, x, W))
                                             backward keeps W.to(bf16): a weight-sized copy per linear,
                                             frozen or trainable (the autocast cache's copy)
    after:   x16 = x.to(bf16)                (left out when x already is bf16)
             out = approxbp::linear_cast(x16, W, b, transposed)
                                             keeps W (the model keeps it anyway) and, where W is trained,
                                             x16 (what autocast's linear keeps); W is cast again in backward

A linear is a site when the tracer recorded an output dtype that differs from its weight's dtype (a half
output from a float32 weight): that is what autocast does, and nothing else gives a linear of a float32
weight a half output. The rewrite computes exactly what autocast's linear computes (casts of x, W and b
to the output dtype, the linear with autocast off), so forward and gradients are bit for bit unchanged.

A site is left alone when its weight is not a parameter or buffer (keeping a computed weight instead of
its half copy would keep more bytes, not fewer), and in graphs holding activation-checkpointed regions
(their recompute must run the same casts as their forward). Under aot_eager and inductor the min-cut
partitioner keeps the parameter rather than its copy because it knows the parameter is kept anyway (the
backend hands it Dynamo's record of which inputs are parameters); under inductor the op's tags ask for
the cast to be rebuilt as well. Linears that the norm family rewrote (they already cast inside
``linear_shared``) are not rewritten again: each candidate names its linear in ``replaces``.
"""

from __future__ import annotations

import torch
import torch.fx as fx
from torch import nn

from ..ops import linears as _ops  # noqa: F401  (registers approxbp::linear_cast)
from ..options import Options
from ._edit import Candidate, GraphEdit
from ._graph import LinearCall, linear_call, module_path, ref_tensor, value

__all__ = ["FAMILY", "find"]

FAMILY = "weight_casts"

_HALF = (torch.float16, torch.bfloat16)


def _is_kept_by_model(gm: fx.GraphModule, ref: object) -> bool:
    """Whether the weight lives as long as the model: a parameter (Dynamo hands parameters in as
    placeholders whose example values are Parameters) or a module attribute (parameter or buffer)."""
    if isinstance(ref, str) or (isinstance(ref, fx.Node) and ref.op == "get_attr"):
        return ref_tensor(gm, ref) is not None
    return isinstance(ref, fx.Node) and ref.op == "placeholder" and isinstance(value(ref), nn.Parameter)


def _short(dtype: torch.dtype) -> str:
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, str(dtype).replace("torch.", ""))


def _describe(ref: object) -> str:
    return ref.name if isinstance(ref, fx.Node) else str(ref)


def find(gm: fx.GraphModule, options: Options) -> list[Candidate]:
    """Every linear that runs under autocast (module docstring), with the reason it is left alone where it is."""
    checkpointed = _checkpointed_regions(gm)
    candidates: list[Candidate] = []
    for n in gm.graph.nodes:
        lin = linear_call(gm, n)
        if lin is None:
            continue
        out, w, xv = value(n), ref_tensor(gm, lin.weight), value(lin.input)
        if out is None or w is None or out.dtype not in _HALF or w.dtype == out.dtype or not w.is_floating_point():
            continue  # not a linear under autocast (or nothing recorded to tell)
        b = None if lin.bias is None else ref_tensor(gm, lin.bias)
        # the copy is kept for x's gradient: without one (x constant, nothing before it trains) none is kept
        needs_x_grad = xv is None or xv.requires_grad
        if checkpointed:
            # measured (LoRA ViT, HF gradient checkpointing, bf16 autocast, eager inner): with a linear of this
            # graph rewritten, the regions' recompute no longer matched their forward (torch's checkpoint raised
            # "aten._to_copy.default invocation index ... not found in storage" in backward)
            reason = (f"the graph holds {checkpointed} activation-checkpointed region(s), whose recompute must run "
                      "the same casts as their forward")
        elif not _is_kept_by_model(gm, lin.weight):
            reason = (f"weight {_describe(lin.weight)} is not a parameter or buffer: keeping it instead of its "
                      f"{_short(out.dtype)} copy would keep more bytes")
        elif xv is not None and not xv.is_floating_point():
            reason = f"input dtype {xv.dtype} is not floating point"
        elif b is not None and not b.is_floating_point():
            reason = f"bias dtype {b.dtype} is not floating point"
        elif not needs_x_grad:
            reason = "no copy kept: the input needs no gradient"
        else:
            reason = ""
        what = "addmm" if lin.transposed else "linear"
        candidates.append(Candidate(
            FAMILY, n.name, module_path(n), f"{what} (autocast {_short(out.dtype)}: weight cast rebuilt)",
            bytes_saved=w.numel() * out.element_size() if needs_x_grad else 0, skip=reason,
            apply=lambda edit, n=n, lin=lin, dtype=out.dtype: _apply(edit, n, lin, dtype),
            replaces=(n,)))
    return candidates


def _checkpointed_regions(gm: fx.GraphModule) -> int:
    """How many activation-checkpointed regions (Dynamo's ``tag_activation_checkpoint`` calls) gm holds."""
    return sum(1 for n in gm.graph.nodes
               if n.op == "call_function" and "tag_activation_checkpoint" in str(getattr(n.target, "__name__", n.target)))


def _apply(edit: GraphEdit, n: fx.Node, lin: LinearCall, dtype: torch.dtype) -> None:
    xv = value(lin.input)
    with edit.inserting_before(n):
        x = lin.input
        if xv is None or xv.dtype != dtype:
            # autocast's cast of the input, as its own node: it keeps nothing for backward, and the op
            # keeps its result (what autocast's linear keeps) when the weight trains
            x = edit.method("to", (lin.input, dtype))
        new = edit.call(torch.ops.approxbp.linear_cast.default,
                        (x, edit.ref(lin.weight), edit.ref(lin.bias), lin.transposed))
    edit.replace(n, new)
