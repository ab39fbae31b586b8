"""Norms identified by what they compute (``approxbp_fx/passes/_norm_forms.py``).

Unit tests: small modules, each a norm written out in one spelling followed by a linear, traced with
``symbolic_trace`` and shape-propagated; the recovered form (RMS or LayerNorm, eps, which parameter is the
weight and which the bias, Gemma's ``1 + weight``, the dtypes) is compared with what the module was written
to compute, and the rewritten graph's forward and gradients with plain autograd on the original module.
Look-alikes that are not what the shared norm computes must not be rewritten.

Models: T5 (eager inner, exact mode) and a small decoder whose LayerNorms are written by hand, against the
same decoder with ``nn.LayerNorm(bias=False)``, in fp32 and under bf16 autocast.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.fx as fx
from torch import Tensor, nn
from torch.fx.passes.shape_prop import ShapeProp

import approxbp_fx
from approxbp_fx.options import Options
from approxbp_fx.passes import norms
from approxbp_fx.passes._norm_forms import identify, is_reduction

from architectures import (
    Runs, hand_layernorm_decoder, layernorm_decoder, t5, t5_inputs, token_inputs,
)
from models import assert_grads_close, grad_errors, rel_l2

D = 16
EPS = 1e-5


class Form(nn.Module):
    """``norm(x)`` (subclasses write it out) followed by a linear that reads it."""

    def __init__(self, bias: bool = False) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.weight = nn.Parameter(torch.rand(D, generator=g) + 0.5)
        self.bias = nn.Parameter(torch.rand(D, generator=g) - 0.5) if bias else None
        self.fc = nn.Linear(D, 8)

    def norm(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.norm(x))


class T5Norm(Form):
    def norm(self, x):
        variance = x.to(torch.float32).pow(2).mean(-1, keepdim=True)
        return self.weight * (x * torch.rsqrt(variance + EPS))


class LlamaNorm(Form):
    def norm(self, x):
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + EPS)
        return self.weight * h.to(x.dtype)


class GemmaNorm(Form):
    def norm(self, x):
        h = x.float()
        out = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + EPS)
        return (out * (1.0 + self.weight.float())).type_as(x)


class HandLayerNorm(Form):
    """fp32, weight only, cast back; ``rsqrt`` and ``pow``."""

    def norm(self, x):
        h = x.float()
        mean = h.mean(-1, keepdim=True)
        var = (h - mean).pow(2).mean(-1, keepdim=True)
        return (self.weight * ((h - mean) * torch.rsqrt(var + EPS))).to(x.dtype)


class HandLayerNormBias(Form):
    """With a bias; ``c * c``, ``/ sqrt``, the affine as ``y * w + b``."""

    def __init__(self) -> None:
        super().__init__(bias=True)

    def norm(self, x):
        c = x - x.mean(-1, keepdim=True)
        var = (c * c).mean(-1, keepdim=True)
        return c / torch.sqrt(var + EPS) * self.weight + self.bias


class SumSqrtRMS(Form):
    """``x / sqrt(sum(x^2) / D + eps)``, no weight (the linear's weight is not a norm parameter)."""

    def norm(self, x):
        return x / torch.sqrt(x.pow(2).sum(-1, keepdim=True) / D + EPS)


class VarMeanLN(Form):
    def __init__(self) -> None:
        super().__init__(bias=True)

    def norm(self, x):
        var, mean = torch.var_mean(x, -1, correction=0, keepdim=True)
        return self.bias + (x - mean) * torch.rsqrt(var + EPS) * self.weight


# form -> (rms, offset, weight attribute, bias attribute)
FORMS = {
    "t5": (T5Norm, True, 0.0, "weight", None),
    "llama": (LlamaNorm, True, 0.0, "weight", None),
    "gemma": (GemmaNorm, True, 1.0, "weight", None),
    "hand_layer_norm": (HandLayerNorm, False, 0.0, "weight", None),
    "hand_layer_norm_bias": (HandLayerNormBias, False, 0.0, "weight", "bias"),
    "sum_sqrt_rms": (SumSqrtRMS, True, 0.0, None, None),
    "var_mean_layer_norm": (VarMeanLN, False, 0.0, "weight", "bias"),
}


# --- look-alikes: not what the shared norm computes --------------------------------------------------


class EpsOutsideRoot(Form):
    def norm(self, x):
        c = x - x.mean(-1, keepdim=True)
        return self.weight * (c / (torch.sqrt(c.pow(2).mean(-1, keepdim=True)) + EPS))


class EpsAfterRsqrt(Form):
    def norm(self, x):
        return self.weight * (x * (torch.rsqrt(x.pow(2).mean(-1, keepdim=True)) + EPS))


class NotLastDim(Form):
    def norm(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(1, keepdim=True) + EPS))


class UnbiasedVariance(Form):
    def norm(self, x):
        return self.weight * ((x - x.mean(-1, keepdim=True)) * torch.rsqrt(x.var(-1, keepdim=True) + EPS))


class ScaledWeight(Form):
    """RMSNorm times 2 * weight: a weight scaled by a constant is no parameter of the norm's; the norm
    found is the one without weight, whose output the multiply by 2 * weight (a [D] modulation) reads."""

    def norm(self, x):
        return (2.0 * self.weight) * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS))


class RstdAlsoUsed(Form):
    """rstd is read outside the norm: the subgraph's inner value is needed as it is."""

    def forward(self, x):
        rstd = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS)
        return self.fc(self.weight * (x * rstd)) * rstd


LOOK_ALIKES = {"not_last_dim": NotLastDim, "unbiased_variance": UnbiasedVariance, "eps_after_rsqrt": EpsAfterRsqrt,
               "rstd_also_used": RstdAlsoUsed}


def _x(dtype: torch.dtype = torch.float32) -> Tensor:
    g = torch.Generator().manual_seed(1)
    # rows of different scales and offsets, some with a mean square near eps
    scales = torch.tensor([1.0, 3.0, 0.1, 3e-3, 1e-3])[:, None]
    return ((torch.randn(2, 5, D, generator=g) + torch.randn(2, 5, 1, generator=g)) * scales).to(dtype)


def _traced(module: nn.Module, x: Tensor) -> fx.GraphModule:
    gm = fx.symbolic_trace(module)
    ShapeProp(gm).propagate(x)
    return gm


def _computed(gm: fx.GraphModule):
    """Computed norms in graph order, each reduction's search skipped once a norm has claimed it."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    found, claimed = [], set()
    for n in gm.graph.nodes:
        norm = identify(gm, n, order) if is_reduction(n) and n not in claimed else None
        if norm is not None:
            found.append(norm)
            claimed |= norm.nodes
    return found


def _grads(module: nn.Module, fn, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    x = x.detach().requires_grad_(True)
    module.zero_grad(set_to_none=True)
    out = fn(x)
    (out.float() * torch.linspace(-1, 1, out.numel()).view(out.shape)).sum().backward()
    grads = {n: p.grad.detach().clone() for n, p in module.named_parameters() if p.grad is not None}
    grads["input"] = x.grad.detach().clone()
    return out.detach(), grads


@pytest.mark.parametrize("form", list(FORMS))
def test_form_is_identified(form: str) -> None:
    cls, rms, offset, weight, bias = FORMS[form]
    gm = _traced(cls(), _x())
    found = _computed(gm)
    assert len(found) == 1, f"{len(found)} norms found"
    (norm,) = found
    assert (norm.rms, norm.eps, norm.offset) == (rms, EPS, offset)
    assert (None if norm.weight is None else norm.weight.target) == weight
    assert (None if norm.bias is None else norm.bias.target) == bias
    assert norm.x.op == "placeholder" and not norm.skip
    assert norm.pattern == ("rms_norm" if rms else "layer_norm") + " (computed)" + (", 1 + weight" if offset else "")


@pytest.mark.parametrize("form", list(FORMS))
def test_form_is_rewritten_with_exact_gradients(form: str) -> None:
    module, x = FORMS[form][0](), _x()
    gm = fx.symbolic_trace(copy.deepcopy(module))
    rewritten, report = approxbp_fx.rewrite(gm, [x], inner="eager", activations=False)
    sites = [s for s in report.sites if s.family == "norms"]
    assert len(sites) == 1 and sites[0].rewritten, report
    expected_out, expected = _grads(module, module, x)
    out, got = _grads(rewritten, rewritten, x)  # gm holds a copy of the module's parameters, by the same names
    assert rel_l2(out, expected_out) <= 1e-6
    assert got.keys() == expected.keys()
    for name in expected:
        assert rel_l2(got[name], expected[name]) <= 1e-5, name


def test_dtypes_follow_the_casts() -> None:
    """bf16 input: LLaMA keeps the normalised value in bf16 (cast before the weight), Gemma in fp32
    (cast after the weight); both give back bf16; T5's multiply on the uncast x promotes to fp32."""
    x = _x(torch.bfloat16)
    expected = {LlamaNorm: (torch.bfloat16, torch.bfloat16), GemmaNorm: (torch.float32, torch.bfloat16),
                T5Norm: (torch.float32, torch.float32), HandLayerNorm: (torch.float32, torch.bfloat16)}
    for cls, (y_dtype, z_dtype) in expected.items():
        module = cls().to(torch.bfloat16) if cls is not T5Norm else cls()
        (norm,) = _computed(_traced(module, x))
        assert (norm.y_dtype, norm.z_dtype) == (y_dtype, z_dtype), cls.__name__
        assert norm.x.op == "placeholder", cls.__name__


def test_eps_outside_the_root_is_left_alone() -> None:
    gm = _traced(EpsOutsideRoot(), _x())
    candidates = norms.find(gm, Options(inner="eager"))
    assert len(candidates) == 1
    assert "outside the square root" in candidates[0].skip
    _rewritten, report = approxbp_fx.rewrite(fx.symbolic_trace(EpsOutsideRoot()), [_x()], inner="eager")
    assert not any(s.rewritten for s in report.sites if s.family == "norms")


@pytest.mark.parametrize("form", list(LOOK_ALIKES))
def test_look_alike_is_not_a_norm(form: str) -> None:
    gm = _traced(LOOK_ALIKES[form](), _x())
    assert _computed(gm) == []
    assert norms.find(gm, Options(inner="eager")) == []


def test_scaled_weight_is_not_the_norms_weight() -> None:
    gm = _traced(ScaledWeight(), _x())
    (norm,) = _computed(gm)
    assert norm.rms and norm.weight is None and norm.bias is None
    (candidate,) = norms.find(gm, Options(inner="eager"))
    # the multiply is a modulation folded into the affine the linear rebuilds
    assert not candidate.skip and "modulated" in candidate.pattern, candidate


def test_layer_norm_claims_its_second_reduction() -> None:
    """A LayerNorm has two reductions; one site, found from the first."""
    gm = _traced(HandLayerNormBias(), _x())
    candidates = norms.find(gm, Options(inner="eager"))
    assert len(candidates) == 1 and candidates[0].pattern == "layer_norm (computed) -> 1 x linear"


# --- models -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def runs() -> Runs:
    return Runs(models={"t5": (t5, t5_inputs), "hand_ln": (hand_layernorm_decoder, token_inputs),
                        "ln": (layernorm_decoder, token_inputs)})


def test_t5_norms_rewritten_with_exact_gradients(runs: Runs) -> None:
    report = approxbp_fx.explain(runs.model("t5"), **t5_inputs(), options={"inner": "eager", "activations": False})
    sites = [s for s in report.sites if s.family == "norms"]
    # every T5LayerNorm feeds linears: the layers' directly, the encoder's final one through dropout (p = 0
    # here) into the cross-attention's k/v, the decoder's final one through T5's ``* d_model**-0.5`` into the LM head
    assert len(sites) == 2 * 2 + 2 * 3 + 2
    assert all(s.rewritten and s.pattern.startswith("rms_norm (computed)") for s in sites), [
        (s.path, s.reason) for s in sites if not s.rewritten]
    exact, eager = runs.get("t5", "approxbp_exact", "eager"), runs.get("t5", "eager")
    assert rel_l2(exact.out, eager.out) == 0.0
    assert_grads_close(exact.grads, eager.grads, 1e-5)
    assert exact.saved_bytes <= 0.87 * eager.saved_bytes


@pytest.mark.parametrize("precision", ["fp32", "autocast"])
def test_hand_written_layer_norm_like_nn_layer_norm(runs: Runs, precision: str) -> None:
    hand = runs.get("hand_ln", "approxbp_exact", "eager", precision)
    reference = runs.get("ln", "approxbp_exact", "eager", precision)
    plain = runs.get("hand_ln", "eager", precision=precision)
    tol = 1e-5 if precision == "fp32" else 3e-2
    assert rel_l2(hand.out, plain.out) <= (1e-6 if precision == "fp32" else 1e-2)
    assert max(grad_errors(hand.grads, plain.grads).values()) <= tol
    # the same bytes as nn.LayerNorm(bias=False) rewritten, and fewer than the hand-written norm unrewritten
    assert abs(hand.saved_bytes - reference.saved_bytes) <= 0.01 * reference.saved_bytes
    assert hand.saved_bytes < plain.saved_bytes
