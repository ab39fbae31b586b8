"""A norm's y_hat handed from one Dynamo graph to the next (a graph break between a norm and its linears).

Where Dynamo breaks a model into graphs (a data-dependent branch such as wav2vec2's layerdrop, a call it
cannot trace), a norm can end one graph and the linears that read its output begin the next. Neither
graph alone can share: the first keeps the norm's input, the second keeps the output z it receives.

The tensor a graph returns is the object the next graph receives (Dynamo passes it on as it is), so
the first graph can leave y_hat beside z, recorded for that object:

    graph A:  z, y_hat, rstd = approxbp::norm_shared(x, gamma, beta, ...)   keeps y_hat, rstd
              publish(z, y_hat, gamma, beta, offset)                          z -> y_hat, by identity
              return z
    graph B:  y, w, b, off = received(z)                 (y_hat, gamma, beta, offset), or (z, None, None, 0.0)
              q = approxbp::linear_shared(z, y, Wq, bq, w, b, off, ...)      keeps y: y_hat (shared) or z

A miss (z came from anywhere else, or was changed in place after the norm: its version counter moved)
gives graph B exactly what it kept before, z with no affine to rebuild. The entry lives no longer than z
and is dropped when the norm's backward has run, so y_hat is never kept past what graph A keeps anyway.

The eager inner runs these calls in the graph; an AOTAutograd-based inner, which fixes a graph's saved
set when it traces it, runs them at the compiled function's boundary (``inners/handoff.py``).
"""

from __future__ import annotations

import weakref

import torch.fx
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

__all__ = ["publish", "received"]

# z -> (z's version when published, y_hat, norm weight, norm bias, weight offset)
_HANDED: WeakIdKeyDictionary = WeakIdKeyDictionary()


@torch.fx.node.has_side_effect  # its result is unused: dead-code elimination must keep the call
def publish(z: Tensor, y_hat: Tensor, weight: Tensor | None, bias: Tensor | None, offset: float) -> None:
    """Record that ``z == affine(y_hat)`` (the norm's output, as ``linear_shared`` rebuilds it) for the
    graph that will receive z. Only a z that carries a gradient to its norm is recorded: without one the
    norm keeps nothing, and y_hat would be a new tensor to keep."""
    node = z.grad_fn
    if node is None or type(z) is not Tensor:  # a subclass (a fake or wrapped tensor) is no object to hand on
        return
    _HANDED[z] = (z._version, y_hat, weight, bias, offset)
    ref = weakref.ref(z)  # not z itself: the hook lives on z's own grad_fn, and would keep z alive

    def forget(*_: object) -> None:
        key = ref()
        if key is not None:
            _HANDED.pop(key, None)

    node.register_hook(forget)


def received(z: Tensor) -> tuple[Tensor, Tensor | None, Tensor | None, float]:
    """``(y_hat, weight, bias, offset)`` published for z, or ``(z, None, None, 0.0)``: z itself with no
    affine, which ``linear_shared`` keeps and gives back unchanged."""
    entry = _HANDED.get(z)
    if entry is None or entry[0] != z._version:
        return z, None, None, 0.0
    return entry[1], entry[2], entry[3], entry[4]
