"""Step derivatives beyond the paper's two: the ``bits`` option and fitted constants (quick_gelu).

References are independent of the package's kernels: a float64 model whose activation backward is
``dy * levels[k(x)]`` computed here from the constants the report names.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn

import approxbp_fx
from approxbp_fx import saved_activation_bytes
from approxbp_fx.ops.activations import step_for

from models import StepActivation


def _tiny_clip() -> nn.Module:
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(0)
    config = CLIPVisionConfig(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                              image_size=32, patch_size=8, hidden_act="quick_gelu")
    return CLIPVisionModel(config).train()


def _grads(model: nn.Module) -> dict[str, Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.fixture(scope="module")
def clip():
    model = _tiny_clip()
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 3
    report = approxbp_fx.explain(model, pixel_values=pixels)
    compiled_model = copy.deepcopy(model)
    compiled = approxbp_fx.compile(compiled_model, inner="eager")
    out = compiled(pixel_values=pixels).last_hidden_state
    out.pow(2).mean().backward()
    return model, pixels, report, compiled_model, out.detach()


def test_quick_gelu_sites_use_fitted_constants(clip) -> None:
    _, _, report, _, _ = clip
    acts = [s for s in report.sites if s.pattern.startswith("quick_gelu")]
    assert len(acts) == 2 and all(s.rewritten for s in acts)
    assert all(s.constants.startswith("fitted 2-bit") for s in acts)
    step, _ = step_for("quick_gelu", 2)
    assert f"{round(step.levels[1], 4)}" in acts[0].constants


def test_quick_gelu_forward_unchanged(clip) -> None:
    model, pixels, _, _, out = clip
    with torch.no_grad():
        ref = model(pixel_values=pixels).last_hidden_state
    assert torch.equal(out, ref) or (out - ref).norm() / ref.norm() < 1e-6


def test_quick_gelu_gradients_match_float64_reference(clip) -> None:
    model, pixels, _, compiled_model, _ = clip
    from transformers.activations import QuickGELUActivation

    step, _ = step_for("quick_gelu", 2)
    ref = copy.deepcopy(model).double()
    for parent in list(ref.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, QuickGELUActivation):
                setattr(parent, name, StepActivation(child, (step.thresholds, step.levels)))
    ref(pixel_values=pixels.double()).last_hidden_state.pow(2).mean().backward()
    expected, actual = _grads(ref), _grads(compiled_model)
    assert expected.keys() == actual.keys()
    floor = 1e-4 * max(g.norm().item() for g in expected.values())
    for name, g in expected.items():
        err = (actual[name].double() - g).norm().item() / max(g.norm().item(), floor)
        assert err < 1e-3, f"{name}: relative error {err:.2e}"


def test_quick_gelu_bytes_below_activations_off(clip) -> None:
    model, pixels, _, _, _ = clip
    on = saved_activation_bytes(approxbp_fx.compile(model, inner="eager"), pixel_values=pixels)
    off = saved_activation_bytes(approxbp_fx.compile(model, inner="eager", activations=False), pixel_values=pixels)
    # two MLP activations of 2 x 17 tokens x 256 in fp32, each kept as a 2-bit code instead
    numel = 2 * 17 * 256
    assert off - on >= 2 * (4 * numel - numel // 4) * 0.99


@pytest.mark.parametrize("bits, per_byte", [(1, 8), (2, 4), (3, 2)])
def test_bits_option_sets_code_width(bits: int, per_byte: int) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 1000), nn.GELU())
    x = torch.randn(3, 8)
    compiled = approxbp_fx.compile(model, inner="eager", norms=False, bits=bits)
    kept = saved_activation_bytes(compiled, x) - saved_activation_bytes(nn.Sequential(model[0]), x)
    assert kept == -(-3000 // per_byte)
    step, source = step_for("gelu", bits)
    assert len(step.thresholds) == 2**bits - 1 and source == ("paper" if bits == 2 else "fitted")


@pytest.mark.parametrize("bits", [0, 4, 2.0, "2"])
def test_bits_option_rejects_other_values(bits) -> None:
    with pytest.raises(ValueError, match="bits"):
        approxbp_fx.compile(nn.Linear(2, 2), bits=bits)
