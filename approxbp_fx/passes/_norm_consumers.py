"""What may stand between a norm's output and the layers that share it: the links of a consumer chain.

    z -> [views, transposes, casts] -> [row gather z2d[index]] -> [views, casts] -> [dropout] -> [views, no-op casts]
      -> linear (F.linear, nn.Linear, GPT-2's addmm), grouped matmul (a mixture-of-experts' experts) or the
         in-projection of ``F.multi_head_attention_forward`` (``_attention.py``)

or, for an adaptive norm, ``z -> [views] -> [modulations: * s, + t] -> [reshapes, casts, dropout] -> linear``
(``modulation``; the multiplies are consumers themselves).

The walk knows where the normalized dim is (``dim_after_view``): views and transposes may move it; a
layer's backward rebuilds its input from y_hat put through the same views, with the affine broadcast
along wherever the dim ended up (a linear over tokens reads ``norm(x).transpose(1, 2)``).

``norms._consumers`` walks the chain with these predicates; each answers for one node ``u`` reading
``cur``: None when ``u`` is not that kind of link, a value when it is one the rewrite can follow, and a
string (the reason) when it is that kind of link but cannot be shared exactly.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F

from .._compat import grouped_mm as grouped_mm_private
from ._graph import VIEW_FUNCTIONS, VIEW_METHODS, arg, dropout_call, is_basic_index, is_call, value
from ._keeps import is_split

__all__ = ["is_view", "is_permutation", "dim_after_view", "split_parts", "copies", "reads_metadata_only", "keeps_nothing", "modulation", "MUL_FUNCTIONS", "MUL_METHODS", "is_noop_cast", "is_widening_cast", "is_shape_view", "row_gather", "dropout_p", "grouped_mm", "GROUPED_MM_KEYWORDS"]

_CAST_METHODS = ("to", "float", "double", "half", "bfloat16", "type", "type_as")
_INDEX_SELECT = (torch.index_select,)


# read only cur's shape, dtype and device (``torch.zeros_like(hidden)`` for an experts' output buffer)
_METADATA_METHODS = ("new_zeros", "new_ones", "new_empty", "new_full", "size", "dim", "numel")
_METADATA_FUNCTIONS = (torch.zeros_like, torch.ones_like, torch.empty_like, torch.full_like)


# Views that permute dims, as Dynamo writes them (methods, and the torch functions of the same names)
_PERMUTE_METHODS = ("transpose", "permute", "t", "swapaxes", "swapdims", "movedim", "moveaxis")
_PERMUTE_FUNCTIONS = tuple(getattr(torch, name) for name in _PERMUTE_METHODS)


def is_permutation(u: fx.Node) -> bool:
    return is_call(u, _PERMUTE_FUNCTIONS, _PERMUTE_METHODS)


def is_view(u: fx.Node, cur: fx.Node) -> bool:
    """u is a view of cur: a reshape (``view``, ``reshape``, ...), a transpose or permute, or basic indexing."""
    return (is_call(u, VIEW_FUNCTIONS, VIEW_METHODS) or is_permutation(u) or is_basic_index(u)) and bool(u.args) \
        and u.args[0] is cur


def dim_after_view(u: fx.Node, cur: fx.Node, dim: int | None, d: int | None) -> int | None | str:
    """Where the normalized dim is in u's output, a view of cur in which it sits at ``dim``.

    Positions are negative (-1: last). None stands for a reshape that merged or split the last dim: its
    rows are still consecutive in the elements' order, and a later reshape whose last dim is d again
    gives rows back (``z.view(B, T * D).view(-1, D)``). A string: the reason the view cannot be followed."""
    cv, uv = value(cur), value(u)
    if cv is None or uv is None or d is None:
        return f"{u.name}: no shape information for the view"
    if is_call(u, VIEW_FUNCTIONS, VIEW_METHODS):
        # a reshape keeps the elements' order; where the normalized dim was moved, that order is no
        # longer rows of it (a later change may follow the dim through it)
        if dim is not None and dim != -1:
            return f"{u.name} reshapes a view whose normalized dim is not last"
        return -1 if uv.dim() > 0 and uv.shape[-1] == d else None
    if dim is None:
        return f"{u.name} rearranges a view whose last dim was merged or split"
    if is_permutation(u):
        perm = _permutation(u, cv.dim())
        if isinstance(perm, str):
            return perm
        return perm.index(cv.dim() + dim) - cv.dim()
    return _dim_after_index(u, cv.dim(), dim)


def split_parts(u: fx.Node, cur: fx.Node, dim: int | None) -> tuple[list[fx.Node], int] | str | None:
    """(the parts, where the normalized dim is in them) for ``cur.chunk(n, k)`` / ``split`` / ``unbind`` along
    another dim than the normalized one (ProphetNet's main and predict streams: ``h.chunk(2, dim=1)``), each
    part taken by ``parts[i]``: views of cur. A reason where the split cannot be followed; None: no split."""
    if not (is_split(u) and u.args and u.args[0] is cur):
        return None
    cv = value(cur)
    if cv is None:
        return f"{u.name}: no shape information for the split"
    unbind = is_call(u, (torch.unbind,), ("unbind",))
    k = arg(u, 1 if unbind else 2, "dim", 0)
    if not isinstance(k, int):
        return f"{u.name} splits along a dim known only at run time"
    k = k - cv.dim() if k >= 0 else k
    if dim is None:
        return f"{u.name} splits a view whose last dim was merged or split"
    if k == dim:
        return f"{u.name} splits the normalized dim"
    parts = list(u.users)
    if not all(is_call(p, (operator.getitem,)) and isinstance(p.args[1], int) for p in parts):
        return f"{u.name}: its parts are used other than by index"
    return parts, (dim + 1 if unbind and k > dim else dim)


def copies(u: fx.Node, cur: fx.Node) -> bool:
    """The view link u returns a copy of cur: ``contiguous`` or a reshape of a permuted cur whose strides allow
    no view. Eager's layer keeps that copy; the rewritten one keeps y_hat instead."""
    cv = value(cur)
    if cv is None or not is_call(u, VIEW_FUNCTIONS, VIEW_METHODS) or cv.is_contiguous():
        return False
    if is_call(u, methods=("contiguous",)):
        return True
    uv = value(u)
    try:
        torch.empty_strided(cv.shape, cv.stride(), device="meta").view(uv.shape)
    except RuntimeError:
        return True
    return False


def _permutation(u: fx.Node, ndim: int) -> list[int] | str:
    """Output dim i of the transpose/permute u is input dim perm[i]: found by running u's own call on a meta
    tensor whose dims have distinct sizes, so every spelling (``t``, ``movedim`` with tuples, negative dims)
    means what torch says."""
    rest_args, kwargs = u.args[1:], u.kwargs
    found: list[fx.Node] = []
    fx.node.map_arg((rest_args, kwargs), found.append)
    if found:
        return f"{u.name} permutes by dims known only at run time"
    probe = torch.empty(tuple(range(2, ndim + 2)), device="meta")
    try:
        out = getattr(probe, u.target)(*rest_args, **kwargs) if u.op == "call_method" else \
            u.target(probe, *rest_args, **kwargs)
    except (RuntimeError, TypeError, IndexError) as e:
        return f"{u.name}: cannot tell how it permutes dims ({e})"
    return [s - 2 for s in out.shape]


def _dim_after_index(u: fx.Node, ndim: int, dim: int) -> int | str:
    """The position of input dim ``dim`` in the output of basic indexing ``cur[index]``."""
    index = u.args[1] if isinstance(u.args[1], tuple) else (u.args[1],)
    used = sum(1 for i in index if i is not None and i is not Ellipsis)
    if sum(1 for i in index if i is Ellipsis) > 1 or used > ndim:
        return f"{u.name}: an index this walk does not read"
    expanded: list[Any] = []
    for i in index:
        expanded += [slice(None)] * (ndim - used) if i is Ellipsis else [i]
    if Ellipsis not in index:
        expanded += [slice(None)] * (ndim - used)
    target, src, out_pos = ndim + dim, 0, 0
    found = None
    for i in expanded:
        if i is None:
            out_pos += 1  # a new dim of size 1
            continue
        if src == target:
            if not isinstance(i, slice):
                return f"{u.name} takes one element of each row of the output"
            found = out_pos
        src += 1
        out_pos += isinstance(i, slice)
    return found - out_pos  # out_pos: the output's number of dims


def reads_metadata_only(u: fx.Node, cur: fx.Node) -> bool:
    """u uses cur's shape, dtype or device, never its values: it keeps nothing of cur. Also
    ``other.type_as(cur)`` / ``other.to(cur)`` (an attention mask cast to the hidden state's dtype)."""
    if is_call(u, methods=("type_as", "to")) and len(u.args) == 2 and u.args[1] is cur and u.args[0] is not cur:
        return not any(a is cur for a in u.kwargs.values())
    return is_call(u, _METADATA_FUNCTIONS, _METADATA_METHODS) and bool(u.args) and u.args[0] is cur and not any(
        a is cur for a in (*u.args[1:], *u.kwargs.values()))


# ops whose backward needs no values of their inputs, only shapes: the gradient is sliced or broadcast back
_SHAPE_ONLY_FUNCTIONS = (torch.cat, torch.concat, torch.stack, torch.sum, torch.mean)
_SHAPE_ONLY_METHODS = ("sum", "mean")


def keeps_nothing(gm: fx.GraphModule, u: fx.Node, cur: fx.Node) -> bool:
    """u computes from cur but keeps none of it for backward: a concatenation, a sum or mean (whose
    gradients need shapes only), an op of bitsandbytes (a linear over a frozen, quantized weight: QLoRA's
    base layers), or an ``autograd.Function`` that Dynamo traced as ``autograd_function_apply`` whose forward
    saves nothing computed from cur (bitsandbytes' ``MatMul4Bit`` saves its packed weight and recomputes the
    rest)."""
    if is_call(u, _SHAPE_ONLY_FUNCTIONS, _SHAPE_ONLY_METHODS):
        return True
    if u.op != "call_function":
        return False
    if getattr(u.target, "namespace", None) == "bitsandbytes":
        return True
    if u.target is not getattr(torch.ops.higher_order, "autograd_function_apply", None) or len(u.args) < 3:
        return False
    operands = list(u.args[2:])
    fwd = u.args[0]
    body = gm.get_submodule(fwd.target) if isinstance(fwd, fx.Node) and fwd.op == "get_attr" else None
    if not isinstance(body, fx.GraphModule) or cur not in operands:
        return False
    placeholders = [n for n in body.graph.nodes if n.op == "placeholder"]
    output = next(n for n in body.graph.nodes if n.op == "output")
    result = output.args[0]
    if len(placeholders) != len(operands) or not (isinstance(result, tuple) and len(result) == 2):
        return False  # not the (outputs, saved) layout this reads
    if not all(isinstance(r, (tuple, list)) for r in result):
        return False
    inputs = {placeholders[i] for i, a in enumerate(operands) if a is cur}
    saved = [n for n in result[1] if isinstance(n, fx.Node)]
    outputs = [n for n in result[0] if isinstance(n, fx.Node)]
    # nothing saved computed from cur, and no output that is cur or a view of it (a gradient-reversal
    # Function returns x.view_as(x): whatever keeps its output keeps cur)
    return not any(_depends_on(n, inputs) for n in saved) and not any(_aliases(n, inputs) for n in outputs)


def _depends_on(n: fx.Node, sources: set[fx.Node]) -> bool:
    todo, seen = [n], set()
    while todo:
        m = todo.pop()
        if m in sources:
            return True
        if m not in seen:
            seen.add(m)
            todo += m.all_input_nodes
    return False


def _aliases(n: fx.Node, sources: set[fx.Node]) -> bool:
    """n is one of ``sources`` or reached from one through view ops only."""
    while n not in sources:
        if not (is_call(n, VIEW_FUNCTIONS, VIEW_METHODS + ("view_as", "detach", "alias")) and n.args
                and isinstance(n.args[0], fx.Node)):
            return False
        n = n.args[0]
    return True


def _cast(u: fx.Node, cur: fx.Node) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(cur's value, u's value) when u is ``cur.to(...)``/``cur.float()``/... of the same shape and device,
    without a layout or copy request; else None."""
    if not (is_call(u, methods=_CAST_METHODS) and u.args and u.args[0] is cur):
        return None
    if any(k in u.kwargs for k in ("memory_format", "copy")):
        return None
    a, b = value(cur), value(u)
    return (a, b) if a is not None and b is not None and (a.shape, a.device) == (b.shape, b.device) else None


MUL_FUNCTIONS, MUL_METHODS = (operator.mul, torch.mul), ("mul", "__mul__", "__rmul__")
_ADD_FUNCTIONS, _ADD_METHODS = (operator.add, torch.add), ("add", "__add__", "__radd__")


def modulation(u: fx.Node, cur: fx.Node, z: fx.Node) -> tuple[str, fx.Node] | None:
    """("mul", s) for ``u = cur * s`` (either order), ("add", t) for ``u = cur + t``, where s or t is a tensor
    with fewer elements than cur that broadcasts into cur's shape and is not computed from the norm's output
    z: a per-sample (adaptive norm: ``x * (1 + scale[:, None]) + shift[:, None]``) or per-channel scale or
    shift that can be folded into the norm's affine. A residual add (an operand as large as cur) is None."""
    if u.kwargs or len(u.args) != 2 or not (is_call(u, MUL_FUNCTIONS, MUL_METHODS) or is_call(u, _ADD_FUNCTIONS, _ADD_METHODS)):
        return None
    a, b = u.args
    other = b if a is cur else a if b is cur else None
    if not isinstance(other, fx.Node) or other is cur:
        return None
    cv, ov, uv = value(cur), value(other), value(u)
    if cv is None or ov is None or uv is None or not ov.is_floating_point() or not cv.is_floating_point():
        return None
    if uv.shape != cv.shape or ov.numel() >= cv.numel() or _depends_on(other, {z}):
        return None
    return ("mul" if is_call(u, MUL_FUNCTIONS, MUL_METHODS) else "add"), other


def is_noop_cast(u: fx.Node, cur: fx.Node) -> bool:
    """``cur.to(dtype)``/``cur.float()``/... that returns a tensor of cur's dtype, shape and device: cur itself."""
    pair = _cast(u, cur)
    return pair is not None and pair[0].dtype == pair[1].dtype


# (from, to) float dtypes whose cast is exact: every value of the narrow dtype is one of the wide dtype
_EXACT_WIDENING = frozenset({
    (torch.bfloat16, torch.float32), (torch.bfloat16, torch.float64), (torch.float16, torch.float32),
    (torch.float16, torch.float64), (torch.float32, torch.float64),
})


def is_widening_cast(u: fx.Node, cur: fx.Node) -> bool:
    """``cur.to(torch.float32)``/``cur.float()``/... of a narrower float dtype, same shape and device: an exact
    cast that backward can redo from cur (PEFT's cast of a bf16 hidden state to its float32 adapter)."""
    pair = _cast(u, cur)
    return pair is not None and (pair[0].dtype, pair[1].dtype) in _EXACT_WIDENING


def is_shape_view(u: fx.Node, cur: fx.Node) -> bool:
    """A reshape of cur that keeps its elements' order (no slicing or permuting)."""
    return is_call(u, VIEW_FUNCTIONS, VIEW_METHODS) and bool(u.args) and u.args[0] is cur


def row_gather(u: fx.Node, cur: fx.Node, d: int | None) -> fx.Node | str | None:
    """The index of ``cur[index]`` / ``index_select(cur, 0, index)`` when cur is 2-D [rows, d] and index a 1-D
    integer tensor: rows of the norm's output, as a mixture-of-experts block hands them to an expert."""
    index: Any = None
    if is_call(u, (operator.getitem,)) and len(u.args) == 2 and u.args[0] is cur:
        index = u.args[1]
        if isinstance(index, tuple) and len(index) == 2 and index[1] == slice(None):
            index = index[0]  # cur[index, :]
        elif isinstance(index, tuple) and len(index) == 1:
            index = index[0]
        if not isinstance(index, fx.Node):
            return None  # basic indexing (a view) or an index the caller rejects
    elif is_call(u, _INDEX_SELECT, ("index_select",)) and arg(u, 0, "input") is cur:
        if arg(u, 1, "dim") not in (0, -2):
            return f"{u.name} selects along dim {arg(u, 1, 'dim')}, not rows"
        index = arg(u, 2, "index")
        if not isinstance(index, fx.Node):
            return None
    else:
        return None
    cv, iv = value(cur), value(index)
    if cv is None or iv is None or d is None:
        return f"{u.name}: no shape information for the gather"
    if cv.dim() != 2 or cv.shape[-1] != d:
        return f"{u.name} indexes a tensor of shape {tuple(cv.shape)}, not rows [n, {d}] of the output"
    if iv.dim() != 1 or iv.dtype not in (torch.int32, torch.int64):
        return f"{u.name} indexes with a {iv.dtype} tensor of shape {tuple(iv.shape)}, not 1-D integer row indices"
    return index


def dropout_p(gm: fx.GraphModule, u: fx.Node, cur: fx.Node) -> float | str | None:
    """p of a training-mode dropout of cur with 0 < p < 1; 0.0 for a dropout that returns cur itself (eval
    mode, p == 0); a reason for one the rewrite cannot reproduce."""
    call = dropout_call(gm, u)
    if call is None or call[0] is not cur:
        return None
    _, p, training, inplace = call
    if not isinstance(p, (int, float)) or not isinstance(training, bool):
        return f"dropout {u.name} has a p or training flag known only at run time"
    if not training or p == 0:
        return 0.0
    if inplace:
        return f"dropout {u.name} is in place"
    if not 0 < p < 1:
        return f"dropout {u.name} has p = {p}"
    return float(p)


def _grouped_targets() -> dict[Any, str]:
    """Call target -> ``approxbp::grouped_mm_shared``'s impl name, for the grouped matmuls torch (and
    transformers, if it registered its fallback op) provide."""
    targets: dict[Any, str] = {}
    if grouped_mm_private is not None:
        targets[grouped_mm_private] = "aten"
        targets[torch.ops.aten._grouped_mm.default] = "aten"
    if hasattr(F, "grouped_mm"):
        targets[F.grouped_mm] = "functional"
    namespace = getattr(torch.ops, "transformers", None)
    packet = getattr(namespace, "grouped_mm_fallback", None) if namespace is not None else None
    if packet is not None:
        targets[packet] = targets[packet.default] = "transformers"
    return targets


#: the names a grouped matmul's (input, weight) arguments go by: transformers' op, torch's private grouped mm, F.grouped_mm
GROUPED_MM_KEYWORDS = (("input", "weight"), ("self", "mat2"), ("mat_a", "mat_b"))


def grouped_mm(u: fx.Node, cur: fx.Node) -> tuple[str, fx.Node, fx.Node] | str | None:
    """(impl, weight, offs) of a grouped matmul reading cur as its [S, D] input with a [E, D, N] weight."""
    if u.op != "call_function":
        return None
    try:
        impl = _grouped_targets().get(u.target)
    except TypeError:  # an unhashable target
        return None
    if impl is None:
        return None
    names = next((k for k in GROUPED_MM_KEYWORDS if k[0] in u.kwargs or k[1] in u.kwargs), GROUPED_MM_KEYWORDS[0])
    x, weight, offs = arg(u, 0, names[0]), arg(u, 1, names[1]), arg(u, 2, "offs")
    if x is not cur:
        return f"{u.name} reads the output as its weight"
    if any(arg(u, i, k) is not None for i, k in ((3, "bias"), (4, "out_dtype"))):
        return f"{u.name} has a bias or an output dtype"
    if not isinstance(weight, fx.Node) or not isinstance(offs, fx.Node):
        return f"{u.name} has no per-expert offsets"
    xv, wv = value(cur), value(weight)
    if xv is None or wv is None or xv.dim() != 2 or wv.dim() != 3:
        return f"{u.name} is not a [S, D] x [E, D, N] grouped matmul"
    return impl, weight, offs
