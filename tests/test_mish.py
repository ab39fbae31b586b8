"""Mish (``x * tanh(softplus(x))``, ``nn.Mish``, ``F.mish``) through the activation registry.

Mish has no constants in the paper: its 2-bit step derivative is fitted by ``fit_step_derivative``, once
per machine. Checked: explain finds native and written-out Mish sites and rewrites them; the forward is
bit for bit the eager model's; gradients equal a float64 reference that applies the fitted step
derivative (written here, independently of the package); a second process reads the fit from the cache.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import approxbp_fx
from approxbp_fx.ops.activations import step_for

from models import StepActivation, grad_errors, rel_l2


class WrittenOutMish(nn.Module):
    def forward(self, x):
        return x * torch.tanh(F.softplus(x))


def mish_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.LayerNorm(32), nn.Linear(32, 64), nn.Mish(), nn.Linear(64, 64), WrittenOutMish(), nn.Linear(64, 8),
    ).train()


def inputs() -> torch.Tensor:
    return torch.randn(4, 16, 32, generator=torch.Generator().manual_seed(1)) * 2


@pytest.fixture(scope="module")
def step():
    return step_for("mish", 2)[0]


def test_fitted_constants_are_mishs(step) -> None:
    # 4 levels, the outer ones mish's asymptotic slopes (0 at -inf, 1 at +inf), the middle ones around
    # its derivative's range (min about -0.1, max about 1.09)
    assert len(step.levels) == 4 and len(step.thresholds) == 3
    assert step.levels[0] == pytest.approx(0.0, abs=1e-9) and step.levels[-1] == pytest.approx(1.0, abs=1e-9)
    assert -0.2 < step.levels[1] < 0.0 and 1.0 < step.levels[2] < 1.2


def test_explain_rewrites_mish_sites() -> None:
    report = approxbp_fx.explain(mish_model(), inputs(), options={"inner": "eager"})
    mish = [s for s in report.sites if s.family == "activations"]
    assert {s.pattern for s in mish} == {"mish", "mish (decomposed, 3 ops)"}, [s.pattern for s in mish]
    assert all(s.rewritten for s in mish), [s.action for s in mish]
    assert all("fitted 2-bit" in s.constants for s in mish)


@pytest.mark.parametrize("inner", ["eager", "inductor"])
def test_mish_forward_and_gradients(inner: str, step, fresh_dynamo) -> None:
    model, x = mish_model(), inputs()
    expected = model(x)

    ours = copy.deepcopy(model)
    out = approxbp_fx.compile(ours, inner=inner, activations=True)(x)
    if inner == "eager":
        assert torch.equal(out, expected), "forward must be bit for bit the eager model's"
    else:
        assert rel_l2(out, expected) <= 1e-5
    out.square().mean().backward()

    # float64 reference: the same model, every Mish (native or written out) with the fitted step derivative
    reference = copy.deepcopy(model).double()
    for i in (2, 4):
        reference[i] = StepActivation(reference[i], (step.thresholds, step.levels))
    reference(x.double()).square().mean().backward()

    errors = grad_errors({n: p.grad for n, p in ours.named_parameters()},
                         {n.replace(".original", ""): p.grad for n, p in reference.named_parameters()})
    assert max(errors.values()) < 1e-3, errors


def test_fit_runs_once_per_machine(tmp_path) -> None:
    """A second process finds the constants in the cache: its fit function is made to raise."""
    env = {**os.environ, "APPROXBP_FX_CACHE_DIR": str(tmp_path)}
    first = textwrap.dedent("""
        from approxbp_fx.ops.activations import step_for
        print(step_for("mish", 2)[0].thresholds)
    """)
    second = textwrap.dedent("""
        import approxbp_fx.fit as fit
        def no_fit(*args, **kwargs):
            raise AssertionError("fitted again")
        fit.fit_step_derivative = no_fit
        from approxbp_fx.ops.activations import step_for
        print(step_for("mish", 2)[0].thresholds)
    """)
    runs = [subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
            for code in (first, second)]
    for r in runs:
        assert r.returncode == 0, r.stderr[-2000:]
    assert runs[0].stdout == runs[1].stdout
    assert (tmp_path / "step_derivatives.json").exists()
