"""The backend's options: names, defaults, validation."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Mapping

from .inners import INNERS

__all__ = ["Options", "BITS"]

BITS = (1, 2, 3)


@dataclass(frozen=True)
class Options:
    """Backend options. ``activations``: Approx-BP at GELU/SiLU/Mish sites (approximate gradients).
    ``norms``: MS-BP at norm -> linear sites (exact). ``masks``: exact 1-bit masks in place of the
    tensors exact backwards keep (ReLU/LeakyReLU/ReLU6/Hardtanh/clamp). ``weight_casts``: linears under
    autocast keep their parameter instead of its half-precision copy (exact). ``input_casts``: linears whose
    input is an exact widening cast (bf16 -> float32) keep the narrow tensor and cast it again (exact).
    ``splits``: a kept part of a split tensor (a fused projection's v) gets storage of its own, so the
    parts nobody keeps are freed (exact). ``inner``: what compiles the
    rewritten graph (a name in ``approxbp_fx.inners.INNERS``). ``verify``: check the rewritten forward against the original
    on the example inputs. ``bits``: bits per element of the activations' step-derivative code (1, 2 or
    3); 2 uses the paper's ReGELU2/ReSiLU2 constants, other widths and activations without paper
    constants use constants fitted by ``fit_step_derivative``."""

    activations: bool = True
    norms: bool = True
    masks: bool = True
    weight_casts: bool = True
    input_casts: bool = True
    splits: bool = True
    inner: str = "inductor"
    verify: bool = True
    bits: int = 2

    @classmethod
    def parse(cls, options: Mapping[str, Any] | None) -> "Options":
        options = dict(options or {})
        known = {f.name: f for f in fields(cls)}
        for name, val in options.items():
            if name not in known:
                raise ValueError(f"approxbp: unknown option {name!r}; valid options are {sorted(known)}")
            expected = type(getattr(cls, name))
            if type(val) is not expected:
                raise ValueError(f"approxbp: option {name!r} must be a {expected.__name__}, got {val!r}")
        if options.get("inner", cls.inner) not in INNERS:
            raise ValueError(f"approxbp: option 'inner' must be one of {tuple(INNERS)}, got {options['inner']!r}")
        if options.get("bits", 2) not in BITS:
            raise ValueError(f"approxbp: option 'bits' must be one of {BITS}, got {options['bits']!r}")
        return cls(**options)
