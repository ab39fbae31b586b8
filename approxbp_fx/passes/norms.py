"""MS-BP: a norm and the linear layers after it share one saved tensor.

    before:  z = layer_norm(x, gamma, beta)                  (or rms_norm, nn.LayerNorm, nn.RMSNorm, or any
             q = linear(z, Wq, bq); k = linear(z.view(..), Wk)   written-out norm: LLaMA's or T5's RMSNorm,
             a = multi_head_attention_forward(z.transpose(1, 0), ...)   Gemma's (1 + weight), LayerNorm by hand, ...)
             h = x + z
    after:   z, y_hat, rstd = approxbp::norm_shared(x, gamma, beta, ...)
             q = approxbp::linear_shared(z, y_hat, Wq, bq, gamma, beta, ...)
             k = approxbp::linear_shared(z.view(..), y_hat.view(..), Wk, None, gamma, beta, ...)
             p = approxbp::linear_shared(z.transpose(1, 0), y_hat.transpose(1, 0), in_proj_weight, ...)
             a = mha_after_projection(p, ...)                (the rest of torch's attention, op for op)
             h = x + z

Norm calls and modules are matched by their targets. Norms written out in pointwise ops, casts and
last-dim reductions are identified by what they compute (``_norm_forms.py``): the subgraph from x to z
is evaluated on probe rows and compared with ``norm(x) * (weight + offset) + bias``, which gives x, the
parameters, eps and the dtypes the op needs; a form the op does not compute (eps outside the root) is
reported and left alone.

A norm is rewritten only when every consumer of its output is a linear layer (``linear``, nn.Linear,
GPT-2's ``addmm``), a grouped matmul (a mixture-of-experts' experts) or the in-projection of
``F.multi_head_attention_forward`` (``nn.MultiheadAttention``: the call is split into its projections and
the rest of torch's function, ``_attention.py``), or an op that keeps nothing of it (add, ``zeros_like``, a
bitsandbytes 4-bit layer: ``_norm_consumers.keeps_nothing``), and at least one of those layers would keep
its own copy (its weight needs a gradient). On the way a layer may read the output through views
(reshapes, basic indexing, transposes and permutes: the walk tracks where the normalized dim is, and a
linear over another dim, MLP-Mixer's token mixing, gets the affine broadcast along it) and casts (no-op, or exact widening casts such as PEFT's
``z.to(float32)`` before a float32 adapter: backward casts the rebuilt bf16 output again), a row gather and
a training dropout, in that order (``_norm_consumers.py``):

    before:  rows = z.view(-1, D)[idx]; e = grouped_mm(rows, W, offs)      keeps rows (a gathered copy)
             a = linear(dropout(z, p), A)                                  keeps dropout's output and mask
    after:   e = approxbp::grouped_mm_shared(rows, y_hat.view(-1, D), idx, W, offs, gamma, beta, ...)
             d, mask = approxbp::dropout_packed(z, p)
             a = approxbp::linear_shared(d, y_hat, A, None, gamma, beta, ..., index=None, mask, scale)
                                                    keep y_hat (shared), idx and a 1-bit mask

A modulation (an adaptive norm's per-sample scale and shift, ``_norm_consumers.modulation``) may come first:

    before:  m = z * (1 + s) + t; q = linear(m, Wq)        the multiply keeps z, the linear m
    after:   zs = approxbp::mul_shared(z, y_hat, 1 + s, gamma, beta, ...)
             q = approxbp::linear_shared(zs + t, y_hat, Wq, None, gamma * (1 + s), beta * (1 + s) + t, ...)

Backward rebuilds a layer's input as ``mask * scale * affine(y_hat)[idx]``. Any other consumer might keep
the output itself (or a chain in another order), so the site is left alone and the report names it.

A graph break between a norm and its linears (the norm's output leaves one Dynamo graph, the linears read
it in the next) is bridged where the inner can (``Inner.shares_across_graphs``; the built-in ones): the
norm is rewritten and ``ops/handoff.py`` records y_hat for its output; a graph input that carries a
gradient and is read by linears gets them rewritten over what it arrives with:

    graph A:  z, y_hat, rstd = approxbp::norm_shared(x, ...); publish(z, y_hat, gamma, beta, offset); return z
    graph B:  y, w, b, off = received(z)          (y_hat, gamma, beta, offset), or (z, None, None, 0.0)
              q = approxbp::linear_shared(z, y, Wq, bq, w, b, off, ...)
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field, replace

import torch
import torch.fx as fx
from torch import nn

from ..inners import get_inner
from ..ops import handoff
from ..options import Options
from ._edit import Candidate, GraphEdit
from ._graph import (
    ADD_FUNCTIONS, LAYER_NORM_FUNCTIONS, RMS_NORM_FUNCTIONS, Ref, arg,
    is_call, linear_call, module_attr, module_path, requires_grad, target_module, tensor_bytes, value,
)
from ._keeps import keeps
from ._norm_forms import identify, is_reduction
from . import _attention
from . import _norm_consumers as links
from ..ops import grouped as _grouped  # noqa: F401  (defines approxbp::grouped_mm_shared)
from ..ops.dropout import dropout_scale

__all__ = ["FAMILY", "find"]

FAMILY = "norms"
HANDED_ON = "graph output (y_hat handed on)"  # a norm's site pattern: its output leaves the graph
RECEIVED = "graph input"  # head of the pattern of a site whose layers read a graph input



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

    @property
    def y_rounded(self) -> bool:
        """The affine reads y rounded to y_dtype (a written-out norm's own ops), not the float32 y (a native
        norm call or module, which has no nodes of its own)."""
        return bool(self.nodes)


@dataclass(frozen=True)
class _Mod:
    """A modulation between the norm and its layers (``_norm_consumers.modulation``): ``node`` is
    ``input * operand`` (kind "mul") or ``input + operand`` (kind "add")."""

    kind: str
    node: fx.Node
    operand: fx.Node


@dataclass
class _Consumer:
    """A layer that reads the norm's output z through a chain (``_norm_consumers``) and can share y_hat."""

    node: fx.Node  # the linear, addmm or grouped-matmul call
    input: fx.Node  # what it reads: z, or the last link of the chain
    chain: list[fx.Node] = field(default_factory=list)  # views between z and the gather (or the layer): y_hat's too
    weight: Ref = None
    bias: Ref = None
    transposed: bool = False
    index: fx.Node | None = None  # the layer reads rows z.view(-1, D)[index]
    dropout: fx.Node | None = None  # a training dropout on the way, after the gather
    p: float = 0.0
    factor: float = 1.0  # z * factor (a Python number), before any dropout
    norm_dtype: torch.dtype | None = None  # z's dtype where the layer reads an exact widening cast of z
    grouped: str = ""  # a grouped matmul: its impl name for approxbp::grouped_mm_shared; "" for a linear
    offs: fx.Node | None = None  # a grouped matmul's per-expert offsets
    attention: _attention.MhaCall | None = None  # an MHA call whose in-projection reads the output
    copied: bool = False  # a view on the way copies the output (a reshape of a transposed view): eager keeps that copy
    modulation: tuple[_Mod, ...] = ()  # the scales and shifts between z and input, in order
    # where the normalized dim is in input (-1: last); elsewhere, a linear mixes another dim (MLP-Mixer's
    # tokens, ``norm(x).transpose(1, 2)``) and the norm's affine is reshaped to broadcast along it
    dim: int = -1
    scale: fx.Node | None = None  # node is the modulation ``input * scale`` itself (approxbp::mul_shared)

    @property
    def kind(self) -> str:
        if self.scale is not None:
            return "modulation"
        return "attention" if self.attention is not None else "grouped_mm" if self.grouped else "linear"


@dataclass
class _Path:
    """Where the walk from z stands: the node reached and the links passed."""

    node: fx.Node
    chain: list[fx.Node] = field(default_factory=list)
    index: fx.Node | None = None
    dropout: fx.Node | None = None
    p: float = 0.0
    factor: float = 1.0  # a constant the output was multiplied by (T5 before its tied LM head)
    norm_dtype: torch.dtype | None = None  # set once the walk passed a widening cast: z's dtype
    # where the normalized dim is (-1: last), or None where a reshape merged or split it
    # (``_norm_consumers.dim_after_view``); layers must read it last
    dim: int | None = -1
    copied: bool = False  # a view on the way copied the output (``links.copies``)
    modulation: tuple[_Mod, ...] = ()
    mod_shape: torch.Size | None = None  # the shape the first modulation broadcast its operand into
    fold_shape: tuple[int, ...] | None = None  # the shape of the affine with the modulations folded in


@dataclass(frozen=True)
class _Walk:
    """What stays the same through one walk from z."""

    z: fx.Node
    d: int | None  # the normalized dim's size
    follow_dropout: bool
    norm_readers: frozenset[fx.Node]
    affine_shape: tuple[int, ...] = ()  # the norm's weight and bias: (D,), or () without them


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
        return _Norm(n, n.args[0], module_attr(gm, n, "weight"), None if rms else module_attr(gm, n, "bias"), 0.0,
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


def _consumers(gm: fx.GraphModule, norm: _Norm, follow_dropout: bool = True,
               norm_readers: frozenset[fx.Node] = frozenset()) -> tuple[list[_Consumer], str | None, int]:
    """Layers that read the norm's output z and can share y_hat, the first consumer that blocks sharing (or None), and how
    many dropouts were not followed (``follow_dropout=False``). ``norm_readers`` are the nodes by which
    norms that will be rewritten read their input: such a norm keeps its own y_hat, nothing of z.

    Order of links on the way (``_norm_consumers``): views, no-op casts, a row gather, a training dropout,
    then the layer; views and no-op casts may also follow the gather and the dropout. The backward
    rebuilds the layer's input as ``mask * (affine(y_hat)[index])``, so a dropout before the gather or a
    second gather or dropout is not followed."""
    z = norm.z
    zv = value(z)
    d = zv.shape[-1] if zv is not None and zv.dim() > 0 else None
    affine = (d,) if d is not None and (norm.weight is not None or norm.bias is not None) else ()
    return _walk(gm, _Path(z), _Walk(z, d, follow_dropout, norm_readers, affine))


def _walk(gm: fx.GraphModule, start: _Path, walk: _Walk) -> tuple[list[_Consumer], str | None, int]:
    """``_consumers`` from ``start`` on."""
    d, follow_dropout, norm_readers = walk.d, walk.follow_dropout, walk.norm_readers
    consumers: list[_Consumer] = []
    dropouts = 0
    todo = [start]
    while todo:
        path = todo.pop()
        cur = path.node
        # after a gather, a dropout or a modulation the layer's rows are rebuilt in y_hat's order
        gathered_or_dropped = path.index is not None or path.dropout is not None or bool(path.modulation)
        for u in cur.users:
            mod = links.modulation(u, cur, walk.z)
            if mod is not None:
                found = _modulated(gm, u, cur, path, mod, walk)
                if isinstance(found, str):
                    return consumers, found, dropouts
                if any(c.node is f.node for c in consumers for f in found[0]):
                    return consumers, f"a layer after {u.name} reads the output through two different chains", dropouts
                consumers += found[0]
                dropouts += found[1]
                continue
            if is_call(u, ADD_FUNCTIONS, ("add", "__add__")) or u.op == "output" or links.reads_metadata_only(u, cur) \
                    or links.keeps_nothing(gm, u, cur) or u in norm_readers:
                continue  # keeps nothing
            if links.is_noop_cast(u, cur):
                todo.append(replace(path, node=u))  # cur itself: y_hat needs no cast
                continue
            if links.is_widening_cast(u, cur):
                if path.dropout is not None or path.factor != 1.0:
                    # backward rebuilds in the order affine, cast, scale or mask: not the other way round
                    return consumers, f"cast {u.name} follows a dropout or a scale of the output", dropouts
                # exact: backward casts the rebuilt output again (a PEFT adapter's float32 upcast)
                todo.append(replace(path, node=u, norm_dtype=path.norm_dtype or value(cur).dtype))
                continue
            if links.is_view(u, cur):
                if gathered_or_dropped and not links.is_shape_view(u, cur):
                    return consumers, f"consumer {u.name} slices or permutes rows after a gather or dropout", dropouts
                dim = links.dim_after_view(u, cur, path.dim, d)
                if isinstance(dim, str):
                    return consumers, dim, dropouts
                # before a gather, y_hat goes through the same views; after it the rows keep their order
                todo.append(replace(path, node=u, dim=dim, copied=path.copied or links.copies(u, cur),
                                    chain=path.chain if gathered_or_dropped else path.chain + [u]))
                continue
            split = links.split_parts(u, cur, path.dim)
            if split is not None:
                if isinstance(split, str):
                    return consumers, split, dropouts
                if gathered_or_dropped:
                    return consumers, f"consumer {u.name} splits rows after a gather, dropout or modulation", dropouts
                parts, dim = split
                todo += [replace(path, node=p, dim=dim, chain=path.chain + [u, p]) for p in parts]
                continue
            index = links.row_gather(u, cur, d)
            if index is not None:
                if isinstance(index, str):
                    return consumers, index, dropouts
                if path.dropout is not None:
                    return consumers, (f"rows {u.name} are gathered after dropout {path.dropout.name}; backward "
                                       "rebuilds a dropout of gathered rows only"), dropouts
                if path.index is not None:
                    return consumers, f"rows {u.name} are gathered from gathered rows {path.index.name}", dropouts
                if path.dim != -1:
                    return consumers, f"rows {u.name} are gathered from a view whose last dim is not the normalized one", dropouts
                if path.modulation:
                    return consumers, f"rows {u.name} are gathered from a modulated output", dropouts
                todo.append(replace(path, node=u, index=index))
                continue
            factor = _constant_factor(u, cur)
            if factor is not None:
                if path.dropout is not None or path.factor != 1.0:
                    return consumers, f"consumer {u.name} scales the output after a dropout or another scale", dropouts
                todo.append(replace(path, node=u, factor=factor))
                continue
            p = links.dropout_p(gm, u, cur)
            if p is not None:
                if isinstance(p, str):
                    return consumers, p, dropouts
                if p == 0.0:
                    todo.append(replace(path, node=u))  # eval mode or p == 0: cur itself
                elif not follow_dropout:
                    dropouts += 1  # keeps a mask, and what follows keeps dropout's output: a different tensor
                elif path.dropout is not None:
                    return consumers, f"dropout {u.name} follows dropout {path.dropout.name}", dropouts
                elif path.factor != 1.0:
                    return consumers, f"dropout {u.name} follows a constant scale of the output", dropouts
                else:
                    todo.append(replace(path, node=u, dropout=u, p=p))
                continue
            found = _layer(gm, u, cur, path)
            if isinstance(found, str):
                return consumers, found, dropouts
            if found is None:
                what = u.target if u.op != "call_function" else getattr(u.target, "__name__", str(u.target))
                return consumers, f"consumer {u.name} ({what}) may keep its own copy of the output", dropouts
            cv = value(cur)
            if path.dim is None or (path.dim == -1 and cv is not None and d is not None
                                    and (cv.dim() == 0 or cv.shape[-1] != d)):
                return consumers, f"consumer {u.name} reads a view whose last dim is not the normalized one", dropouts
            if path.dim != -1 and found.kind != "linear":
                return consumers, (f"{found.kind} {u.name} reads a view with the normalized dim at position "
                                   f"{path.dim}; only a linear is rebuilt from such a view"), dropouts
            if any(c.node is u for c in consumers):
                return consumers, f"consumer {u.name} reads the output through two different chains", dropouts
            consumers.append(found)
    return consumers, None, dropouts


def _modulated(gm: fx.GraphModule, u: fx.Node, cur: fx.Node, path: _Path, mod: tuple[str, fx.Node],
               walk: _Walk) -> tuple[list[_Consumer], int] | str:
    """The consumers reached through the modulation u of cur (and u itself, a multiply, which keeps cur for
    its operand's gradient), with the dropouts not followed; or why u blocks sharing.

    When the layers after u cannot all share y_hat, or the affine with u folded in would be as large as the
    output (a [B, T, 1] scale of a norm with a [D] weight), they are left alone: they keep their own copies
    of u's output, not z. An add keeps nothing of cur then; a multiply still shares y_hat."""
    kind, operand = mod
    cv = value(cur)
    why = None
    if path.index is not None or path.dropout is not None or path.factor != 1.0 or path.norm_dtype is not None:
        why = f"modulation {u.name} follows a gather, dropout, constant scale or cast of the output"
    elif path.dim is None:
        why = f"modulation {u.name} reads a view whose last dim merged or split the normalized one"
    elif path.dim != -1 or any(links.is_permutation(v) for v in path.chain):
        why = f"modulation {u.name} reads a permuted view of the output"
    elif path.mod_shape is not None and cv.shape != path.mod_shape:
        why = f"modulation {u.name} reads a reshaped modulated output"
    found: list[_Consumer] = []
    dropouts = 0
    fold = _fold_shape(walk, path, operand) if why is None else None
    if fold is not None and math.prod(fold) < cv.numel():
        after = replace(path, node=u, modulation=path.modulation + (_Mod(kind, u, operand),),
                        mod_shape=path.mod_shape or cv.shape, fold_shape=fold)
        sub, blocker, n = _walk(gm, after, walk)
        if blocker is None:
            found, dropouts = sub, n
    if kind == "add":
        return found, dropouts  # keeps nothing of cur
    if why is not None:
        return why
    mul = _Consumer(node=u, input=cur, chain=path.chain, weight=operand, modulation=path.modulation, scale=operand)
    return [mul, *found], dropouts


def _fold_shape(walk: _Walk, path: _Path, operand: fx.Node) -> tuple[int, ...]:
    """The shape of the norm's affine with the modulations so far and ``operand`` folded in (cur's shape
    where they do not broadcast together: never foldable)."""
    shapes = (walk.affine_shape if path.fold_shape is None else path.fold_shape, value(operand).shape)
    try:
        return tuple(torch.broadcast_shapes(*shapes))
    except RuntimeError:
        return tuple(value(path.node).shape)


def _constant_factor(u: fx.Node, cur: fx.Node) -> float | None:
    """c for ``cur * c`` / ``c * cur`` with a Python number c (not a tensor: that would be kept), else None."""
    if not is_call(u, links.MUL_FUNCTIONS, links.MUL_METHODS) or len(u.args) != 2 or u.kwargs:
        return None
    other = u.args[1] if u.args[0] is cur else (u.args[0] if u.args[1] is cur else None)
    if isinstance(other, bool) or not isinstance(other, (int, float)):
        return None
    return float(other)


def _layer(gm: fx.GraphModule, u: fx.Node, cur: fx.Node, path: _Path) -> _Consumer | str | None:
    """u as a consumer reading cur (a linear, GPT-2's addmm, a grouped matmul), a reason it cannot share, or None."""
    at = {"node": u, "input": cur, "chain": path.chain, "index": path.index, "dropout": path.dropout, "p": path.p,
          "factor": path.factor, "norm_dtype": path.norm_dtype, "copied": path.copied, "modulation": path.modulation,
          "dim": path.dim}
    lin = linear_call(gm, u)
    if lin is not None and lin.input is cur:
        return _Consumer(weight=lin.weight, bias=lin.bias, transposed=lin.transposed, **at)
    mha = _attention.mha_in_projection(u, cur)
    if path.modulation and (mha is not None or links.grouped_mm(u, cur) is not None):
        return f"{u.name} reads a modulated output; only linears are rebuilt from a modulated y_hat"
    if isinstance(mha, str):
        return mha
    if mha is not None:
        if path.index is not None or path.dropout is not None or path.factor != 1.0:
            # torch's mha reads query/key/value directly; a gathered or dropped-out one is not this norm's rows
            return f"attention {u.name} reads gathered, dropped-out or scaled rows of the output"
        # the weight that decides whether sharing pays: a trainable one among the projections reading cur
        weights = [w if not isinstance(w, tuple) else w[0]
                   for i, w in zip(mha.inputs, mha.weights) if i is cur]
        weight = next((w for w in weights if requires_grad(gm, w)), weights[0])
        return _Consumer(weight=weight, attention=mha, **at)
    grouped = links.grouped_mm(u, cur)
    if grouped is None or isinstance(grouped, str):
        return grouped
    if path.norm_dtype is not None:
        return f"grouped matmul {u.name} reads a cast of the output"
    impl, weight, offs = grouped
    return _Consumer(weight=weight, grouped=impl, offs=offs, **at)


def _pattern(head: str, consumers: list[_Consumer]) -> str:
    """``rms_norm (...) -> 1 x linear, 2 x grouped_mm (gathered)``: what the site found."""
    parts = []
    for kind in ("linear", "grouped_mm", "attention", "modulation"):
        of_kind = [c for c in consumers if c.kind == kind]
        if not of_kind and (kind != "linear" or consumers):
            continue
        notes = []
        for note, n in (("gathered", sum(c.index is not None for c in of_kind)),
                        ("through dropout", sum(c.dropout is not None for c in of_kind)),
                        ("modulated", sum(bool(c.modulation) for c in of_kind if c.scale is None))):
            if n:
                notes.append(note if n == len(of_kind) else f"{n} {note}")
        parts.append(f"{len(of_kind)} x {kind}" + (f" ({', '.join(notes)})" if notes else ""))
    return f"{head} -> {', '.join(parts)}"


def _bytes_saved(gm: fx.GraphModule, z: fx.Node, consumers: list[_Consumer]) -> int:
    """Estimate: the output (kept by the linears that read it, or the norm's input it stands for) plus
    each distinct gathered, dropped-out, cast, copied (a reshape of a transposed view) or modulated tensor a
    layer with a trainable weight (or a modulation whose scale needs a gradient) would keep."""
    own = {c.input for c in consumers
           if (c.index is not None or c.dropout is not None or c.norm_dtype is not None or c.copied or c.modulation)
           and requires_grad(gm, c.weight)}
    return tensor_bytes(z) + sum(tensor_bytes(n) for n in own)


def find(gm: fx.GraphModule, options: Options) -> list[Candidate]:
    """Every norm -> linear site (module docstring), with the reason it cannot be shared where it cannot."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    handoff_on = get_inner(getattr(options, "inner", "inductor")).shares_across_graphs
    received = [c for p in gm.graph.find_nodes(op="placeholder") if (c := _received_site(gm, p)) is not None] \
        if handoff_on else []
    claimed: set[fx.Node] = set()  # nodes of computed norms found so far: a LayerNorm's second reduction
    norms: list[tuple[fx.Node, _Norm]] = []
    for n in gm.graph.nodes:
        norm = None if n in claimed else _find_norm(gm, n, order)
        if norm is not None:
            claimed.update(norm.nodes)
            norms.append((n, norm))
    # A norm reading another norm's output (CLIP's ln_pre before the first block's ln_1) keeps that output
    # for its backward unless it is rewritten itself (then it keeps its own y_hat): decide the skipped sites
    # again with the rewritten norms' readers counted as keeping nothing, until no more readers join. More
    # readers only unblock, so a site once rewritten stays as it was.
    readers: frozenset[fx.Node] = frozenset()
    candidates = [_site(gm, n, norm, options, readers, handoff_on) for n, norm in norms]
    while True:
        now = _input_readers(norms, frozenset(norm.z for (_, norm), c in zip(norms, candidates) if not c.skip))
        if now == readers:
            return candidates + received  # a layer both would rewrite goes to the norm's site
        readers = now
        candidates = [_site(gm, n, norm, options, readers, handoff_on) if c.skip else c
                      for (n, norm), c in zip(norms, candidates)]


def _input_readers(norms: list[tuple[fx.Node, _Norm]], rewritten: frozenset[fx.Node]) -> frozenset[fx.Node]:
    """The nodes by which the norms whose output is in ``rewritten`` read their input x."""
    readers: set[fx.Node] = set()
    for _, norm in norms:
        if norm.z in rewritten:
            readers.update(u for u in norm.x.users if u is norm.z or u in norm.nodes)
    return frozenset(readers)


def _feeds_norm(z: fx.Node, norm_readers: frozenset[fx.Node]) -> bool:
    """Whether a rewritten norm reads z (or z through views and no-op casts)."""
    todo = [z]
    while todo:
        cur = todo.pop()
        for u in cur.users:
            if u in norm_readers:
                return True
            if links.is_noop_cast(u, cur) or links.is_shape_view(u, cur):
                todo.append(u)
    return False


def _upcast_kept(gm: fx.GraphModule, norm: _Norm) -> int:
    """Bytes a rewrite saves by y_hat alone: a written-out norm of a bf16/fp16 x (LLaMA's RMSNorm on a bf16
    checkpoint) casts x to float32 and its own ops keep that copy (``hidden * rsqrt(...)``); the rewritten
    norm keeps y_hat in x's dtype instead. 0 where the norm keeps no such copy."""
    xv = value(norm.x)
    if not norm.nodes or xv is None or xv.dtype not in (torch.bfloat16, torch.float16):
        return 0
    y_size = (norm.y_dtype or xv.dtype).itemsize
    for u in norm.x.users:
        if u in norm.nodes and links.is_widening_cast(u, norm.x) \
                and any(w in norm.nodes and keeps(gm, w, u) not in (None, "?") for w in u.users):
            return tensor_bytes(u) - xv.numel() * y_size
    return 0


def _site(gm: fx.GraphModule, n: fx.Node, norm: _Norm, options: Options, norm_readers: frozenset[fx.Node],
          handoff_on: bool = False) -> Candidate:
    consumers, blocker, dropouts = _consumers(gm, norm, getattr(options, "masks", True), norm_readers)
    # Returned by the graph (a graph break before the linears that read it): where the inner can, the
    # rewritten norm hands y_hat on to the next graph (``ops/handoff.py``)
    returned = any(u.op == "output" for u in norm.z.users)
    hands_on = returned and handoff_on
    # Read by another norm that is rewritten (which keeps its own y_hat): this norm's output is then kept by
    # nobody, and the rewrite keeps y_hat and rstd where a LayerNorm kept x, its mean and rstd: the mean less.
    feeds_norm = _feeds_norm(norm.z, norm_readers)
    trainable = any(requires_grad(gm, c.weight) for c in consumers)
    # No trainable reader (a final norm before a frozen head, under LoRA): a written-out half-precision norm
    # may still keep a float32 copy of its input that y_hat would replace
    upcast = 0 if trainable else _upcast_kept(gm, norm)
    xv = value(norm.x)
    if norm.skip:
        reason = norm.skip
    elif blocker is not None:
        reason = blocker
    elif not trainable and not (feeds_norm and not norm.rms) and upcast <= 0 and not hands_on:
        reason = ("nothing to share: no linear with a trainable weight reads the output"
                  + (f" ({dropouts} reach linears through dropout, which keep its output)" if dropouts else "")
                  + (" (it leaves the graph, and this inner does not hand y_hat on to the next graph's linears)"
                     if returned else "")
                  + (" (a norm reads it, which keeps its own y_hat: an RMSNorm's y_hat would weigh what its input "
                     "does)" if feeds_norm else ""))
    elif xv is not None and not xv.is_floating_point():
        reason = f"input dtype {xv.dtype} is not floating point"
    elif norm.ndim != 1:
        reason = f"normalized over {norm.ndim} dims; the linears read the last one"
    else:
        reason = ""
    pattern, saved = _pattern(norm.pattern, consumers), _bytes_saved(gm, norm.z, consumers)
    zv = value(norm.z)
    mean_bytes = 0 if norm.rms else (zv.numel() // zv.shape[-1] if zv is not None and zv.dim() else 0) * 4
    if feeds_norm and not consumers:
        pattern, saved = f"{norm.pattern} -> norm", mean_bytes  # the float32 mean
    elif upcast > 0:
        pattern, saved = f"{pattern} (frozen: the norm's own float32 copy of its input)", upcast
    elif hands_on and not trainable:
        # what the next graph's linears stop keeping is not known here (there may be none): the sure bytes
        # are the mean a LayerNorm kept
        pattern, saved = f"{norm.pattern} -> {HANDED_ON}", mean_bytes
    if hands_on and trainable:
        pattern += f", {HANDED_ON}"
    return Candidate(
        FAMILY, norm.z.name, module_path(n), pattern, bytes_saved=saved, skip=reason,
        apply=lambda edit, norm=norm, consumers=consumers: _apply(edit, norm, consumers, hands_on),
        # every node the site rewrites: z, the layers, and the dropouts that become dropout_packed
        replaces=(norm.z, *(c.node for c in consumers), *dict.fromkeys(c.dropout for c in consumers if c.dropout)))


def _received_site(gm: fx.GraphModule, p: fx.Node) -> Candidate | None:
    """A graph input read by linears with a trainable weight, which may be a norm's output handed on by
    the previous graph (``ops/handoff.py``): the linears read it as ``linear_shared`` over the y_hat it
    arrives with, or over itself with no affine where it arrives with none (then they keep what they
    kept before). Only an activation that carries a gradient (not a parameter), read by no dropout, and
    only plain linear layers (no modulation, no moved dim: their affine would need the norm's)."""
    v = value(p)
    if v is None or isinstance(v, nn.Parameter) or not v.requires_grad or not v.is_floating_point() or v.dim() == 0:
        return None
    if getattr(p, "_dynamo_source", None) is None:
        # not a value of the user's frame: a piece of a graph Dynamo's DDP optimizer split at its buckets,
        # whose inputs are the previous piece's values (the pieces run together, under fake tensors too)
        return None
    # a dropout reading p is the dropout family's site (its linears keep p and the mask)
    consumers, blocker, dropouts = _walk(gm, _Path(p), _Walk(p, v.shape[-1], False, frozenset()))
    if blocker is not None or dropouts or not any(requires_grad(gm, c.weight) for c in consumers) \
            or any(c.modulation or c.kind not in ("linear", "attention") or c.dim != -1 for c in consumers):
        return None
    first = next(n for n in gm.graph.nodes if n.op != "placeholder")
    # bytes_saved: whether p arrives with a y_hat is known only at run time
    return Candidate(
        FAMILY, p.name, module_path(consumers[0].node),
        _pattern(RECEIVED, consumers) + " (reading a handed-on y_hat, if any)",
        apply=lambda edit: _apply_received(edit, p, first, consumers), replaces=tuple(c.node for c in consumers))


def _apply_received(edit: GraphEdit, p: fx.Node, first: fx.Node, consumers: list[_Consumer]) -> None:
    with edit.inserting_before(first):
        entry = edit.call(handoff.received, (p,))
        y_hat, weight, bias, offset = (edit.call(operator.getitem, (entry, i)) for i in range(4))
    _share(edit, consumers, y_hat, weight, bias, offset)


def _apply(edit: GraphEdit, norm: _Norm, consumers: list[_Consumer], publish: bool = False) -> None:
    xv = value(norm.x)
    x_dtype = xv.dtype if xv is not None else None
    y_dtype = norm.y_dtype or x_dtype
    z_dtype = norm.z_dtype or x_dtype
    if y_dtype is None or z_dtype is None:
        raise RuntimeError(f"approxbp: no dtype information for {norm.z.name}; run shape propagation first")
    with edit.inserting_before(norm.z):
        weight, bias = edit.ref(norm.weight), edit.ref(norm.bias)
        eps = norm.eps if isinstance(norm.eps, fx.Node) else float(norm.eps)
        triple = edit.call(torch.ops.approxbp.norm_shared.default, (
            norm.x, weight, bias, norm.offset, norm.ndim, eps, norm.rms, y_dtype, z_dtype, norm.y_rounded))
        z = edit.call(operator.getitem, (triple, 0))
        y_hat = edit.call(operator.getitem, (triple, 1))
        if publish:
            edit.call(handoff.publish, (z, y_hat, weight, bias, norm.offset))
    edit.replace(norm.z, z)
    _share(edit, consumers, y_hat, weight, bias, norm.offset)


def _share(edit: GraphEdit, consumers: list[_Consumer], y_hat: fx.Node, weight: object, bias: object,
           offset: object) -> None:
    """Each consumer rewritten to read y_hat and rebuild its input from it (the norm's affine ``weight``,
    ``bias``, ``offset``, with the modulations on the way)."""
    masks: dict[fx.Node, fx.Node] = {}  # dropout -> its packed mask, one per dropout whatever reads it
    folded: dict[tuple[fx.Node, ...], tuple[object, object, float]] = {}
    for c in consumers:
        # the affine that gives the layer's input from y_hat: the norm's, with the modulations on the way
        affine = _fold(edit, c.modulation, weight, bias, offset, folded)
        if c.dim != -1:
            affine = _along(edit, c.node, affine, c.dim)
        mask, scale = None, c.factor
        if c.dropout is not None:
            if c.dropout not in masks:
                masks[c.dropout] = _pack_dropout(edit, c.dropout, c.p)
            mask, scale = masks[c.dropout], _dropout_scale(c.dropout, c.p)
        with edit.inserting_before(c.node):
            shared = y_hat  # not gathered: a gathered copy would be a new tensor to keep
            for view in _replayed(c.chain):  # the views z went through before the gather (or the layer)
                shared = edit.copy(view, lambda a, v=view, s=shared: s if a is edit.node(v.args[0]) else a)
            if c.scale is not None:
                new = edit.call(torch.ops.approxbp.mul_shared.default, (c.input, shared, c.scale, *affine))
            elif c.attention is not None:
                new = _attention.emit(edit, c.node, c.attention, c.input, lambda w, b, s=shared: edit.call(
                    torch.ops.approxbp.linear_shared.default,
                    (c.input, s, w, b, weight, bias, offset, False, None, None, 1.0, c.norm_dtype)))
            elif c.grouped:
                new = edit.call(torch.ops.approxbp.grouped_mm_shared.default, (
                    c.input, shared, c.index, c.weight, c.offs, weight, bias, offset, mask, scale, c.grouped))
            else:
                new = edit.call(torch.ops.approxbp.linear_shared.default, (
                    c.input, shared, edit.ref(c.weight), edit.ref(c.bias), *affine,
                    c.transposed, c.index, mask, scale, c.norm_dtype))
        edit.replace(c.node, new)


def _along(edit: GraphEdit, before: fx.Node, affine: tuple[object, object, float], dim: int) -> tuple[object, object, float]:
    """The affine's [D] weight and bias as views [D, 1, ...] that broadcast along the normalized dim at
    position ``dim`` of the layer's input."""
    shape = (-1,) + (1,) * (-dim - 1)
    with edit.inserting_before(before):
        w, b = (None if t is None else edit.method("reshape", (t, shape)) for t in affine[:2])
    return w, b, affine[2]


def _fold(edit: GraphEdit, mods: tuple[_Mod, ...], weight: object, bias: object, offset: float,
          memo: dict[tuple[fx.Node, ...], tuple[object, object, float]]) -> tuple[object, object, float]:
    """(weight, bias, offset) of the affine that gives a modulated output from y_hat: ``* s`` makes it
    ``(weight + offset) * s`` and ``bias * s``, ``+ t`` makes the bias ``bias + t``. Small tensors ([B, 1, D]
    for a per-sample modulation) computed before the modulation itself, once per prefix of links."""
    if not mods:
        return weight, bias, offset
    key = tuple(m.node for m in mods)
    if key not in memo:
        w, b, off = _fold(edit, mods[:-1], weight, bias, offset, memo)
        m = mods[-1]
        with edit.inserting_before(m.node):
            if off and w is not None:
                w = edit.call(operator.add, (w, off))
            if m.kind == "mul":
                w = m.operand if w is None else edit.call(operator.mul, (w, m.operand))
                b = None if b is None else edit.call(operator.mul, (b, m.operand))
            else:
                b = m.operand if b is None else edit.call(operator.add, (b, m.operand))
        memo[key] = (w, b, 0.0)
    return memo[key]


def _replayed(chain: list[fx.Node]) -> list[fx.Node]:
    """The links of a chain that y_hat goes through. The layer reads y_hat as rows [-1, D] in the order of
    its input's rows, which only permutations and indexing change: after the last of them, reshapes are
    left out, and so is ``contiguous``, since on a permuted y_hat they would copy it and the layer would
    keep the copy (``z.transpose(0, 1).reshape(-1, D)`` becomes ``y_hat.transpose(0, 1)``)."""
    last = max((i for i, v in enumerate(chain) if not links.is_shape_view(v, v.args[0])), default=-1)
    permuted = any(links.is_permutation(v) for v in chain[:last + 1])
    return [v for i, v in enumerate(chain)
            if not is_call(v, methods=("contiguous",)) and not (permuted and i > last)]


def _dropout_input(d: fx.Node) -> fx.Node:
    return d.args[0] if d.args else d.kwargs["input"]


def _dropout_scale(d: fx.Node, p: float) -> float:
    v = value(_dropout_input(d))
    return dropout_scale(p, v.dtype if v is not None else torch.float32)


def _pack_dropout(edit: GraphEdit, d: fx.Node, p: float) -> fx.Node:
    """d becomes approxbp::dropout_packed (the same draws, a 1-bit mask); returns the mask node."""
    with edit.inserting_before(d):
        pair = edit.call(torch.ops.approxbp.dropout_packed.default, (_dropout_input(d), p))
        out = edit.call(operator.getitem, (pair, 0))
        mask = edit.call(operator.getitem, (pair, 1))
    edit.replace(d, out)
    return mask
