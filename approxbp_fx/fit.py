"""Fit a k-bit step derivative to any activation (Yang et al., ICML 2024, generalised).

The paper replaces an activation's derivative by a step function with ``2**bits`` levels. Equivalently, it
approximates the activation itself (the *primitive* of the derivative) by a continuous piecewise-linear function

    h(x) = s0 * x + b + sum_i a_i * ReLU(x - c_i),        i = 1 .. 2**bits - 1,

whose derivative is the step function with ``levels = [s0, s0 + a_1, s0 + a_1 + a_2, ...]`` and
``thresholds = c`` (sorted). The fit minimises the L2 distance to the activation f over a truncated interval
[L, R]:

    E(s0, b, a, c) = integral_L^R (h(x) - f(x))^2 dx,

subject to the asymptote constraints where f has linear asymptotes:

* left asymptote  f(x) ~ l1 * x + l0 (x -> -inf):  s0 = l1, b = l0 (h is the asymptote left of c_1);
* right asymptote f(x) ~ r1 * x + r0 (x -> +inf):  s0 + sum a_i = r1, b - sum a_i c_i = r0.

For GELU and SiLU these are the paper's ``sum a_i = 1, sum a_i c_i = 0`` with s0 = b = 0.

The interval. On a side with a linear asymptote the interval ends where f comes within ``tol`` of it for good:
the outermost x (scanning up to |x| = 256) with |f(x) - asymptote(x)| >= tol. Beyond it the constrained h
equals the asymptote exactly wherever the thresholds lie inside [L, R], so the truncation drops at most a few
tol**2 of error. A side without a linear asymptote (squared ReLU grows quadratically; x**3; functions that
approach their asymptote more slowly than the scan can confirm) has no natural end: it is bounded at
``max(6, extent of the other side)`` from 0 (6 ~ the paper's GELU bound for tol = 1e-8) and left
unconstrained there. Each side reaches at least 1 from 0. Pass ``interval=(L, R)`` to override.

Reproducing the paper. Their search script truncates at GELU: [-6.07, 6.07], SiLU: [-38.2, 38.2] (both from
tol = 1e-8, by bounds of their own); ours gives about [-5.9, 5.9] and [-21.5, 21.5]. With either, and with any
symmetric interval wider than about +-3.2 (GELU) / +-6.5 (SiLU), the optimum is the same: thresholds
(-3.1713, 0, 3.1713), levels (0, -0.0496, 1.0496, 1) for GELU; (-6.3199, 0, 6.3199), (0, -0.0405, 1.0405, 1)
for SiLU. It is exactly symmetric, since f(x) - ReLU(x) is even for both. The published constants (simulated
annealing) are not: their thresholds sit up to 0.0195 (GELU: -0.0146, -0.0012, +0.0195) and 0.0149 (SiLU:
+0.0149, -0.0009, +0.0059) from the optimum, on a flat stretch of the objective, with an L2 error 2.4e-6
(GELU: 9.5093e-3 vs 9.5069e-3) and 2.5e-6 (SiLU: 3.9944e-2 vs 3.9941e-2) above it, confirmed by adaptive
quadrature. Levels agree to 1e-3. No interval reproduces their thresholds to 1e-2: the optimum does not move
with the interval until the interval cuts into it, and then the thresholds pin to its ends (they are searched
inside (L, R)).

The optimisation. For fixed thresholds c, (s0, b, a) solve a linearly constrained least-squares problem (its KKT
system), so only c is searched: L-BFGS in float64 on the reduced objective, with autograd through the KKT solve,
from a few deterministic starts (uniformly spread, at quantiles of |f''|**(2/5), the asymptotically optimal knot
density, and that spread widened and narrowed). The thresholds are parametrised by softmax gaps, which keeps
them strictly increasing and inside (L, R). The objective uses f's piecewise-linear interpolant on a dense grid
with the ReLU kinks integrated exactly, so it is smooth in c. The reported ``error`` is the objective evaluated
independently: the trapezoid rule on ``QUAD_POINTS`` uniform points over [L, R] of (h - f)**2.

Deterministic (fixed starts, float64, CPU): about 0.1-0.5 s per fit for bits 1-3 on one core, plus about 1.5 s once
per process for torch.optim's first use.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import pathlib
import tempfile
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor

from .ops.activations import StepDerivative

__all__ = ["fit_step_derivative", "fit_interval", "Interval", "QUAD_POINTS", "step_error", "cached_step_derivative",
           "cache_dir"]

log = logging.getLogger("approxbp_fx")

#: Uniform points of the trapezoid rule that defines ``StepDerivative.error`` (and the objective's grid).
QUAD_POINTS = 65537
_SCAN_MAX = 256.0  # how far out asymptotes are looked for
_SCAN_STEP = 1.0 / 64
_NO_ASYMPTOTE_EXTENT = 6.0
_MIN_EXTENT = 1.0
_DT = torch.float64


@dataclass(frozen=True)
class Interval:
    """The fitting interval [lo, hi] and the linear asymptotes (slope, intercept) found at -inf / +inf."""

    lo: float
    hi: float
    left: Optional[tuple[float, float]]
    right: Optional[tuple[float, float]]


def _eval(f: Callable, x: Tensor) -> Tensor:
    y = f(x)
    y = torch.as_tensor(y, dtype=_DT)
    if y.shape != x.shape:
        raise ValueError(f"f must map a tensor elementwise; got shape {tuple(y.shape)} for input {tuple(x.shape)}")
    return y


def _snap(v: float) -> float:
    """Round to the nearest integer when within 1e-9 of it (finite differences of f(x) = x give 1 - 1e-13)."""
    r = round(v)
    return float(r) if abs(v - r) < 1e-9 else v


def _side(f: Callable, sign: float, tol: float) -> tuple[Optional[tuple[float, float]], Optional[float]]:
    """Asymptote (slope, intercept) on one side and the extent |x| beyond which f stays within tol of it."""
    n = int(round(_SCAN_MAX / _SCAN_STEP))
    t = torch.arange(n + 1, dtype=_DT) * _SCAN_STEP  # 0 .. SCAN_MAX
    x = sign * t
    y = _eval(f, x)
    if not bool(torch.isfinite(y).all()):
        return None, None
    # the line through the two outermost probes (at |x| = SCAN_MAX and 3/4 of it)
    i1, i0 = n, (3 * n) // 4
    slope = ((y[i1] - y[i0]) / (x[i1] - x[i0])).item()
    slope = _snap(slope)
    intercept = _snap((y[i1] - slope * x[i1]).item())
    dev = (y - (slope * x + intercept)).abs()
    far = dev >= tol
    if not bool(far.any()):
        return (slope, intercept), 0.0
    last = int(torch.nonzero(far).max())
    if last >= n // 2:  # not within tol of that line by half the scan: no (confirmable) linear asymptote
        return None, None
    return (slope, intercept), min(float(t[last]) + _SCAN_STEP, _SCAN_MAX)


def fit_interval(f: Callable, tol: float = 1e-8) -> Interval:
    """The interval and asymptotes ``fit_step_derivative`` uses for f (see the module docstring)."""
    left, lext = _side(f, -1.0, tol)
    right, rext = _side(f, 1.0, tol)
    if left is None and right is None:
        lext = rext = _NO_ASYMPTOTE_EXTENT
    elif left is None:
        lext = max(_NO_ASYMPTOTE_EXTENT, rext)
    elif right is None:
        rext = max(_NO_ASYMPTOTE_EXTENT, lext)
    return Interval(-max(lext, _MIN_EXTENT), max(rext, _MIN_EXTENT), left, right)


def _grid(lo: float, hi: float, n: int = QUAD_POINTS) -> tuple[Tensor, Tensor]:
    x = torch.linspace(lo, hi, n, dtype=_DT)
    w = torch.full((n,), (hi - lo) / (n - 1), dtype=_DT)
    w[0] *= 0.5
    w[-1] *= 0.5
    return x, w


def _h(x: Tensor, s0: float, b: float, a: Tensor, c: Tensor) -> Tensor:
    return s0 * x + b + (torch.relu(x[:, None] - c[None, :]) * a[None, :]).sum(1)


def step_error(f: Callable, step: StepDerivative, lo: float, hi: float, intercept: float = 0.0) -> float:
    """The L2 objective of a step derivative against f on [lo, hi] (trapezoid, ``QUAD_POINTS`` points).

    The primitive is h(x) = intercept + integral of the step function, anchored so that
    h(x) = levels[0] * x + intercept below the first threshold.
    """
    c = torch.tensor(step.thresholds, dtype=_DT)
    lv = torch.tensor(step.levels, dtype=_DT)
    x, w = _grid(lo, hi)
    h = _h(x, float(lv[0]), intercept, lv.diff(), c)
    return float((w * (h - _eval(f, x)) ** 2).sum())


class _Objective:
    """E(c) = min over (s0, b, a) under the constraints, with f replaced by its linear interpolant on a grid."""

    def __init__(self, f: Callable, lo: float, hi: float, k: int, s0: Optional[float] = None,
                 b: Optional[float] = None, right_slope: Optional[float] = None,
                 right_intercept: Optional[float] = None):
        self.lo, self.hi, self.k = lo, hi, k
        x, w = _grid(lo, hi)
        fx = _eval(f, x)
        if not bool(torch.isfinite(fx).all()):
            raise ValueError(f"f is not finite on the fitting interval [{lo}, {hi}]")
        self.x, self.fx, self.dx = x, fx, float(x[1] - x[0])
        self.slope = fx.diff() / self.dx
        # exact cell integrals of f_lin and x * f_lin, as suffix sums (T[j] = integral from x_j to hi)
        c0 = self._cell0(fx[:-1], self.slope, torch.full_like(self.slope, self.dx))
        c1 = self._cell1(x[:-1], fx[:-1], self.slope, torch.full_like(self.slope, self.dx))
        zero = torch.zeros(1, dtype=_DT)
        self.T0 = torch.cat([c0.flip(0).cumsum(0).flip(0), zero])
        self.T1 = torch.cat([c1.flip(0).cumsum(0).flip(0), zero])
        self.f2 = float((w * fx * fx).sum())
        self.fixed = (s0, b, right_slope, right_intercept)

    @staticmethod
    def _cell0(fj: Tensor, sj: Tensor, t: Tensor) -> Tensor:  # integral_0^t (fj + sj u) du
        return fj * t + sj * t * t / 2

    @staticmethod
    def _cell1(xj: Tensor, fj: Tensor, sj: Tensor, t: Tensor) -> Tensor:  # integral_0^t (xj + u)(fj + sj u) du
        return xj * fj * t + (xj * sj + fj) * t * t / 2 + sj * t ** 3 / 3

    def _moments(self, c: Tensor) -> tuple[Tensor, Tensor]:
        """integral_c^hi f_lin and integral_c^hi x f_lin, differentiable in c."""
        j = ((c.detach() - self.lo) / self.dx).floor().clamp(0, len(self.x) - 2).long()
        t = c - self.x[j]
        fj, sj, xj = self.fx[j], self.slope[j], self.x[j]
        return self.T0[j] - self._cell0(fj, sj, t), self.T1[j] - self._cell1(xj, fj, sj, t)

    def thresholds(self, z: Tensor) -> Tensor:
        gaps = torch.softmax(z, 0) * (self.hi - self.lo)
        return self.lo + gaps.cumsum(0)[:-1]

    def solve(self, c: Tensor) -> tuple[Tensor, Tensor]:
        """Optimal theta = (s0, b, a_1..a_k) for thresholds c, and the objective value."""
        lo, hi, k = self.lo, self.hi, self.k
        one = torch.ones((), dtype=_DT)
        # Gram matrix of the basis x, 1, (x - c_i)+ on [lo, hi]
        u = hi - c
        g_xx = one * (hi ** 3 - lo ** 3) / 3
        g_x1 = one * (hi ** 2 - lo ** 2) / 2
        g_11 = one * (hi - lo)
        g_xr = c * u * u / 2 + u ** 3 / 3
        g_1r = u * u / 2
        m = torch.maximum(c[:, None], c[None, :])
        p, q, um = m - c[:, None], m - c[None, :], hi - m
        g_rr = p * q * um + (p + q) * um * um / 2 + um ** 3 / 3
        top = torch.stack([torch.stack([g_xx, g_x1]), torch.stack([g_x1, g_11])])
        G = torch.cat([torch.cat([top, torch.stack([g_xr, g_1r])], 1),
                       torch.cat([torch.stack([g_xr, g_1r], 1), g_rr], 1)], 0)
        M0, M1 = self._moments(c)
        r = torch.cat([torch.stack([self.T1[0], self.T0[0]]), M1 - c * M0])
        rows, rhs = [], []
        zk = torch.zeros(k, dtype=_DT)
        s0, b, rs, ri = self.fixed
        e0, e1 = torch.tensor([1.0, 0.0], dtype=_DT), torch.tensor([0.0, 1.0], dtype=_DT)
        for value, row in ((s0, lambda: torch.cat([e0, zk])), (b, lambda: torch.cat([e1, zk])),
                           (rs, lambda: torch.cat([e0, torch.ones(k, dtype=_DT)])),
                           (ri, lambda: torch.cat([e1, -c]))):
            if value is not None:
                rows.append(row())
                rhs.append(value)
        n = k + 2
        G = G + torch.eye(n, dtype=_DT) * (1e-13 * float(G.detach().diagonal().abs().max()))
        if rows:
            A = torch.stack(rows)
            K = torch.cat([torch.cat([G, A.T], 1),
                           torch.cat([A, torch.zeros(len(rows), len(rows), dtype=_DT)], 1)], 0)
            sol = torch.linalg.solve(K, torch.cat([r, torch.tensor(rhs, dtype=_DT)]))
            theta = sol[:n]
        else:
            theta = torch.linalg.solve(G, r)
        err = theta @ G @ theta - 2 * (r @ theta) + self.f2
        return theta, err


def _starts(obj: _Objective, k: int) -> list[Tensor]:
    """Deterministic initial thresholds: uniform, and curvature quantiles spread by 1, 2, 1/2, 3/2, 3/4, 0.35."""
    lo, hi = obj.lo, obj.hi
    frac = (torch.arange(k, dtype=_DT) + 1) / (k + 1)
    out = [lo + (hi - lo) * frac]
    d2 = (obj.fx[2:] - 2 * obj.fx[1:-1] + obj.fx[:-2]).abs() / obj.dx ** 2
    dens = d2.clamp_min(0) ** 0.4
    if float(dens.sum()) > 0:
        cdf = dens.cumsum(0) / dens.sum()
        qs = (torch.arange(k, dtype=_DT) + 0.5) / k
        idx = torch.searchsorted(cdf, qs).clamp(max=len(cdf) - 1)
        cq = obj.x[1:-1][idx]
        mid = cq.mean() if k > 1 else torch.tensor((lo + hi) / 2, dtype=_DT)
        for s in (1.0, 2.0, 0.5, 1.5, 0.75, 0.35):
            out.append(mid + s * (cq - mid) if k > 1 else cq * s)
    res = []
    margin = 1e-3 * (hi - lo)
    for c in out:
        c = torch.sort(c.clamp(lo + margin, hi - margin)).values
        # strictly increasing and inside: re-space ties
        for i in range(1, k):
            if c[i] <= c[i - 1] + margin / k:
                c[i] = c[i - 1] + margin / k
        if bool((c < hi).all()) and not any(torch.allclose(c, r) for r in res):
            res.append(c)
    return res


def _optimize(obj: _Objective, c0: Tensor) -> tuple[float, Tensor]:
    gaps = torch.cat([c0[:1] - obj.lo, c0.diff(), obj.hi - c0[-1:]])
    z = gaps.log().clone().requires_grad_(True)
    with torch.no_grad():
        scale = float(obj.solve(c0)[1]) or 1.0  # optimise E / E(c0): tolerances relative to the start
    opt = torch.optim.LBFGS([z], lr=1, max_iter=100, history_size=20, tolerance_grad=1e-9,
                            tolerance_change=1e-14, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        _, e = obj.solve(obj.thresholds(z))
        e = e / scale
        e.backward()
        return e

    prev = math.inf
    for _ in range(3):  # L-BFGS restarts from a fresh history
        e = float(opt.step(closure).detach())
        if not e < prev * (1 - 1e-9):
            break
        prev = e
        opt.state.clear()
    with torch.no_grad():
        c = obj.thresholds(z)
        _, e = obj.solve(c)
    return float(e), c.detach()


def fit_step_derivative(f: Callable[[Tensor], Tensor], bits: int = 2, tol: float = 1e-8, *,
                        interval: Optional[tuple[float, float]] = None) -> StepDerivative:
    """Fit a ``2**bits``-level step derivative to the activation f (see the module docstring).

    f maps a float64 tensor elementwise (``F.gelu``, ``F.silu``, ``lambda x: x * torch.sigmoid(1.702 * x)``, ...).
    ``tol`` sets where the fitting interval is truncated; ``interval`` replaces the automatic one (the
    asymptote constraints still apply). Returns thresholds (increasing, ``2**bits - 1``), levels
    (``levels[0]`` below the first threshold) and ``error``, the L2 objective of the fit.
    """
    if not callable(f):
        raise TypeError(f"f must be callable, got {type(f).__name__}")
    if isinstance(bits, bool) or not isinstance(bits, int):
        raise TypeError(f"bits must be an int, got {type(bits).__name__}")
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    if not (isinstance(tol, (int, float)) and math.isfinite(tol) and tol > 0):
        raise ValueError(f"tol must be a positive number, got {tol!r}")
    iv = fit_interval(f, float(tol))
    if interval is not None:
        lo, hi = (float(v) for v in interval)
        if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
            raise ValueError(f"interval must be finite with lo < hi, got {interval!r}")
        iv = Interval(lo, hi, iv.left, iv.right)
    k = (1 << bits) - 1
    left, right = iv.left, iv.right
    (l1, l0), (r1, r0) = left or (None, None), right or (None, None)
    if k == 1 and left is not None and right is not None:
        # Four constraints on (s0, b, a_1): s0 = l1 and a_1 = r1 - l1, and b - a_1 c_1 = r0 puts c_1 where the
        # asymptotes meet (GELU, SiLU: c_1 = 0, h = ReLU). Parallel asymptotes (tanh) cannot both be met by one
        # kink: then only the slopes are imposed and b is fitted.
        if l1 != r1:
            c = torch.tensor([(l0 - r0) / (r1 - l1)], dtype=_DT)
            s0, b, a = l1, l0, [r1 - l1]
            return _result(f, iv, c, s0, b, a)
        l0 = r0 = None
    obj = _Objective(f, iv.lo, iv.hi, k, s0=l1, b=l0, right_slope=r1, right_intercept=r0)
    best: Optional[tuple[float, Tensor]] = None
    for c0 in _starts(obj, k):
        e, c = _optimize(obj, c0)
        if math.isfinite(e) and (best is None or e < best[0] - 1e-15):
            best = (e, c)
    if best is None:
        raise ValueError("the fit did not converge to a finite error")
    c = best[1]
    with torch.no_grad():
        theta, _ = obj.solve(c)
    s0 = l1 if l1 is not None else float(theta[0])  # exact, not up to the solve's rounding
    b = l0 if l0 is not None else float(theta[1])
    return _result(f, iv, c, s0, b, theta[2:].tolist())


def _result(f: Callable, iv: Interval, c: Tensor, s0: float, b: float, a: list[float]) -> StepDerivative:
    levels = [s0]
    for ai in a:
        levels.append(levels[-1] + ai)
    step = StepDerivative(tuple(c.tolist()), tuple(levels))
    error = step_error(f, step, iv.lo, iv.hi, intercept=b)
    return StepDerivative(step.thresholds, step.levels, error)


# Bump when the fit's method changes: cached constants of an older method are then refitted.
_FIT_VERSION = 1


def cache_dir() -> pathlib.Path:
    """Where fitted constants are kept: ``$APPROXBP_FX_CACHE_DIR``, else ``$XDG_CACHE_HOME/approxbp_fx``,
    else ``~/.cache/approxbp_fx``."""
    explicit = os.environ.get("APPROXBP_FX_CACHE_DIR")
    if explicit:
        return pathlib.Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return pathlib.Path(base) / "approxbp_fx"


def _fingerprint(f: Callable[[Tensor], Tensor]) -> str:
    """A digest of what f computes (its values on a float64 grid): a changed reference is refitted."""
    x = torch.linspace(-16.0, 16.0, 2049, dtype=_DT)
    return hashlib.sha256(_eval(f, x).numpy().tobytes()).hexdigest()[:16]


def cached_step_derivative(name: str, f: Callable[[Tensor], Tensor], bits: int) -> StepDerivative:
    """``fit_step_derivative(f, bits)``, fitted at most once per machine.

    Results are kept in ``cache_dir() / "step_derivatives.json"``, keyed by the name, the width, a
    fingerprint of f's values and the fit's version (``step_for`` keeps them in memory within a process).
    An unreadable or unwritable cache only costs a refit (logged), never an error."""
    key = f"{name}|{bits}|{_fingerprint(f)}|v{_FIT_VERSION}"
    path = cache_dir() / "step_derivatives.json"
    try:
        stored = json.loads(path.read_text())
    except (OSError, ValueError):
        stored = {}
    entry = stored.get(key) if isinstance(stored, dict) else None
    if isinstance(entry, dict):
        step = StepDerivative(tuple(entry["thresholds"]), tuple(entry["levels"]), entry.get("error", float("nan")))
    else:
        log.info("approxbp: fitting a %d-bit step derivative for %s (once; cached in %s)", bits, name, path)
        # The first compile may happen inside a caller's saved_tensors_hooks (e.g. while measuring saved
        # bytes): the fit's own autograd must not show up there.
        with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
            step = fit_step_derivative(f, bits=bits)
        stored = stored if isinstance(stored, dict) else {}
        stored[key] = {"thresholds": list(step.thresholds), "levels": list(step.levels), "error": step.error}
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as tmp:
                json.dump(stored, tmp, indent=1)
            os.replace(tmp.name, path)  # atomic: a concurrent reader sees the old or the new file
        except OSError as exc:
            log.warning("approxbp: could not cache fitted constants in %s (%s)", path, exc)
    return step
