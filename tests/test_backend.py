"""The approxbp backend end to end: tiny HF ViT and BERT, a plain-nn pre-LN
transformer through torch.fx, explain(), verification, options.

Every configuration (model x variant x inner) is compiled once and its forward output, gradients and
saved bytes are cached for the whole module (``Runs``): the tests only compare cached numbers.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import approxbp_fx
from approxbp_fx.backend import approxbp_backend
from approxbp_fx.ops import activations

from architectures import Runs, assert_forward_matches_eager, run_and_measure
from models import (
    BNDropoutLN, assert_grads_close, bert_inputs, preln_inputs, rel_l2, tiny_bert, tiny_preln, tiny_vit, vit_inputs,
    with_step_gelu,
)

INNERS = ("eager", "inductor")
FORWARD_TOL = {"eager": 1e-5, "inductor": 1e-4}
EXACT_GRAD_TOL = 1e-4
STEP_GRAD_TOL = 5e-3
BYTES_RATIO = 0.70

MODELS = {"vit": (tiny_vit, vit_inputs), "bert": (tiny_bert, bert_inputs)}


@pytest.fixture(scope="module")
def runs() -> Runs:
    return Runs(models=MODELS)


# --- HF ViT and BERT, each inner ------------------------------------------------------------------

model_and_inner = pytest.mark.parametrize("inner", INNERS)
model_names = pytest.mark.parametrize("name", list(MODELS))


@model_names
@model_and_inner
def test_forward_matches_eager(runs: Runs, name: str, inner: str) -> None:
    assert_forward_matches_eager(runs, name, inner, FORWARD_TOL[inner])


@model_names
@model_and_inner
def test_gradients_exact_without_activations(runs: Runs, name: str, inner: str) -> None:
    assert_grads_close(runs.get(name, "approxbp_exact", inner).grads, runs.get(name, "eager").grads, EXACT_GRAD_TOL)


@model_names
@model_and_inner
def test_gradients_match_step_reference(runs: Runs, name: str, inner: str) -> None:
    reference = runs.get(name, "step")
    assert_grads_close(runs.get(name, "approxbp", inner).grads, reference.grads, STEP_GRAD_TOL)


@model_names
def test_step_reference_is_not_exact_gelu(runs: Runs, name: str) -> None:
    """Guards the test above: the step derivative moves gradients far beyond its tolerance."""
    step, exact = runs.get(name, "step").grads, runs.get(name, "eager").grads
    worst = max(rel_l2(step[n], g) for n, g in exact.items() if g is not None)
    assert worst > 10 * STEP_GRAD_TOL


@model_names
@model_and_inner
def test_saved_bytes_below_baseline(runs: Runs, name: str, inner: str) -> None:
    baseline = runs.baseline(name, inner).saved_bytes
    ours = runs.get(name, "approxbp", inner).saved_bytes
    assert ours <= BYTES_RATIO * baseline, f"{ours} / {baseline} = {ours / baseline:.3f}"


@model_names
def test_saved_bytes_survive_inductor(runs: Runs, name: str) -> None:
    """Inductor keeps at most 3% more than the eager inner, never more than torch.compile."""
    eager = runs.get(name, "approxbp", "eager").saved_bytes
    inductor = runs.get(name, "approxbp", "inductor").saved_bytes
    assert inductor <= 1.03 * eager, f"inductor {inductor} vs eager inner {eager}"
    assert inductor <= runs.get(name, "torch.compile").saved_bytes


# --- explain --------------------------------------------------------------------------------------


def _bits(sd: dict[str, Tensor]) -> dict[str, tuple]:
    return {k: (v.dtype, tuple(v.shape), v.detach().contiguous().reshape(-1).view(torch.uint8).clone()) for k, v in sd.items()}


@pytest.fixture(scope="module")
def vit_explained():
    model = tiny_vit()
    before = _bits(model.state_dict())
    rng = torch.get_rng_state()
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    logger = logging.getLogger("approxbp_fx")
    handler, level = Keep(level=logging.INFO), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        report = approxbp_fx.explain(model, **vit_inputs())
        rng_unchanged = torch.equal(torch.get_rng_state(), rng)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    return model, before, rng_unchanged, report, records


def _modules_of(model: nn.Module, kind) -> set[str]:
    return {n for n, m in model.named_modules() if isinstance(m, kind)}


def test_explain_vit_sites(vit_explained) -> None:
    from transformers.activations import GELUActivation

    model, _, _, report, _ = vit_explained
    norms = [s for s in report.sites if s.pattern.startswith("layer_norm")]
    gelus = [s for s in report.sites if s.pattern.startswith("gelu")]
    block_norms = {n for n in _modules_of(model, nn.LayerNorm) if ".layers." in n}
    assert len(block_norms) == 4
    assert block_norms <= {s.path for s in norms if s.rewritten}
    assert {s.path for s in gelus if s.rewritten} == _modules_of(model, GELUActivation)
    assert len([s for s in gelus if s.rewritten]) == 2
    # every other norm is accounted for: the final vit.layernorm (feeding classifier through [:, 0]) is a
    # site too, rewritten or skipped with a reason
    assert {s.path for s in norms} == _modules_of(model, nn.LayerNorm)
    assert len(norms) == 5
    assert all(s.reason for s in report.skipped)
    assert not [s for s in gelus if not s.rewritten]
    assert all(s.bytes_saved > 0 for s in report.rewritten)
    assert report.bytes_saved == sum(s.bytes_saved for s in report.rewritten)


def test_explain_leaves_model_untouched(vit_explained) -> None:
    model, before, rng, _, _ = vit_explained
    after = _bits(model.state_dict())
    assert after.keys() == before.keys()
    for k in before:
        assert after[k][:2] == before[k][:2] and torch.equal(after[k][2], before[k][2]), k
    assert all(p.grad is None for p in model.parameters())
    assert rng, "explain changed the global RNG state"


def test_explain_report_prints(vit_explained, capsys) -> None:
    _, _, _, report, records = vit_explained
    print(report)
    text = capsys.readouterr().out
    for s in report.sites:
        assert s.path in text
    assert "rewritten" in text and "skipped" in text
    assert report.graphs
    for original, rewritten in report.graphs:
        assert isinstance(original, torch.fx.GraphModule) and isinstance(rewritten, torch.fx.GraphModule)
        before = original.print_readable(print_output=False)
        after = rewritten.print_readable(print_output=False)
        assert "layer_norm" in before and "approxbp.norm_shared" not in before and "approxbp.step_act" not in before
        assert "approxbp.norm_shared" in after and "approxbp.step_act" in after
    assert any("vit.layers.0.layernorm_before" in r.getMessage() for r in records), "no INFO log of the report"


# --- verification catches a wrong rewrite ---------------------------------------------------------


@pytest.fixture
def broken_gelu(monkeypatch):
    """Make exactly one kind of rewrite wrong: native GELU sites compute SiLU's forward."""
    gelu = activations.ACTIVATIONS["gelu"]
    monkeypatch.setitem(activations.ACTIVATIONS, "gelu", dataclasses.replace(gelu, forward=F.silu))
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_forward_mismatch_is_caught(broken_gelu) -> None:
    model, inputs = tiny_vit(), vit_inputs()
    expected = model(**inputs).logits.detach()
    gelu_paths = ["vit.layers.0.mlp.activation_fn", "vit.layers.1.mlp.activation_fn"]

    compiled = approxbp_fx.compile(copy.deepcopy(model), inner="eager")
    with pytest.warns(RuntimeWarning) as caught:
        out = compiled(**inputs).logits
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    for path in gelu_paths:
        assert any(path in m for m in messages), messages
    assert not any("layernorm" in m for m in messages), messages
    assert rel_l2(out, expected) <= FORWARD_TOL["eager"]

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        report = approxbp_fx.explain(copy.deepcopy(model), **inputs)
    gelus = [s for s in report.sites if s.pattern.startswith("gelu")]
    assert sorted(s.path for s in gelus) == gelu_paths
    assert all(not s.rewritten and "forward mismatch" in s.reason for s in gelus)
    norms = [s for s in report.sites if s.pattern.startswith("layer_norm")]
    assert {f"vit.layers.{i}.{ln}" for i in range(2) for ln in ("layernorm_before", "layernorm_after")} <= {
        s.path for s in norms if s.rewritten}
    assert not [s for s in norms if "mismatch" in s.reason]
    for _, graph in report.graphs:
        code = graph.print_readable(print_output=False)
        assert "approxbp.norm_shared" in code and "approxbp.step_act" not in code


# --- plain torch.fx -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def preln():
    model, inputs = tiny_preln(), preln_inputs()
    results = {"eager": run_and_measure(m := copy.deepcopy(model), m, *inputs),
               "step_reference": run_and_measure(m := with_step_gelu(copy.deepcopy(model)), m, *inputs),
               "backend": run_and_measure(m := copy.deepcopy(model), approxbp_fx.compile(m, inner="eager"), *inputs)}
    reports = {}
    for variant, options in (("fx", {}), ("fx_exact", {"activations": False})):
        m = copy.deepcopy(model)
        gm = torch.fx.symbolic_trace(m)
        rewritten, reports[variant] = approxbp_fx.rewrite(gm, example_inputs=inputs, **options)
        results[variant] = run_and_measure(rewritten, rewritten, *inputs)
    return results, reports


def test_fx_rewrite_sites(preln) -> None:
    _, reports = preln
    report = reports["fx"]
    norms = {s.path for s in report.rewritten if "norm" in s.pattern.lower()}
    assert norms == {f"blocks.{i}.{ln}" for i in range(2) for ln in ("ln1", "ln2")}
    gelus = {s.path for s in report.rewritten if s.pattern.startswith("gelu")}
    assert gelus == {"blocks.0.act", "blocks.1.act"}
    assert not reports["fx_exact"].rewritten or all("gelu" not in s.pattern for s in reports["fx_exact"].rewritten)


def test_fx_rewrite_bytes_match_backend(preln) -> None:
    results, _ = preln
    fx_bytes, backend_bytes = results["fx"].saved_bytes, results["backend"].saved_bytes
    assert abs(fx_bytes - backend_bytes) <= 0.01 * backend_bytes, (fx_bytes, backend_bytes)
    assert fx_bytes <= BYTES_RATIO * results["eager"].saved_bytes


def test_fx_rewrite_forward_and_gradients(preln) -> None:
    results, _ = preln
    for variant in ("fx", "fx_exact", "backend"):
        assert rel_l2(results[variant].out, results["eager"].out) <= FORWARD_TOL["eager"], variant
    assert_grads_close(results["fx_exact"].grads, results["eager"].grads, EXACT_GRAD_TOL)
    assert_grads_close(results["fx"].grads, results["step_reference"].grads, STEP_GRAD_TOL)
    assert_grads_close(results["backend"].grads, results["step_reference"].grads, STEP_GRAD_TOL)


# --- options --------------------------------------------------------------------------------------


def _small_graph() -> tuple[torch.fx.GraphModule, list[Tensor]]:
    gm = torch.fx.symbolic_trace(nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 8), nn.GELU()))
    return gm, [torch.randn(2, 8)]


@pytest.mark.parametrize("options, named", [
    ({"bogus": True}, "bogus"),
    ({"activation": True}, "activation"),
    ({"activations": "yes"}, "activations"),
    ({"norms": 1}, "norms"),
    ({"verify": None}, "verify"),
    ({"inner": 3}, "inner"),
    ({"inner": "bogus"}, "inner"),
])
def test_bad_options_raise_value_error(options: dict, named: str) -> None:
    model = nn.Linear(4, 4)
    with pytest.raises(ValueError, match=named):
        approxbp_fx.compile(model, **options)
    gm, inputs = _small_graph()
    with pytest.raises(ValueError, match=named):
        approxbp_backend(gm, inputs, options=options)
    with pytest.raises(ValueError, match=named):
        approxbp_fx.rewrite(gm, inputs, **options)
    with pytest.raises(ValueError, match=named):
        approxbp_fx.explain(model, torch.randn(2, 4), options=options)


def test_unknown_option_lists_valid_ones() -> None:
    with pytest.raises(ValueError) as info:
        approxbp_fx.compile(nn.Linear(4, 4), bogus=True)
    for valid in ("activations", "norms", "inner", "verify"):
        assert valid in str(info.value)


def test_unknown_option_through_torch_compile() -> None:
    """Through torch.compile the backend only runs at the first call; Dynamo wraps its ValueError."""
    compiled = torch.compile(nn.Linear(4, 4), backend="approxbp", options={"bogus": True})
    with pytest.raises(Exception) as info:
        compiled(torch.randn(2, 4))
    chain, e = [], info.value
    while e is not None:
        chain.append(e)
        e = e.__cause__ or e.__context__
    assert any(isinstance(e, ValueError) and "bogus" in str(e) for e in chain), chain


# --- post-LN BERT ---------------------------------------------------------------------------------


def test_post_ln_bert_norms_are_rewritten() -> None:
    model = tiny_bert()
    report = approxbp_fx.explain(model, **bert_inputs())
    rewritten = {s.path for s in report.rewritten if s.pattern.startswith("layer_norm")}
    # attention.output.LayerNorm feeds intermediate.dense and the residual add of output;
    # layer 0's output.LayerNorm feeds layer 1's q, k, v and its residual add.
    expected = {"bert.encoder.layer.0.attention.output.LayerNorm", "bert.encoder.layer.1.attention.output.LayerNorm",
                "bert.encoder.layer.0.output.LayerNorm"}
    assert expected <= rewritten, str(report)
    for s in report.sites:
        if s.path in expected:
            assert s.pattern.endswith("x linear") and not s.pattern.startswith("layer_norm -> 0"), s


# --- verification has no side effects ---------------------------------------------------------------


@pytest.fixture(scope="module")
def side_effects():
    torch.manual_seed(3)
    model = BNDropoutLN().train()
    x = torch.randn(16, 8)

    eager, eager_counter = copy.deepcopy(model), torch.zeros(())
    torch.manual_seed(7)
    expected = eager(x, eager_counter).detach()
    eager_rng = torch.get_rng_state()

    torch._dynamo.reset()
    ours, counter = copy.deepcopy(model), torch.zeros(())
    compiled = approxbp_fx.compile(ours, inner="eager")
    torch.manual_seed(7)
    out = compiled(x, counter).detach()
    rng = torch.get_rng_state()
    report = approxbp_fx.explain(copy.deepcopy(model), x, torch.zeros(()))
    return dict(eager=eager, ours=ours, expected=expected, out=out, eager_rng=eager_rng, rng=rng,
                eager_counter=eager_counter, counter=counter, report=report)


def test_verification_sites_exist(side_effects) -> None:
    """The graph has rewritten sites, so verification ran: otherwise the tests below prove nothing."""
    report = side_effects["report"]
    assert {s.path for s in report.rewritten} >= {"act", "ln"}, str(report)


def test_verification_keeps_rng(side_effects) -> None:
    assert torch.equal(side_effects["rng"], side_effects["eager_rng"]), "RNG state advanced differently"
    assert rel_l2(side_effects["out"], side_effects["expected"]) <= FORWARD_TOL["eager"]  # same dropout mask


def test_verification_keeps_bn_running_stats(side_effects) -> None:
    ours, eager = side_effects["ours"].bn, side_effects["eager"].bn
    torch.testing.assert_close(ours.running_mean, eager.running_mean, rtol=0, atol=1e-6)
    torch.testing.assert_close(ours.running_var, eager.running_var, rtol=0, atol=1e-6)


def test_bn_num_batches_tracked_updated_once(side_effects) -> None:
    ours, eager = side_effects["ours"].bn, side_effects["eager"].bn
    assert eager.num_batches_tracked.item() == 1
    assert ours.num_batches_tracked.item() == 1


def test_input_updated_in_place_once(side_effects) -> None:
    assert side_effects["eager_counter"].item() == 1
    assert side_effects["counter"].item() == 1
