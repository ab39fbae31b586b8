"""Graph passes, one file per family; ``PASSES`` is the order they run in."""

from __future__ import annotations

from typing import Callable

import torch.fx as fx

from ..options import Options
from ..report import Site
from ._graph import cleanup, value
from .activations import compress_activations
from .norms import share_norm_outputs

__all__ = ["PASSES", "run_passes", "compress_activations", "share_norm_outputs"]

# (option that enables it, pass). Every pass: (gm, skip: {site id: reason}, options) -> sites; it edits
# gm.graph in place.
PASSES: list[tuple[str, Callable[[fx.GraphModule, dict[str, str], Options], list[Site]]]] = [
    ("norms", share_norm_outputs),
    ("activations", compress_activations),
]


def copy_graph_module(gm: fx.GraphModule) -> fx.GraphModule:
    """A GraphModule with its own copy of the graph (node names kept) over the same submodules/attributes."""
    graph = fx.Graph()
    graph._codegen = gm.graph._codegen  # keeps pytree in/out handling of symbolic_trace graphs
    out = graph.graph_copy(gm.graph, {})
    graph.output(out)
    return fx.GraphModule(gm, graph)


class _AllSites(dict):
    """A skip map that skips every site with one reason."""

    def __init__(self, reason: str) -> None:
        super().__init__()
        self.reason = reason

    def __contains__(self, key: object) -> bool:
        return True

    def __getitem__(self, key: str) -> str:
        return self.reason


def produces_gradients(gm: fx.GraphModule) -> bool:
    """False when the tracer recorded that no output requires grad; True when unknown."""
    output = next(n for n in gm.graph.nodes if n.op == "output")
    values = [v for v in (value(n) for n in output.all_input_nodes) if v is not None]
    return not values or any(v.requires_grad for v in values)


def run_passes(gm: fx.GraphModule, options: Options, skip: dict[str, str] | None = None) -> tuple[fx.GraphModule, list[Site]]:
    """Run the enabled passes on a copy of ``gm``; ``gm`` itself is left as it was."""
    new = copy_graph_module(gm)
    skip = dict(skip or {})
    if not produces_gradients(gm):
        # traced under no_grad/inference_mode: nothing is saved for backward, a rewrite only costs time
        reason = "no gradients flow through this graph (no_grad / inference_mode)"
        skip = _AllSites(reason)
    sites: list[Site] = []
    for option, rewrite in PASSES:
        if getattr(options, option):
            sites += rewrite(new, skip, options)
    return cleanup(new), sites
