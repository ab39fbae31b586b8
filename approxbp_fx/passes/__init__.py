"""Rewrite families, one module each; ``FAMILIES`` is the order they apply in.

A family is a module with ``FAMILY`` (the option that switches it on, also its name in reports) and
``find(gm, options) -> list[Candidate]``: every site it recognises, with a reason where it must be left
alone and an ``apply`` for the others. ``find`` never changes ``gm``; ``approxbp_fx.driver`` decides,
applies and cleans up.
"""

from __future__ import annotations

from types import ModuleType

from . import activations, dropout, linears, norms, splits
from ._edit import Candidate, GraphEdit

__all__ = ["FAMILIES", "Candidate", "GraphEdit", "activations", "dropout", "linears", "norms", "splits"]

# norms first: an activation after a shared linear then reads the rewritten linear's output, and a
# dropout between a norm and its linears belongs to the norm's site (the dropout family takes the rest)
# linears after them: a linear another family rewrote (linear_shared casts inside already) is not rewritten
# again; splits last: it copies parts of tensors that the other families' sites read
FAMILIES: list[ModuleType] = [norms, dropout, activations, linears, splits]
