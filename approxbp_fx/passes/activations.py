"""Approx-BP: give GELU/SiLU sites a 2-bit step derivative, in every form a traced graph spells them.

    before:  y = gelu(x)                     (or F.gelu, nn.GELU, approximate="tanh", F.silu, x * sigmoid(x),
                                               GPT-2's decomposed tanh formula, F.mish, ...)
    after:   y = approxbp::step_act(x, "gelu", c, levels)[0]          native forms: same aten kernel
             y = approxbp::step_attach(x, f(x.detach()), c, levels)[0]   decomposed forms: f's nodes unchanged

Sites are found by what they compute, not by how they are spelled: a node whose pointwise cone reaches
back to a single tensor x is evaluated in float64 on probe points and compared with the known
activations (``approxbp_fx.ops.activations.ACTIVATIONS``). A decomposed form therefore keeps its exact
forward (its own nodes, fed a detached x), and only its backward changes.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ..inners import get_inner
from ..ops.activations import ACTIVATIONS, Activation, StepDerivative, step_for
from ..options import Options
from ._edit import Candidate, GraphEdit
from ._graph import module_path, target_module, value

__all__ = ["FAMILY", "find"]

FAMILY = "activations"

# Pointwise building blocks of activations written out; each activation's own native calls and modules
# join them below. torch._C._nn.*: the call targets Dynamo writes for F.softplus / F.gelu.
_POINTWISE_FUNCTIONS = {
    operator.add, operator.mul, operator.sub, operator.truediv, operator.neg, operator.pow,
    torch.add, torch.mul, torch.sub, torch.div, torch.tanh, torch.sigmoid, torch.pow, torch.erf, torch.exp,
    torch.neg, torch.special.erf, torch.nn.functional.sigmoid, torch.nn.functional.tanh, F.softplus,
    torch._C._nn.softplus,
}
_POINTWISE_METHODS = {"add", "mul", "sub", "div", "tanh", "sigmoid", "pow", "erf", "exp", "neg", "__mul__", "__add__"}
_POINTWISE_MODULES = (nn.Sigmoid, nn.Tanh, nn.Softplus)
# native call target -> the keyword that makes it in place (None: it has none)
_NATIVE_FUNCTIONS = {f: a.inplace for a in ACTIVATIONS.values() for f in a.functions}
_NATIVE_MODULES = tuple({m for a in ACTIVATIONS.values() for m in a.modules})

_PROBE = torch.linspace(-12.0, 12.0, 4001, dtype=torch.float64)
_REFERENCES = [(a, a.reference(_PROBE)) for a in ACTIVATIONS.values()]


def _is_pointwise(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_function":
        if node.target in _NATIVE_FUNCTIONS:
            inplace = _NATIVE_FUNCTIONS[node.target]
            return inplace is None or not node.kwargs.get(inplace, False)
        return node.target in _POINTWISE_FUNCTIONS
    if node.op == "call_method":
        return node.target in _POINTWISE_METHODS
    if node.op == "call_module":
        mod = target_module(gm, node)
        return isinstance(mod, _POINTWISE_MODULES) or (
            isinstance(mod, _NATIVE_MODULES) and not getattr(mod, "inplace", False))
    return False


def _cone(gm: fx.GraphModule, y: fx.Node) -> tuple[fx.Node, list[fx.Node]] | None:
    """(x, nodes) when y is computed from the single tensor x by pointwise nodes only (graph order)."""
    root: fx.Node | None = None
    nodes: set[fx.Node] = set()
    stack = [y]
    while stack:
        n = stack.pop()
        if n in nodes:
            continue
        if n is not y and not _is_pointwise(gm, n):
            if root is not None and root is not n:
                return None
            root = n
            continue
        nodes.add(n)
        stack += [a for a in n.all_input_nodes]
    if root is None or not _is_pointwise(gm, y):
        return None
    # inner nodes must not be used outside the cone: those values are needed as they are
    if any(u not in nodes for n in nodes if n is not y for u in n.users):
        return None
    # graph order; a cone is a handful of nodes, so sort them rather than scan the graph
    order = {n: i for i, n in enumerate(_ancestors_in_order(nodes))}
    return root, sorted(nodes, key=order.__getitem__)


def _ancestors_in_order(nodes: set[fx.Node]) -> list[fx.Node]:
    """``nodes`` in an order where every node comes after its inputs (a topological order of the cone)."""
    out: list[fx.Node] = []
    seen: set[fx.Node] = set()

    def visit(n: fx.Node) -> None:
        if n in seen or n not in nodes:
            return
        seen.add(n)
        for a in n.all_input_nodes:
            visit(a)
        out.append(n)

    for n in nodes:
        visit(n)
    return out


def _evaluate(gm: fx.GraphModule, x: fx.Node, nodes: list[fx.Node], probe: torch.Tensor) -> torch.Tensor | None:
    env = {x: probe}
    load = lambda a: fx.node.map_arg(a, lambda n: env[n])  # noqa: E731
    try:
        for n in nodes:
            args, kwargs = load(n.args), load(n.kwargs)
            if n.op == "call_function":
                env[n] = n.target(*args, **kwargs)
            elif n.op == "call_method":
                env[n] = getattr(args[0], n.target)(*args[1:], **kwargs)
            else:
                env[n] = target_module(gm, n)(*args, **kwargs)
    except Exception:  # an op that does not accept the probe is not an activation we know
        return None
    out = env[nodes[-1]]
    return out if isinstance(out, torch.Tensor) and out.shape == probe.shape else None


def _identify(gm: fx.GraphModule, x: fx.Node, nodes: list[fx.Node]) -> Activation | None:
    out = _evaluate(gm, x, nodes, _PROBE)
    if out is None:
        return None
    for act, expected in _REFERENCES:
        if torch.allclose(out.to(torch.float64), expected, rtol=0, atol=1e-7):
            return act
    return None


def _native_op(gm: fx.GraphModule, node: fx.Node, act: Activation) -> str | None:
    """The op name when the site is one native call of ``act`` that ``step_act`` computes with the same kernel."""
    if act.op_name is None:
        return None
    if node.op == "call_function" and node.target in act.functions:
        return act.op_name
    if node.op == "call_module" and isinstance(target_module(gm, node), act.modules):
        return act.op_name
    return None


def _gates(y: fx.Node) -> bool:
    """True when the activation multiplies another tensor (SwiGLU/GeGLU: act(gate) * up).

    Measured (LLaMA/Gemma, 2 layers, fp32): under inductor the rewrite changed the bytes by exactly 0
    (the baseline keeps gate and up and recomputes act(gate); the rewritten gate still needs act(gate)
    for up's gradient), under eager it saved 0.828 -> 0.692 of the baseline.
    """
    for u in y.users:
        if (u.op == "call_function" and u.target in (operator.mul, torch.mul)) or (
                u.op == "call_method" and u.target in ("mul", "__mul__")):
            other = u.args[1] if u.args[0] is y else u.args[0]
            if isinstance(other, fx.Node) and other is not y:
                return True
    return False


def _saved_bytes_estimate(x: fx.Node, step: StepDerivative) -> int:
    v = value(x)
    if v is None:
        return 0
    per_byte = 8 // step.bits
    return v.numel() * v.element_size() - (v.numel() + per_byte - 1) // per_byte


def find(gm: fx.GraphModule, options: Options) -> list[Candidate]:
    """Every recognised activation site (module docstring), with the reason it is left alone where it is."""
    candidates: list[Candidate] = []
    claimed: set[fx.Node] = set()
    gate_skips = get_inner(options.inner).recomputes_glu_gate
    for y in reversed(gm.graph.nodes):  # outermost node of a decomposed form first
        if y in claimed or not _is_pointwise(gm, y):
            continue
        found = _cone(gm, y)
        if found is None:
            continue
        x, nodes = found
        act = _identify(gm, x, nodes)
        if act is None:
            continue
        claimed.update(nodes)
        native = _native_op(gm, y, act) if len(nodes) == 1 else None
        pattern = act.name if native or len(nodes) == 1 else f"{act.name} (decomposed, {len(nodes)} ops)"
        xv = value(x)
        if gate_skips and _gates(y):
            reason = (f"GLU gate under the {options.inner} inner: the compiler already keeps only the gate's input "
                      "and recomputes the activation, which the other factor's gradient needs; a 2-bit code would "
                      "save nothing")
        elif xv is not None and not xv.is_floating_point():
            reason = f"input dtype {xv.dtype} is not floating point"
        else:
            reason = ""
        step, source = step_for(act.name, options.bits) if not reason else (None, "")
        candidates.append(Candidate(
            FAMILY, y.name, module_path(y), pattern,
            bytes_saved=_saved_bytes_estimate(x, step) if step else 0, skip=reason,
            constants="" if step is None else (
                f"{source} {options.bits}-bit: thresholds {tuple(round(v, 4) for v in step.thresholds)}, "
                f"levels {tuple(round(v, 4) for v in step.levels)}"),
            apply=lambda edit, y=y, x=x, nodes=nodes, native=native, step=step: _apply(edit, y, x, nodes, native, step),
            replaces=(y,)))
    candidates.reverse()  # graph order, as the report lists them
    return candidates


def _apply(edit: GraphEdit, y: fx.Node, x: fx.Node, nodes: list[fx.Node], native: str | None,
           step: StepDerivative) -> None:
    thresholds, levels = list(step.thresholds), list(step.levels)
    with edit.inserting_before(y):
        if native is not None:
            pair = edit.call(torch.ops.approxbp.step_act.default, (x, native, thresholds, levels))
        else:
            # the decomposed forward, node for node, on a detached x: its autograd keeps nothing
            detached = edit.method("detach", (x,))
            env = {edit.node(x): detached}
            for n in nodes:
                env[edit.node(n)] = edit.copy(n, lambda a: env[a])
            pair = edit.call(torch.ops.approxbp.step_attach.default, (x, env[edit.node(y)], thresholds, levels))
        out = edit.call(operator.getitem, (pair, 0))
    edit.replace(y, out)
