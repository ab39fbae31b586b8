"""One definition per op, three generated forms: an opaque custom op and two autograd.Functions.

An op is written once, as an ``OpSpec`` beside its kernel: the forward body, the fake (shape) function,
what backward keeps (``setup``) and the backward. ``define_op`` generates from it

* the ``torch.library`` custom op (``register_fake``, ``register_autograd``): opaque to AOTAutograd, so
  its partitioner cannot change what backward keeps. What the passes write into graphs, what the
  aot_eager inner runs, and what users call directly.
* an eager ``torch.autograd.Function`` running the same forward as the custom op, for the eager inner:
  without a tracer, what its ``setup`` saves is what backward keeps, and an autograd.Function costs less
  per call than a custom op's Python dispatch (measured: 4.5 vs 5.0 ms forward and backward of a
  [1040, 256] x [256, 256] linear_shared on the CPU, where F.linear takes 4.1 ms).
* a traceable ``torch.autograd.Function`` with the same forward, setup and backward, for inners that
  fuse across op boundaries (inductor). AOTAutograd traces through it, so the forward marks, by region
  tags in ``node.meta["custom"]``, which of its values backward must keep (``SAVED``) and which it
  should rebuild (``RECOMPUTE``); a partitioner that reads the tags keeps the op's saved set.

    forward(form, *args)   form.traced: False for the custom op and the eager form, True for the traceable one
                           with form.tag(SAVED): ...       values leaving this block are kept
                           with form.tag(RECOMPUTE): ...   values rebuilt in backward

The two forms share every line of math; where they must differ (a fused or aten fast path that a
tracer cannot see into) the body branches on ``form.traced`` and says why.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, ContextManager

import torch

from .._compat import annotate

__all__ = ["OpSpec", "Form", "OPAQUE", "SAVED", "RECOMPUTE", "TAG", "define_op", "traceable_forms", "eager_forms"]

#: Key of the region tags in ``node.meta["custom"]``.
TAG = "approxbp"
SAVED = "saved"
RECOMPUTE = "recompute"


@dataclass(frozen=True)
class Form:
    """How an op body runs: opaque (custom op, no tags) or traced (tags name the node's region)."""

    traced: bool
    region: str = ""

    def tag(self, kind: str) -> ContextManager[None]:
        if not self.traced:
            return contextlib.nullcontext()
        # every op instance has its own "saved" region: a value leaving it is what backward keeps
        return annotate({TAG: RECOMPUTE if kind == RECOMPUTE else f"{SAVED}:{self.region}"})


OPAQUE = Form(traced=False)


@dataclass(frozen=True)
class OpSpec:
    """An op's single definition (see the module docstring). ``backward`` returns one gradient (or
    None) per input; ``traced_non_differentiable`` lists outputs the traceable form marks
    non-differentiable (AOTAutograd refuses double backward, so nothing is lost)."""

    name: str
    schema: str
    forward: Callable[..., Any]
    fake: Callable[..., Any]
    setup: Callable[[Any, tuple[Any, ...], Any], None]
    backward: Callable[..., tuple[Any, ...]]
    traced_non_differentiable: tuple[int, ...] = ()
    #: False: the op has no traceable form and stays opaque under the tracing inners (a body with a
    #: data-dependent loop, such as a grouped matmul over per-expert row counts, cannot be traced)
    traceable: bool = True


# op overload -> traceable function taking the op's arguments and a region name last
_TRACEABLE: dict[Any, Callable[..., Any]] = {}
# op overload -> eager autograd.Function taking the op's arguments
_EAGER: dict[Any, Callable[..., Any]] = {}


def traceable_forms() -> dict[Any, Callable[..., Any]]:
    """{custom op overload: its traceable form}, for every op defined so far."""
    return dict(_TRACEABLE)


def eager_forms() -> dict[Any, Callable[..., Any]]:
    """{custom op overload: its eager autograd.Function's apply}, for every op defined so far."""
    return dict(_EAGER)


def _function(spec: OpSpec, traced: bool) -> type[torch.autograd.Function]:
    """The op as an autograd.Function: traced (tags, and a region name as the last argument) or eager (the
    custom op's own forward)."""

    class Function(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, *args: Any) -> Any:
            if traced:
                *inputs, region = args
                out = spec.forward(Form(traced=True, region=region), *inputs)
            else:
                inputs, out = args, spec.forward(OPAQUE, *args)
            spec.setup(ctx, tuple(inputs), out)
            if traced and spec.traced_non_differentiable:
                ctx.mark_non_differentiable(*(out[i] for i in spec.traced_non_differentiable))
            return out

        @staticmethod
        def backward(ctx: Any, *grads: Any) -> tuple[Any, ...]:
            grads_in = spec.backward(ctx, *grads)
            return (*grads_in, None) if traced else grads_in  # no gradient for the region name

    Function.__name__ = Function.__qualname__ = spec.name.split("::")[-1] + ("_traced" if traced else "_eager")
    return Function


def define_op(spec: OpSpec) -> Any:
    """Register ``spec`` as a custom op, its eager and (where ``spec.traceable``) traceable forms; returns the
    custom op (a CustomOpDef)."""
    op = torch.library.custom_op(spec.name, lambda *args: spec.forward(OPAQUE, *args), mutates_args=(),
                                 schema=spec.schema)
    op.register_fake(spec.fake)
    op.register_autograd(spec.backward, setup_context=spec.setup)
    namespace, name = spec.name.split("::")
    overload = getattr(getattr(torch.ops, namespace), name).default
    _EAGER[overload] = _callable(_function(spec, traced=False))
    if spec.traceable:
        _TRACEABLE[overload] = _function(spec, traced=True).apply
    return op


def _callable(function: type[torch.autograd.Function]) -> Callable[..., Any]:
    """``function.apply`` as a plain function of this module: fx's code generation takes an inherited
    ``apply`` for an attribute of ``torch.autograd.function``."""
    apply = function.apply

    def call(*args: Any) -> Any:
        return apply(*args)

    call.__name__ = call.__qualname__ = function.__name__
    return call
