"""Run an op body as one inductor kernel when it executes for real, as plain torch ops when it is traced.

The custom ops' forwards are opaque to AOTAutograd (that is what pins the saved set), so their bodies
never reach the user's inductor graph: without help they would run as several eager kernels, one pass
over memory each. ``fused`` compiles a body once per dtype (dynamic shapes) and calls that instead.

Backward formulas are written as plain torch code so that, when AOTAutograd traces the backward of a
compiled model, they land in the backward graph where inductor fuses them with their neighbours. In
that case ``fused`` must not call the compiled kernel: it detects tracing (fake tensors or an active
proxy mode) and runs the body directly.

Set ``APPROXBP_FX_KERNELS=eager`` to never compile (for debugging, or where no C compiler exists).
"""

from __future__ import annotations

import functools
import logging
import os
import types
from typing import Callable, TypeVar

import torch
from .._compat import DynamoError, get_proxy_mode, is_fake

log = logging.getLogger("approxbp_fx")

F = TypeVar("F", bound=Callable[..., object])

_KERNEL_MODES = ("compiled", "eager")


def kernel_mode() -> str:
    mode = os.environ.get("APPROXBP_FX_KERNELS", "compiled")
    if mode not in _KERNEL_MODES:
        raise ValueError(f"APPROXBP_FX_KERNELS={mode!r}: expected one of {_KERNEL_MODES}")
    return mode


def is_tracing(*tensors: torch.Tensor | None) -> bool:
    """True when the op runs under a tracer (Dynamo/AOTAutograd/make_fx), not on real data."""
    if torch.compiler.is_compiling() or get_proxy_mode() is not None:
        return True
    return any(t is not None and is_fake(t) for t in tensors)


# Static-shape kernels ran about 2x faster than dynamic-shape ones on CPU (0.5M elements: 55 vs 103 us
# for the 2-bit encode); a training run sees few shapes, so each function gets this many static
# variants before it falls back to one dynamic kernel per argument combination.
STATIC_VARIANTS = 8


def _variant_key(args: tuple[object, ...], shapes: bool) -> tuple[object, ...]:
    return tuple(
        (a.dtype, a.device.type, tuple(a.shape) if shapes else a.dim()) if isinstance(a, torch.Tensor) else (type(a), a)
        for a in args
    )


def _fresh_copy(fn: Callable[..., object], n: int) -> Callable[..., object]:
    """fn with a code object of its own: Dynamo's recompile limit (8) counts per code object, and one
    body serves many argument combinations (dtypes, which gradients are needed, bias or not)."""
    code = fn.__code__.replace(co_name=f"{fn.__name__}_v{n}")
    copy = types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__, fn.__closure__)
    copy.__kwdefaults__ = fn.__kwdefaults__
    return copy


def refuse_double_backward(grad: torch.Tensor, what: str, option: str) -> None:
    """Raise when a backward runs with create_graph=True (grad mode on, outside tracing). For the
    activations: a step function's derivative is zero almost everywhere, which would be a silently wrong
    second derivative (the norms' backwards are differentiable and never call this)."""
    if torch.is_grad_enabled() and not is_tracing(grad):
        raise RuntimeError(
            f"approxbp: double backward (create_graph=True) through {what} is not supported. Compile with "
            f"options={{{option!r}: False}} for this site (or without the approxbp backend) to take higher-order gradients."
        )


def fused(fn: F) -> F:
    """Decorator: run ``fn`` through ``torch.compile`` on real tensors, directly when traced.

    Each combination of non-tensor arguments and tensor dtypes gets its own compiled copy, the first
    ``STATIC_VARIANTS`` of them (by shape) with static shapes.
    """
    static: dict[tuple[object, ...], Callable[..., object]] = {}
    dynamic: dict[tuple[object, ...], Callable[..., object]] = {}

    def slot_for(args: tuple[object, ...]) -> tuple[dict[tuple[object, ...], Callable[..., object]], tuple[object, ...]]:
        """The table and key whose entry runs these arguments, with the entry compiled on first use."""
        key = _variant_key(args, shapes=True)
        if key in static:
            return static, key
        n = len(static) + len(dynamic)
        if len(static) < STATIC_VARIANTS:
            static[key] = torch.compile(_fresh_copy(fn, n), dynamic=False, fullgraph=True)
            return static, key
        key = _variant_key(args, shapes=False)
        if key not in dynamic:
            dynamic[key] = torch.compile(_fresh_copy(fn, n), dynamic=True, fullgraph=True)
        return dynamic, key

    @functools.wraps(fn)
    def wrapper(*args: object) -> object:
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        if kernel_mode() == "eager" or is_tracing(*tensors):
            return fn(*args)
        table, key = slot_for(args)
        try:
            return table[key](*args)
        except DynamoError as exc:
            # A machine without a working C compiler still gets correct (slower) results. Only this
            # signature falls back: its slot now holds the plain body, the others keep their kernels.
            table[key] = fn
            log.warning("approxbp_fx: compiling %s for %s failed (%s); using eager kernels for it",
                        fn.__name__, key, exc)
            return fn(*args)

    return wrapper  # type: ignore[return-value]
