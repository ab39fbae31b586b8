"""Never worse than torch.compile: a graph the rewrite cannot handle is compiled unrewritten, and graphs
whose unused calls matter (Mamba's inline vmap) keep them.

Mamba's pure-torch path holds vmap nesting calls whose results are unused: a whole-graph dead-code
elimination removed them and the graph failed at run time, under every option. The rewrite now removes
only what it made dead, so the model trains and its norm and SiLU sites are rewritten.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import approxbp_fx
from approxbp_fx.passes import norms

from models import grad_errors, rel_l2


def tiny_mamba():
    from transformers import MambaConfig, MambaForCausalLM

    torch.manual_seed(0)
    config = MambaConfig(vocab_size=100, hidden_size=64, state_size=8, num_hidden_layers=2, intermediate_size=128,
                         use_cache=False)
    return MambaForCausalLM(config).train()


def _ids():
    return torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(0))


def _grads(model) -> dict:
    return {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("inner", ["eager", "aot_eager", "inductor"])
def test_mamba_trains_with_its_sites_rewritten(inner: str, fresh_dynamo) -> None:
    model = tiny_mamba()
    report = approxbp_fx.explain(model, input_ids=_ids(), options={"inner": inner})
    rewritten = {s.family for s in report.rewritten}
    assert rewritten == {"norms", "activations"}, str(report)

    reference = copy.deepcopy(model)
    expected = reference(input_ids=_ids()).logits
    expected.square().mean().backward()
    out = torch.compile(model, backend="approxbp", options={"inner": inner, "activations": False})(input_ids=_ids()).logits
    out.square().mean().backward()
    assert rel_l2(out, expected) <= 1e-5
    errors = grad_errors(_grads(model), _grads(reference))
    assert max(errors.values()) <= 1e-4, errors


def test_a_failing_rewrite_compiles_the_graph_unrewritten(monkeypatch, fresh_dynamo) -> None:
    """A family that raises: one RuntimeWarning naming the error, then training exactly as torch.compile
    with the same inner (here: eager, so as plain eager autograd)."""
    from models import tiny_vit, vit_inputs

    def broken_find(gm, options):
        raise KeyError("a pattern this family did not expect")

    monkeypatch.setattr(norms, "find", broken_find)
    model = tiny_vit()
    reference = copy.deepcopy(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = torch.compile(model, backend="approxbp", options={"inner": "eager"})(**vit_inputs()).logits
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning) and "approxbp" in str(w.message)]
    assert len(messages) == 1 and "could not rewrite" in messages[0] and "a pattern this family" in messages[0], messages
    out.sum().backward()
    expected = reference(**vit_inputs()).logits
    expected.sum().backward()
    assert torch.equal(out, expected)
    assert max(grad_errors(_grads(model), _grads(reference)).values()) == 0.0
