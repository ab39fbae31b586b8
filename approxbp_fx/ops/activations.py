"""Approx-BP activations: exact forward, k-bit step-function derivative in backward.

The forward of GELU/SiLU is computed by the same aten kernel as ``F.gelu``/``F.silu`` (bitwise equal).
For backward only a code k = #{i : x > c_i} is kept, packed ``8 // bits`` codes per byte; backward is
``dy * levels[k]`` (Yang et al., ICML 2024, "ReGELU2"/"ReSiLU2" for 2 bits).

    before:  y = gelu(x)                       saves x            (4 bytes/elem in fp32)
    after:   y, code = approxbp::step_act(x)   saves code         (0.25 bytes/elem at 2 bits)

The forward is an opaque custom op so that AOTAutograd's partitioner cannot recompute the code from x
(and then keep x instead); its traceable twin (``ops/spec.py``) tags the code as kept instead. The
backward is plain torch code, which AOTAutograd traces into the backward graph where inductor fuses
the unpacking with the surrounding gradient math.

Everything the package knows about an activation is one ``Activation`` record in ``ACTIVATIONS``: the
graph pass identifies sites with its float64 reference and native call targets, the op computes its
forward by the record's ``forward``, and its step derivative comes from the paper or a cached fit.
Adding an activation means adding one record (see ``docs/architecture.md``).

Piecewise-linear activations (ReLU, LeakyReLU, ReLU6, Hardtanh, clamp) have a step function as their
*exact* derivative. Their records carry ``mask``, torch's own backward condition, and run through
``approxbp::mask_act``, which keeps that condition as a 1-bit mask (always 1 bit: the gradient either
passes or is zero or scaled by a constant slope). Backward is bit for bit torch's, kinks and NaN included:

    before:  y = relu(x)                       saves y            (4 bytes/elem in fp32)
    after:   y, mask = approxbp::mask_act(x)   saves the mask     (0.125 bytes/elem)
"""

from __future__ import annotations

import functools
import math
import struct
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._fused import fused, is_tracing, refuse_double_backward
from .spec import SAVED, OpSpec, define_op

__all__ = [
    "StepDerivative", "REGELU2", "RESILU2", "regelu2", "resilu2", "step_activation", "Activation", "ACTIVATIONS",
    "activation_by_op_name", "step_for", "exact_activation", "mask_activation",
]


@dataclass(frozen=True)
class StepDerivative:
    """A step function used as an activation's derivative: ``levels[k]`` where k thresholds are exceeded."""

    thresholds: tuple[float, ...]
    levels: tuple[float, ...]
    error: float = float("nan")

    def __post_init__(self) -> None:
        if len(self.levels) != len(self.thresholds) + 1:
            raise ValueError(
                f"a step derivative needs one more level than thresholds, got {len(self.levels)} levels "
                f"and {len(self.thresholds)} thresholds"
            )
        if len(self.levels) > 256:
            raise ValueError(f"at most 256 levels (8 bits) are supported, got {len(self.levels)}")
        if any(b <= a for a, b in zip(self.thresholds, self.thresholds[1:])):
            raise ValueError(f"thresholds must be strictly increasing, got {self.thresholds}")

    @property
    def bits(self) -> int:
        """Bits one code occupies in the packed buffer (1, 2, 4 or 8: a divisor of 8)."""
        need = max(1, math.ceil(math.log2(len(self.levels))))
        return next(b for b in (1, 2, 4, 8) if b >= need)

    @classmethod
    def from_relu_sum(cls, a: Sequence[float], c: Sequence[float]) -> "StepDerivative":
        """From the paper's parametrisation h(x) = sum_i a_i ReLU(x - c_i): levels are partial sums of a."""
        levels = [0.0]
        for ai in a:
            levels.append(levels[-1] + ai)
        return cls(tuple(c), tuple(levels))


# Constants of Yang et al. (ICML 2024), Table 1: h(x) = sum_i a_i ReLU(x - c_i).
REGELU2 = StepDerivative.from_relu_sum(
    a=(-0.04922261145617846, 1.0979632065417297, -0.048740595085551286),
    c=(-3.1858810036855245, -0.001178821281161997, 3.190832613414926),
)
RESILU2 = StepDerivative.from_relu_sum(
    a=(-0.04060357190528599, 1.080925428529668, -0.040321856624382146),
    c=(-6.3050461001646445, -0.0008684942046214787, 6.325815242089708),
)


def _quick_gelu(x: Tensor) -> Tensor:
    return x * torch.sigmoid(1.702 * x)


def _mish(x: Tensor) -> Tensor:
    return x * torch.tanh(F.softplus(x))


@dataclass(frozen=True)
class Activation:
    """What the package knows about one activation.

    ``name`` is how reports spell it. ``reference`` is what it computes (evaluated in float64 on probe
    points to identify a site in any spelling, and fitted for constants). ``op_name``/``forward``: the
    string the ``approxbp::step_act`` op takes and the forward it then computes, the same kernel as the
    native call (None: the activation only appears decomposed, and its own nodes stay the forward).
    ``functions``/``modules``: native call targets and modules in traced graphs; ``inplace``: the keyword
    that makes such a call in place (those sites are left alone). ``paper``: the paper's 2-bit constants,
    or None to fit them (``step_for``)."""

    name: str
    reference: Callable[..., Tensor]
    op_name: str | None = None
    forward: Callable[..., Tensor] | None = None
    functions: tuple[Callable[..., object], ...] = ()
    modules: tuple[type, ...] = ()
    inplace: str | None = None
    paper: StepDerivative | None = None
    # --- exact (piecewise-linear) records only; ``reference`` and ``forward`` then take ``*params`` too ---
    #: call_method spellings (``x.relu()``, ``x.clamp(min=0)``)
    methods: tuple[str, ...] = ()
    #: torch's own backward condition: True where dx = dy, elsewhere dx = ``slope(*params)`` * dy
    mask: Callable[..., Tensor] | None = None
    #: the site's constants, read off the site itself evaluated in float64 (``f``: x -> site(x)); None: not this op
    params: Callable[[Callable[[Tensor], Tensor]], tuple[float, ...] | None] | None = None
    #: names of the site's constants (``forward(x, *params)``); ``bounds``: they are compared with x
    param_names: tuple[str, ...] = ()
    bounds: bool = False
    #: the gradient's factor where the mask is False (0 for all but LeakyReLU)
    slope: Callable[..., float] = lambda *params: 0.0
    #: what torch's own op keeps for backward: "input" or "output"
    keeps: str = "input"
    #: the derivative in words, formatted with the params (reports)
    rule: str = ""

    @property
    def exact(self) -> bool:
        return self.mask is not None


# --- exact records ---------------------------------------------------------------------------------
# Each mask is the condition torch's own backward tests (torch 2.13, CPU, measured at 0, -0, the bounds, NaN):
# relu:       threshold_backward on the result: dy unless result <= 0 (0 and -0 give 0, NaN passes)
# leaky_relu: dy where x > 0, else slope * dy (0, -0 and NaN take the slope)
# hardtanh:   0 where x <= min or x >= max, and at NaN (relu6 is hardtanh(0, 6))
# clamp:      dy where min <= x <= max (both bounds pass), 0 at NaN


def _relu_passes(x: Tensor) -> Tensor:
    return ~(x <= 0)


def _positive(x: Tensor, *_: float) -> Tensor:
    return x > 0


def _relu6_passes(x: Tensor) -> Tensor:
    return (x > 0) & (x < 6)


def _open_interval(x: Tensor, lo: float, hi: float) -> Tensor:
    return (x > lo) & (x < hi)


def _closed_interval(x: Tensor, lo: float, hi: float) -> Tensor:
    return (x >= lo) & (x <= hi)


def _clip(x: Tensor, lo: float, hi: float) -> Tensor:
    """The float64 reference of clamp/hardtanh (NaN stays NaN)."""
    return torch.where(x < lo, lo, torch.where(x > hi, hi, x))


def _at(f: Callable[[Tensor], Tensor], *points: float) -> list[float]:
    return f(torch.tensor(points, dtype=torch.float64)).tolist()


def _slope_of(f: Callable[[Tensor], Tensor]) -> tuple[float, ...]:
    return (-_at(f, -1.0)[0],)


def _bounds(f: Callable[[Tensor], Tensor], finite: bool = True) -> tuple[float, ...] | None:
    lo, hi = _at(f, -math.inf, math.inf)
    if math.isnan(lo) or math.isnan(hi) or (finite and not (math.isfinite(lo) and math.isfinite(hi))):
        return None
    return lo, hi


def _clamp_forward(x: Tensor, lo: float, hi: float) -> Tensor:
    return torch.clamp(x, None if lo == -math.inf else lo, None if hi == math.inf else hi)


# torch._C._nn.* are the call targets Dynamo writes for F.gelu / F.silu / F.mish when it inlines modules.
ACTIVATIONS: dict[str, Activation] = {a.name: a for a in (
    Activation("gelu", F.gelu, "gelu", lambda x: F.gelu(x), (F.gelu, torch._C._nn.gelu), (nn.GELU,), None, REGELU2),
    # GELU's constants serve the tanh form too: their derivatives differ by at most 9e-4
    Activation("gelu(tanh)", lambda x: F.gelu(x, approximate="tanh"), "gelu_tanh",
               lambda x: F.gelu(x, approximate="tanh"), (F.gelu, torch._C._nn.gelu), (nn.GELU,), None, REGELU2),
    Activation("silu", F.silu, "silu", F.silu, (F.silu,), (nn.SiLU,), "inplace", RESILU2),
    Activation("quick_gelu", _quick_gelu),
    Activation("mish", _mish, "mish", F.mish, (F.mish, torch._C._nn.mish), (nn.Mish,), "inplace"),
    # exact: Dynamo writes F.relu for nn.ReLU, F.hardtanh(x, 0.0, 6.0, False) for nn.ReLU6 (so relu6 is
    # tried before hardtanh: the same spellings, told apart by value), and torch._C._nn.leaky_relu /
    # torch._C._nn.hardtanh where it inlines the functional forms
    Activation("relu", lambda x: torch.where(x > 0, x, 0.0), forward=torch.relu, functions=(F.relu, torch.relu),
               modules=(nn.ReLU,), inplace="inplace", methods=("relu",), mask=_relu_passes, params=lambda f: (),
               keeps="output", rule="dy where y > 0, else 0"),
    Activation("leaky_relu", lambda x, slope: torch.where(x > 0, x, x * slope), forward=F.leaky_relu,
               functions=(F.leaky_relu, torch._C._nn.leaky_relu), modules=(nn.LeakyReLU,), inplace="inplace",
               mask=_positive, params=_slope_of, param_names=("slope",), slope=lambda slope: slope,
               rule="dy where x > 0, else {0} * dy"),
    Activation("relu6", lambda x: _clip(x, 0.0, 6.0), forward=F.relu6,
               functions=(F.relu6, F.hardtanh, torch._C._nn.hardtanh), modules=(nn.Hardtanh,), inplace="inplace",
               mask=_relu6_passes, params=lambda f: (), rule="dy where 0 < x < 6, else 0"),
    Activation("hardtanh", _clip, forward=F.hardtanh, functions=(F.hardtanh, torch._C._nn.hardtanh),
               modules=(nn.Hardtanh,), inplace="inplace", mask=_open_interval, params=_bounds,
               param_names=("min", "max"), bounds=True, rule="dy where {0} < x < {1}, else 0"),
    Activation("clamp", _clip, forward=_clamp_forward, functions=(torch.clamp, torch.clip, torch.clamp_min, torch.clamp_max),
               methods=("clamp", "clip", "clamp_min", "clamp_max"), mask=_closed_interval,
               params=lambda f: _bounds(f, finite=False), param_names=("min", "max"), bounds=True,
               rule="dy where {0} <= x <= {1}, else 0"),
)}


def activation_by_op_name(op_name: str) -> Activation:
    for a in ACTIVATIONS.values():
        if a.op_name == op_name:
            return a
    raise ValueError(f"unknown activation {op_name!r}; expected one of "
                     f"{sorted(a.op_name for a in ACTIVATIONS.values() if a.op_name)}")


@functools.lru_cache(maxsize=None)
def step_for(name: str, bits: int) -> tuple[StepDerivative, str]:
    """The step derivative of ``ACTIVATIONS[name]`` at ``bits`` bits, and where it comes from.

    The paper's constants at 2 bits where it has them; otherwise ``fit_step_derivative``'s, fitted once
    per machine (cached on disk, see ``approxbp_fx.fit.cached_step_derivative``)."""
    act = ACTIVATIONS[name]
    if act.exact:
        raise ValueError(f"{name} has an exact step derivative (approxbp::mask_act), nothing to fit")
    if bits == 2 and act.paper is not None:
        return act.paper, "paper"
    from ..fit import cached_step_derivative

    return cached_step_derivative(name, act.reference, bits), "fitted"


@functools.lru_cache(maxsize=64)
def _cached_const(values: tuple[float, ...], device: torch.device, dtype: torch.dtype) -> Tensor:
    return torch.tensor(values, dtype=dtype, device=device)


def _const(values: Sequence[float], ref: Tensor, dtype: torch.dtype) -> Tensor:
    """A small constant tensor on ref's device, built once per (values, device, dtype) in a bounded cache:
    no host-to-device copy per call."""
    if is_tracing(ref):  # a tracer's tensor must not outlive its trace
        return torch.tensor(values, dtype=dtype, device=ref.device)
    return _cached_const(tuple(values), ref.device, dtype)


def _round_down_f32(c: float) -> float:
    """The largest float32 <= c (pure Python: it also runs while a tracer holds fake tensors)."""
    r = struct.unpack("f", struct.pack("f", c))[0]
    if r <= c:
        return r
    bits = struct.unpack("I", struct.pack("f", r))[0]
    bits = bits - 1 if r > 0 else (bits + 1 if r < 0 else 0x80000001)
    return struct.unpack("f", struct.pack("I", bits))[0]


def _thresholds(thresholds: Sequence[float], x: Tensor) -> tuple[float, ...]:
    """Thresholds exact in x's compute dtype, each rounded down: for x in that dtype, x > round_down(c)
    exactly when x > c (rounding to nearest could move c past an input equal to the rounded value)."""
    if _compute_dtype(x) == torch.float64:
        return tuple(thresholds)
    return tuple(_round_down_f32(c) for c in thresholds)


@fused
def _encode(x: Tensor, thresholds: tuple[float, ...]) -> Tensor:
    """Pack k = #{i: x > thresholds[i]}: x is [per_byte, m] (planes), the result [m] uint8 whose
    bits j*b .. j*b+b-1 hold the code of x[j].

    ``thresholds`` come from ``_thresholds``: Python floats exact in x's compute dtype. Measured on
    CPU (0.5M fp32 elements, compiled): planes with float arithmetic 55 us (F.gelu: 63 us); four
    consecutive elements per byte 190-350 us (strided gathers); thresholds read from a tensor
    constant made the fused GELU kernel 3x slower; integer adds and shifts did not vectorise.
    """
    per_byte = x.shape[0]
    bits = 8 // per_byte
    x = x.to(_compute_dtype(x))  # compare half inputs in fp32: rounding the thresholds to half moves them
    k = (x > thresholds[0]).to(x.dtype)
    for t in thresholds[1:]:
        k = k + (x > t).to(x.dtype)
    code = k[0]
    for j in range(1, per_byte):
        code = code + k[j] * float(1 << (bits * j))  # exact: integers below 256
    return code.to(torch.uint8)


@fused
def _decode_mul(grad: Tensor, code: Tensor, levels: Tensor) -> Tensor:
    """grad * levels[k] with grad as [per_byte, m] planes and k unpacked from code [m].

    k is compared as a float: inductor's CPU code vectorises float selects but not integer ones
    (0.06 ms vs 1.6 ms for 0.5M elements; a table lookup took 1.2 ms; aten's gelu_backward 0.11 ms).
    """
    per_byte = grad.shape[0]
    bits = 8 // per_byte
    shifts = torch.arange(0, 8, bits, dtype=torch.int32, device=code.device).unsqueeze(-1)
    k = ((code.to(torch.int32).unsqueeze(0) >> shifts) & ((1 << bits) - 1)).to(levels.dtype)
    scale = torch.where(k >= 1, levels[1], levels[0])
    for j in range(2, levels.shape[0]):
        scale = torch.where(k >= j, levels[j], scale)
    return (grad.to(levels.dtype) * scale).to(grad.dtype)


def _compute_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _planes(t: Tensor, per_byte: int) -> Tensor:
    """t flattened (row-major), zero-padded to per_byte * m elements, as [per_byte, m] planes:
    element e is in plane e // m, so each code byte packs elements m apart."""
    flat = t.reshape(-1)
    pad = (-flat.numel()) % per_byte
    if pad:
        flat = F.pad(flat, (0, pad))
    return flat.view(per_byte, -1)


def _code_bytes(x: Tensor, bits: int) -> int:
    per_byte = 8 // bits
    return (x.numel() + per_byte - 1) // per_byte


def _step_code(form, x: Tensor, thresholds: list[float], levels: list[float]) -> Tensor:
    """The packed step code of x: what backward keeps (``levels`` only sets the code's width)."""
    bits = StepDerivative(tuple(thresholds), tuple(levels)).bits
    with form.tag(SAVED):
        return _encode(_planes(x, 8 // bits), _thresholds(thresholds, x))


def _fake_code(x: Tensor, thresholds: list[float], levels: list[float]) -> Tensor:
    return x.new_empty(_code_bytes(x, StepDerivative(tuple(thresholds), tuple(levels)).bits), dtype=torch.uint8)


def _step_act_forward(form, x: Tensor, fn: str, thresholds: list[float], levels: list[float]) -> tuple[Tensor, Tensor]:
    """y = fn(x) and the packed step code of x."""
    return activation_by_op_name(fn).forward(x), _step_code(form, x, thresholds, levels)


def _step_act_fake(x: Tensor, fn: str, thresholds: list[float], levels: list[float]) -> tuple[Tensor, Tensor]:
    return torch.empty_like(x), _fake_code(x, thresholds, levels)


def _step_setup(ctx, inputs, output) -> None:
    thresholds, levels = inputs[-2:]
    ctx.levels = tuple(levels)
    ctx.bits = StepDerivative(tuple(thresholds), tuple(levels)).bits
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(output[1])


def _step_backward(ctx, grad_y: Tensor, _grad_code: Tensor | None):
    """Gradient of x, and None for each of the other three inputs (either op's)."""
    refuse_double_backward(grad_y, "an Approx-BP activation (its derivative is a step function)", "activations")
    (code,) = ctx.saved_tensors
    # float32 levels for half inputs: one rounding, in the final cast
    levels = _const(ctx.levels, grad_y, _compute_dtype(grad_y))
    grad_x = _decode_mul(_planes(grad_y, 8 // ctx.bits), code, levels)
    return grad_x.reshape(-1)[: grad_y.numel()].view(grad_y.shape), None, None, None


define_op(OpSpec(
    "approxbp::step_act", "(Tensor x, str fn, float[] thresholds, float[] levels) -> (Tensor, Tensor)",
    _step_act_forward, _step_act_fake, _step_setup, _step_backward,
))


def _step_attach_forward(form, x: Tensor, y: Tensor, thresholds: list[float], levels: list[float]) -> tuple[Tensor, Tensor]:
    """y (computed elsewhere from x.detach(), e.g. a decomposed GELU) with x's step derivative attached.

    The copy of y is the price of keeping a decomposed forward bit for bit what it was (a custom op's
    output must not alias its input)."""
    return y.clone(), _step_code(form, x, thresholds, levels)


def _step_attach_fake(x: Tensor, y: Tensor, thresholds: list[float], levels: list[float]) -> tuple[Tensor, Tensor]:
    return torch.empty_like(y), _fake_code(x, thresholds, levels)


define_op(OpSpec(
    "approxbp::step_attach", "(Tensor x, Tensor y, float[] thresholds, float[] levels) -> (Tensor, Tensor)",
    _step_attach_forward, _step_attach_fake, _step_setup, _step_backward,
))

_APPROXIMATE = {"none": "gelu", "tanh": "gelu_tanh"}


def step_activation(x: Tensor, fn: str, step: StepDerivative) -> Tensor:
    """``fn(x)`` whose backward uses ``step`` as the derivative; ``fn`` is an ``op_name`` of ``ACTIVATIONS``
    ("gelu", "gelu_tanh", "silu", "mish")."""
    activation_by_op_name(fn)  # raises ValueError naming the valid ones
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise TypeError(f"step_activation expects a floating-point tensor, got {type(x).__name__}"
                        f"{'' if not isinstance(x, Tensor) else ' of dtype ' + str(x.dtype)}")
    return torch.ops.approxbp.step_act(x, fn, list(step.thresholds), list(step.levels))[0]


def regelu2(x: Tensor, approximate: str = "none") -> Tensor:
    """``F.gelu(x, approximate=...)`` in forward (bitwise); backward with the paper's 2-bit ReGELU2 derivative.

    Keeps ceil(numel / 4) bytes for backward instead of the input.
    """
    if approximate not in _APPROXIMATE:
        raise ValueError(f"approximate must be 'none' or 'tanh', got {approximate!r}")
    return step_activation(x, _APPROXIMATE[approximate], REGELU2)


def resilu2(x: Tensor) -> Tensor:
    """``F.silu(x)`` in forward (bitwise); backward with the paper's 2-bit ReSiLU2 derivative."""
    return step_activation(x, "silu", RESILU2)


# --- exact masks ---------------------------------------------------------------------------------


def exact_activation(name: str) -> Activation:
    """The exact (piecewise-linear) record called ``name``."""
    act = ACTIVATIONS.get(name)
    if act is None or not act.exact:
        raise ValueError(f"unknown exact activation {name!r}; expected one of "
                         f"{sorted(a.name for a in ACTIVATIONS.values() if a.exact)}")
    return act


def exact_in(dtype: torch.dtype, values: Sequence[float]) -> bool:
    """True when every value is exactly representable in ``dtype`` (infinities are). The masks compare x
    with the bounds in x's dtype, as torch's backward does; a bound torch would round first (0.1 in
    float32) could be compared differently, so such sites are left alone."""
    v = torch.tensor(list(values), dtype=torch.float64)
    return bool(torch.equal(v.to(dtype).to(torch.float64), v)) if v.numel() else True


@fused
def _encode_mask(x: Tensor, mask: Callable[..., Tensor], params: tuple[float, ...]) -> Tensor:
    """Pack ``mask(x, *params)`` 8 per byte: x is [8, m] planes, bit j of byte i holds x[j, i]'s.

    Bounds are exact in x's dtype (``exact_in``), so comparing half inputs in float32 is exact too;
    the bits are summed as floats, which inductor's CPU code vectorises (see ``_encode``)."""
    bit = mask(x.to(_compute_dtype(x)), *params).to(torch.float32)
    code = bit[0]
    for j in range(1, 8):
        code = code + bit[j] * float(1 << j)  # exact: integers below 256
    return code.to(torch.uint8)


@fused
def _mask_grad(grad: Tensor, code: Tensor, slope: float) -> Tensor:
    """dy where the mask bit is set, else ``slope`` * dy; grad is [8, m] planes, code [m].

    Where the slope is 0 the gradient is a select, not a product: an inf or NaN dy then gives +0, as
    torch's relu/hardtanh/clamp backwards do (0 * inf would be NaN, 0 * -1 is -0). LeakyReLU's product
    runs in float32 for half inputs and rounds once, as torch's CPU kernel does."""
    shifts = torch.arange(8, dtype=torch.int32, device=code.device).unsqueeze(-1)
    passes = ((code.to(torch.int32).unsqueeze(0) >> shifts) & 1).to(torch.float32) > 0.5
    if slope == 0.0:
        return torch.where(passes, grad, 0.0)
    g = grad.to(_compute_dtype(grad))
    return torch.where(passes, g, g * slope).to(grad.dtype)


def _mask_act_forward(form, x: Tensor, fn: str, params: list[float]) -> tuple[Tensor, Tensor]:
    """y = fn(x, *params) by torch's own kernel, and the packed 1-bit mask of torch's backward condition."""
    act = exact_activation(fn)
    y = act.forward(x, *params)
    with form.tag(SAVED):
        return y, _encode_mask(_planes(x, 8), act.mask, tuple(params))


def _mask_act_fake(x: Tensor, fn: str, params: list[float]) -> tuple[Tensor, Tensor]:
    return torch.empty_like(x), x.new_empty(_code_bytes(x, 1), dtype=torch.uint8)


def _mask_setup(ctx, inputs, output) -> None:
    _, fn, params = inputs
    ctx.slope = float(exact_activation(fn).slope(*params))
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(output[1])


def _mask_backward(ctx, grad_y: Tensor, _grad_code: Tensor | None):
    """Gradient of x, None for fn and params.

    Double backward is supported and exact: dx is linear in dy (the same mask again) and does not
    depend on x (torch's own second derivative of these ops is 0 in x). With create_graph=True the body
    runs as plain torch ops, which autograd records; the compiled kernel would hide them."""
    (code,) = ctx.saved_tensors
    body = _mask_grad.__wrapped__ if torch.is_grad_enabled() and not is_tracing(grad_y) else _mask_grad
    grad_x = body(_planes(grad_y, 8), code, ctx.slope)
    return grad_x.reshape(-1)[: grad_y.numel()].view(grad_y.shape), None, None


define_op(OpSpec(
    "approxbp::mask_act", "(Tensor x, str fn, float[] params) -> (Tensor, Tensor)",
    _mask_act_forward, _mask_act_fake, _mask_setup, _mask_backward,
))


def mask_activation(x: Tensor, name: str, params: Sequence[float] = ()) -> Tensor:
    """``name``'s forward (torch's own kernel, bit for bit) keeping a 1-bit mask for backward, which
    then equals torch's own backward bit for bit. ``name``: relu, leaky_relu (params: slope), relu6,
    hardtanh (min, max) or clamp (min, max; +-inf for none)."""
    act = exact_activation(name)
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise TypeError(f"mask_activation expects a floating-point tensor, got {type(x).__name__}"
                        f"{'' if not isinstance(x, Tensor) else ' of dtype ' + str(x.dtype)}")
    params = [float(p) for p in params]
    if len(params) != len(act.param_names):
        raise ValueError(f"{name} takes {len(act.param_names)} parameter(s) {act.param_names}, got {len(params)}")
    if act.bounds and not exact_in(x.dtype, params):
        raise ValueError(f"{name} bounds {params} are not exact in {x.dtype}: torch would compare with rounded ones")
    return torch.ops.approxbp.mask_act(x, name, params)[0]
