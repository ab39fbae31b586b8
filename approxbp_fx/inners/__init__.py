"""Inner compilers: what compiles a graph after the rewrite, and what each one means for the rewrite.

Each inner is one ``Inner`` record in ``INNERS``. The options, the CLI and the rewrite families read the
records' capabilities instead of comparing names, so a new inner is one ``register_inner`` call:

    register_inner(Inner("my_inner", compile=my_compile, recomputes_glu_gate=False))

``compile(gm, example_inputs, mode)`` returns the callable Dynamo runs; ``mode`` is torch.compile's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch.fx as fx

from .. import _compat

__all__ = ["Inner", "INNERS", "register_inner", "get_inner"]


@dataclass(frozen=True)
class Inner:
    """An inner compiler and what the rewrite must know about it.

    ``recomputes_glu_gate``: the compiler already keeps only a GLU gate's input and recomputes the
    activation (which the other factor's gradient needs), so a 2-bit code at a gate saves nothing there.
    ``traceable_ops``: it traces through the ops (it receives their traceable, tagged forms, and its
    partitioner reads the tags) instead of calling them as opaque custom ops.
    ``shares_across_graphs``: it runs the handoff calls a graph may hold (``ops/handoff.py``: a norm ending
    one graph hands its y_hat to the linears beginning the next, after a graph break): the eager inner in
    the graph, as Python; an AOTAutograd-based one at the compiled function's boundary (``_lifting``).
    An inner without it gets no such calls: those norms are left alone with the reason."""

    name: str
    compile: Callable[[fx.GraphModule, Sequence[Any], str | None], Callable[..., Any]]
    recomputes_glu_gate: bool = False
    traceable_ops: bool = False
    shares_across_graphs: bool = False
    description: str = ""


INNERS: dict[str, Inner] = {}


def register_inner(inner: Inner) -> Inner:
    """Make ``inner`` selectable as ``options={"inner": inner.name}``."""
    if not isinstance(inner, Inner):
        raise TypeError(f"register_inner expects an Inner, got {type(inner).__name__}")
    INNERS[inner.name] = inner
    return inner


def get_inner(name: str) -> Inner:
    try:
        return INNERS[name]
    except KeyError:
        raise ValueError(f"approxbp: option 'inner' must be one of {tuple(INNERS)}, got {name!r}") from None


def _lifting(compile: Callable[[fx.GraphModule, Sequence[Any], str | None], Callable[..., Any]]
             ) -> Callable[[fx.GraphModule, Sequence[Any], str | None], Callable[..., Any]]:
    """An AOTAutograd-based inner's compile with the graph's handoff calls at the compiled function's
    boundary (``inners/handoff.py``): inside, AOTAutograd would trace them once."""

    def compile_lifted(gm: fx.GraphModule, example_inputs: Sequence[Any], mode: str | None) -> Callable[..., Any]:
        from .handoff import lift

        gm, examples, wrap = lift(gm, example_inputs)
        compiled = compile(gm, examples, mode)
        return compiled if wrap is None else wrap(compiled)

    return compile_lifted


@_lifting
def _compile_inductor(gm: fx.GraphModule, example_inputs: Sequence[Any], mode: str | None) -> Callable[..., Any]:
    from .inductor import compile_with_steering

    return compile_with_steering(gm, example_inputs, mode)


register_inner(Inner(
    "inductor", _compile_inductor, recomputes_glu_gate=True, traceable_ops=True, shares_across_graphs=True,
    description="torch.compile's default: ops traced and fused, the saved set kept by a steering partitioner",
))
register_inner(Inner(
    "aot_eager", _lifting(lambda gm, example_inputs, mode: _compat.aot_eager(gm, example_inputs)),
    shares_across_graphs=True,
    description="AOTAutograd without code generation (opaque ops)",
))
def _compile_eager(gm: fx.GraphModule, example_inputs: Sequence[Any], mode: str | None) -> Callable[..., Any]:
    """The graph itself, its custom-op calls swapped for the ops' eager autograd.Functions: no tracer runs,
    so what each one saves is what backward keeps, at less cost per call than a custom op's dispatch."""
    from ..driver import copy_graph_module
    from ..ops.spec import eager_forms

    forms = eager_forms()
    gm, _ = copy_graph_module(gm)  # the report's rewritten graph keeps the custom ops users can read
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target in forms and not n.kwargs:
            n.target = forms[n.target]
    gm.recompile()
    return gm


register_inner(Inner(
    "eager", _compile_eager, shares_across_graphs=True,
    description="the rewritten graph run by Python (the ops as autograd.Functions)",
))
