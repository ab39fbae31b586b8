"""Shared helpers of the rewrite families: argument normalisation, node metadata, pattern tables."""

from __future__ import annotations

import operator
from typing import Any, Iterable, NamedTuple, Sequence, Union

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.fx.passes.shape_prop import TensorMetadata

from .._compat import dynamo_module_path, is_mutable_op

__all__ = ["arg", "value", "module_path", "target_module", "is_call", "remove_dead", "has_side_effects", "tensor_bytes",
           "topological", "Ref", "attribute", "module_attr", "ref_tensor", "requires_grad", "LinearCall", "linear_call",
           "dropout_call", "VIEW_METHODS"]

# A parameter reference: a node, or (symbolic_trace graphs' call_module layers) the qualified name of a
# module attribute, which becomes a get_attr node only when a site is applied.
Ref = Union[fx.Node, str, None]


def arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    """Argument ``name`` of a call, given positionally at ``index`` or as a keyword."""
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def value(node: Any) -> torch.Tensor | None:
    """The example (fake) tensor a node produces, when the tracer recorded it."""
    if not isinstance(node, fx.Node):
        return None
    v = node.meta.get("example_value", node.meta.get("val"))
    if isinstance(v, torch.Tensor):
        return v
    tm = node.meta.get("tensor_meta")  # from ShapeProp, on symbolic_trace graphs
    if isinstance(tm, TensorMetadata):
        return torch.empty(tm.shape, dtype=tm.dtype, device="meta").requires_grad_(tm.requires_grad)
    return None


def concrete(n: Any) -> Any:
    """A size as a plain int: a symbolic one (Dynamo marks a dim dynamic after a recompile) as its example's
    value, read without adding a guard; for estimates and messages only."""
    return int(n.node.hint) if isinstance(n, torch.SymInt) else n


def tensor_bytes(node: Any) -> int:
    v = value(node)
    return 0 if v is None else concrete(v.numel()) * v.element_size()


def target_module(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    if node.op != "call_module":
        return None
    return gm.get_submodule(node.target)


def module_path(node: fx.Node) -> str:
    """The user's module path of a node: from Dynamo's nn_module_stack, or the call_module target."""
    if node.op == "call_module":
        return str(node.target)
    return dynamo_module_path(node) or node.name


def attribute(gm: fx.GraphModule, qualname: str) -> object:
    """``gm.a.b.c`` for ``"a.b.c"``; None where a part is missing."""
    obj: object = gm
    for part in qualname.split("."):
        obj = getattr(obj, part, None)
    return obj


def module_attr(gm: fx.GraphModule, where: fx.Node, name: str) -> str | None:
    """The qualified name of ``module.name`` of a call_module node (symbolic_trace graphs), if set."""
    mod = target_module(gm, where)
    return None if getattr(mod, name, None) is None else f"{where.target}.{name}"


def ref_tensor(gm: fx.GraphModule, ref: Ref) -> torch.Tensor | None:
    """The tensor a reference stands for: the module attribute a name or get_attr node names, or a node's
    example value."""
    if isinstance(ref, str) or (isinstance(ref, fx.Node) and ref.op == "get_attr"):
        t = attribute(gm, ref if isinstance(ref, str) else str(ref.target))
        return t if isinstance(t, torch.Tensor) else None
    return value(ref)


def requires_grad(gm: fx.GraphModule, ref: Ref) -> bool:
    """Whether a reference's tensor needs a gradient: False for None and attributes that are no trainable
    tensor, True for a node whose example value is unknown (assume it does)."""
    if not isinstance(ref, (str, fx.Node)):
        return False
    t = ref_tensor(gm, ref)
    if t is None:
        return isinstance(ref, fx.Node) and ref.op != "get_attr"
    return bool(t.requires_grad)


def is_call(node: Any, functions: Sequence[Any] = (), methods: Sequence[str] = ()) -> bool:
    if not isinstance(node, fx.Node):
        return False
    if node.op == "call_function":
        return node.target in functions
    if node.op == "call_method":
        return node.target in methods
    return False


# Ops that only change how a tensor is viewed: a linear behind them still consumes the norm's output.
VIEW_METHODS = ("view", "reshape", "contiguous", "flatten", "unflatten", "unsqueeze", "squeeze", "view_as", "reshape_as")
VIEW_FUNCTIONS = (torch.reshape, torch.flatten, torch.unsqueeze, torch.squeeze)

def is_basic_index(node: fx.Node) -> bool:
    """``t[...]`` with slices, ints, None and Ellipsis only: a view of t."""
    if not is_call(node, (operator.getitem,)) or len(node.args) != 2:
        return False
    index = node.args[1] if isinstance(node.args[1], tuple) else (node.args[1],)
    return all(i is None or i is Ellipsis or isinstance(i, (int, slice)) for i in index) and not any(
        isinstance(i, slice) and any(isinstance(b, fx.Node) for b in (i.start, i.stop, i.step)) for i in index)


ADD_FUNCTIONS = (operator.add, torch.add, operator.iadd)

# torch._C._nn.linear: the call target Dynamo writes for nn.Linear / F.linear
LINEAR_FUNCTIONS = (torch._C._nn.linear, F.linear)
LAYER_NORM_FUNCTIONS = (F.layer_norm, torch.layer_norm)
RMS_NORM_FUNCTIONS = tuple(f for f in (getattr(F, "rms_norm", None), getattr(torch, "rms_norm", None)) if f)


class LinearCall(NamedTuple):
    """A linear layer's operands: nodes, or attribute names of a call_module's nn.Linear (symbolic_trace)."""

    input: Any
    weight: Ref
    bias: Ref
    transposed: bool  # W is [in, out]: GPT-2's Conv1D, addmm(bias, x, W); a matmul x @ W
    kind: str = "linear"  # how the model spelled it, for reports: linear, addmm, matmul, einsum


def linear_call(gm: fx.GraphModule, n: fx.Node) -> LinearCall | None:
    """n as a linear layer (``F.linear``, an ``nn.Linear`` module, GPT-2's ``addmm``, a matmul or two-operand
    einsum of a tensor with a 2-D parameter: CLIP's ``x @ proj``, Falcon's ``x @ weight.T``), else None."""
    if is_call(n, LINEAR_FUNCTIONS):
        return LinearCall(arg(n, 0, "input"), arg(n, 1, "weight"), arg(n, 2, "bias"), False)
    if is_call(n, (torch.addmm,)) and len(n.args) == 3 and not n.kwargs:
        return LinearCall(n.args[1], n.args[2], n.args[0], True, "addmm")
    mod = target_module(gm, n)
    if isinstance(mod, nn.Linear) and len(n.args) == 1 and not n.kwargs:
        return LinearCall(n.args[0], module_attr(gm, n, "weight"), module_attr(gm, n, "bias"), False)
    return _matmul_call(n) or _einsum_call(n)


# x @ W, torch.matmul, Tensor.matmul, torch.mm
_MATMUL_FUNCTIONS = (operator.matmul, torch.matmul, torch.mm)
_MATMUL_METHODS = ("matmul", "mm", "__matmul__")
# W.t(), W.T, W.transpose(0, 1), W.mT: the [out, in] parameter read as [in, out]
_TRANSPOSE_ATTRS = ("T", "mT")


def _parameter_2d(w: Any) -> tuple[fx.Node, bool] | None:
    """(W, transposed) when w is a 2-D graph input or attribute (a parameter, never an activation) used as a
    matmul's right operand: W itself ([in, out], transposed) or its transpose (W is [out, in], as F.linear's)."""
    if not isinstance(w, fx.Node):
        return None
    flipped = False
    if (is_call(w, (getattr,)) and len(w.args) == 2 and w.args[1] in _TRANSPOSE_ATTRS) \
            or (is_call(w, (torch.t,), ("t",)) and len(w.args) == 1) \
            or (is_call(w, (torch.transpose,), ("transpose",)) and len(w.args) == 3
                and {a % 2 if isinstance(a, int) else a for a in w.args[1:]} == {0, 1}):
        w, flipped = w.args[0], True
    if not isinstance(w, fx.Node) or w.op not in ("placeholder", "get_attr"):
        return None
    v = value(w)
    return (w, not flipped) if v is not None and v.dim() == 2 else None


def _matmul_call(n: fx.Node) -> LinearCall | None:
    if not (is_call(n, _MATMUL_FUNCTIONS, _MATMUL_METHODS) and len(n.args) == 2 and not n.kwargs):
        return None
    x, found = n.args[0], _parameter_2d(n.args[1])
    xv = value(x) if isinstance(x, fx.Node) else None
    if found is None or xv is None or xv.dim() < 2 or (n.target in (torch.mm, "mm") and xv.dim() != 2):
        return None  # a batched or vector product is no linear
    return LinearCall(x, found[0], None, found[1], "matmul")


def _einsum_call(n: fx.Node) -> LinearCall | None:
    """``einsum("...d,nd->...n", x, W)`` (either operand order, W as [out, in] or [in, out]) as a linear."""
    if not (is_call(n, (torch.einsum,)) and len(n.args) == 3 and isinstance(n.args[0], str) and not n.kwargs):
        return None
    inputs, _, out = n.args[0].replace(" ", "").partition("->")
    subs = inputs.split(",")
    if len(subs) != 2 or not out:
        return None
    for i in (0, 1):
        xs, ws, x = subs[i], subs[1 - i], n.args[1 + i]
        found = _parameter_2d(n.args[2 - i])
        if found is None or "." in ws or len(ws) != 2 or len(xs) < 2 or not found[1]:
            continue
        d = xs[-1]
        if d not in ws or d in out or ws.replace(d, "", 1) in xs:
            continue
        o = ws.replace(d, "", 1)
        if len(set(xs.replace("...", ""))) != len(xs.replace("...", "")) or out != xs[:-1] + o:
            continue
        # found[0] is W itself: "nd" reads it as [out, in], "dn" as [in, out]
        return LinearCall(x, found[0], None, ws[1] == o, "einsum")
    return None


def dropout_call(gm: fx.GraphModule, n: fx.Node) -> tuple[Any, Any, Any, Any] | None:
    """(input, p, training, inplace) of a dropout, else None: ``F.dropout`` and ``torch.dropout`` (the targets
    Dynamo writes for nn.Dropout, F.dropout and PEFT's lora_dropout) and ``nn.Dropout`` modules (not their
    subclasses, which may draw differently)."""
    if is_call(n, (F.dropout,)):
        return arg(n, 0, "input"), arg(n, 1, "p", 0.5), arg(n, 2, "training", True), arg(n, 3, "inplace", False)
    if is_call(n, (torch.dropout,)):
        return arg(n, 0, "input"), arg(n, 1, "p"), arg(n, 2, "train"), False
    mod = target_module(gm, n)
    if type(mod) is nn.Dropout:
        return n.args[0] if n.args else n.kwargs.get("input"), mod.p, mod.training, mod.inplace
    return None


def has_side_effects(node: fx.Node) -> bool:
    """Nodes dead-code elimination must keep: fx's impure ones and in-place calls (``x.add_(1)``,
    BatchNorm's ``num_batches_tracked.add_``), whose results are typically unused."""
    if node.is_impure():
        return True
    if node.op not in ("call_method", "call_function"):
        return False
    if is_mutable_op(node.target):
        return True
    name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
    return isinstance(name, str) and name.endswith("_") and not name.endswith("__")


def remove_dead(graph: fx.Graph, roots: Iterable[fx.Node]) -> int:
    """Erase ``roots`` once nothing uses them, and then whatever only they used, transitively.

    Only what a rewrite itself made dead goes: a whole-graph dead-code elimination would also remove
    calls Dynamo keeps for their effects although their results are unused (vmap's nesting counters,
    for one), and the graph would then fail at run time. Returns the number of nodes erased."""
    work, erased = list(roots), set()
    while work:
        n = work.pop()
        if n in erased or n.users or n.op in ("placeholder", "output") or has_side_effects(n):
            continue
        inputs = n.all_input_nodes
        graph.erase_node(n)
        erased.add(n)
        work += inputs
    return len(erased)


def topological(nodes: set[fx.Node]) -> list[fx.Node]:
    """``nodes`` (a small subgraph: an activation's cone, a norm's nodes) with every node after its inputs,
    in the same order on every run; cheaper than scanning the whole graph for their positions."""
    out: list[fx.Node] = []
    seen: set[fx.Node] = set()

    def visit(n: fx.Node) -> None:
        if n in seen or n not in nodes:
            return
        seen.add(n)
        for a in n.all_input_nodes:
            visit(a)
        out.append(n)

    for n in sorted(nodes, key=lambda n: n.name):  # any fixed order; visit() puts inputs first
        visit(n)
    return out
