"""The fast CI subset of the model-family sweep (benchmarks/families.py): one decoder, one encoder, one vision
model and T5, through the same code path as ``python benchmarks/coverage_table.py --families``.

Asserted per family: it builds, trains one step under the backend (eager inner) without a crash with finite
gradients, keeps no more bytes than plain eager, computes the eager forward, and every LayerNorm/RMSNorm
that feeds a trainable linear is either rewritten or listed as an exception with a reason. The hook-based
norm detector the sweep relies on is checked on hand-written modules with known answers.
"""

from __future__ import annotations

import pathlib

import pytest
import torch
from torch import nn

from scripts import load_script

families = load_script(pathlib.Path(__file__).parents[1] / "benchmarks" / "families.py", "families_sweep")

# one family per kind the CI can afford; T5's norms may not be identified yet (then they must be listed)
SUBSET = ["llama", "bert", "vit", "t5"]


@pytest.fixture(scope="module")
def results() -> dict[str, object]:
    torch._dynamo.reset()
    out = families.sweep(families.select(SUBSET), budget_s=60, total_s=240, dynamo_check="never")
    torch._dynamo.reset()
    return {r.family: r for r in out}


@pytest.mark.parametrize("name", SUBSET)
def test_family_trains_under_the_backend(results, name):
    r = results[name]
    assert r.status == "ok", f"{name}: {r.status} {r.skip_reason} {r.crash}"
    assert r.grads_finite
    assert r.eager_bytes > 0
    assert r.approxbp_bytes <= r.eager_bytes, f"{name}: {r.approxbp_bytes} bytes > eager's {r.eager_bytes}"
    assert r.forward_error is not None and r.forward_error <= 1e-5, f"{name}: forward error {r.forward_error:.2e}"


@pytest.mark.parametrize("name", SUBSET)
def test_every_norm_feeding_a_linear_is_rewritten_or_explained(results, name):
    r = results[name]
    # every pre-LN / post-LN model here has two norms per layer feeding linears, plus a final or embedding norm
    assert r.norms_feeding_linears >= 2 * families.LAYERS, f"{name}: the hook detector found {r.norms_feeding_linears}"
    assert r.norms_rewritten + len(r.norm_exceptions) == r.norms_feeding_linears
    for path, why in r.norm_exceptions.items():
        assert why.strip(), f"{name}: {path} is neither rewritten nor explained"


def test_norms_rewritten_where_the_pattern_is_plain(results):
    # LLaMA's decomposed RMSNorm and ViT's nn.LayerNorm feed linears directly (pre-LN): all of them share
    for name in ("llama", "vit"):
        r = results[name]
        assert r.norms_rewritten == r.norms_feeding_linears, (name, r.norm_exceptions)


def test_markdown_lists_measured_and_skipped(results):
    skipped = families.Result("nonesuch", "decoder", status="not built", skip_reason="does not build: ValueError")
    rows = [*results.values(), skipped]
    text = families.markdown(rows, 1.0, "cmd")
    for name in SUBSET:
        assert f"| {name} |" in text
    assert "- nonesuch (decoder): does not build: ValueError" in text
    s = families.summary(rows)
    assert s["tried"] == len(SUBSET) + 1 and s["built"] == len(SUBSET) and s["no_crash"] == len(SUBSET)


# --- the norm detector, on modules with known answers ---------------------------------------------------------


class MyRMSNorm(nn.Module):
    """A hand-written RMSNorm: recognised by its class name, as HF's are."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight


class Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.direct = nn.LayerNorm(8)  # -> linear: counted
        self.lin_a = nn.Linear(8, 8)
        self.behind_act = nn.LayerNorm(8)  # -> gelu -> linear: the linear reads another tensor
        self.lin_b = nn.Linear(8, 8)
        self.frozen_only = nn.LayerNorm(8)  # -> linear with a frozen weight: nothing to share
        self.lin_frozen = nn.Linear(8, 8).requires_grad_(False)
        self.rms = MyRMSNorm(8)  # -> view -> linear: counted
        self.lin_c = nn.Linear(8, 8)
        self.batch = nn.BatchNorm1d(8)  # not a row norm
        self.lin_d = nn.Linear(8, 8)

    def forward(self, x):
        h = self.lin_a(self.direct(x))
        h = h + self.lin_b(torch.nn.functional.gelu(self.behind_act(h)))
        h = h + self.lin_frozen(self.frozen_only(h))
        h = h + self.lin_c(self.rms(h).view(-1, 8)).view_as(h)
        return h + self.lin_d(self.batch(h))


def test_norm_detector_on_known_modules():
    feeds = families.norms_feeding_linears(Toy().train(), {"x": torch.randn(5, 8)})
    assert feeds == {"direct": ["lin_a"], "rms": ["lin_c"]}


def test_norm_status_reads_the_report():
    from approxbp_fx.report import Report, Site

    report = Report([Site("a", "n1", "layer_norm -> 1 x linear", True, family="norms"),
                     Site("b", "n2", "layer_norm -> 0 x linear", False, "consumer x (mul) may keep its own copy",
                          family="norms")])
    rewritten, exceptions = families._norm_status({"n1": ["l"], "n2": ["l"], "n3": ["l"]}, report)
    assert rewritten == 1
    assert exceptions == {"n2": "consumer x (mul) may keep its own copy",
                          "n3": "not identified as a norm site by the norms family"}
    assert families.reason_category("consumer x (mul) may keep its own copy") == "other consumer (mul)"


def test_family_budget_is_enforced():
    r = families.measure_family(families.BY_NAME["llama"], budget_s=0.01)
    assert r.status == "timeout" and "budget" in r.skip_reason


def test_unknown_model_type_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown model type"):
        families.select(["not-a-model-type"])


def test_captured_report_is_what_explain_prints(results):
    # the sweep reads the backend's own report from its log record instead of tracing again with explain
    import approxbp_fx

    model, inputs = families.build(families.BY_NAME["vit"])
    torch._dynamo.reset()
    report = approxbp_fx.explain(model, **inputs, options={"inner": "eager"})
    torch._dynamo.reset()
    r = results["vit"]
    assert (len(report.sites), len(report.rewritten)) == (r.sites, r.rewritten)
    assert r.sites > 0
