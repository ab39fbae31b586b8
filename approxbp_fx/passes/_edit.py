"""What a rewrite family hands the driver: candidates, and the edit through which they apply.

A family's ``find(gm, options)`` returns ``Candidate``s without touching ``gm``. A candidate's ``apply``
receives a ``GraphEdit`` of a copy of the graph and addresses nodes by the original graph's nodes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.fx as fx

from ..report import Site
from ._graph import concrete

__all__ = ["Candidate", "GraphEdit", "SITE_KEY"]

#: node.meta key naming the candidate that created a node
SITE_KEY = "approxbp_site"
_KEPT_META = ("nn_module_stack", "stack_trace", "example_value", "val", "tensor_meta")


@dataclass
class Candidate:
    """One place a family can rewrite: found without touching the graph, applied on demand."""

    family: str  # the option that enables its family ("norms", "activations")
    id: str  # the anchor node's name in the original graph
    path: str
    pattern: str
    bytes_saved: int = 0  # estimate from shapes, for one call
    skip: str = ""  # why the family leaves it as it is; empty: it can be applied
    constants: str = ""
    apply: Callable[["GraphEdit"], None] | None = field(default=None, repr=False)
    #: original nodes the candidate replaces; a later candidate that would replace one of them again is
    #: not applied (the node is already part of an applied site)
    replaces: tuple[fx.Node, ...] = field(default=(), repr=False)

    def site(self, rewritten: bool, reason: str = "") -> Site:
        return Site(self.id, self.path, self.pattern, rewritten, "" if rewritten else reason,
                    concrete(self.bytes_saved) if rewritten else 0, self.constants if rewritten else "", self.family)


class GraphEdit:
    """Edits of one copy of a graph, addressed by the original graph's nodes."""

    def __init__(self, gm: fx.GraphModule, node_map: dict[fx.Node, fx.Node]) -> None:
        self.gm, self.graph = gm, gm.graph
        self._map = node_map
        self._replaced: dict[fx.Node, fx.Node] = {}
        self.site = ""
        #: new node -> (name of the original node it stands for, site id)
        self.replacements: dict[fx.Node, tuple[str, str]] = {}
        self.dead: list[fx.Node] = []

    def node(self, original: Any) -> Any:
        """The node of the copy that now stands for ``original`` (non-nodes pass through)."""
        if not isinstance(original, fx.Node):
            return original
        n = self._map.get(original, original)
        while n in self._replaced:
            n = self._replaced[n]
        return n

    def args(self, a: Any) -> Any:
        return fx.node.map_arg(a, self.node)

    def inserting_before(self, original: fx.Node) -> Any:
        return self.graph.inserting_before(self.node(original))

    def call(self, target: Callable[..., Any], args: tuple[Any, ...]) -> fx.Node:
        n = self.graph.call_function(target, self.args(args))
        n.meta[SITE_KEY] = self.site
        return n

    def method(self, name: str, args: tuple[Any, ...]) -> fx.Node:
        n = self.graph.call_method(name, self.args(args))
        n.meta[SITE_KEY] = self.site
        return n

    def attr(self, qualname: str) -> fx.Node:
        n = self.graph.get_attr(qualname)
        n.meta[SITE_KEY] = self.site
        return n

    def ref(self, ref: Any) -> Any:
        """The copy's node for a parameter reference: a get_attr made now for an attribute name (a
        call_module layer's parameter on symbolic_trace graphs), else ``node(ref)``."""
        return self.attr(ref) if isinstance(ref, str) else self.node(ref)

    def copy(self, original: fx.Node, arg_transform: Callable[[fx.Node], Any]) -> fx.Node:
        n = self.graph.node_copy(self.node(original), arg_transform)
        n.meta[SITE_KEY] = self.site
        return n

    def own_storage(self, original: fx.Node) -> fx.Node:
        """Every use of ``original`` (a view) now reads a contiguous copy of it made right after it: whatever
        keeps the copy for backward no longer pins the view's whole base storage."""
        old = self.node(original)
        with self.graph.inserting_after(old):
            new = self.graph.call_method("clone", (old,), {"memory_format": torch.contiguous_format})
        new.meta[SITE_KEY] = self.site
        new.meta.update({k: old.meta[k] for k in _KEPT_META if k in old.meta})
        old.replace_all_uses_with(new, delete_user_cb=lambda u: u is not new)
        self._replaced[old] = new
        self.replacements[new] = (original.name, self.site)
        return new

    def replace(self, original: fx.Node, new: fx.Node) -> None:
        """Every use of ``original`` now reads ``new``; ``original`` is removed once nothing uses it."""
        old = self.node(original)
        new.meta.update({k: old.meta[k] for k in _KEPT_META if k in old.meta})
        old.replace_all_uses_with(new)
        self._replaced[old] = new
        self.replacements[new] = (original.name, self.site)
        self.dead.append(old)
