"""Adaptive norms: a norm's output scaled and shifted by tensors that are not computed from it (a diffusion
transformer's ``x * (1 + scale[:, None]) + shift[:, None]``, a per-channel ``[D]`` scale) before its linears.
The multiply becomes ``approxbp::mul_shared`` and the linears after the modulation ``linear_shared`` with the
modulation folded into the norm's affine: every one of them keeps the norm's y_hat.

References are independent of the code under test: plain autograd on the same module (forward equal,
gradients to float rounding) and byte counts from shapes.
"""

from __future__ import annotations


import pytest
import torch
from torch import nn

import approxbp_fx

from architectures import compare_with_autograd

B, T, D = 4, 16, 32
N = B * T * D * 4  # bytes of one float32 hidden state
SMALL = B * D * 4  # bytes of one per-sample scale or shift
EXACT = {"inner": "eager", "activations": False}


class Modulated(nn.Module):
    """norm -> modulation -> two linears (and a residual add), the modulation spelled by ``form``. scale and
    shift are [B, 1, D], computed from the input's mean (DiT computes them from its conditioning)."""

    FORMS = {
        "scale then shift": lambda h, s, t: h * (1 + s) + t,
        "shift then scale": lambda h, s, t: (h + t) * (1 + s),
        "scale on the left": lambda h, s, t: (1 + s) * h + t,
        "scale only": lambda h, s, t: h * s,
        "shift only": lambda h, s, t: t + h,
        "two scales": lambda h, s, t: (h * s) * (1 + t),
    }

    def __init__(self, form: str, affine: bool = False) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.norm = nn.LayerNorm(D, elementwise_affine=affine)
        if affine:
            with torch.no_grad():
                self.norm.weight.copy_(torch.rand(D, generator=g) + 0.5)
                self.norm.bias.copy_(torch.randn(D, generator=g) * 0.1)
        self.cond = nn.Linear(D, 2 * D)
        self.q, self.fc = nn.Linear(D, D), nn.Linear(D, 2 * D)
        self.form = self.FORMS[form]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale, shift = self.cond(x.mean(1)).chunk(2, dim=-1)
        m = self.form(self.norm(x), scale.unsqueeze(1), shift.unsqueeze(1))
        return x + self.q(m) + self.fc(m)[..., :D]


def _inputs() -> torch.Tensor:
    return torch.randn(B, T, D, generator=torch.Generator().manual_seed(1))


def _compare(model: nn.Module, x: torch.Tensor | None = None, tol: float = 1e-5, **options):
    return compare_with_autograd(model, _inputs() if x is None else x, tol, forward_tol=tol, **options)


@pytest.mark.parametrize("affine", [False, True], ids=["no affine", "affine"])
@pytest.mark.parametrize("form", list(Modulated.FORMS))
def test_modulated_norm_shares_y_hat(form, affine):
    """Eager keeps x (the norm), the norm's output (the multiply, for the scale's gradient) and the modulated
    output (both linears): three hidden states. Rewritten: y_hat, rstd and small tensors."""
    eager, saved, sites = _compare(Modulated(form, affine), **EXACT)
    assert len(sites) == 1 and sites[0].rewritten, sites
    assert "modulated" in sites[0].pattern, sites[0].pattern
    hidden = 3 if "scale" in form else 2  # a shift alone: nothing keeps the norm's output itself
    assert eager >= hidden * N, eager
    assert saved <= eager - (hidden - 1) * N + 8 * SMALL, f"kept {saved} of eager's {eager}"


def test_traced_inner_matches_autograd():
    """The traceable forms (what inductor partitions) give the same gradients."""
    eager, saved, sites = _compare(Modulated("scale then shift", affine=True), inner="aot_eager", activations=False)
    assert sites and all(s.rewritten for s in sites), sites
    assert saved <= eager - 2 * N + 8 * SMALL, f"kept {saved} of eager's {eager}"


def test_bf16_modulation_matches_autograd():
    model = Modulated("scale then shift", affine=True).to(torch.bfloat16)
    _, _, sites = _compare(model, _inputs().to(torch.bfloat16), tol=2e-2, **EXACT)
    assert sites and all(s.rewritten for s in sites), sites


def test_modulation_read_by_an_unknown_op_still_shares_the_multiply():
    """The modulated output goes to an op the walk does not know (which keeps its own copy of it, not of the
    norm's output): the multiply still keeps y_hat instead of the norm's output, and the linear of the norm's
    output shares it too."""

    class Unknown(Modulated):
        def forward(self, x):
            scale, _ = self.cond(x.mean(1)).chunk(2, dim=-1)
            h = self.norm(x)
            return self.q(h) + torch.sin(h * scale.unsqueeze(1))

    eager, saved, sites = _compare(Unknown("scale only"), **EXACT)
    assert len(sites) == 1 and sites[0].rewritten and "1 x modulation" in sites[0].pattern, sites
    assert saved <= eager - N + 4 * SMALL, f"kept {saved} of eager's {eager}"


@pytest.mark.parametrize("case", ["full-size scale", "after dropout"])
def test_what_is_no_modulation_is_left_alone(case):
    """A product with a tensor as large as the output (a gate, attention) keeps the output: no modulation. A
    modulation after a dropout cannot be rebuilt in backward's order: the site is skipped with a reason."""

    class Other(Modulated):
        def forward(self, x):
            h = self.norm(x)
            if case == "full-size scale":
                return self.q(h * torch.sigmoid(x))
            scale, _ = self.cond(x.mean(1)).chunk(2, dim=-1)
            return self.q(nn.functional.dropout(h, 0.1, True) * scale.unsqueeze(1))

    report = approxbp_fx.explain(Other("scale only"), _inputs(), options=EXACT)
    (site,) = [s for s in report.sites if s.family == "norms"]
    assert not site.rewritten, site
    expected = "may keep its own copy" if case == "full-size scale" else "follows a gather, dropout"
    assert expected in site.reason, site.reason


@pytest.fixture(scope="module")
def dit_and_inputs():
    from handwritten import dit, dit_inputs

    return dit(), dit_inputs()[0]


def test_dit_every_norm_shared_exactly(dit_and_inputs):
    """DiT's adaLN-Zero blocks: every norm (two per block and the final one) rewritten; gradients equal plain
    autograd's; each norm's output and its modulated copy are no longer kept (about two hidden states each)."""
    model, x = dit_and_inputs
    eager, saved, sites = _compare(model, x, **EXACT)
    assert len(sites) == 5 and all(s.rewritten for s in sites), sites
    hidden = x.numel() * 4
    rows = x.numel() // x.shape[-1]
    assert saved <= eager - 5 * (2 * hidden - rows * 4 * 2), f"kept {saved} of eager's {eager}"



def test_per_token_scale_of_an_affine_norm_is_not_folded():
    """A [B, T, 1] scale (a per-token gate) of a norm with a [D] weight would fold into a [B, T, D] weight, as
    large as what it saves: the multiply still shares y_hat (it kept the output for the gate's gradient),
    the linears after it keep their own input."""

    class PerToken(Modulated):
        def forward(self, x):
            gate = torch.sigmoid(x[..., :1])  # [B, T, 1]
            h = self.norm(x) * gate
            return x + self.q(h) + self.fc(h)[..., :D]

    eager, saved, sites = _compare(PerToken("scale only", affine=True), **EXACT)
    assert len(sites) == 1 and sites[0].rewritten and "1 x modulation" in sites[0].pattern, sites
    assert "modulated" not in sites[0].pattern, sites[0].pattern
    assert saved <= eager - N + 4 * SMALL, f"kept {saved} of eager's {eager}"  # the output the multiply kept


def test_product_with_a_view_that_splits_the_normalized_dim():
    """Persimmon's q_layernorm: the output split into heads, then rotary's ``q * cos`` with cos
    [1, T, 1, head_dim]: no modulation of the normalized dim (cos does not broadcast with the norm's [D]
    affine). The site is skipped with a reason, the rest of the graph is rewritten, and nothing raises."""

    class Rotary(Modulated):
        def forward(self, x):
            h = self.norm(x).view(B, T, 4, D // 4)  # [B, T, heads, head_dim]
            cos = torch.cos(torch.arange(T * D // 4, dtype=x.dtype)).view(1, T, 1, D // 4)
            return (h * cos).sum() + self.q(self.norm2(x)).sum()

    model = Rotary("scale only", affine=True)
    model.norm2 = nn.LayerNorm(D)
    report = approxbp_fx.explain(model, _inputs(), options=EXACT)
    sites = {s.path: s for s in report.sites if s.family == "norms"}
    assert not sites["norm"].rewritten and "modulation" in sites["norm"].reason, sites["norm"]
    assert sites["norm2"].rewritten, sites["norm2"]
