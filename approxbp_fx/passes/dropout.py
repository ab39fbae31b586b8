"""Dropout keeps a 1-bit mask, and the linears after it keep dropout's input instead of its output.

    before:  d = F.dropout(x, p, training=True)      (or torch.dropout, nn.Dropout; PEFT's lora_dropout)
                                                       keeps its mask: 4 bytes/elem on CPU, 1 on CUDA
             a = linear(d, A)                          keeps d (a new full-size tensor), A trainable
    after:   d, mask = approxbp::dropout_packed(x, p)                          keeps mask (1 bit/elem)
             a = approxbp::linear_shared(d, x, A, None, None, None, 0.0, False, None, mask, scale, None)
                                                       keeps x and the same mask; rebuilds d in backward

Forward values are bit for bit torch's: the op draws exactly what torch's dropout draws for the same RNG
state, and the linear computes on d as before. Both backwards are exact.

A site is a training-mode dropout with a constant p in (0, 1); eval mode and p == 0 are the identity and
no site. The linears (``linear``/nn.Linear/GPT-2's ``addmm``, possibly behind view/reshape) with a
trainable weight are rewritten when every other reader of d keeps nothing of it (an add, a linear with a
frozen weight, the graph's output); otherwise d is kept anyway and only the mask is packed.

Keeping x instead of d costs nothing where x is kept anyway: by another dropout site on the same x (PEFT
gives q, k and v each its own ``lora_dropout`` of one hidden state) or by a linear reading x itself. It
is neutral where nobody else keeps x (x instead of d, the same size), except under autocast: there a
linear keeps its own bf16 cast of d, and x at its wider dtype could be more. The sites reading one x are
decided together: their linears are rewritten when the copies of d they stop keeping weigh at least x.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ..inners import get_inner
from ..ops.dropout import dropout_scale, mask_bytes
from ..options import Options
from ._edit import Candidate, GraphEdit
from ._graph import (
    ADD_FUNCTIONS, LINEAR_FUNCTIONS, VIEW_FUNCTIONS, VIEW_METHODS, Ref, arg, dropout_call, is_call, linear_call,
    module_path, requires_grad, target_module, value,
)

__all__ = ["FAMILY", "OPTIONS", "find"]

FAMILY = "dropout"
#: the option that switches the family on: exact 1-bit masks
OPTIONS = ("masks",)

# devices whose dropout keeps a bool mask (one byte per element) rather than a mask of x's dtype
_BOOL_MASK_DEVICES = ("cuda", "xpu")

@dataclass
class _Linear:
    node: fx.Node  # the linear (or addmm) call
    chain: list[fx.Node]  # view ops between d and the linear, in order
    weight: Ref
    bias: Ref
    transposed: bool = False  # addmm(bias, d, W), d @ W: W is [in, out]
    input: fx.Node | None = None  # what the linear reads: d or a view of it


@dataclass
class _Site:
    d: fx.Node  # the dropout's output
    x: fx.Node
    p: float
    skip: str = ""  # why the dropout is left alone
    linears: list[_Linear] = field(default_factory=list)  # those with a trainable weight
    blocker: str = ""  # why the linears cannot be rewritten (another reader may keep d)
    take_linears: bool = False  # decided per x: rewrite the linears
    x_cost: int = 0  # this site's share of the bytes of x its linears newly keep
    linear_skip: str = ""  # why the linears are left alone although they could be rewritten


def _site(gm: fx.GraphModule, n: fx.Node) -> _Site | None:
    """The dropout site at n; None where n is no dropout or one that is the identity (eval mode, p == 0)."""
    call = dropout_call(gm, n)
    if call is None:
        return None
    x, p, training, inplace = call
    if training is False or (isinstance(p, (int, float)) and p == 0):
        return None  # the identity: nothing is kept
    if not isinstance(x, fx.Node):
        return None
    site = _Site(n, x, float(p) if isinstance(p, (int, float)) else 0.0)
    xv = value(x)
    if training is not True:
        site.skip = f"training flag {training!r} is not a constant"
    elif not isinstance(p, (int, float)):
        site.skip = f"dropout probability {p!r} is not a constant"
    elif not 0.0 < p < 1.0:
        site.skip = f"dropout probability {p} is outside (0, 1)"
    elif inplace is not False:
        site.skip = "in-place dropout: x itself is overwritten, and readers of x after it see dropout's output"
    elif xv is not None and not xv.is_floating_point():
        site.skip = f"input dtype {xv.dtype} is not floating point"
    return site


def _readers(gm: fx.GraphModule, d: fx.Node) -> tuple[list[_Linear], str]:
    """The linears with a trainable weight that read d (behind views), and the first reader that may keep d
    itself (empty if none)."""
    linears: list[_Linear] = []
    todo: list[tuple[fx.Node, list[fx.Node]]] = [(d, [])]
    while todo:
        cur, chain = todo.pop()
        for u in cur.users:
            # views that keep the element order: the mask still lines up with the linear's input
            if is_call(u, VIEW_FUNCTIONS, VIEW_METHODS) and u.args and u.args[0] is cur:
                todo.append((u, chain + [u]))
                continue
            if is_call(u, ADD_FUNCTIONS + (getattr,), ("add", "__add__", "size", "dim")) or u.op == "output":
                continue  # keeps nothing (an add, d.shape, ...)
            lin = linear_call(gm, u)
            if lin is None or lin.input is not cur:
                what = u.target if u.op != "call_function" else getattr(u.target, "__name__", str(u.target))
                return linears, f"reader {u.name} ({what}) may keep dropout's output itself"
            if requires_grad(gm, lin.weight):
                linears.append(_Linear(u, chain, lin.weight, lin.bias, lin.transposed, cur))
            # a frozen weight: the linear keeps nothing of its input
    return linears, ""


def _itemsize(n: fx.Node) -> int:
    v = value(n)
    return 4 if v is None else v.element_size()


def _numel(n: fx.Node) -> int:
    v = value(n)
    return 0 if v is None else math.prod(int(s) for s in v.shape)


def _kept_copies(site: _Site) -> int:
    """Bytes the linears keep of d: d itself once (views share its storage), or under autocast each
    linear's own cast of d (the autocast cache holds casts of leaves, the parameters, only)."""
    numel, own = _numel(site.d), _itemsize(site.d)
    sizes = [_itemsize(c.node) for c in site.linears]
    casts = [s for s in sizes if s != own]
    return numel * (sum(casts) + (own if len(casts) < len(sizes) else 0))


# Ops whose backward keeps their output: an x they produce is kept whatever the linears do
_KEEPS_OUTPUT_FUNCTIONS = (torch.tanh, torch.sigmoid, torch.exp, torch.softmax, F.softmax, F.tanh, F.sigmoid)
_KEEPS_OUTPUT_METHODS = ("tanh", "sigmoid", "exp", "softmax")
_KEEPS_OUTPUT_MODULES = (nn.Tanh, nn.Sigmoid, nn.Softmax)


def _keeps_itself(gm: fx.GraphModule, x: fx.Node, sites: set[fx.Node]) -> bool:
    """Whether backward keeps x whatever the dropout sites do: its producer keeps its output (tanh,
    sigmoid, softmax, exp), or a reader other than the sites is a trainable linear computing in x's dtype.
    Readers that other families rewrite (norms, activations) are not counted: they may stop keeping x."""
    xv = value(x)
    if xv is not None and not xv.requires_grad:
        return False
    if is_call(x, _KEEPS_OUTPUT_FUNCTIONS, _KEEPS_OUTPUT_METHODS) or isinstance(target_module(gm, x),
                                                                               _KEEPS_OUTPUT_MODULES):
        return True
    return any(u not in sites and is_call(u, LINEAR_FUNCTIONS) and arg(u, 0, "input") is x
               and requires_grad(gm, arg(u, 1, "weight")) and _itemsize(u) == _itemsize(x) for u in x.users)


def _casts(site: _Site) -> bool:
    """Whether the site's linears compute in another dtype than d (autocast): they keep casts of d."""
    return any(_itemsize(c.node) != _itemsize(site.d) for c in site.linears)


def _decide_linears(gm: fx.GraphModule, sites: list[_Site], traced: bool) -> None:
    """Decide, per dropout input x, whether the linears of the sites reading it keep x instead of d.

    ``traced``: the inner compiler traces through the ops and partitions the graph itself. Under
    autocast it was measured to keep x itself plus dropout's float noise (4 bytes per element, not the
    1-bit mask) once the linears read the mask, and to recompute what produced x: both are counted."""
    groups: dict[fx.Node, list[_Site]] = {}
    for s in sites:
        if not s.skip and s.linears and not s.blocker:
            groups.setdefault(s.x, []).append(s)
    for x, group in groups.items():
        dropped = sum(_kept_copies(s) for s in group)
        x_bytes = _numel(x) * _itemsize(x)
        if traced and any(_casts(s) for s in group):
            cost = x_bytes + _numel(x) * 4
        else:
            cost = 0 if _keeps_itself(gm, x, {s.d for s in group}) else x_bytes
        if dropped >= cost:
            for s in group:
                s.take_linears = True
                s.x_cost = cost // len(group)  # the sites of one x share what keeping x costs
            continue
        xv = value(x)
        reason = (f"under autocast the linears keep casts of dropout's output ({dropped:,} bytes for the "
                  f"{len(group)} dropout(s) of {x.name}); keeping their {'' if xv is None else str(xv.dtype)[6:] + ' '}"
                  f"input instead would keep more ({cost:,} bytes)")
        for s in group:
            s.linear_skip = reason


def _mask_bytes_before(site: _Site, inner_name: str) -> int:
    """What the dropout itself keeps for backward before the rewrite."""
    xv = value(site.x)
    if xv is None or not xv.requires_grad:
        return 0  # no gradient flows to x: dropout keeps nothing
    numel = _numel(site.x)
    if xv.device.type in _BOOL_MASK_DEVICES or get_inner(inner_name).traceable_ops:
        return numel  # a bool mask (a compiler's decomposition keeps one on every device)
    return numel * xv.element_size()  # CPU: the scaled noise, a tensor like x


def find(gm: fx.GraphModule, options: Options) -> list[Candidate]:
    """Every training-mode dropout (module docstring), with the reason it is left alone where it is."""
    sites: list[_Site] = []
    for n in gm.graph.nodes:
        site = _site(gm, n)
        if site is None:
            continue
        if not site.skip:
            site.linears, site.blocker = _readers(gm, n)
        sites.append(site)
    _decide_linears(gm, sites, get_inner(options.inner).traceable_ops)

    candidates: list[Candidate] = []
    for s in sites:
        xv = value(s.x)
        packed = mask_bytes(xv) if xv is not None else 0
        grad_x = xv is None or xv.requires_grad
        saved = max(_mask_bytes_before(s, options.inner) - packed, 0) if grad_x else 0
        linears = s.linears if s.take_linears else []
        if linears:
            # without a gradient into x the mask is new, kept by the linears
            saved += _kept_copies(s) - s.x_cost - (0 if grad_x else packed)
        pattern = "dropout (1-bit mask)" if not linears else f"dropout -> {len(linears)} x linear (keeps input)"
        reason = s.skip
        if not reason and not linears and not grad_x:
            reason = "no gradient flows into the dropout's input, so it keeps no mask" + (
                f"; its linears stay: {s.linear_skip or s.blocker}" if s.linears else "")
        candidates.append(Candidate(
            FAMILY, s.d.name, module_path(s.d), pattern, bytes_saved=saved, skip=reason,
            apply=lambda edit, s=s, linears=linears: _apply(edit, s, linears),
            replaces=(s.d, *(c.node for c in linears))))
        if s.linears and not linears and not reason:
            # the dropout is packed; say why its linears keep their own copy of d. Its own id: a linear's
            # name is the id another family's site at that linear may have; naming the linears in replaces
            # leaves it out of the report where an earlier family's site rewrote them
            candidates.append(Candidate(
                FAMILY, f"{s.d.name}->linears", module_path(s.linears[0].node),
                f"dropout -> {len(s.linears)} x linear (keeps input)",
                skip=s.linear_skip or s.blocker or "left to the dropout's own site",
                replaces=tuple(c.node for c in s.linears)))
    return candidates


def _apply(edit: GraphEdit, site: _Site, linears: list[_Linear]) -> None:
    with edit.inserting_before(site.d):
        pair = edit.call(torch.ops.approxbp.dropout_packed.default, (site.x, site.p))
        out = edit.call(operator.getitem, (pair, 0))
        mask = edit.call(operator.getitem, (pair, 1))
    edit.replace(site.d, out)
    xv = value(site.x)
    scale = dropout_scale(site.p, xv.dtype if xv is not None else torch.float32)
    for c in linears:
        with edit.inserting_before(c.node):
            shared = edit.node(site.x)
            for view in c.chain:  # x through the same views as the linear's input
                shared = edit.copy(view, lambda a, v=view, s=shared: s if a is edit.node(v.args[0]) else a)
            linear_input = edit.node(c.input)  # the new d (or a view of it)
            new = edit.call(torch.ops.approxbp.linear_shared.default, (
                linear_input, shared, edit.ref(c.weight), edit.ref(c.bias), None, None, 0.0, c.transposed,
                None, mask, scale, None))
        edit.replace(c.node, new)
