"""Readers of a norm's output that keep nothing of it or can share y_hat: linears the model spelled as a
matmul with a parameter (CLIP's ``x @ proj``, Falcon's ``x @ weight.T``, ``einsum``), other norms (CLIP's
``ln_pre`` before the first block's ``ln_1``), tensors cast to its dtype (``mask.type_as(h)``) and ops whose
gradient needs no values (``cat``, ``sum``, ``mean``).

References are independent of the code under test: plain autograd on the same module (forward equal,
gradients to float rounding) and byte counts from shapes.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import approxbp_fx

from architectures import compare_with_autograd, loss_weight, train_step
from models import assert_grads_close

ROWS, WIDTH, OUT = (4, 16), 32, 24
N = ROWS[0] * ROWS[1] * WIDTH * 4  # bytes of one float32 hidden state
EXACT = {"inner": "eager", "activations": False}

# the spellings of one linear y = x W^T (W: [OUT, WIDTH]) or y = x P (P: [WIDTH, OUT])
SPELLINGS = {
    "matmul": lambda h, m: h @ m.proj,
    "torch.matmul": lambda h, m: torch.matmul(h, m.proj),
    "matmul method": lambda h, m: h.matmul(m.proj),
    "weight.T": lambda h, m: h @ m.weight.T + m.bias,
    "weight.t()": lambda h, m: h @ m.weight.t(),
    "weight.transpose": lambda h, m: torch.matmul(h, m.weight.transpose(0, 1)),
    "mm": lambda h, m: torch.mm(h.view(-1, WIDTH), m.proj).view(*ROWS, OUT),
    "einsum nd": lambda h, m: torch.einsum("btd,nd->btn", h, m.weight),
    "einsum dn, weight first": lambda h, m: torch.einsum("dn,...d->...n", m.proj, h),
}


class NormToMatmul(nn.Module):
    """A LayerNorm read by a matmul-spelled linear (and a residual add), as CLIP's final projection."""

    def __init__(self, spelling: str) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.norm = nn.LayerNorm(WIDTH)
        with torch.no_grad():
            self.norm.weight.copy_(torch.rand(WIDTH, generator=g) + 0.5)
            self.norm.bias.copy_(torch.randn(WIDTH, generator=g) * 0.1)
        self.proj = nn.Parameter(torch.randn(WIDTH, OUT, generator=g) / WIDTH ** 0.5)
        self.weight = nn.Parameter(torch.randn(OUT, WIDTH, generator=g) / WIDTH ** 0.5)
        self.bias = nn.Parameter(torch.randn(OUT, generator=g) * 0.1)
        self.spelling = SPELLINGS[spelling]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        return self.spelling(h, self) + h[..., :OUT]  # the slice keeps nothing: a view added


class NormToNorm(nn.Module):
    """ln_pre's output is read by the residual stream, by ln_1 (whose output feeds q) and, with ``direct``,
    by a linear as well: sharing pays only where a linear reads it."""

    def __init__(self, direct: bool) -> None:
        super().__init__()
        self.pre, self.ln = nn.LayerNorm(WIDTH), nn.LayerNorm(WIDTH)
        self.q, self.k = nn.Linear(WIDTH, WIDTH), nn.Linear(WIDTH, WIDTH)
        self.direct = direct

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.pre(x)
        out = h + self.q(self.ln(h))
        return out * self.k(h) if self.direct else out


def _inputs() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randn(*ROWS, WIDTH, generator=g).requires_grad_()


def _compare(model: nn.Module, **options):
    return compare_with_autograd(model, _inputs(), **options)


@pytest.mark.parametrize("spelling", list(SPELLINGS))
def test_matmul_with_a_parameter_shares_the_norm(spelling):
    """Eager keeps the norm's input and the matmul's copy of h; the rewrite keeps y_hat (and rstd) only."""
    eager, saved, sites = _compare(NormToMatmul(spelling), **EXACT)
    assert len(sites) == 1 and sites[0].rewritten, sites
    assert eager >= 2 * N, eager
    assert saved <= N + N // WIDTH, f"kept {saved}, y_hat and rstd are {N + N // WIDTH}"


def test_product_of_two_activations_is_no_linear():
    """``h @ h.transpose(-1, -2)`` (attention scores) keeps h for both operands' gradients: not a linear."""

    class Scores(NormToMatmul):
        def forward(self, x):
            h = self.norm(x)
            return (h @ h.transpose(-1, -2)).sum(-1, keepdim=True) + h @ self.proj

    reports = approxbp_fx.explain(Scores("matmul"), _inputs(), options=EXACT)
    site = [s for s in reports.sites if s.family == "norms"]
    # refused at the transpose that moves the normalized dim, or at the product itself
    assert len(site) == 1 and not site[0].rewritten and ("moves the normalized dim" in site[0].reason
                                                         or "may keep its own copy" in site[0].reason), site


@pytest.mark.parametrize("inner", ["aot_eager"])
def test_traced_inner_matches_autograd(inner):
    eager, saved, sites = _compare(NormToMatmul("weight.T"), inner=inner, activations=False)
    assert sites and all(s.rewritten for s in sites), sites


def test_norm_read_by_a_rewritten_norm_shares():
    """ln_1 rewritten keeps its own y_hat, not ln_pre's output: ln_pre's linear k can share. Eager keeps x
    (ln_pre), h (ln_1, k), ln_1's output (q): three hidden states; rewritten, y_hat of each norm: two."""
    eager, saved, sites = _compare(NormToNorm(direct=True), **EXACT)
    assert len(sites) == 2 and all(s.rewritten for s in sites), sites
    assert eager >= 3 * N, eager
    assert saved <= eager - N + 2 * N // WIDTH, f"kept {saved} of eager's {eager}"


@pytest.mark.parametrize("norm", ["layer", "rms"])
def test_norm_read_only_by_norms(norm):
    """Where only another (rewritten) norm reads ln_pre's output, nobody keeps it: a LayerNorm rewritten keeps
    y_hat and rstd instead of x, its mean and rstd (the mean less); an RMSNorm would keep what it kept."""
    model = NormToNorm(direct=False)
    if norm == "rms":
        model.pre = nn.RMSNorm(WIDTH)
    eager, saved, sites = _compare(model, **EXACT)
    by_site = {s.path: s for s in sites}
    assert by_site["ln"].rewritten, sites
    if norm == "layer":
        assert by_site["pre"].rewritten and by_site["pre"].pattern.endswith("-> norm"), by_site["pre"]
        stat = N // WIDTH  # one float32 per row: a mean or an rstd
        assert eager >= 3 * N + 4 * stat, eager  # x, h, ln_1's output, two means and two rstds
        assert saved <= 2 * N + 2 * stat, f"kept {saved}: two y_hat and two rstd are {2 * N + 2 * stat}"
    else:
        assert not by_site["pre"].rewritten and "a norm reads it" in by_site["pre"].reason, by_site["pre"]


def test_cast_to_the_outputs_dtype_reads_no_values():
    """``mask.type_as(h)`` / ``mask.to(h)`` read h's dtype only (Funnel's attention mask)."""

    class MaskLike(NormToMatmul):
        def forward(self, x):
            h = self.norm(x)
            mask = (x[..., :1] > 0).type_as(h) + (x[..., :1] > 1).to(h)
            return h @ self.proj * mask

    eager, saved, sites = _compare(MaskLike("matmul"), **EXACT)
    assert len(sites) == 1 and sites[0].rewritten, sites


def test_concatenations_and_reductions_keep_nothing():
    """``cat``/``stack``/``sum``/``mean`` slice or broadcast the gradient back: they keep nothing of h."""

    class Pooled(NormToMatmul):
        def forward(self, x):
            h = self.norm(x)
            pooled = torch.cat([h, h.mean(1, keepdim=True)], 1).sum(1) + torch.stack([h, h]).mean((0, 2))
            return h @ self.proj + (pooled @ self.proj)[:, None]

    eager, saved, sites = _compare(Pooled("matmul"), **EXACT)
    assert len(sites) == 1 and sites[0].rewritten, sites


def test_clip_style_tower_shares_every_norm():
    """open_clip's spelling: a cast-back LayerNorm subclass, nn.MultiheadAttention (batch_first), QuickGELU,
    ln_pre read only by the first ln_1, ``ln_post(x[:, 0]) @ proj``: every norm rewritten, gradients equal."""
    from handwritten import clip_inputs, clip_tower

    model = clip_tower()
    (x,) = clip_inputs()
    ref_model, got_model = copy.deepcopy(model), copy.deepcopy(model)
    with approxbp_fx.collect_reports() as reports:
        compiled = approxbp_fx.compile(got_model, **EXACT)
        out = compiled(x)
    ref = ref_model(x)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    (out * loss_weight(out.shape)).sum().backward()
    (ref * loss_weight(ref.shape)).sum().backward()
    assert_grads_close({n: p.grad for n, p in got_model.named_parameters()},
                       {n: p.grad for n, p in ref_model.named_parameters()}, 1e-5)
    norms = [s for r in reports for s in r.sites if s.family == "norms"]
    assert len(norms) == 6 and all(s.rewritten for s in norms), norms


def test_mlp_mixer_shares_both_norms_of_each_block():
    """Token mixing reads ``norm1(x).transpose(1, 2)``: a linear over tokens, the normalized dim second to
    last. Both norms of each block rewritten; gradients equal autograd's; the final norm, read only by a
    mean, has nothing to share."""
    from handwritten import mixer, mixer_inputs

    model = mixer()
    (x,) = mixer_inputs()
    ref = train_step(model, model, x)
    rewritten = copy.deepcopy(model)
    with approxbp_fx.collect_reports() as reports:
        got = train_step(rewritten, approxbp_fx.compile(rewritten, **EXACT), x)
    torch.testing.assert_close(got[0], ref[0], rtol=0, atol=0)
    # the token-mixing output bias adds one value per token to every channel, which the next norm (over
    # channels) takes out again: its true gradient is zero, and both runs' are rounding noise (~1e-7)
    largest = max(g.norm() for g in ref[1].values())
    kept = [n for n, g in ref[1].items() if g.norm() > 1e-5 * largest]
    assert len(kept) >= len(ref[1]) - 2
    assert_grads_close({n: got[1][n] for n in kept}, {n: ref[1][n] for n in kept}, 1e-5)
    sites = {s.path: s for r in reports for s in r.sites if s.family == "norms"}
    blocks = [s for path, s in sites.items() if path.startswith("blocks")]
    assert len(blocks) == 4 and all(s.rewritten for s in blocks), sites
    assert got[2] < ref[2], (got[2], ref[2])


@pytest.mark.parametrize("view", ["unsqueeze", "torch.unsqueeze", "squeeze", "view_as"])
def test_views_that_add_or_drop_unit_dims(view):
    """``h.unsqueeze(0)`` (DeBERTa-style relative embeddings), ``squeeze``, ``view_as``: the rows keep their order."""

    class Unit(NormToMatmul):
        def forward(self, x):
            h = self.norm(x)
            v = {"unsqueeze": lambda: h.unsqueeze(0), "torch.unsqueeze": lambda: torch.unsqueeze(h, 1),
                 "squeeze": lambda: h[None].squeeze(0), "view_as": lambda: h.view_as(x)}[view]()
            return (v @ self.proj).sum(0) + h[..., :OUT]

    eager, saved, sites = _compare(Unit("matmul"), **EXACT)
    assert len(sites) == 1 and sites[0].rewritten, sites
    assert saved <= N + N // WIDTH, f"kept {saved}, y_hat and rstd are {N + N // WIDTH}"


@pytest.mark.parametrize("split", ["chunk", "split", "unbind", "torch.chunk"])
def test_parts_of_the_output_along_another_dim(split):
    """ProphetNet splits its streams with ``h.chunk(2, dim=1)``: each part is a view, and the linears reading
    the parts share y_hat (replayed through the same split)."""

    class Parts(NormToMatmul):
        def forward(self, x):
            h = self.norm(x)
            if split == "unbind":
                parts = h.unbind(0)
            else:
                parts = {"chunk": lambda: h.chunk(2, dim=1), "split": lambda: h.split([6, 10], 1),
                         "torch.chunk": lambda: torch.chunk(h, 2, 0)}[split]()
            return sum((p @ self.proj).sum() for p in parts) + (h @ self.proj).mean()

    eager, saved, sites = _compare(Parts("matmul"), **EXACT)
    assert len(sites) == 1 and sites[0].rewritten, sites
    assert saved <= N + N // WIDTH, f"kept {saved}, y_hat and rstd are {N + N // WIDTH}"


def test_split_of_the_normalized_dim_is_refused():
    class Halves(NormToMatmul):
        def forward(self, x):
            a, b = self.norm(x).chunk(2, dim=-1)
            return a @ self.proj[:WIDTH // 2] + b @ self.proj[WIDTH // 2:]

    report = approxbp_fx.explain(Halves("matmul"), _inputs(), options=EXACT)
    (site,) = [s for s in report.sites if s.family == "norms"]
    assert not site.rewritten and "splits the normalized dim" in site.reason, site
