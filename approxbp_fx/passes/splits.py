"""A part of a split tensor that backward keeps gets storage of its own, so the parts nobody keeps are freed.

    before:  qkv = linear(h, W)                         [..., 3d]  (a fused projection: Phi-3, GPT-NeoX, ...)
             q, k, v = qkv[..., :d], qkv[..., d:2d], qkv[..., 2d:]       views of qkv
             rope(q), rope(k) keep nothing of q and k; attention keeps v
                                                        keeping the view v keeps all of qkv: 3d per token
    after:   v = v.clone(memory_format=torch.contiguous_format)
                                                        attention keeps v's own copy: d per token

A saved view keeps its whole base storage alive. Where a tensor is taken apart (``chunk``, ``split``,
``unbind``, basic slices) and only some parts are kept for backward, copying those parts frees the rest
when the base is no longer needed: the fused spelling then keeps what the unfused one keeps. The copy is
exact (same values, a contiguous layout) and costs one pass over the kept parts in forward.

A site is a base that is read only by splits and slices, not a graph input, a view (of a tensor others
may hold) or the output of an op that keeps its own output, and with some but not all parts read by an op that may keep them (anything
``_keeps.keeps`` does not know counts as keeping; so does being returned from the graph). A 2-bit code at
a part is the activation family's business: it copies a GLU's up half itself when it codes the gate
(``gate, up = fused(h).chunk(2, -1)``), since only then does the gate stop being kept.
"""

from __future__ import annotations

import torch.fx as fx

from ..options import Options
from ._edit import Candidate, GraphEdit
from ._graph import module_path, tensor_bytes
from ._keeps import split_site

__all__ = ["FAMILY", "find"]

FAMILY = "splits"


def find(gm: fx.GraphModule, options: Options) -> list[Candidate]:
    """Every split tensor some of whose parts are kept and others not (module docstring)."""
    candidates: list[Candidate] = []
    for base in gm.graph.nodes:
        site = split_site(gm, base)
        if site is None:
            continue
        parts, kept = site
        saved = tensor_bytes(base) - sum(tensor_bytes(p) for p in kept)
        if not kept or len(kept) == len(parts) or saved <= 0:
            continue  # nothing kept (nothing to free), or everything kept (a copy would free nothing)
        candidates.append(Candidate(
            # its own id: the base's name is the id of a site at the projection that computes it
            FAMILY, f"{base.name}:split", module_path(base), f"split into {len(parts)} parts, {len(kept)} kept: copied",
            bytes_saved=saved, apply=lambda edit, kept=kept: _apply(edit, kept), replaces=tuple(kept)))
    return candidates


def _apply(edit: GraphEdit, kept: list[fx.Node]) -> None:
    for part in kept:
        edit.own_storage(part)
