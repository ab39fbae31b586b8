"""The ``masks`` sites: piecewise-linear activations found in every spelling, rewritten where a mask pays.

References are plain eager runs of the same models: these rewrites are exact, so outputs and gradients
must equal eager's bit for bit (the tiny OPT with its norms also rewritten: to float rounding). The op
bodies run as plain torch code here (``eager_kernels``); tests/ops/test_mask_act.py checks the compiled
kernels against torch.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

import approxbp_fx

from architectures import QV, Runs, token_inputs, with_lora

# (spelling, the pattern the report must give it)
SPELLINGS = [
    (F.relu, "relu"),
    (torch.relu, "relu"),
    (nn.ReLU(), "relu"),
    (lambda t: t.relu(), "relu"),
    (F.leaky_relu, "leaky_relu(slope=0.01)"),
    (nn.LeakyReLU(0.2), "leaky_relu(slope=0.2)"),
    (lambda t: F.leaky_relu(t, negative_slope=0.2), "leaky_relu(slope=0.2)"),
    (nn.ReLU6(), "relu6"),
    (F.relu6, "relu6"),
    (lambda t: F.hardtanh(t, -2, 3), "hardtanh(min=-2, max=3)"),
    (nn.Hardtanh(-2.0, 3.0), "hardtanh(min=-2, max=3)"),
    (lambda t: torch.clamp(t, min=0), "clamp(min=0, max=inf)"),
    (lambda t: t.clamp(-2, 3), "clamp(min=-2, max=3)"),
    (lambda t: t.clamp_min(0), "clamp(min=0, max=inf)"),
]


class Branches(nn.Module):
    """out = sum_i act_i(linear_i(x)) [-> head]: each activation reads its own linear's output and feeds an
    add (which keeps nothing), or ``head`` when given."""

    def __init__(self, acts, head: nn.Module | None = None) -> None:
        super().__init__()
        self.acts = list(acts)
        self.mods = nn.ModuleList(a for a in self.acts if isinstance(a, nn.Module))
        self.lins = nn.ModuleList(nn.Linear(8, 8) for _ in self.acts)
        self.head = head

    def forward(self, x):
        out = 0
        for act, lin in zip(self.acts, self.lins):
            h = act(lin(x))
            out = out + (h if self.head is None else self.head(h))
        return out


def _inputs():
    return torch.randn(4, 8, generator=torch.Generator().manual_seed(5)) * 3


def _train(fn, model, x):
    """Output, input gradient and parameter gradients of one forward/backward (fixed random loss)."""
    x = x.clone().requires_grad_()
    model.zero_grad(set_to_none=True)
    out = fn(x)
    (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(6))).sum().backward()
    return [out.detach(), x.grad] + [p.grad for p in model.parameters() if p.grad is not None]


def _assert_same_training(model, options) -> None:
    x = _inputs()
    expected = _train(model, model, x)
    torch._dynamo.reset()
    got = _train(approxbp_fx.compile(model, inner="eager", **options), model, x)
    torch._dynamo.reset()
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        assert torch.equal(g, e)


def _masks(report):
    return [s for s in report.sites if s.family == "masks"]


@pytest.fixture(scope="module")
def spelled():
    torch.manual_seed(0)
    return Branches([a for a, _ in SPELLINGS])


def test_every_spelling_is_found_and_exact(spelled, eager_kernels):
    report = approxbp_fx.explain(spelled, _inputs(), options={"inner": "eager"})
    sites = _masks(report)
    assert sorted(s.pattern for s in sites) == sorted(p for _, p in SPELLINGS)
    assert all(s.rewritten and s.constants.startswith("exact 1-bit") for s in sites), [s.reason for s in sites]
    assert all("approxbp.mask_act" in after.code for _, after in report.graphs)
    _assert_same_training(spelled, {})


def test_symbolic_trace_modules(eager_kernels):
    """call_module spellings (torch.fx.symbolic_trace keeps modules as modules)."""
    model = Branches([nn.ReLU(), nn.LeakyReLU(0.2), nn.ReLU6(), nn.Hardtanh(-2.0, 3.0)])
    x = _inputs().requires_grad_()
    gm, report = approxbp_fx.rewrite(fx.symbolic_trace(model), (x,), inner="eager")
    assert sorted(s.pattern for s in _masks(report) if s.rewritten) == [
        "hardtanh(min=-2, max=3)", "leaky_relu(slope=0.2)", "relu", "relu6"]
    expected, got = _train(model, model, x.detach()), _train(gm, model, x.detach())
    assert all(torch.equal(g, e) for g, e in zip(got, expected))


def test_masks_false_leaves_them_alone(spelled):
    report = approxbp_fx.explain(spelled, _inputs(), options={"inner": "eager", "masks": False})
    assert not _masks(report)
    assert all("mask_act" not in after.code for _, after in report.graphs)


def test_masks_do_not_depend_on_the_activations_option(eager_kernels):
    """activations=False (exact gradients) still rewrites ReLU; the GELU site is not listed, as before."""
    torch.manual_seed(0)
    model = Branches([nn.ReLU(), nn.GELU()])
    report = approxbp_fx.explain(model, _inputs(), options={"inner": "eager", "activations": False})
    assert [(s.family, s.pattern, s.rewritten) for s in report.sites] == [("masks", "relu", True)]
    report = approxbp_fx.explain(model, _inputs(), options={"inner": "eager", "masks": False})
    assert [(s.family, s.pattern, s.rewritten) for s in report.sites] == [("activations", "gelu", True)]


def test_in_place_forms_are_left_alone():
    torch.manual_seed(0)
    model = Branches([nn.ReLU(inplace=True), lambda t: F.leaky_relu(t, 0.1, True), nn.Hardtanh(-2.0, 3.0, True)])
    sites = _masks(approxbp_fx.explain(model, _inputs(), options={"inner": "eager"}))
    assert len(sites) == 3
    assert all(not s.rewritten and "in place" in s.reason for s in sites)
    _assert_same_training(model, {})


def test_skipped_where_the_consumer_keeps_the_output_anyway():
    """ReLU keeps its output, which a trainable linear after it keeps as its input anyway: nothing to save.
    Hardtanh keeps its input, which that linear does not keep: its mask pays."""
    torch.manual_seed(0)
    trained = Branches([nn.ReLU(), nn.Hardtanh(-2.0, 3.0)], head=nn.Linear(8, 8))
    sites = {s.pattern: s for s in _masks(approxbp_fx.explain(trained, _inputs(), options={"inner": "eager"}))}
    relu = sites["relu"]
    assert not relu.rewritten and "kept anyway" in relu.reason and "linear whose weight is trained" in relu.reason
    assert sites["hardtanh(min=-2, max=3)"].rewritten
    _assert_same_training(trained, {})

    frozen = copy.deepcopy(trained)
    frozen.head.requires_grad_(False)
    sites = {s.pattern: s for s in _masks(approxbp_fx.explain(frozen, _inputs(), options={"inner": "eager"}))}
    assert sites["relu"].rewritten and sites["hardtanh(min=-2, max=3)"].rewritten


def test_dropout_then_linear(eager_kernels):
    """relu -> dropout -> linear: with the linear trained, the dropout rewrite (same option) makes it keep
    dropout's input, ReLU's output, so ReLU's mask would add bytes; with it frozen nothing keeps it."""
    torch.manual_seed(0)
    trained = Branches([nn.ReLU()], head=nn.Sequential(nn.Dropout(0.1), nn.Linear(8, 8)))
    (relu,) = _masks(approxbp_fx.explain(trained, _inputs(), options={"inner": "eager"}))
    assert not relu.rewritten and "dropout" in relu.reason
    frozen = copy.deepcopy(trained)
    frozen.head.requires_grad_(False)
    (relu,) = _masks(approxbp_fx.explain(frozen, _inputs(), options={"inner": "eager"}))
    assert relu.rewritten


def test_skipped_where_a_consumer_is_unknown():
    """A consumer the pass does not know may keep the output: left alone, the consumer named."""
    torch.manual_seed(0)
    model = Branches([nn.ReLU()], head=nn.Softplus())  # softplus keeps its input
    (site,) = _masks(approxbp_fx.explain(model, _inputs(), options={"inner": "eager"}))
    assert not site.rewritten and "softplus" in site.reason


# --- a model: OPT's feed-forward ReLU under LoRA ---------------------------------------------------


def lora_opt(seed: int = 0) -> nn.Module:
    """tests/architectures.py's geometry (2 layers, hidden 128, FFN 512, 4 heads, vocab 100, dropout 0),
    ReLU feed-forward, LoRA on q_proj and v_proj: fc2 is frozen, so only ReLU keeps its output."""
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(seed)
    config = OPTConfig(vocab_size=100, hidden_size=128, ffn_dim=512, num_hidden_layers=2, num_attention_heads=4,
                       max_position_embeddings=64, word_embed_proj_dim=128, activation_function="relu",
                       dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, use_cache=False)
    return with_lora(OPTForCausalLM(config).float().train(), QV)


@pytest.fixture(scope="module")
def runs():
    return Runs(models={"lora_opt": (lora_opt, token_inputs)})


def test_lora_opt_keeps_one_bit_masks(runs, eager_kernels):
    report = approxbp_fx.explain(runs.model("lora_opt"), options={"inner": "eager"}, **token_inputs())
    relus = _masks(report)
    assert [s.path.rsplit(".", 2)[-2:] for s in relus] == [["0", "activation_fn"], ["1", "activation_fn"]]
    assert all(s.rewritten and s.pattern == "relu" for s in relus)
    assert runs.ratio("lora_opt", "eager") <= 0.70  # 0.955 without the masks
    expected, got = runs.get("lora_opt", "eager"), runs.get("lora_opt", "approxbp", "eager")
    assert torch.allclose(got.out, expected.out, rtol=1e-6, atol=1e-6)
    trained = {n: g for n, g in expected.grads.items() if g is not None}
    assert trained and set(trained) == {n for n, g in got.grads.items() if g is not None}
    for n, g in trained.items():
        assert (got.grads[n] - g).norm() <= 1e-6 * g.norm(), n
