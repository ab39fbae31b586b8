"""What a backward keeps: which readers of a tensor keep it, and which views pin its storage.

Shared by the families that decide by what is kept (exact masks, split parts). A saved view keeps its whole
base storage alive, so every question is asked of a tensor together with its views: ``through_views``
walks them, ``keeps`` answers for one reader (None: it keeps nothing of its input; a reason; "?" for an
op it does not know, which counts as keeping).
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ._graph import LINEAR_FUNCTIONS, is_basic_index, requires_grad, target_module, value

__all__ = ["is_view", "through_views", "keeps", "TRAINED_LINEAR", "OUTPUT_KEEPERS", "OUTPUT_KEEPER_METHODS",
           "OUTPUT_KEEPER_MODULES", "is_split", "parts_of", "split_site", "kept_siblings", "keeps_output"]

# Ops that alias (or, for casts and reshape, may alias) their input: whoever keeps a view keeps the storage.
_VIEW_METHODS = {"view", "reshape", "transpose", "permute", "unsqueeze", "squeeze", "flatten", "unflatten",
                 "expand", "expand_as", "view_as", "reshape_as", "contiguous", "t", "narrow", "split", "chunk",
                 "unbind", "to", "type", "float", "half", "bfloat16", "double", "detach"}
_VIEW_FUNCTIONS = {torch.reshape, torch.flatten, torch.transpose, torch.permute, torch.squeeze, torch.unsqueeze,
                   torch.narrow, torch.split, torch.chunk, torch.unbind, torch.t, torch.movedim, torch.detach,
                   operator.getitem}
# Ops whose backward keeps nothing of their inputs
_KEEP_NOTHING_FUNCTIONS = {operator.add, operator.sub, operator.neg, operator.iadd, torch.add, torch.sub, torch.neg,
                           torch.cat, torch.stack, torch.sum, torch.mean, torch.clone, F.pad}
_KEEP_NOTHING_METHODS = {"add", "sub", "neg", "__add__", "__radd__", "__sub__", "sum", "mean", "clone"}
_KEEP_NOTHING_MODULES = (nn.Identity,)
_DROPOUT_FUNCTIONS, _DROPOUT_MODULES = {F.dropout, torch.dropout}, (nn.Dropout,)
# Ops that keep their own output for backward: an input they produce is kept whatever its consumer does
OUTPUT_KEEPERS = {torch.relu, F.relu, torch.sigmoid, F.sigmoid, torch.tanh, F.tanh, torch.exp, torch.softmax,
                   F.softmax, F.log_softmax, torch.sqrt, torch.rsqrt}
OUTPUT_KEEPER_METHODS = {"relu", "sigmoid", "tanh", "exp", "softmax", "log_softmax", "sqrt", "rsqrt"}
OUTPUT_KEEPER_MODULES = (nn.ReLU, nn.Sigmoid, nn.Tanh, nn.Softmax, nn.LogSoftmax)
_MATMUL_FUNCTIONS = {operator.matmul, torch.matmul, torch.mm, torch.bmm}
_MATMUL_METHODS = {"matmul", "mm", "bmm", "__matmul__"}
_MUL_FUNCTIONS, _MUL_METHODS = {operator.mul, torch.mul}, {"mul", "__mul__", "__rmul__"}
_DIV_FUNCTIONS, _DIV_METHODS = {operator.truediv, torch.div}, {"div", "__truediv__"}


def is_view(gm: fx.GraphModule, n: fx.Node) -> bool:
    return (n.op == "call_function" and n.target in _VIEW_FUNCTIONS) or (
        n.op == "call_method" and n.target in _VIEW_METHODS)


TRAINED_LINEAR = "a linear whose weight is trained"


def through_views(gm: fx.GraphModule, n: fx.Node) -> list[tuple[fx.Node, fx.Node]]:
    """(tensor, user) for every user of n that is not a view, following views of n."""
    out, stack = [], [n]
    while stack:
        t = stack.pop()
        for u in t.users:
            if is_view(gm, u):
                stack.append(u)
            else:
                out.append((t, u))
    return out


def keeps(gm: fx.GraphModule, u: fx.Node, t: fx.Node) -> str | None:
    """Why ``u``'s backward keeps its input ``t`` (None: it keeps nothing of it; "?" unknown)."""
    def other(args: tuple) -> list[object]:
        return [a for a in args[:2] if a is not t]

    if u.op == "output":
        return None
    if (u.op == "call_function" and u.target in _DROPOUT_FUNCTIONS) or (
            u.op == "call_module" and isinstance(target_module(gm, u), _DROPOUT_MODULES)):
        # A dropout keeps its mask, not its input; but the dropout family (same option) makes a trained
        # linear after it keep dropout's input instead of its output (measured on T5 with dropout 0.1:
        # relu masks there only added their own bytes)
        if any(keeps(gm, v, w) == TRAINED_LINEAR for w, v in through_views(gm, u)):
            return "a dropout whose trained linear keeps the dropout's input"
        return None
    if u.op == "call_module":
        mod = target_module(gm, u)
        if isinstance(mod, _KEEP_NOTHING_MODULES):
            return None
        if isinstance(mod, nn.Linear):
            return TRAINED_LINEAR if mod.weight.requires_grad else None
        return "?"
    fn = u.target
    is_fn, is_method = u.op == "call_function", u.op == "call_method"
    if (is_fn and fn in _KEEP_NOTHING_FUNCTIONS) or (is_method and fn in _KEEP_NOTHING_METHODS):
        return None
    if is_fn and fn in LINEAR_FUNCTIONS:
        weight = u.args[1] if len(u.args) > 1 else u.kwargs.get("weight")
        if u.args and u.args[0] is t and weight is not t:
            return TRAINED_LINEAR if requires_grad(gm, weight) else None
        return "a linear"
    if (is_fn and fn in _MATMUL_FUNCTIONS) or (is_method and fn in _MATMUL_METHODS):
        others = other(u.args)
        if len(others) == 1 and not requires_grad(gm, others[0]):
            return None
        return "a matmul whose other operand needs a gradient"
    if (is_fn and fn in _MUL_FUNCTIONS) or (is_method and fn in _MUL_METHODS):
        others = other(u.args)
        if len(others) == 1 and not requires_grad(gm, others[0]):
            return None
        return "a multiply by a tensor that needs a gradient"
    if (is_fn and fn in _DIV_FUNCTIONS) or (is_method and fn in _DIV_METHODS):
        if u.args and u.args[0] is t and u.args[1] is not t and not requires_grad(gm, u.args[1]):
            return None
        return "a division"
    return "?"


_SPLIT_FUNCTIONS = {torch.chunk, torch.split, torch.tensor_split, torch.unbind}
_SPLIT_METHODS = {"chunk", "split", "tensor_split", "unbind", "split_with_sizes"}


def is_split(n: fx.Node) -> bool:
    return (n.op == "call_function" and n.target in _SPLIT_FUNCTIONS) or (
        n.op == "call_method" and n.target in _SPLIT_METHODS)


def parts_of(base: fx.Node) -> list[fx.Node] | None:
    """The parts of the tensor ``base`` its readers take: the items of a ``chunk``/``split``/``unbind`` and
    basic slices; None when a reader does anything else with the whole tensor, or base is no tensor (the
    items of an op returning a tuple share no storage)."""
    if not isinstance(value(base), torch.Tensor):
        return None
    parts = []
    for r in base.users:
        if is_split(r) and r.args and r.args[0] is base:
            if not all(u.op == "call_function" and u.target is operator.getitem for u in r.users):
                return None
            parts += list(r.users)
        elif is_basic_index(r) and r.args[0] is base:
            parts.append(r)
        else:
            return None
    return parts


def _pinned(gm: fx.GraphModule, base: fx.Node) -> bool:
    """Whether base's storage lives on whatever its parts do: a graph input or attribute, a view of some
    other tensor (whose other readers may hold it), or the output of an op whose backward reads it."""
    return base.op in ("placeholder", "get_attr") or is_view(gm, base) or keeps_output(gm, base)


def _holds(gm: fx.GraphModule, part: fx.Node) -> bool:
    """Whether something holds ``part`` (through views) past the forward: a reader may keep it for
    backward, or it is returned from the graph."""
    return any(u.op == "output" or keeps(gm, u, t) is not None for t, u in through_views(gm, part))


def split_site(gm: fx.GraphModule, base: fx.Node) -> tuple[list[fx.Node], list[fx.Node]] | None:
    """(parts, held parts) of a tensor that is only taken apart and whose storage nothing else pins; None
    otherwise. Copying the held parts frees base once the others are done with."""
    parts = parts_of(base) if base.op in ("call_function", "call_method", "call_module") else None
    if not parts or _pinned(gm, base):
        return None
    return parts, [p for p in parts if _holds(gm, p)]


def kept_siblings(gm: fx.GraphModule, x: fx.Node, nodes: list[fx.Node]) -> list[fx.Node]:
    """The other parts of the tensor x is a part of, where something holds them.

    ``gate, up = fused(h).chunk(2, -1); silu(gate) * up``: up is a view, so keeping it keeps all of
    ``fused(h)``, and a 2-bit code at the gate (``nodes``: the activation that reads x) frees nothing
    unless up gets storage of its own. Empty where x is not such a part, where x is read elsewhere, or
    where the whole tensor stays alive anyway (a reader of it, or a producer that keeps it)."""
    if any(u not in nodes for u in x.users) or not x.args or not isinstance(x.args[0], fx.Node):
        return []
    base = x.args[0]
    if is_split(base):
        base = base.args[0]  # x is an item of a split of base
    elif not is_basic_index(x):
        return []
    site = split_site(gm, base) if isinstance(base, fx.Node) else None
    if site is None or x not in site[0]:
        return []
    return [p for p in site[1] if p is not x]


def keeps_output(gm: fx.GraphModule, n: fx.Node) -> bool:
    """n's backward reads its own output (relu, sigmoid, tanh, softmax, exp, sqrt): n's result stays kept."""
    return (n.op == "call_function" and n.target in OUTPUT_KEEPERS) or (
        n.op == "call_method" and n.target in OUTPUT_KEEPER_METHODS) or (
        n.op == "call_module" and isinstance(target_module(gm, n), OUTPUT_KEEPER_MODULES))
