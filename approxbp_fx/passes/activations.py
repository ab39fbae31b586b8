"""Approx-BP: give GELU/SiLU sites a 2-bit step derivative, in every form a traced graph spells them.

    before:  y = gelu(x)                     (or F.gelu, nn.GELU, approximate="tanh", F.silu, x * sigmoid(x),
                                               GPT-2's decomposed tanh formula, F.mish, ...)
    after:   y = approxbp::step_act(x, "gelu", c, levels)[0]          native forms: same aten kernel
             y = approxbp::step_attach(x, f(x.detach()), c, levels)[0]   decomposed forms: f's nodes unchanged

Sites are found by what they compute, not by how they are spelled: a node whose pointwise cone reaches
back to a single tensor x is evaluated in float64 on probe points and compared with the known
activations (``approxbp_fx.ops.activations.ACTIVATIONS``). A decomposed form therefore keeps its exact
forward (its own nodes, fed a detached x), and only its backward changes.

Piecewise-linear activations (ReLU, LeakyReLU, ReLU6, Hardtanh, clamp) have an exact step derivative.
Their sites are single native calls (the spelling decides which of torch's backward conventions holds at
the kinks; the value, evaluated the same way, confirms the op and gives its constants):

    before:  y = relu(x)                                   keeps y (relu's backward reads its output)
    after:   y = approxbp::mask_act(x, "relu", [])[0]      keeps a 1-bit mask; same forward kernel

Those candidates belong to the ``masks`` option (exact), the others to ``activations`` (approximate),
so this family is searched when either is on (``OPTIONS``). A mask only pays when nothing else keeps
the tensor the op kept: a site whose output feeds a linear with a trained weight (which keeps that
output as its input anyway) is left alone, with the consumer named in the reason.
"""

from __future__ import annotations

import inspect
import operator

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ..inners import get_inner
from ..ops.activations import ACTIVATIONS, Activation, StepDerivative, exact_in, step_for
from ..options import Options
from ._edit import Candidate, GraphEdit
from ._graph import module_path, target_module, topological, value
from ._keeps import is_view, keeps, keeps_output, kept_siblings, through_views

__all__ = ["FAMILY", "OPTIONS", "MASKS", "find"]

FAMILY = "activations"
#: the exact sites' option (and family name in reports)
MASKS = "masks"
#: the driver searches this family when any of these options is on
OPTIONS = (FAMILY, MASKS)

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
_APPROXIMATE = [a for a in ACTIVATIONS.values() if not a.exact]
_EXACT = [a for a in ACTIVATIONS.values() if a.exact]
_NATIVE_FUNCTIONS = {f: a.inplace for a in _APPROXIMATE for f in a.functions}
_NATIVE_MODULES = tuple({m for a in _APPROXIMATE for m in a.modules})

_PROBE = torch.linspace(-12.0, 12.0, 4001, dtype=torch.float64)
_REFERENCES = [(a, a.reference(_PROBE)) for a in _APPROXIMATE]


def _is_inplace(gm: fx.GraphModule, node: fx.Node, keyword: str | None) -> bool:
    """Whether a native activation call or module runs in place. The flag may be positional: Dynamo
    writes ``nn.LeakyReLU(0.2)`` as ``leaky_relu(x, 0.2, False)``."""
    if node.op == "call_module":
        return bool(getattr(target_module(gm, node), "inplace", False))
    if keyword is None or node.op != "call_function":
        return False
    if keyword in node.kwargs:
        return bool(node.kwargs[keyword])
    try:
        bound = inspect.signature(node.target).bind(*node.args, **node.kwargs)
    except (TypeError, ValueError):  # a builtin without a signature has no in-place flag (torch.relu_ is its own target)
        return False
    return bool(bound.arguments.get(keyword, False))


def _is_pointwise(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_function":
        if node.target in _NATIVE_FUNCTIONS:
            return not _is_inplace(gm, node, _NATIVE_FUNCTIONS[node.target])
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
    return root, topological(nodes)


def _single_call(y: fx.Node) -> tuple[fx.Node, list[fx.Node]] | None:
    """(x, [y]) when y reads one tensor x: a native activation call whose input is itself pointwise in
    several tensors (QLoRA's ``silu(base(x) + lora(x))``), where the widest pointwise cone has two roots."""
    inputs = y.all_input_nodes
    return (inputs[0], [y]) if len(inputs) == 1 else None


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
        if y in claimed:
            continue
        exact = _exact_site(gm, y) if options.masks else None
        if exact is not None:
            candidates.append(_exact_candidate(gm, y, *exact))
            claimed.add(y)
            continue
        if not options.activations or not _is_pointwise(gm, y):
            continue
        found = _cone(gm, y) or _single_call(y)
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
        siblings = [] if reason else kept_siblings(gm, x, nodes)
        if siblings:
            pattern += f" (split: {len(siblings)} other part(s) copied)"
        candidates.append(Candidate(
            FAMILY, y.name, module_path(y), pattern,
            bytes_saved=_saved_bytes_estimate(x, step) if step else 0, skip=reason,
            constants="" if step is None else (
                f"{source} {options.bits}-bit: thresholds {tuple(round(v, 4) for v in step.thresholds)}, "
                f"levels {tuple(round(v, 4) for v in step.levels)}"),
            apply=lambda edit, y=y, x=x, nodes=nodes, native=native, step=step, siblings=siblings: _apply(
                edit, y, x, nodes, native, step, siblings),
            replaces=(y, *siblings)))
    candidates.reverse()  # graph order, as the report lists them
    return candidates


def _apply(edit: GraphEdit, y: fx.Node, x: fx.Node, nodes: list[fx.Node], native: str | None,
           step: StepDerivative, siblings: list[fx.Node] = ()) -> None:
    for part in siblings:
        edit.own_storage(part)
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


# --- exact sites: piecewise-linear activations with a 1-bit mask ----------------------------------

def _spelled_as(gm: fx.GraphModule, node: fx.Node, act: Activation) -> bool:
    if node.op == "call_function":
        return node.target in act.functions
    if node.op == "call_method":
        return node.target in act.methods
    return node.op == "call_module" and isinstance(target_module(gm, node), act.modules)


def _exact_site(gm: fx.GraphModule, y: fx.Node) -> tuple[Activation, fx.Node, tuple[float, ...], bool] | None:
    """(record, x, params, in place) when y is one call of an exact activation of the single tensor x.

    The spelling picks the candidate records (torch's conventions at the kinks differ: relu and clamp(min=0)
    compute the same values but pass different gradients at 0); evaluating y in float64 gives the
    constants (a slope, bounds) and confirms them against the record's reference."""
    spelled = [a for a in _EXACT if _spelled_as(gm, y, a)]
    inputs = y.all_input_nodes
    if not spelled or len(inputs) != 1:
        return None
    x = inputs[0]
    site = lambda t: _evaluate(gm, x, [y], t.clone())  # noqa: E731  (an in-place form must not write the probe)
    out = site(_PROBE)
    if out is None:
        return None
    for act in spelled:
        try:
            params = act.params(site)
        except (TypeError, AttributeError):  # the site did not accept the probe points
            continue
        if params is not None and torch.allclose(out.to(torch.float64), act.reference(_PROBE, *params), rtol=0,
                                                  atol=1e-12, equal_nan=True):
            return act, x, tuple(params), _is_inplace(gm, y, act.inplace)
    return None


def _kept_anyway(gm: fx.GraphModule, site: fx.Node, kept: fx.Node, what: str) -> str:
    """Why ``kept`` (the tensor torch's op keeps: its input or output) stays saved for backward without
    the site, or "" when nothing else keeps it. Views and casts of it count as it; an op this does not know
    counts as keeping it (a mask that saves nothing would only cost its own bytes and time)."""
    base = kept
    while is_view(gm, base) and isinstance(base.args[0], fx.Node):
        base = base.args[0]
    if base is not site and keeps_output(gm, base):
        return f"its {what} is kept anyway by {base.name}, whose backward reads its own output; a mask would save nothing"
    for n, u in through_views(gm, base):
        if u is site:
            continue
        why = keeps(gm, u, n)
        if why == "?":
            target = u.target if u.op != "call_function" else getattr(u.target, "__name__", u.target)
            return (f"its {what} also feeds {u.name} ({target}), which may keep it for backward; a mask might "
                    "save nothing")
        if why is not None:
            return f"its {what} is kept anyway by {u.name} ({why}); a mask would save nothing"
    return ""


def _exact_pattern(act: Activation, params: tuple[float, ...]) -> str:
    if not params:
        return act.name
    return f"{act.name}({', '.join(f'{n}={v:g}' for n, v in zip(act.param_names, params))})"


def _exact_candidate(gm: fx.GraphModule, y: fx.Node, act: Activation, x: fx.Node, params: tuple[float, ...],
                     inplace: bool) -> Candidate:
    kept = y if act.keeps == "output" else x
    what = "output" if act.keeps == "output" else "input"
    xv, kv = value(x), value(kept)
    dtypes = [xv.dtype] if xv is not None else [torch.bfloat16, torch.float16]  # exact in both: exact in every float
    if inplace:
        reason = "in place: later readers of its input see the result; left as it is"
    elif xv is not None and not xv.is_floating_point():
        reason = f"input dtype {xv.dtype} is not floating point"
    elif act.bounds and not all(exact_in(d, params) for d in dtypes):
        reason = (f"bounds {params} are not exact in {dtypes[0] if xv is not None else 'half precision'}: torch's "
                  "backward compares x with the rounded bounds, which a mask of the exact ones could miss")
    else:
        reason = _kept_anyway(gm, y, kept, what)
    saved = 0 if kv is None else kv.numel() * kv.element_size() - (kv.numel() + 7) // 8
    return Candidate(
        MASKS, y.name, module_path(y), _exact_pattern(act, params), bytes_saved=saved if not reason else 0,
        skip=reason, constants="" if reason else f"exact 1-bit: {act.rule.format(*(f'{p:g}' for p in params))}",
        apply=lambda edit: _apply_exact(edit, y, x, act, params), replaces=(y,))


def _apply_exact(edit: GraphEdit, y: fx.Node, x: fx.Node, act: Activation, params: tuple[float, ...]) -> None:
    with edit.inserting_before(y):
        pair = edit.call(torch.ops.approxbp.mask_act.default, (x, act.name, [float(p) for p in params]))
        out = edit.call(operator.getitem, (pair, 0))
    edit.replace(y, out)
