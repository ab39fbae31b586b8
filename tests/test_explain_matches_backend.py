"""``explain`` reports what ``torch.compile(model, backend="approxbp", options=...)`` does, site for site.

For LLaMA (SwiGLU gates: the inductor inner leaves them exact, the others rewrite them) and ViT, under
every inner: the sites explain lists as rewritten and skipped, with their reasons, equal the sites the
backend logs while it compiles the same model with the same options.
"""

from __future__ import annotations


import pytest
import torch

import approxbp_fx
from approxbp_fx.inners import INNERS

from architectures import llama, vit_inputs
from models import tiny_vit

MODELS = {
    "llama": (llama, lambda: {"input_ids": torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(0))}),
    "vit": (tiny_vit, vit_inputs),
}


def _decisions(sites) -> set[tuple[str, str, str, bool, str]]:
    return {(s.id, s.path, s.pattern, s.rewritten, s.reason) for s in sites}


def _backend_sites(model, inputs, inner: str) -> list:
    """The sites the backend itself logs while compiling ``model`` (forward and backward run)."""
    try:
        torch._dynamo.reset()
        with approxbp_fx.collect_reports() as reports:
            compiled = torch.compile(model, backend="approxbp", options={"inner": inner})
            out = compiled(**inputs)
            out.logits.float().sum().backward()
    finally:
        torch._dynamo.reset()
    return [s for r in reports for s in r.sites]


@pytest.mark.parametrize("inner", list(INNERS))
@pytest.mark.parametrize("name", list(MODELS))
def test_explain_equals_backend(name: str, inner: str) -> None:
    build, make_inputs = MODELS[name]
    model, inputs = build(), make_inputs()
    explained = approxbp_fx.explain(model, options={"inner": inner}, **inputs)
    compiled_sites = _backend_sites(model, inputs, inner)
    assert explained.sites, "explain found no site"
    assert _decisions(explained.sites) == _decisions(compiled_sites)
    if name == "llama":
        gates = [s for s in explained.sites if s.family == "activations"]
        assert len(gates) == 2
        # the inner's capability decides, in explain as in the backend
        assert all(s.rewritten is not INNERS[inner].recomputes_glu_gate for s in gates)


def test_explain_defaults_to_the_backends_inner() -> None:
    model, inputs = llama(), MODELS["llama"][1]()
    default = approxbp_fx.explain(model, **inputs)
    inductor = approxbp_fx.explain(model, options={"inner": "inductor"}, **inputs)
    assert _decisions(default.sites) == _decisions(inductor.sites)
