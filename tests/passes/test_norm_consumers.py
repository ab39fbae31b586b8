"""The norm family's consumer chains: a norm's output reaching linears (and grouped matmuls) through row
gathers (mixture-of-experts experts), no-op casts and dropout.

References are independent of the code under test: plain autograd with the same RNG seed (forward bit for
bit, gradients to float rounding) and byte counts computed from shapes (the gathered copies and dropout
outputs eager keeps, which the rewrite must not keep).
"""

from __future__ import annotations

import contextlib
import copy
from typing import Iterator

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

import approxbp_fx
from approxbp_fx.ops.spec import traceable_forms

from architectures import Runs, loss_weight, mixtral, token_inputs
from models import assert_grads_close

# the ops' bodies as plain torch code: what is tested here is the rewrite; compiling their kernels for
# every dtype and argument combination would cost most of the time (compiled kernels: tests/ops)
pytestmark = pytest.mark.usefixtures("eager_kernels")

SEED = 7
TOKENS, D, OUT, EXPERTS, CAPACITY = 64, 32, 16, 3, 24
EXACT = {"inner": "eager", "activations": False}
BF16_GRAD_TOL = 3e-2  # two bf16 computations of the same gradient (tests/test_architectures.py's bound)


def _run(model: nn.Module, fn, *args: torch.Tensor):
    """Forward + backward with RNG seed SEED; then the bytes kept by a second seeded forward."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(SEED)
    out = fn(*args)
    (out.float() * loss_weight(out.shape)).sum().backward()
    grads = {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    torch.manual_seed(SEED)
    saved = approxbp_fx.saved_activation_bytes(fn, *args, exclude=[model])
    return out.detach(), grads, saved


@contextlib.contextmanager
def _sites() -> Iterator[list]:
    """The sites of every graph the backend compiles inside the block."""
    sites: list = []
    with approxbp_fx.collect_reports() as reports:
        yield sites
    sites.extend(s for r in reports for s in r.sites)


def _compare(model: nn.Module, x: torch.Tensor, options: dict | None = None):
    """(eager, approxbp) runs of copies of model, and the sites of what the backend did."""
    eager = _run(model, model, x)
    compiled_model = copy.deepcopy(model)
    torch._dynamo.reset()
    with _sites() as sites:
        compiled = _run(compiled_model, approxbp_fx.compile(compiled_model, **(options or EXACT)), x)
    return eager, compiled, sites


def _norm_site(sites: list, path: str):
    (site,) = [s for s in sites if s.family == "norms" and s.path == path]
    return site


class TinyMoE(nn.Module):
    """LayerNorm -> router linear + expert-choice experts: each expert reads CAPACITY rows ``h[idx]`` of the
    norm's output (static shapes, so Dynamo keeps one graph). ``grouped``: the experts' rows are
    concatenated and run through one ``torch._grouped_mm``; otherwise each expert is an nn.Linear, one of
    them reading its rows by ``index_select`` behind a no-op cast."""

    def __init__(self, grouped: bool) -> None:
        super().__init__()
        self.grouped = grouped
        self.norm = nn.LayerNorm(D)
        self.router = nn.Linear(D, EXPERTS, bias=False)
        self.experts = nn.ModuleList(nn.Linear(D, OUT) for _ in range(EXPERTS))
        self.weight = nn.Parameter(torch.randn(EXPERTS, D, OUT) / D**0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x).view(-1, D)
        scores = self.router(h).softmax(-1)
        idx = [torch.topk(scores[:, e], CAPACITY).indices for e in range(EXPERTS)]
        if self.grouped:
            index = torch.cat(idx)
            offs = torch.arange(1, EXPERTS + 1, dtype=torch.int32) * CAPACITY
            out = torch._grouped_mm(h[index], self.weight, offs=offs)
            return out.sum() * 0 + out.new_zeros(TOKENS, OUT).index_add(0, index, out)
        out = h.new_zeros(TOKENS, OUT)
        for e, expert in enumerate(self.experts):
            rows = torch.index_select(h, 0, idx[e]).float() if e == 0 else h[idx[e]]
            out = out.index_add(0, idx[e], expert(rows) * scores[idx[e], e, None])
        return out


class NormDropoutLinear(nn.Module):
    """PEFT LoRA's shape after a norm: ``base(z) + B(A(dropout(z)))``, twice (q and v), frozen bases."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(D)
        self.base = nn.ModuleList(nn.Linear(D, D) for _ in range(2)).requires_grad_(False)
        self.drop = nn.ModuleList(nn.Dropout(0.1) for _ in range(2))
        self.a = nn.ModuleList(nn.Linear(D, 4, bias=False) for _ in range(2))
        self.b = nn.ModuleList(nn.Linear(4, D, bias=False) for _ in range(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.norm(x)
        return sum(self.base[i](z) + self.b[i](self.a[i](self.drop[i](z))) for i in range(2))


class DropoutThenGather(nn.Module):
    """A dropout before the row gather: backward could not rebuild the gathered rows from one mask."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(D)
        self.expert = nn.Linear(D, OUT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.dropout(self.norm(x).view(-1, D), 0.2, True)
        idx = torch.arange(0, TOKENS, 2)
        return self.expert(h[idx])


def _randomize(model: nn.Module) -> nn.Module:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    return model


def _input() -> torch.Tensor:
    return torch.randn(4, TOKENS // 4, D, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("grouped", [False, True], ids=["linear_experts", "grouped_mm_bf16"])
def test_moe_experts_share_the_norm_output(grouped):
    """The router and every expert's gathered rows share y_hat: the gathered copies eager keeps are gone,
    forward is eager's and gradients equal plain autograd's. (torch._grouped_mm traces in bf16 only: that
    variant runs in bf16, both sides rounding in bf16.)"""
    torch.manual_seed(0)
    dtype = torch.bfloat16 if grouped else torch.float32
    model = _randomize(TinyMoE(grouped)).to(dtype)
    (out, grads, saved), (out2, grads2, saved2), sites = _compare(model, _input().to(dtype))
    tol = BF16_GRAD_TOL if grouped else 1e-5
    torch.testing.assert_close(out2, out, rtol=tol, atol=tol)
    assert_grads_close({k: None if g is None else g.float() for k, g in grads2.items()},
                       {k: None if g is None else g.float() for k, g in grads.items()}, tol)
    site = _norm_site(sites, "norm")
    assert site.rewritten, site.reason
    assert site.pattern.endswith("1 x linear, 1 x grouped_mm (gathered)" if grouped else "4 x linear (3 gathered)")
    gathered_copies = EXPERTS * CAPACITY * D * dtype.itemsize  # rows each expert kept for its weight gradient
    assert saved - saved2 >= gathered_copies, (saved, saved2)


def test_norm_dropout_linear_keeps_y_hat_and_packed_masks():
    """LoRA after a norm: A's linear keeps y_hat (shared with the bases) and its dropout a 1-bit mask instead
    of the dropout's output and a float mask; same draws, same gradients as plain autograd."""
    torch.manual_seed(0)
    model = _randomize(NormDropoutLinear())
    x = _input()
    (out, grads, saved), (out2, grads2, saved2), sites = _compare(model, x)
    torch.testing.assert_close(out2, out, rtol=0, atol=0)
    assert_grads_close(grads2, grads, 1e-5)
    site = _norm_site(sites, "norm")
    assert site.rewritten, site.reason
    assert site.pattern.endswith("4 x linear (2 through dropout)")
    assert not [s for s in sites if s.family == "dropout"]  # the norm site took both dropouts
    n = x.numel()
    # per dropout, eager keeps a float mask and the dropout's output (A's input); the rewrite a packed mask
    assert saved - saved2 >= 2 * (2 * n * 4 - n // 8), (saved, saved2)


def test_dropout_chain_in_symbolic_trace_and_without_masks():
    """nn.Dropout as a call_module (symbolic_trace) is followed too; with ``masks=False`` dropouts are left
    as they are, and the site says why there is nothing to share."""
    torch.manual_seed(0)
    model = _randomize(NormDropoutLinear())
    x = _input()
    gm, report = approxbp_fx.rewrite(fx.symbolic_trace(copy.deepcopy(model)), [x])
    site = _norm_site(report.sites, "norm")
    assert site.rewritten and "(2 through dropout)" in site.pattern, site
    torch.manual_seed(SEED)
    expected = model(x)
    torch.manual_seed(SEED)
    torch.testing.assert_close(gm(x), expected, rtol=0, atol=0)

    report = approxbp_fx.explain(model, x, options={**EXACT, "masks": False})
    site = _norm_site(report.sites, "norm")
    assert not site.rewritten and "through dropout" in site.reason


def test_dropout_before_gather_is_left_alone():
    torch.manual_seed(0)
    model = _randomize(DropoutThenGather())
    (out, grads, _), (out2, grads2, _), sites = _compare(model, _input())
    site = _norm_site(sites, "norm")
    assert not site.rewritten and "gathered after dropout" in site.reason, site
    torch.testing.assert_close(out2, out, rtol=0, atol=0)
    assert_grads_close(grads2, grads, 1e-5)


class ScaledNormLinear(nn.Module):
    """T5 before its tied LM head: ``head(norm(x) * d**-0.5)``; ``then_dropout`` adds a dropout after the scale."""

    def __init__(self, then_dropout: bool) -> None:
        super().__init__()
        self.then_dropout = then_dropout
        self.norm = nn.LayerNorm(D)
        self.head = nn.Linear(D, OUT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x) * D**-0.5
        return self.head(F.dropout(h, 0.2, True) if self.then_dropout else h)


@pytest.mark.parametrize("then_dropout", [False, True])
def test_constant_scale_before_the_linear(then_dropout):
    """The head's input is rebuilt as affine(y_hat) * c: same forward, same gradients as plain autograd; a
    dropout after the scale is not rebuilt (one scale per link), so that site is left alone with a reason."""
    torch.manual_seed(0)
    model = _randomize(ScaledNormLinear(then_dropout))
    (out, grads, saved), (out2, grads2, saved2), sites = _compare(model, _input())
    torch.testing.assert_close(out2, out, rtol=0, atol=0)
    assert_grads_close(grads2, grads, 1e-5)
    site = _norm_site(sites, "norm")
    if then_dropout:
        assert not site.rewritten and "follows a constant scale" in site.reason, site
    else:
        assert site.rewritten, site.reason
        assert saved2 < saved  # the head no longer keeps the scaled output


def test_grouped_op_stays_opaque_under_inductor():
    """Its per-expert loop depends on offsets' values: no traceable form, so lowering leaves the call alone."""
    assert torch.ops.approxbp.grouped_mm_shared.default not in traceable_forms()
    assert torch.ops.approxbp.linear_shared.default in traceable_forms()


@pytest.fixture(scope="module")
def mixtral_runs():
    torch._dynamo.reset()
    return Runs(models={"mixtral": (mixtral, token_inputs)})


def test_mixtral_post_attention_norm_is_shared(mixtral_runs):
    """Mixtral (4 experts, top-2): the router and the grouped experts' gathered rows share one y_hat."""
    eager = mixtral_runs.get("mixtral", "eager")
    with _sites() as sites:
        ours = mixtral_runs.get("mixtral", "approxbp_exact", "eager")
    assert_grads_close(ours.grads, eager.grads, 1e-5)
    assert ours.saved_bytes <= 0.90 * eager.saved_bytes, (ours.saved_bytes, eager.saved_bytes)
    sites = [s for s in sites if s.family == "norms" and s.path.endswith("post_attention_layernorm")]
    assert len(sites) == 2 and all(s.rewritten for s in sites), sites
    assert all(s.pattern.endswith("1 x linear, 1 x grouped_mm (gathered)") for s in sites), sites
