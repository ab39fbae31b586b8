"""Norms identified by what they compute, whatever their spelling.

A written-out LayerNorm or RMSNorm is a small subgraph from one tensor x to an output z made of
pointwise ops, dtype casts and reductions over the last dim (with keepdim), whose only other leaves
are parameters of shape [D] and python scalars:

    HF LLaMA:   h = x.to(f32); y = h * rsqrt(h.pow(2).mean(-1, keepdim=True) + eps); z = w * y.to(dt)
    T5:         v = x.to(f32).pow(2).mean(-1, keepdim=True); y = x * rsqrt(v + eps); z = w * y
    Gemma:      y = x.float() * rsqrt(...); z = (y * (1 + w.float())).type_as(x)
    by hand:    m = x.mean(-1, keepdim=True); c = x - m; v = (c * c).mean(-1, keepdim=True)
                z = w * (c / sqrt(v + eps)) + b

Spellings are endless (which tensor the multiply reads, where the casts sit, ``rsqrt`` or ``/ sqrt``,
``pow(2)`` or ``c * c``, ``mean`` or ``sum / D``), so the subgraph is not matched op by op. It is
*evaluated*: in float64, casts neutralised, on probe rows (some of them small, so that eps shows), with
random values for the parameter leaves, and compared with the reference
``norm(x) * (weight + offset) + bias`` for every assignment of the leaves to the roles weight and bias,
offset 0 or 1 (Gemma's ``1 + weight``), RMSNorm or LayerNorm, and eps among the subgraph's float
constants. What matches is what ``approxbp::norm_shared`` computes, with the recovered parameters.

Search: from each reduction over the last dim (graph order), the pointwise descendants z are tried
from the furthest (at most ``_DEPTH`` steps away) and, for each, the inputs x from the furthest up the
reduction's input chain (through casts that do not lose precision). The first match wins; its nodes are
claimed so that the second reduction of a LayerNorm does not start another search.

``x / (sqrt(var) + eps)`` (eps outside the root) is a different function, which the op does not
compute: it is recognised and returned with a reason to leave it alone.
"""

from __future__ import annotations

import itertools
import math
import operator
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
import torch.fx as fx
from torch import nn

from ._graph import arg, topological, value

__all__ = ["ComputedNorm", "identify", "is_reduction"]

# How many steps below the reduction an output z may lie: the longest common form (a LayerNorm in fp32
# with bias, cast back) is 9 steps from its first mean.
_DEPTH = 12
# How many steps above the reduction its input x may lie (LLaMA: pow <- to <- x).
_CHAIN = 4

_POINTWISE_FUNCTIONS = {
    operator.add, operator.sub, operator.mul, operator.truediv, operator.neg, operator.pow,
    torch.add, torch.sub, torch.mul, torch.div, torch.true_divide, torch.pow, torch.neg, torch.rsqrt, torch.sqrt,
    torch.reciprocal, torch.square,
}
_POINTWISE_METHODS = {
    "add", "sub", "mul", "div", "true_divide", "pow", "neg", "rsqrt", "sqrt", "reciprocal", "square",
    "__add__", "__radd__", "__sub__", "__rsub__", "__mul__", "__rmul__", "__truediv__", "__rtruediv__", "__pow__",
}
# dtype casts: the first argument is the data, the rest (a dtype, a device, a tensor to take the dtype of)
# is not
_CAST_METHODS = {"to", "float", "double", "half", "bfloat16", "type", "type_as"}
_REDUCTION_FUNCTIONS = {torch.mean, torch.sum, torch.var, torch.std, torch.var_mean, torch.std_mean}
_REDUCTION_METHODS = {"mean", "sum", "var", "std"}
_TUPLE_REDUCTIONS = {torch.var_mean, torch.std_mean}  # their getitem nodes belong to the subgraph


@dataclass
class ComputedNorm:
    """A subgraph that computes ``norm(x) * (weight + offset) + bias`` and what it is made of."""

    z: fx.Node
    x: fx.Node
    weight: fx.Node | None
    bias: fx.Node | None
    offset: float
    eps: float
    rms: bool
    y_dtype: torch.dtype | None  # the normalised value's dtype before the affine (None: unknown)
    z_dtype: torch.dtype | None
    nodes: frozenset[fx.Node] = field(default_factory=frozenset)  # the subgraph, x and parameters excluded
    skip: str = ""  # why it must be left alone (a form the op does not compute); empty: it can be rewritten

    @property
    def pattern(self) -> str:
        return ("rms_norm" if self.rms else "layer_norm") + " (computed)" + (", 1 + weight" if self.offset else "")


def _is_cast(n: fx.Node) -> bool:
    return n.op == "call_method" and n.target in _CAST_METHODS


def _is_pointwise(n: fx.Node) -> bool:
    if n.op == "call_function":
        return n.target in _POINTWISE_FUNCTIONS
    return n.op == "call_method" and n.target in _POINTWISE_METHODS


def _is_tuple_item(n: fx.Node) -> bool:
    return (n.op == "call_function" and n.target is operator.getitem and isinstance(n.args[0], fx.Node)
            and n.args[0].op == "call_function" and n.args[0].target in _TUPLE_REDUCTIONS)


def _is_any_reduction(n: fx.Node) -> bool:
    if n.op == "call_function":
        return n.target in _REDUCTION_FUNCTIONS
    return n.op == "call_method" and n.target in _REDUCTION_METHODS


def _allowed(n: fx.Node) -> bool:
    return _is_pointwise(n) or _is_cast(n) or _is_any_reduction(n) or _is_tuple_item(n)


def _reduced(n: fx.Node) -> Any:
    """What a reduction reduces (given positionally, or as ``input=``)."""
    return n.args[0] if n.args else n.kwargs.get("input")


def is_reduction(n: fx.Node) -> bool:
    """A reduction over the last dim that keeps it (``x.mean(-1, keepdim=True)``, ``var_mean``, ...):
    where a norm's search starts. Reductions over other dims never belong to a norm."""
    if not _is_any_reduction(n):
        return False
    x = _reduced(n)
    if not isinstance(x, fx.Node):
        return False
    # var/std(x, dim, unbiased, keepdim): keepdim is the fourth positional argument there
    keepdim = arg(n, 3 if n.target in (torch.var, torch.std, torch.var_mean, torch.std_mean, "var", "std") else 2, "keepdim", False)
    if keepdim is not True:
        return False
    dim = arg(n, 1, "dim")
    if isinstance(dim, (list, tuple)):
        if len(dim) != 1:
            return False
        dim = dim[0]
    if not isinstance(dim, int) or isinstance(dim, bool):
        return False
    xv = value(x)
    return dim == -1 or (xv is not None and dim == xv.dim() - 1)


def _data_inputs(n: fx.Node) -> list[fx.Node]:
    """The inputs whose values flow into n (a cast's dtype reference does not)."""
    if _is_cast(n) or _is_tuple_item(n):
        return [n.args[0]] if isinstance(n.args[0], fx.Node) else []
    return list(n.all_input_nodes)


def _is_parameter(gm: fx.GraphModule, n: fx.Node, d: int) -> bool:
    """A parameter of shape [d]: a get_attr of one, or a placeholder whose example value is one."""
    if n.op == "get_attr":
        t: Any = gm
        for part in str(n.target).split("."):
            t = getattr(t, part, None)
        return isinstance(t, torch.Tensor) and tuple(t.shape) == (d,)
    if n.op != "placeholder":
        return False
    v = value(n)
    return v is not None and (isinstance(v, nn.Parameter) or v.requires_grad) and tuple(v.shape) == (d,)


def _precision(dtype: torch.dtype) -> tuple[int, int]:
    info = torch.finfo(dtype)
    return info.bits, int(-math.log2(info.eps))


def _widens(n: fx.Node) -> bool:
    """n is a cast that keeps every value of its input exactly (same dtype, or a wider float)."""
    src, dst = value(n.args[0]), value(n)
    if src is None or dst is None or not src.is_floating_point() or not dst.is_floating_point():
        return False
    if src.dtype == dst.dtype:
        return True
    (sb, sm), (db, dm) = _precision(src.dtype), _precision(dst.dtype)
    return db >= sb and dm >= sm


def _input_chain(gm: fx.GraphModule, r: fx.Node, d: int) -> list[fx.Node]:
    """The possible x of a norm whose reduction is r, nearest first: r's input and what it is computed
    from by single-input pointwise ops (``pow(2)``, ``h * h``) and casts that lose nothing."""
    chain = [_reduced(r)]
    while len(chain) <= _CHAIN:
        n = chain[-1]
        if _is_cast(n):
            if not _widens(n):
                break
        elif not _is_pointwise(n):
            break
        tensors = {a for a in _data_inputs(n) if not _is_parameter(gm, a, d)}
        if len(tensors) != 1 or len(tensors) != len(set(_data_inputs(n))):
            break
        chain.append(tensors.pop())
    return chain


def _descendants(r: fx.Node, order: dict[fx.Node, int]) -> list[fx.Node]:
    """Nodes reachable from r through allowed ops within ``_DEPTH`` steps, furthest (graph order) first."""
    seen: set[fx.Node] = {r}
    frontier = [r]
    for _ in range(_DEPTH):
        frontier = [u for n in frontier for u in n.users if u not in seen and _allowed(u)]
        seen.update(frontier)
        if not frontier:
            break
    return sorted(seen, key=order.__getitem__, reverse=True)


def _subgraph(gm: fx.GraphModule, z: fx.Node, x: fx.Node, r: fx.Node, d: int
              ) -> tuple[list[fx.Node], list[fx.Node]] | None:
    """(nodes in graph order, parameter leaves) of the subgraph from x to z, or None when it reads any
    other tensor, holds an op that is not allowed, misses r, or an inner value is used outside it."""
    nodes: set[fx.Node] = set()
    params: list[fx.Node] = []
    reaches_x = False
    stack = [z]
    while stack:
        n = stack.pop()
        if n is x:
            reaches_x = True
            continue
        if n in nodes or n in params:
            continue
        if _is_parameter(gm, n, d):
            params.append(n)
            continue
        if not _allowed(n):
            return None
        nodes.add(n)
        stack += _data_inputs(n)
    if not reaches_x or r not in nodes or len(params) > 2:
        return None
    if any(u not in nodes for n in nodes if n is not z for u in n.users):
        return None
    return topological(nodes), params


def _evaluate(gm: fx.GraphModule, nodes: list[fx.Node], env: dict[fx.Node, Any]) -> dict[fx.Node, Any] | None:
    """Values of ``nodes`` in float64 given those of x and the parameters in ``env``; casts are identities."""
    env = dict(env)

    def load(a: Any) -> Any:
        return fx.node.map_arg(a, lambda n: env[n])

    try:
        for n in nodes:
            if _is_cast(n):
                env[n] = env[n.args[0]]
                continue
            args, kwargs = load(n.args), dict(load(n.kwargs))
            kwargs.pop("dtype", None)  # a reduction's accumulation dtype: float64 throughout here
            if n.op == "call_function":
                env[n] = n.target(*args, **kwargs)
            else:
                env[n] = getattr(args[0], n.target)(*args[1:], **kwargs)
    except Exception:  # an op that does not accept the probe cannot be part of a norm we know
        return None
    return env


def _constants(nodes: Iterable[fx.Node]) -> list[float]:
    """The float constants the subgraph uses that could be an eps."""
    found: list[float] = []

    def collect(a: Any) -> None:
        if isinstance(a, float) and 0.0 < a < 0.01 and a not in found:
            found.append(a)
        elif isinstance(a, (list, tuple)):
            for b in a:
                collect(b)
        elif isinstance(a, dict):
            for b in a.values():
                collect(b)

    for n in nodes:
        collect(n.args)
        collect(n.kwargs)
    return found or [0.0]


def _probe(shape: tuple[int, ...], eps: float, generator: torch.Generator) -> torch.Tensor:
    """Rows of mean square about 1 and, so that eps shows, about eps / 10, eps and 10 eps; each row has
    an offset so that LayerNorm's centring shows too."""
    rows, d = shape[-2], shape[-1]
    base = torch.randn(rows, d, generator=generator, dtype=torch.float64)
    base = base + torch.empty(rows, 1, dtype=torch.float64).uniform_(-2, 2, generator=generator)
    scales = [1.0, 0.5, 2.0, 1.0]
    if eps > 0:
        scales += [math.sqrt(eps) * s for s in (0.3, 1.0, 3.0, 10.0)]
    scales += [1.0] * (rows - len(scales))
    return (base * torch.tensor(scales[:rows], dtype=torch.float64)[:, None]).reshape(shape)


def _normalize(x: torch.Tensor, eps: float, rms: bool, inside: bool) -> torch.Tensor:
    c = x if rms else x - x.mean(-1, keepdim=True)
    ms = c.pow(2).mean(-1, keepdim=True)
    return c / torch.sqrt(ms + eps) if inside else c / (torch.sqrt(ms) + eps)


def _close(a: Any, b: torch.Tensor) -> bool:
    return isinstance(a, torch.Tensor) and a.shape == b.shape and bool(torch.allclose(a, b, rtol=1e-6, atol=1e-9))


@dataclass
class _Match:
    rms: bool
    eps: float
    inside: bool  # eps inside the root: what the op computes
    weight: fx.Node | None
    bias: fx.Node | None
    offset: float
    env: dict[fx.Node, Any]
    normalized: torch.Tensor


def _roles(params: list[fx.Node]) -> list[tuple[fx.Node | None, fx.Node | None]]:
    """(weight, bias) for every way the parameter leaves can play those roles."""
    if not params:
        return [(None, None)]
    if len(params) == 1:
        return [(params[0], None), (None, params[0])]
    return [(params[0], params[1]), (params[1], params[0])]


def _match(gm: fx.GraphModule, x: fx.Node, nodes: list[fx.Node], params: list[fx.Node], shape: tuple[int, ...],
           z: fx.Node) -> _Match | None:
    g = torch.Generator().manual_seed(0)
    d = shape[-1]
    values = {p: torch.rand(d, generator=g, dtype=torch.float64) + 0.5 for p in params}
    if len(params) == 2:  # a weight near 1 and a bias near 0 must not be confused: make them differ clearly
        values[params[1]] = values[params[1]] - 1.0
    for eps in _constants(nodes):
        xs = _probe(shape, eps, g)
        env = _evaluate(gm, nodes, {x: xs, **values})
        if env is None:
            return None
        out = env[z]
        for inside, rms in itertools.product((True, False), (True, False)):
            normalized = _normalize(xs, eps, rms, inside)
            for (w, b), offset in itertools.product(_roles(params), (0.0, 1.0)):
                if offset and w is None:
                    continue
                ref = normalized
                if w is not None:
                    ref = ref * (values[w] + offset)
                if b is not None:
                    ref = ref + values[b]
                if _close(out, ref):
                    return _Match(rms, eps, inside, w, b, offset, env, normalized)
    return None


def _dtype(n: fx.Node) -> torch.dtype | None:
    v = value(n)
    return None if v is None else v.dtype


def identify(gm: fx.GraphModule, r: fx.Node, order: dict[fx.Node, int]) -> ComputedNorm | None:
    """The norm whose reduction is r (``is_reduction(r)``), or None; ``order``: each node's graph index."""
    x0 = _reduced(r)
    xv = value(x0)
    if xv is None or xv.dim() < 2 or not xv.is_floating_point():
        return None
    try:
        d = int(xv.shape[-1])
    except (TypeError, ValueError):  # a symbolic hidden size: parameters cannot be told apart by shape
        return None
    rows = 12 if d != 12 else 13  # differs from d, so a reduction over the wrong dim cannot pass by shape
    shape = (1,) * (xv.dim() - 2) + (rows, d)
    chain = _input_chain(gm, r, d)
    for z in _descendants(r, order):
        if z is r or _is_tuple_item(z) or not isinstance(value(z), torch.Tensor) or value(z).shape != xv.shape:
            continue
        for x in reversed(chain):
            found = _subgraph(gm, z, x, r, d)
            if found is None:
                continue
            nodes, params = found
            m = _match(gm, x, nodes, params, shape, z)
            if m is None:
                continue
            # y: the last node holding the normalised value itself (after its cast, if any)
            ys = [n for n in nodes if _close(m.env[n], m.normalized)]
            y_dtype = _dtype(max(ys, key=order.__getitem__)) if ys else _dtype(r)
            skip = "" if m.inside else (
                "eps is added outside the square root (x / (sqrt(var) + eps)); the shared norm computes "
                "x / sqrt(var + eps), a different function")
            return ComputedNorm(z, x, m.weight, m.bias, m.offset, m.eps, m.rms, y_dtype, _dtype(z),
                                frozenset(nodes), skip)
    return None
