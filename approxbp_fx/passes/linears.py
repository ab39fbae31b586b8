"""Linear layers keep the narrowest exact form of what they read for backward: under autocast their
parameter rather than its cast copy (option ``weight_casts``), and where their input is an exact widening
cast, the narrow tensor rather than the wide one (option ``input_casts``). Both are exact.

Weight casts:

    before (traced under torch.autocast(dtype=bf16); W, b float32 parameters):
             out = linear(x, W, b)           (nn.Linear, F.linear, or GPT-2's addmm(b, x, W))
                                             backward keeps W.to(bf16): a weight-sized copy per linear,
                                             frozen or trainable (the autocast cache's copy)
    after:   x16 = x.to(bf16)                (left out when x already is bf16)
             out = approxbp::linear_cast(x16, W, b, transposed)
                                             keeps W (the model keeps it anyway) and, where W is trained,
                                             x16 (what autocast's linear keeps); W is cast again in backward

A linear is a site when the tracer recorded an output dtype that differs from its weight's dtype (a half
output from a float32 weight): that is what autocast does, and nothing else gives a linear of a float32
weight a half output. The rewrite computes exactly what autocast's linear computes (casts of x, W and b
to the output dtype, the linear with autocast off), so forward and gradients are bit for bit unchanged.

A site is left alone when its weight is not a parameter or buffer (keeping a computed weight instead of
its half copy would keep more bytes, not fewer), and in graphs holding activation-checkpointed regions
(their recompute must run the same casts as their forward). Under aot_eager and inductor the min-cut
partitioner keeps the parameter rather than its copy because it knows the parameter is kept anyway (the
backend hands it Dynamo's record of which inputs are parameters); under inductor the op's tags ask for
the cast to be rebuilt as well. Linears that the norm family rewrote (they already cast inside
``linear_shared``) are not rewritten again: each candidate names its linear in ``replaces``.

Input casts:

    before:  x32 = h.to(torch.float32)           h bf16 (PEFT's cast of a bf16 hidden state before its
                                                 float32 adapter: lora_A(h.to(float32)))
             a = linear(x32, A)                  A trainable: keeps x32, 4 bytes per element
    after:   a = approxbp::linear_shared(x32, h, A, None, None, None, 0.0, False, None, None, 1.0, bf16)
                                                 keeps h (2 bytes per element, one storage for every
                                                 linear reading a cast of it); backward casts it again

The cast is exact (every bf16/fp16 value is a float32 one), so the gradients are bit for bit plain
autograd's. A site needs a trainable weight (a frozen one keeps nothing of its input) and a linear that
computes in the cast's dtype (under autocast it keeps its own half-precision cast: the weight-cast sites'
business); it is left alone where another reader of the wide tensor may keep it anyway.
"""

from __future__ import annotations

import torch
import torch.fx as fx
from torch import nn

from ..ops import linears as _ops  # noqa: F401  (registers approxbp::linear_cast)
from ..ops import norms as _norm_ops  # noqa: F401  (registers approxbp::linear_shared)
from ..options import Options
from ._edit import Candidate, GraphEdit
from ._graph import (
    ADD_FUNCTIONS, VIEW_FUNCTIONS, VIEW_METHODS, LinearCall, is_call, linear_call, module_path, ref_tensor,
    requires_grad, tensor_bytes, value,
)
from ._norm_consumers import is_widening_cast, reads_metadata_only

__all__ = ["FAMILY", "OPTIONS", "INPUT_CASTS", "find"]

FAMILY = "weight_casts"
INPUT_CASTS = "input_casts"
#: the options whose sites this family finds: autocast weight copies, and wide casts of linear inputs
OPTIONS = (FAMILY, INPUT_CASTS)

_HALF = (torch.float16, torch.bfloat16)


def _is_kept_by_model(gm: fx.GraphModule, ref: object) -> bool:
    """Whether the weight lives as long as the model: a parameter (Dynamo hands parameters in as
    placeholders whose example values are Parameters) or a module attribute (parameter or buffer)."""
    if isinstance(ref, str) or (isinstance(ref, fx.Node) and ref.op == "get_attr"):
        return ref_tensor(gm, ref) is not None
    return isinstance(ref, fx.Node) and ref.op == "placeholder" and isinstance(value(ref), nn.Parameter)


def _short(dtype: torch.dtype) -> str:
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, str(dtype).replace("torch.", ""))


def _describe(ref: object) -> str:
    return ref.name if isinstance(ref, fx.Node) else str(ref)


def find(gm: fx.GraphModule, options: Options) -> list[Candidate]:
    """The sites of the options that are on (module docstring), with the reason each is left alone where it is."""
    return ((_weight_cast_sites(gm) if getattr(options, FAMILY) else [])
            + (_input_cast_sites(gm) if getattr(options, INPUT_CASTS) else []))


def _weight_cast_sites(gm: fx.GraphModule) -> list[Candidate]:
    """Every linear that runs under autocast, with the reason it is left alone where it is."""
    checkpointed = _checkpointed_regions(gm)
    candidates: list[Candidate] = []
    for n in gm.graph.nodes:
        lin = linear_call(gm, n)
        if lin is None:
            continue
        out, w, xv = value(n), ref_tensor(gm, lin.weight), value(lin.input)
        if out is None or w is None or out.dtype not in _HALF or w.dtype == out.dtype or not w.is_floating_point():
            continue  # not a linear under autocast (or nothing recorded to tell)
        b = None if lin.bias is None else ref_tensor(gm, lin.bias)
        # the copy is kept for x's gradient: without one (x constant, nothing before it trains) none is kept
        needs_x_grad = xv is None or xv.requires_grad
        if checkpointed:
            # measured (LoRA ViT, HF gradient checkpointing, bf16 autocast, eager inner): with a linear of this
            # graph rewritten, the regions' recompute no longer matched their forward (torch's checkpoint raised
            # "aten._to_copy.default invocation index ... not found in storage" in backward)
            reason = (f"the graph holds {checkpointed} activation-checkpointed region(s), whose recompute must run "
                      "the same casts as their forward")
        elif not _is_kept_by_model(gm, lin.weight):
            reason = (f"weight {_describe(lin.weight)} is not a parameter or buffer: keeping it instead of its "
                      f"{_short(out.dtype)} copy would keep more bytes")
        elif xv is not None and not xv.is_floating_point():
            reason = f"input dtype {xv.dtype} is not floating point"
        elif b is not None and not b.is_floating_point():
            reason = f"bias dtype {b.dtype} is not floating point"
        elif not needs_x_grad:
            reason = "no copy kept: the input needs no gradient"
        else:
            reason = ""
        candidates.append(Candidate(
            FAMILY, n.name, module_path(n), f"{lin.kind} (autocast {_short(out.dtype)}: weight cast rebuilt)",
            bytes_saved=w.numel() * out.element_size() if needs_x_grad else 0, skip=reason,
            apply=lambda edit, n=n, lin=lin, dtype=out.dtype: _apply(edit, n, lin, dtype),
            replaces=(n,)))
    return candidates


def _cast_below(node: object) -> tuple[fx.Node, list[fx.Node]] | None:
    """(cast, views) where ``node`` is ``cast`` through shape views (in order) and ``cast`` an exact
    widening cast of another tensor; else None."""
    views: list[fx.Node] = []
    while isinstance(node, fx.Node) and is_call(node, VIEW_FUNCTIONS, VIEW_METHODS) and node.args:
        views.insert(0, node)
        node = node.args[0]
    if not (isinstance(node, fx.Node) and node.args and isinstance(node.args[0], fx.Node)
            and is_widening_cast(node, node.args[0])):
        return None
    narrow = value(node.args[0])
    if views and (narrow is None or not narrow.is_contiguous()):
        return None  # the cast is contiguous, a strided narrow tensor might not take the same views
    return node, views


def _may_keep(gm: fx.GraphModule, cast: fx.Node, sites: set[fx.Node]) -> fx.Node | None:
    """A reader of ``cast`` (through views) other than the site linears that may keep it, or None."""
    todo = [cast]
    while todo:
        cur = todo.pop()
        for u in cur.users:
            if u in sites or u.op == "output" or is_call(u, ADD_FUNCTIONS, ("add", "__add__")) \
                    or reads_metadata_only(u, cur):
                continue
            if is_call(u, VIEW_FUNCTIONS, VIEW_METHODS) and u.args[0] is cur:
                todo.append(u)
                continue
            lin = linear_call(gm, u)
            if lin is not None and lin.input is cur and not requires_grad(gm, lin.weight):
                continue  # a frozen weight: keeps nothing of its input
            return u
    return None


def _input_cast_sites(gm: fx.GraphModule) -> list[Candidate]:
    """Every linear with a trainable weight that reads an exact widening cast (module docstring)."""
    found: list[tuple[fx.Node, LinearCall, fx.Node, list[fx.Node]]] = []
    for n in gm.graph.nodes:
        lin = linear_call(gm, n)
        below = None if lin is None or not requires_grad(gm, lin.weight) else _cast_below(lin.input)
        if below is None or value(n) is None or value(n).dtype != value(below[0]).dtype:
            continue  # no cast before it, or under autocast (the linear keeps its own half copy)
        found.append((n, lin, *below))
    sites = {n for n, *_ in found}
    readers: dict[fx.Node, int] = {}  # narrow tensor -> how many sites keep it
    for _, _, cast, _ in found:
        readers[cast.args[0]] = readers.get(cast.args[0], 0) + 1
    candidates = []
    for n, lin, cast, views in found:
        narrow = cast.args[0]
        keeper = _may_keep(gm, cast, sites)
        reason = "" if keeper is None else f"reader {keeper.name} of the cast {cast.name} may keep it anyway"
        dtypes = f"{_short(value(narrow).dtype)} -> {_short(value(cast).dtype)}"
        candidates.append(Candidate(
            INPUT_CASTS, n.name, module_path(n), f"{lin.kind} (input cast {dtypes} "
            "rebuilt)", bytes_saved=tensor_bytes(cast) - tensor_bytes(narrow) // readers[narrow], skip=reason,
            apply=lambda edit, n=n, lin=lin, cast=cast, views=views: _apply_input_cast(edit, n, lin, cast, views),
            replaces=(n,)))
    return candidates


def _apply_input_cast(edit: GraphEdit, n: fx.Node, lin: LinearCall, cast: fx.Node, views: list[fx.Node]) -> None:
    narrow = cast.args[0]
    with edit.inserting_before(n):
        kept = edit.node(narrow)
        for view in views:  # the narrow tensor through the same views as the linear's input
            kept = edit.copy(view, lambda a, v=view, k=kept: k if a is edit.node(v.args[0]) else a)
        new = edit.call(torch.ops.approxbp.linear_shared.default, (
            edit.node(lin.input), kept, edit.ref(lin.weight), edit.ref(lin.bias), None, None, 0.0, lin.transposed,
            None, None, 1.0, value(narrow).dtype))
    edit.replace(n, new)


def _checkpointed_regions(gm: fx.GraphModule) -> int:
    """How many activation-checkpointed regions (Dynamo's ``tag_activation_checkpoint`` calls) gm holds."""
    return sum(1 for n in gm.graph.nodes
               if n.op == "call_function" and "tag_activation_checkpoint" in str(getattr(n.target, "__name__", n.target)))


def _apply(edit: GraphEdit, n: fx.Node, lin: LinearCall, dtype: torch.dtype) -> None:
    xv = value(lin.input)
    with edit.inserting_before(n):
        x = lin.input
        if xv is None or xv.dtype != dtype:
            # autocast's cast of the input, as its own node: it keeps nothing for backward, and the op
            # keeps its result (what autocast's linear keeps) when the weight trains
            x = edit.method("to", (lin.input, dtype))
        new = edit.call(torch.ops.approxbp.linear_cast.default,
                        (x, edit.ref(lin.weight), edit.ref(lin.bias), lin.transposed))
    edit.replace(n, new)
