"""The rewrite driver: find -> decide -> apply, for every family, on one copy of a graph.

    candidates = [c for family in FAMILIES if family is on for c in family.find(gm, options)]   # gm untouched
    decide:  a candidate runs unless the family skips it (c.skip), the graph carries no gradients, or
             verification dropped it (``verdicts``); families switched off by the options are not searched
    apply:   one copy of gm; each family's chosen candidates apply through a ``GraphEdit``, then the
             nodes they made dead are removed; the copy is linted and recompiled once. A candidate that
             would replace a node an applied candidate already replaced (``Candidate.replaces``: a linear
             that a norm site shares, a dropout in its chain) is left out: that node is rewritten already

Candidates name the nodes of the original graph; a ``GraphEdit`` translates them into the copy and
follows earlier replacements (a linear that the norm family replaced is what an activation after it
reads). Every node an edit creates carries its candidate's id in ``node.meta["approxbp_site"]``, and
every replacement is recorded, so verification can check each site by itself.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterator

import torch.fx as fx

from .options import Options
from .passes import FAMILIES
from .passes._edit import Candidate, GraphEdit
from .passes._graph import remove_dead, value
from .report import Site

__all__ = ["find_candidates", "decide", "apply_candidates", "copy_graph_module", "produces_gradients"]

NO_GRADIENTS = "no gradients flow through this graph (no_grad / inference_mode)"


def copy_graph_module(gm: fx.GraphModule) -> tuple[fx.GraphModule, dict[fx.Node, fx.Node]]:
    """A GraphModule with its own copy of the graph (node names kept) over the same submodules and
    attributes (higher-order ops' subgraphs included), and the map from original to copied nodes."""
    graph = fx.Graph()
    graph._codegen = gm.graph._codegen  # keeps pytree in/out handling of symbolic_trace graphs
    node_map: dict[fx.Node, fx.Node] = {}
    out = graph.graph_copy(gm.graph, node_map)
    graph.output(out)
    copied = fx.GraphModule(gm, graph)
    _keep_dynamo_metadata(gm, copied, node_map)
    return copied, node_map


def _keep_dynamo_metadata(gm: fx.GraphModule, copied: fx.GraphModule, node_map: dict[fx.Node, fx.Node]) -> None:
    """Carry over what Dynamo attached to the graph module and its placeholders. AOTAutograd reads it to
    tell the parameters among the inputs ("static" inputs): without it every parameter counts as an
    activation, and the min-cut partitioner prefers keeping a parameter's half-precision cast (half
    the bytes of the parameter, which it then believes it must otherwise keep) to keeping the parameter
    the model holds anyway (measured under aot_eager: a weight copy per norm-shared linear)."""
    copied.meta.update(gm.meta)
    if hasattr(gm, "_param_name_to_source"):
        copied._param_name_to_source = gm._param_name_to_source
    for old, new in node_map.items():
        if old.op == "placeholder" and hasattr(old, "_dynamo_source"):
            new._dynamo_source = old._dynamo_source


def produces_gradients(gm: fx.GraphModule) -> bool:
    """False when the tracer recorded that no output requires grad; True when unknown."""
    output = next(n for n in gm.graph.nodes if n.op == "output")
    values = [v for v in (value(n) for n in output.all_input_nodes) if v is not None]
    return not values or any(v.requires_grad for v in values)


def find_candidates(gm: fx.GraphModule, options: Options) -> list[Candidate]:
    """The candidates of every family the options switch on, in family order; ``gm`` is left exactly as it
    was. A family switched off is not even looked for (its sites are not in the report); a family whose
    candidates belong to several options (``OPTIONS``) is searched when any is on and leaves out the rest."""
    return [c for family in FAMILIES if any(getattr(options, o) for o in getattr(family, "OPTIONS", (family.FAMILY,)))
            for c in family.find(gm, options)]


def decide(candidates: list[Candidate], gm: fx.GraphModule,
           verdicts: dict[str, str] | None = None) -> dict[str, str]:
    """{candidate id: reason} for every candidate that must not be applied."""
    verdicts = verdicts or {}
    grads = produces_gradients(gm)
    skipped: dict[str, str] = {}
    for c in candidates:
        if c.id in verdicts:
            skipped[c.id] = verdicts[c.id]
        elif not grads:
            # traced under no_grad/inference_mode: nothing is saved for backward, a rewrite only costs time
            skipped[c.id] = NO_GRADIENTS
        elif c.skip:
            skipped[c.id] = c.skip
    return skipped


@dataclass
class Applied:
    gm: fx.GraphModule
    sites: list[Site]
    edit: GraphEdit
    seconds: float


def apply_candidates(gm: fx.GraphModule, candidates: list[Candidate], skipped: dict[str, str]) -> Applied:
    """Apply every candidate not in ``skipped`` to one copy of ``gm``, family by family."""
    start = time.perf_counter()
    new, node_map = copy_graph_module(gm)
    edit = GraphEdit(new, node_map)
    sites: list[Site] = []
    taken: set[fx.Node] = set()
    for family in _in_order(candidates):
        for c in family:
            if taken.intersection(c.replaces):
                continue  # covered by an applied site: neither rewritten again nor a skip to report
            if c.id in skipped:
                sites.append(c.site(False, skipped[c.id]))
                continue
            taken.update(c.replaces)
            edit.site = c.id
            c.apply(edit)
            sites.append(c.site(True))
        # clean up after each family, so the next one sees no dead nodes
        remove_dead(new.graph, edit.dead)
        edit.dead = []
    new.graph.lint()
    new.recompile()
    return Applied(new, sites, edit, time.perf_counter() - start)


def _in_order(candidates: list[Candidate]) -> Iterator[list[Candidate]]:
    families: dict[str, list[Candidate]] = {}
    for c in candidates:
        families.setdefault(c.family, []).append(c)
    yield from families.values()
