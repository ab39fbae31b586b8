"""MS-BP: a norm and the linear layers after it share one saved tensor.

    before:  z = layer_norm(x, gamma, beta)                  (or rms_norm, nn.LayerNorm, nn.RMSNorm, or any
             q = linear(z, Wq, bq); k = linear(z.view(..), Wk)   written-out norm: LLaMA's or T5's RMSNorm,
             h = x + z                                        Gemma's (1 + weight), LayerNorm by hand, ...)
    after:   z, y_hat, rstd = approxbp::norm_shared(x, gamma, beta, ...)
             q = approxbp::linear_shared(z, y_hat, Wq, bq, gamma, beta, ...)
             k = approxbp::linear_shared(z.view(..), y_hat.view(..), Wk, None, gamma, beta, ...)
             h = x + z

Norm calls and modules are matched by their targets. Norms written out in pointwise ops, casts and
last-dim reductions are identified by what they compute (``_norm_forms.py``): the subgraph from x to z
is evaluated on probe rows and compared with ``norm(x) * (weight + offset) + bias``, which gives x, the
parameters, eps and the dtypes the op needs; a form the op does not compute (eps outside the root) is
reported and left alone.

A norm is rewritten only when every consumer of its output is a linear layer (``linear``, nn.Linear,
GPT-2's ``addmm``), possibly behind view/reshape, or an op that keeps nothing of it (add, dropout), and
at least one of those linears would keep its own copy (its weight needs a gradient). Any other consumer
might keep the output itself, so the site is left alone and the report names that consumer.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Union

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ..options import Options
from ._edit import Candidate, GraphEdit
from ._graph import (
    ADD_FUNCTIONS, LAYER_NORM_FUNCTIONS, is_basic_index, LINEAR_FUNCTIONS, RMS_NORM_FUNCTIONS, VIEW_FUNCTIONS, VIEW_METHODS, arg,
    is_call, module_path, target_module, tensor_bytes, value,
)
from ._norm_forms import identify, is_reduction

__all__ = ["FAMILY", "find"]

FAMILY = "norms"

_DROPOUT = (F.dropout, torch.dropout)


# A parameter reference: a node, or (symbolic_trace graphs' call_module norms) the qualified name of a
# module attribute, which becomes a get_attr node only when the site is applied.
Ref = Union[fx.Node, str, None]


@dataclass
class _Norm:
    z: fx.Node  # the output the graph uses
    x: fx.Node
    weight: Ref
    bias: Ref
    offset: float
    ndim: int
    eps: float
    rms: bool
    pattern: str
    y_dtype: torch.dtype | None = None  # None: x's dtype
    z_dtype: torch.dtype | None = None
    nodes: frozenset[fx.Node] = frozenset()  # a computed norm's nodes (x and parameters excluded)
    skip: str = ""  # why the form must be left alone whatever its consumers; empty: it can be rewritten


@dataclass
class _Consumer:
    node: fx.Node  # the linear (or addmm) call
    chain: list[fx.Node] = field(default_factory=list)  # view ops between z and the linear
    weight: Ref = None
    bias: Ref = None
    transposed: bool = False


def _attr(gm: fx.GraphModule, where: fx.Node, name: str) -> str | None:
    """The qualified name of ``module.name`` of a call_module node (symbolic_trace graphs), if set."""
    mod = target_module(gm, where)
    return None if getattr(mod, name, None) is None else f"{where.target}.{name}"


def _resolve(gm: fx.GraphModule, qualname: str) -> object:
    t: object = gm
    for part in qualname.split("."):
        t = getattr(t, part)
    return t


def _requires_grad(ref: Ref, gm: fx.GraphModule) -> bool:
    if ref is None:
        return False
    if isinstance(ref, str) or ref.op == "get_attr":
        return bool(getattr(_resolve(gm, ref if isinstance(ref, str) else str(ref.target)), "requires_grad", False))
    v = value(ref)
    return True if v is None else bool(v.requires_grad)  # unknown: assume it does


def _node(edit: GraphEdit, ref: Ref) -> fx.Node | None:
    """The copy's node for a reference (a get_attr made now for an attribute name)."""
    return edit.attr(ref) if isinstance(ref, str) else edit.node(ref)


def _normalized_ndim(shape: object) -> int:
    return 1 if isinstance(shape, int) else len(shape)  # type: ignore[arg-type]


def _find_call_norm(gm: fx.GraphModule, n: fx.Node) -> _Norm | None:
    if n.op == "call_function" and n.target in LAYER_NORM_FUNCTIONS:
        return _Norm(n, arg(n, 0, "input"), arg(n, 2, "weight"), arg(n, 3, "bias"), 0.0,
                     _normalized_ndim(arg(n, 1, "normalized_shape")), arg(n, 4, "eps", 1e-5), False, "layer_norm")
    if n.op == "call_function" and n.target in RMS_NORM_FUNCTIONS:
        x = arg(n, 0, "input")
        eps = arg(n, 3, "eps")
        if eps is None:
            v = value(x)
            eps = torch.finfo(v.dtype if v is not None else torch.float32).eps
        return _Norm(n, x, arg(n, 2, "weight"), None, 0.0, _normalized_ndim(arg(n, 1, "normalized_shape")),
                     eps, True, "rms_norm")
    mod = target_module(gm, n)
    if isinstance(mod, nn.LayerNorm) or isinstance(mod, getattr(nn, "RMSNorm", ())):
        rms = not isinstance(mod, nn.LayerNorm)
        eps = mod.eps if mod.eps is not None else torch.finfo(torch.float32).eps
        return _Norm(n, n.args[0], _attr(gm, n, "weight"), None if rms else _attr(gm, n, "bias"), 0.0,
                     len(mod.normalized_shape), eps, rms, type(mod).__name__)
    return None


def _find_computed_norm(gm: fx.GraphModule, n: fx.Node, order: dict[fx.Node, int]) -> _Norm | None:
    """A norm written out in pointwise ops, casts and last-dim reductions, identified by evaluating it
    (``_norm_forms``); n is its first reduction."""
    if not is_reduction(n):
        return None
    found = identify(gm, n, order)
    if found is None:
        return None
    return _Norm(found.z, found.x, found.weight, found.bias, found.offset, 1, found.eps, found.rms, found.pattern,
                 found.y_dtype, found.z_dtype, found.nodes, found.skip)


def _find_norm(gm: fx.GraphModule, n: fx.Node, order: dict[fx.Node, int]) -> _Norm | None:
    return _find_call_norm(gm, n) or _find_computed_norm(gm, n, order)


def _consumers(gm: fx.GraphModule, z: fx.Node) -> tuple[list[_Consumer], str | None, int]:
    """Linear consumers of z, the first consumer that blocks sharing (or None), and how many dropouts."""
    linears: list[_Consumer] = []
    dropouts = 0
    todo: list[tuple[fx.Node, list[fx.Node]]] = [(z, [])]
    while todo:
        cur, chain = todo.pop()
        for u in cur.users:
            if (is_call(u, VIEW_FUNCTIONS, VIEW_METHODS) or is_basic_index(u)) and u.args[0] is cur:
                todo.append((u, chain + [u]))
            elif is_call(u, LINEAR_FUNCTIONS) and arg(u, 0, "input") is cur:
                linears.append(_Consumer(u, chain, arg(u, 1, "weight"), arg(u, 2, "bias")))
            elif u.op == "call_module" and isinstance(target_module(gm, u), nn.Linear) and u.args[0] is cur:
                linears.append(_Consumer(u, chain, _attr(gm, u, "weight"), _attr(gm, u, "bias")))
            elif is_call(u, (torch.addmm,)) and len(u.args) == 3 and u.args[1] is cur and not u.kwargs:
                linears.append(_Consumer(u, chain, u.args[2], u.args[0], transposed=True))
            elif is_call(u, ADD_FUNCTIONS, ("add", "__add__")) or u.op == "output":
                continue  # keeps nothing
            elif is_call(u, _DROPOUT) or (u.op == "call_module" and isinstance(target_module(gm, u), nn.Dropout)):
                dropouts += 1  # keeps a mask, and what follows keeps dropout's output: a different tensor
            else:
                what = u.target if u.op != "call_function" else getattr(u.target, "__name__", str(u.target))
                return linears, f"consumer {u.name} ({what}) may keep its own copy of the output", dropouts
    return linears, None, dropouts


def find(gm: fx.GraphModule, options: Options) -> list[Candidate]:
    """Every norm -> linear site (module docstring), with the reason it cannot be shared where it cannot."""
    candidates: list[Candidate] = []
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    claimed: set[fx.Node] = set()  # nodes of computed norms found so far: a LayerNorm's second reduction
    for n in gm.graph.nodes:
        norm = None if n in claimed else _find_norm(gm, n, order)
        if norm is None:
            continue
        claimed.update(norm.nodes)
        linears, blocker, dropouts = _consumers(gm, norm.z)
        xv = value(norm.x)
        if norm.skip:
            reason = norm.skip
        elif blocker is not None:
            reason = blocker
        elif not any(_requires_grad(c.weight, gm) for c in linears):
            reason = ("nothing to share: no linear with a trainable weight reads the output"
                      + (f" ({dropouts} reach linears through dropout, which keep its output)" if dropouts else ""))
        elif xv is not None and not xv.is_floating_point():
            reason = f"input dtype {xv.dtype} is not floating point"
        elif norm.ndim != 1:
            reason = f"normalized over {norm.ndim} dims; the linears read the last one"
        else:
            reason = ""
        candidates.append(Candidate(
            FAMILY, norm.z.name, module_path(n), f"{norm.pattern} -> {len(linears)} x linear",
            bytes_saved=tensor_bytes(norm.z), skip=reason,
            apply=lambda edit, norm=norm, linears=linears: _apply(edit, norm, linears),
            replaces=(norm.z, *(c.node for c in linears))))
    return candidates


def _apply(edit: GraphEdit, norm: _Norm, linears: list[_Consumer]) -> None:
    xv = value(norm.x)
    x_dtype = xv.dtype if xv is not None else None
    y_dtype = norm.y_dtype or x_dtype
    z_dtype = norm.z_dtype or x_dtype
    if y_dtype is None or z_dtype is None:
        raise RuntimeError(f"approxbp: no dtype information for {norm.z.name}; run shape propagation first")
    with edit.inserting_before(norm.z):
        weight, bias = _node(edit, norm.weight), _node(edit, norm.bias)
        eps = norm.eps if isinstance(norm.eps, fx.Node) else float(norm.eps)
        triple = edit.call(torch.ops.approxbp.norm_shared.default, (
            norm.x, weight, bias, norm.offset, norm.ndim, eps, norm.rms, y_dtype, z_dtype))
        z = edit.call(operator.getitem, (triple, 0))
        y_hat = edit.call(operator.getitem, (triple, 1))
    edit.replace(norm.z, z)
    for c in linears:
        with edit.inserting_before(c.node):
            shared = y_hat
            for view in c.chain:  # the same views the linear's input went through
                shared = edit.copy(view, lambda a, v=view, s=shared: s if a is edit.node(v.args[0]) else a)
            linear = edit.node(c.node)  # its input now reads the new z (or a view of it)
            linear_input = linear.args[1] if c.transposed else (linear.args[0] if linear.args else linear.kwargs["input"])
            new = edit.call(torch.ops.approxbp.linear_shared.default, (
                linear_input, shared, _node(edit, c.weight), _node(edit, c.bias), weight, bias, norm.offset,
                c.transposed, None, None, 1.0))
        edit.replace(c.node, new)
