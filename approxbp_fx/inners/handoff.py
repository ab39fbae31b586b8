"""The handoff calls of a graph (``ops/handoff.py``) moved to the boundary of a compiled function.

AOTAutograd fixes a graph's saved set when it traces it, with the inputs it is given: a lookup inside
the graph that returns y_hat on one call and the input itself on the next cannot be traced. So before an
AOTAutograd-based inner compiles a graph, ``lift`` turns

    y, w, b, off = received(p)               into three new inputs y, w, b (off folded into w), which the
                                             returned function fills from the record before each call:
                                             (y_hat, weight + offset, bias) or (p, ones, zeros)
    publish(z, y_hat, weight, bias, off)     into extra outputs (y_hat, and weight and bias where they are
                                             not inputs), which it records for the output z and drops

A miss rebuilds ``p * 1 + 0``: p itself, which the graph keeps as plain autograd kept it. The weight and
bias pass in float32 (float64 for a float64 p), so one compiled graph takes any norm's parameters; y_hat
only where it has p's dtype, shape and strides (else a miss), since the compiled code is specialised on
them.
"""

from __future__ import annotations

import functools
import operator
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx
from torch import Tensor

from ..ops import handoff
from ..ops.norms import filled

__all__ = ["lift"]


@dataclass
class _Published:
    z: int  # index of z among the graph's own outputs
    y_hat: int  # index of y_hat among all outputs
    weight: tuple[str, int] | None  # ("input", i) or ("output", i); None: no weight
    bias: tuple[str, int] | None
    offset: float


@dataclass
class _Lifted:
    outputs: int = 0  # the graph's own outputs
    received: list[int] = field(default_factory=list)  # input index of each received graph input
    published: list[_Published] = field(default_factory=list)


def _affine_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _arriving(p: Tensor) -> list[Tensor]:
    """y, weight, bias for the lifted inputs of a received p."""
    y_hat, weight, bias, offset = handoff.received(p)
    dtype, d = _affine_dtype(p), p.shape[-1]

    def constant(value: float) -> Tensor:
        # a fake or other subclass (a run under a tracer) gets constants of its own kind, not cached real ones
        return filled(d, value, p.device, dtype) if type(p) is Tensor else p.new_full((d,), value, dtype=dtype)

    if y_hat is p or y_hat.dtype != p.dtype or y_hat.shape != p.shape or y_hat.stride() != p.stride() \
            or any(t is not None and t.shape != (d,) for t in (weight, bias)):
        return [p, constant(1.0), constant(0.0)]
    if weight is not None and offset:
        weight = weight + offset  # in the weight's dtype, as the norm computed it (no weight: no offset either)
    return [y_hat, constant(1.0) if weight is None else weight.to(dtype),
            constant(0.0) if bias is None else bias.to(dtype)]


def _example(like: Any, fill: float | None) -> Any:
    """An example input made from p's example ``like``: y like p, or a [D] vector in the affine dtype. Never p
    itself, which AOTAutograd would take for a duplicated input and drop; made from Dynamo's fake p where
    there is one, so its sizes are p's symbols (a new symbol would have no source for a guard to read)."""
    if fill is None:
        return torch.empty_like(like)
    return like.new_full((like.shape[-1],), fill, dtype=_affine_dtype(like))


Wrapper = Callable[[Callable[..., Any]], Callable[..., Any]]


def _is_handoff(n: fx.Node) -> bool:
    return n.op == "call_function" and n.target in (handoff.received, handoff.publish)


def lift(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> tuple[fx.GraphModule, list[Any], Wrapper | None]:
    """A copy of the graph with its handoff calls lifted, its example inputs with the new ones, and a function
    that wraps the compiled graph; where the graph has no such call, the graph itself and ``None``."""
    if not any(_is_handoff(n) for n in gm.graph.nodes):
        return gm, list(example_inputs), None
    from ..driver import copy_graph_module

    gm, _ = copy_graph_module(gm)  # the report's graph keeps the calls
    calls = [n for n in gm.graph.nodes if _is_handoff(n)]
    graph = gm.graph
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    output = next(n for n in graph.nodes if n.op == "output")
    outs = list(output.args[0]) if isinstance(output.args[0], (tuple, list)) else [output.args[0]]
    lifted, examples, extra_outs = _Lifted(outputs=len(outs)), list(example_inputs), []
    for n in calls:
        if n.target is handoff.received:
            (p,) = n.args
            i = placeholders.index(p)
            lifted.received.append(i)
            like = p.meta.get("example_value", examples[i])
            new = []
            for what in ("y_hat", "weight", "bias"):  # after the last input, in this order
                with graph.inserting_after(placeholders[-1]):
                    placeholders.append(graph.placeholder(f"{p.name}_handed_{what}"))
                placeholders[-1]._dynamo_source = None  # AOTAutograd reads it on every input: not from user code
                new.append(placeholders[-1])
            examples += [_example(like, fill) for fill in (None, 1.0, 0.0)]
            for u in list(n.users):  # getitem 0..3
                k = u.args[1]
                if k < 3:
                    u.replace_all_uses_with(new[k])
                else:  # the offset is folded into the weight
                    for user in list(u.users):
                        user.args = fx.node.map_arg(user.args, lambda a, u=u: 0.0 if a is u else a)
                        user.kwargs = fx.node.map_arg(user.kwargs, lambda a, u=u: 0.0 if a is u else a)
                graph.erase_node(u)
            graph.erase_node(n)
        else:
            z, y_hat, weight, bias, offset = n.args
            graph.erase_node(n)
            if z not in outs:
                continue  # no longer returned: nothing to hand on
            refs = []
            for t in (weight, bias):
                if t is None:
                    refs.append(None)
                elif t in placeholders:
                    refs.append(("input", placeholders.index(t)))
                else:
                    refs.append(("output", len(outs) + len(extra_outs)))
                    extra_outs.append(t)
            lifted.published.append(_Published(outs.index(z), len(outs) + len(extra_outs), *refs, float(offset)))
            extra_outs.append(y_hat)
    output.args = (tuple(outs + extra_outs),)
    graph.lint()
    gm.recompile()
    return gm, examples, functools.partial(_wrap, lifted=lifted)


def _wrap(compiled: Callable[..., Any], lifted: _Lifted) -> Callable[..., Any]:
    # the inputs publish needs (norm parameters); only those are held through the call
    wanted = {ref[1] for pub in lifted.published for ref in (pub.weight, pub.bias) if ref and ref[0] == "input"}

    def run(*args: Any) -> Any:
        extra = [t for i in lifted.received for t in _arriving(args[i])]
        inputs = {i: args[i] for i in wanted}
        outs = compiled(*args, *extra)
        for pub in lifted.published:
            w, b = ((None if ref is None else (inputs if ref[0] == "input" else outs)[ref[1]])
                    for ref in (pub.weight, pub.bias))
            handoff.publish(outs[pub.z], outs[pub.y_hat], w, b, pub.offset)
        mine = outs[:lifted.outputs]
        return mine if isinstance(outs, list) else tuple(mine)

    return run
