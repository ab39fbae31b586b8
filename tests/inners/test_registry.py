"""The inner-compiler registry: options, the backend and explain read it; a registered inner is usable by name."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import approxbp_fx
from approxbp_fx.inners import INNERS, Inner, get_inner, register_inner
from approxbp_fx.options import Options


def test_builtin_inners_and_capabilities() -> None:
    assert {"eager", "aot_eager", "inductor"} <= set(INNERS)
    assert INNERS["inductor"].recomputes_glu_gate and INNERS["inductor"].traceable_ops
    assert not INNERS["eager"].recomputes_glu_gate and not INNERS["aot_eager"].traceable_ops


def test_unknown_inner_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match=r"option 'inner' must be one of \('inductor', 'aot_eager', 'eager'"):
        Options.parse({"inner": "tvm"})
    with pytest.raises(ValueError, match="must be one of"):
        get_inner("tvm")
    with pytest.raises(TypeError, match="expects an Inner"):
        register_inner("tvm")  # type: ignore[arg-type]


class _GatedMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm, self.gate, self.up, self.down = nn.LayerNorm(8), nn.Linear(8, 16), nn.Linear(8, 16), nn.Linear(16, 8)

    def forward(self, x):
        h = self.norm(x)
        return self.down(nn.functional.silu(self.gate(h)) * self.up(h))


def test_a_registered_inner_is_used_and_its_capabilities_decide(monkeypatch, fresh_dynamo) -> None:
    calls = []

    def compile_fn(gm, example_inputs, mode):
        calls.append(gm)
        return gm

    monkeypatch.setitem(INNERS, "recording", Inner("recording", compile_fn, recomputes_glu_gate=True))
    torch.manual_seed(0)
    model, x = _GatedMLP(), torch.randn(2, 4, 8)
    out = approxbp_fx.compile(model, inner="recording")(x)
    torch.testing.assert_close(out, model(x))
    assert len(calls) == 1 and "approxbp.norm_shared" in calls[0].code
    # the gate is left exact, as the capability says, in the backend and in explain alike
    assert "approxbp.step_act" not in calls[0].code
    report = approxbp_fx.explain(model, x, options={"inner": "recording"})
    gate = next(s for s in report.sites if s.family == "activations")
    assert not gate.rewritten and "GLU gate under the recording inner" in gate.reason
