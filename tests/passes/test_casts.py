"""Exact widening casts between a tensor and the linears that read it (a bf16 model with PEFT's float32
adapters): a norm's consumer chain follows them, and a trainable linear reading one keeps the narrow tensor.

References are independent of the code under test: plain autograd on the same module (forward bit for bit,
gradients to float rounding) and byte counts from shapes (eager keeps a float32 copy per cast; the rewrite
keeps the bf16 tensor once).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import approxbp_fx

from architectures import train_step
from models import BF16_EXACT_GRAD_TOL, assert_grads_close

ROWS, WIDTH, OUT = (4, 16), 64, 48
N = ROWS[0] * ROWS[1] * WIDTH  # elements of one hidden state
BF16 = torch.bfloat16
EXACT = {"inner": "eager", "activations": False}


def _rms(h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """LLaMA's RMSNorm, written out: float32 statistics, y rounded to the input's dtype, then the weight."""
    x = h.to(torch.float32)
    var = x.pow(2).mean(-1, keepdim=True)
    return weight * (x * torch.rsqrt(var + 1e-6)).to(h.dtype)


class NormToAdapters(nn.Module):
    """A bf16 norm read by a frozen bf16 linear and by two float32 adapters through ``.to(float32)`` and
    ``.float()`` (one behind a view), as PEFT's LoRA layers read a bf16 base model's hidden state."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter((torch.rand(WIDTH) + 0.5).to(BF16))
        self.base = nn.Linear(WIDTH, OUT, bias=False).to(BF16).requires_grad_(False)
        self.a = nn.Linear(WIDTH, OUT)
        self.b = nn.Linear(WIDTH, OUT, bias=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        z = _rms(h, self.weight)
        adapters = self.a(z.to(torch.float32)) + self.b(z.float().view(-1, WIDTH)).view(*ROWS, OUT)
        return self.base(z) + adapters.to(h.dtype)


class CastToLinears(nn.Module):
    """A bf16 hidden state (a frozen projection's output) read by a frozen bf16 linear and two float32
    adapters, each through its own ``.to(float32)``: o_proj's and down_proj's adapters under PEFT."""

    def __init__(self, keep_cast: bool = False) -> None:
        super().__init__()
        self.pre = nn.Linear(WIDTH, WIDTH).to(BF16)
        self.base = nn.Linear(WIDTH, OUT, bias=False).to(BF16).requires_grad_(False)
        self.a, self.b = nn.Linear(WIDTH, OUT), nn.Linear(WIDTH, OUT, bias=False)
        self.keep_cast = keep_cast

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.pre(x)
        wide = h.to(torch.float32)
        out = self.a(wide) + self.b(h.to(torch.float32))
        if self.keep_cast:
            out = out + (wide * wide).sum(-1, keepdim=True)  # mul keeps the float32 cast itself
        return self.base(h) + out.to(h.dtype)


def _inputs() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randn(*ROWS, WIDTH, generator=g).to(BF16).requires_grad_()


def _assert_grads(got: dict, ref: dict, float32_tol: float = 1e-5) -> None:
    """float32 gradients (the adapters') to float32 rounding; bf16 ones (the input's, the norm weight's:
    plain autograd rounds at every bf16 op, the shared backward once) to bf16 rounding."""
    for dtype, tol in ((torch.float32, float32_tol), (BF16, BF16_EXACT_GRAD_TOL)):
        names = [n for n, g in ref.items() if g.dtype == dtype]
        assert names
        assert_grads_close({n: got[n] for n in names}, {n: ref[n] for n in names}, tol)


def _compare(model: nn.Module, **options):
    x = _inputs()
    ref = train_step(model, model, x)
    rewritten = copy.deepcopy(model)
    with approxbp_fx.collect_reports() as reports:
        got = train_step(rewritten, approxbp_fx.compile(rewritten, **options), x)
    assert torch.equal(got[0], ref[0]), "forward differs from eager"
    _assert_grads(got[1], ref[1])
    return ref[2], got[2], [s for r in reports for s in r.sites]


def test_norm_shares_its_output_through_widening_casts():
    """Eager keeps the norm's float32 upcast of h and one float32 copy of z per adapter (12 bytes per
    element) and y (2); the rewrite keeps y_hat in bf16 once, and rstd."""
    eager, saved, sites = _compare(NormToAdapters(), **EXACT)
    norm = [s for s in sites if s.family == "norms"]
    assert len(norm) == 1 and norm[0].rewritten, norm
    assert eager >= 14 * N, eager  # the reference itself: three float32 copies and the bf16 y
    rstd = ROWS[0] * ROWS[1] * 4
    assert saved <= 2 * N + rstd, f"kept {saved} bytes, y_hat and rstd are {2 * N + rstd}"


def test_cast_after_dropout_is_not_followed():
    """Backward rebuilds affine, then cast, then mask: a cast of dropout's output would round differently."""

    class DropThenCast(NormToAdapters):
        def forward(self, h):
            z = _rms(h, self.weight)
            return self.base(z) + self.a(F.dropout(z, 0.1, training=True).to(torch.float32)).to(h.dtype)

    reports = approxbp_fx.explain(DropThenCast(), _inputs(), options=EXACT)
    norm = [s for s in reports.sites if s.family == "norms"]
    assert len(norm) == 1 and not norm[0].rewritten and "follows a dropout" in norm[0].reason, norm


def test_linears_keep_the_narrow_tensor():
    """Eager keeps two float32 casts of h (8 bytes per element); the rewrite keeps h once (2)."""
    eager, saved, sites = _compare(CastToLinears(), **EXACT)
    casts = [s for s in sites if s.family == "input_casts"]
    assert len(casts) == 2 and all(s.rewritten for s in casts), casts
    assert eager >= 8 * N, eager
    assert saved <= eager - 6 * N, f"kept {saved} of eager's {eager}"


def test_cast_kept_anyway_is_left_alone():
    """When another reader keeps the float32 cast, keeping h as well would only add bytes."""
    eager, saved, sites = _compare(CastToLinears(keep_cast=True), **EXACT)
    casts = {s.id: s for s in sites if s.family == "input_casts"}
    kept = [s for s in casts.values() if not s.rewritten]
    assert kept and all("may keep it anyway" in s.reason for s in kept), casts
    assert saved <= eager, f"kept {saved}, more than eager's {eager}"


def test_option_off_leaves_the_linears():
    eager, saved, sites = _compare(CastToLinears(), input_casts=False, **EXACT)
    assert not [s for s in sites if s.family == "input_casts"]
    assert saved == eager


@pytest.mark.parametrize("inner", ["aot_eager", "inductor"])
def test_compiled_inners_match_autograd(inner):
    """The traceable forms rebuild the casts too: gradients equal plain autograd's to bf16 rounding (inductor
    computes bf16 products in float32 without rounding them, plain torch.compile as well: 2e-3 to 4e-3 here),
    bytes no more than the same-mode baseline's."""
    model = NormToAdapters()
    x = _inputs()
    ref = train_step(model, model, x)
    plain = copy.deepcopy(model)
    base = train_step(plain, torch.compile(plain, backend=inner), x)
    rewritten = copy.deepcopy(model)
    got = train_step(rewritten, approxbp_fx.compile(rewritten, inner=inner, activations=False), x)
    _assert_grads(got[1], ref[1], 1e-5 if inner == "aot_eager" else BF16_EXACT_GRAD_TOL)
    assert got[2] <= base[2], f"kept {got[2]}, plain {inner} {base[2]}"


@pytest.mark.parametrize("dtype", [BF16, torch.float32])
def test_norm_before_a_frozen_head_drops_its_float32_copy(dtype):
    """A final norm read only by a frozen head (LoRA leaves the LM head alone): no linear shares, but the
    written-out bf16 norm's own ops keep a float32 copy of its input (4 bytes per element) where the rewrite
    keeps y_hat in bf16 (2). In float32 that copy is the input itself: nothing to gain, left alone."""

    class FrozenHead(NormToAdapters):
        def forward(self, h):
            return self.base(_rms(h, self.weight))

    model = FrozenHead().requires_grad_(False).to(dtype)
    model.weight.requires_grad_(False)
    x = _inputs().to(dtype)
    ref = train_step(model, model, x)
    rewritten = copy.deepcopy(model)
    with approxbp_fx.collect_reports() as reports:
        got = train_step(rewritten, approxbp_fx.compile(rewritten, **EXACT), x)
    assert torch.equal(got[0], ref[0]), "forward differs from eager"
    assert_grads_close(got[1], ref[1], BF16_EXACT_GRAD_TOL if dtype == BF16 else 1e-6)
    (site,) = [s for r in reports for s in r.sites if s.family == "norms"]
    if dtype == BF16:
        assert site.rewritten and "frozen" in site.pattern, site
        assert ref[2] >= 4 * N, ref[2]  # the reference: the float32 copy
        assert got[2] <= ref[2] - 2 * N, f"kept {got[2]} of eager's {ref[2]}"
    else:
        assert not site.rewritten and "nothing to share" in site.reason, site
