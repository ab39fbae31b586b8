"""A norm's output reaching linears through transposes and permutes, and through ``nn.MultiheadAttention``
(one opaque ``F.multi_head_attention_forward`` call in Dynamo's graph, which the norm family splits so that
its in-projection shares y_hat).

References are independent of the code under test: plain autograd with the same RNG seed (forward bit for
bit, gradients of every parameter and of the input to float rounding) and byte bounds computed from the
shapes of the tensors eager keeps and the rewrite must not.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import approxbp_fx
from approxbp_fx.passes.norms import HANDED_ON, RECEIVED

from architectures import loss_weight
from models import assert_grads_close, randomize_norm_affines

pytestmark = pytest.mark.usefixtures("eager_kernels")

SEED = 7
B, T, D, HEADS = 2, 8, 16, 2
# masks=False leaves dropouts alone: the bytes compared are the norm family's only
EXACT = {"inner": "eager", "activations": False, "masks": False}
FLOAT_BYTES = 4


def _run(model: nn.Module, fn, *inputs: torch.Tensor):
    """Forward + backward (RNG seed SEED); gradients of the parameters and the inputs; bytes kept by a second
    seeded forward. An output tuple (attention and its weights) is compared whole."""
    model.zero_grad(set_to_none=True)
    leaves = [t.clone().requires_grad_(True) for t in inputs]
    torch.manual_seed(SEED)
    out = fn(*leaves)
    outs = out if isinstance(out, tuple) else (out,)
    sum((o * loss_weight(o.shape)).sum() for o in outs if o is not None).backward()
    grads = {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}
    grads.update({f"input{i}": t.grad for i, t in enumerate(leaves)})
    torch.manual_seed(SEED)
    saved = approxbp_fx.saved_activation_bytes(fn, *[t.clone().requires_grad_(True) for t in inputs],
                                               exclude=[model])
    return tuple(None if o is None else o.detach() for o in outs), grads, saved


def _compare(model: nn.Module, *inputs: torch.Tensor, options: dict | None = None):
    """Plain autograd against the backend on a copy: forward bit for bit, gradients to rounding. Returns the
    bytes each kept and the norm sites of every compiled graph."""
    out, grads, saved = _run(model, model, *inputs)
    compiled_model = copy.deepcopy(model)
    torch._dynamo.reset()
    with approxbp_fx.collect_reports() as reports:
        out2, grads2, saved2 = _run(compiled_model, approxbp_fx.compile(compiled_model, **(options or EXACT)), *inputs)
    for a, b in zip(out2, out):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert_grads_close(grads2, grads, 1e-5)
    # the norms' sites (not those of graph inputs read by a linear, ``norms.RECEIVED``)
    return saved, saved2, {s.path: s for r in reports for s in r.sites
                           if s.family == "norms" and not s.pattern.startswith(RECEIVED)}


def _input(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


class Transposed(nn.Module):
    """Linears reading the norm's output through every spelling of a transpose that keeps the normalized dim
    last; two of them then copy it (a reshape of the transposed view, ``contiguous``)."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(D)
        self.lins = nn.ModuleList(nn.Linear(D, D) for _ in range(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.norm(x)  # [B, T, D]
        views = [
            z.transpose(1, 0),
            z.permute(1, 0, 2),
            torch.transpose(z, 0, 1).reshape(-1, D),  # a copy in eager, which its linear keeps
            z.movedim(0, 1),
            torch.swapaxes(z, 0, 1).contiguous(),  # a copy too
        ]
        return sum(lin(v).sum(-1).reshape(-1) for lin, v in zip(self.lins, views))


def test_transposed_linears_keep_y_hat_only():
    """Every layer keeps y_hat (transposed views of it, no copy): eager's z and its two transposed copies
    are gone."""
    torch.manual_seed(0)
    model = randomize_norm_affines(Transposed())
    saved, saved2, sites = _compare(model, _input(B, T, D))
    site = sites["norm"]
    assert site.rewritten, site.reason
    assert site.pattern.endswith("5 x linear")
    z = B * T * D * FLOAT_BYTES
    assert saved - saved2 >= 3 * z, (saved, saved2)
    assert site.bytes_saved == 3 * z  # the report's estimate counts the copies too


class MovedDim(nn.Module):
    """T == D: views whose last dim has the normalized dim's size without being it."""

    def __init__(self, which: str) -> None:
        super().__init__()
        self.which = which
        self.norm = nn.LayerNorm(D)
        self.lin = nn.Linear(D, D)
        self.keep = nn.Linear(D, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.norm(x)  # [B, D, D]: tokens == width
        if self.which == "transpose":
            v = z.transpose(1, 2)
        elif self.which == "permute":
            v = z.permute(0, 2, 1)
        elif self.which == "element":
            v = z[..., 0]
        else:
            v = z.reshape(-1, D).t().t()
        return self.lin(v).sum() + self.keep(z).sum()


@pytest.mark.parametrize("which", ["transpose", "permute", "t_twice"])
def test_views_that_move_the_normalized_dim_are_followed(which):
    """With tokens == width a transposed output still ends in a dim of size D: the walk knows where the
    normalized dim is. A linear over the other dim (an MLP-Mixer's token mixing) rebuilds its input with the
    norm's affine broadcast along the moved dim; gradients equal autograd's and both linears keep y_hat."""
    torch.manual_seed(0)
    model = randomize_norm_affines(MovedDim(which))
    x = _input(B, D, D)
    eager, saved, sites = _compare(model, x)
    assert sites["norm"].rewritten, sites["norm"]
    assert saved <= eager - B * D * D * FLOAT_BYTES + B * D * FLOAT_BYTES, (saved, eager)  # x's storage less


def test_view_that_takes_one_element_of_each_row_is_refused():
    torch.manual_seed(0)
    model = randomize_norm_affines(MovedDim("element"))
    _, _, sites = _compare(model, _input(B, D, D))
    assert not sites["norm"].rewritten and "takes one element of each row" in sites["norm"].reason, sites["norm"]


class PreNormAttention(nn.Module):
    """``norm -> nn.MultiheadAttention``: self-attention (query is key is value), cross attention (key and value
    from ``memory``) or separate projection weights (kdim, vdim != embed_dim)."""

    def __init__(self, kind: str, batch_first: bool, need_weights: bool = False) -> None:
        super().__init__()
        self.kind, self.need_weights = kind, need_weights
        self.norm = nn.LayerNorm(D)
        kv = {"kdim": 12, "vdim": 8} if kind == "separate" else {}
        self.attn = nn.MultiheadAttention(D, HEADS, dropout=0.1, batch_first=batch_first, **kv)

    def forward(self, x: torch.Tensor, memory: torch.Tensor, values: torch.Tensor, mask: torch.Tensor):
        z = self.norm(x)
        if self.kind == "self":
            return self.attn(z, z, z, need_weights=self.need_weights, attn_mask=mask)
        if self.kind == "cross":
            return self.attn(z, memory, memory, need_weights=self.need_weights, key_padding_mask=mask)
        return self.attn(z, memory, values, need_weights=self.need_weights)


def _attention_inputs(kind: str, batch_first: bool):
    s = 6  # memory's length
    shapes = [(B, T, D), (B, s, 12 if kind == "separate" else D), (B, s, 8 if kind == "separate" else D)]
    x, memory, values = (_input(*sh, seed=i) for i, sh in enumerate(shapes))
    if not batch_first:
        x, memory, values = (t.transpose(0, 1).contiguous() for t in (x, memory, values))
    if kind == "self":  # a causal bool mask
        mask = torch.ones(T, T, dtype=torch.bool).triu(1)
    else:  # pads the last two memory positions of the second sequence
        mask = torch.zeros(B, s, dtype=torch.bool)
        mask[1, -2:] = True
    return x, memory, values, mask


@pytest.mark.parametrize("batch_first", [True, False], ids=["batch_first", "seq_first"])
@pytest.mark.parametrize("kind, need_weights", [("self", False), ("self", True), ("cross", False), ("separate", False)])
def test_attention_in_projection_shares_y_hat(kind, need_weights, batch_first):
    """The projection(s) reading the norm's output become linear_shared: the copy of the output eager's
    in-projection keeps is gone; the attention (dropout included, its masks, its weights where asked for)
    is torch's bit for bit and gradients (of key and value inputs too) are plain autograd's."""
    torch.manual_seed(0)
    model = randomize_norm_affines(PreNormAttention(kind, batch_first, need_weights))
    x, memory, values, mask = _attention_inputs(kind, batch_first)
    saved, saved2, sites = _compare(_MaskBound(model, mask), x, memory, values)
    site = sites["inner.norm"]
    assert site.rewritten, site.reason
    assert site.pattern.endswith("1 x attention")
    assert saved - saved2 >= B * T * D * FLOAT_BYTES, (saved, saved2)  # the in-projection's copy of z
    assert site.bytes_saved == B * T * D * FLOAT_BYTES


class _MaskBound(nn.Module):
    """The model with its mask as a buffer (a mask is no input whose gradient is compared)."""

    def __init__(self, inner: nn.Module, mask: torch.Tensor) -> None:
        super().__init__()
        self.inner = inner
        self.register_buffer("mask", mask)

    def forward(self, x, memory, values):
        return self.inner(x, memory, values, self.mask)


def _encoder(batch_first: bool, dropout: float, norm_first: bool = True) -> nn.Module:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(D, HEADS, 2 * D, dropout=dropout, batch_first=batch_first, norm_first=norm_first)
    return randomize_norm_affines(nn.TransformerEncoder(layer, 2, enable_nested_tensor=False))


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_transformer_encoder_every_norm_shared_in_either_layout(dropout):
    """nn.TransformerEncoder (pre-norm): every norm is rewritten with batch_first True (a transpose before
    the attention) and False, and both keep the same bytes: two outputs per layer fewer than eager."""
    kept = {}
    for batch_first in (True, False):
        x = _input(B, T, D) if batch_first else _input(B, T, D).transpose(0, 1).contiguous()
        saved, saved2, sites = _compare(_encoder(batch_first, dropout), x)
        assert len(sites) == 4 and all(s.rewritten for s in sites.values()), sites
        assert saved - saved2 >= 4 * B * T * D * FLOAT_BYTES, (saved, saved2)
        kept[batch_first] = saved2
    assert kept[True] == kept[False], kept


def test_post_norm_encoder_shares_every_norm_that_feeds_a_linear():
    """PyTorch's defaults (post-norm, ReLU, dropout 0.1): the norm after each layer's attention feeds its
    feed-forward, the first layer's last norm the second layer's attention; the last norm feeds nothing in
    its graph, which it ends: under the eager inner it hands its y_hat on to whatever graph reads it next."""
    x = _input(B, T, D)
    _, _, sites = _compare(_encoder(True, 0.1, norm_first=False), x)
    rewritten = sorted(p for p, s in sites.items() if s.rewritten and not s.pattern.endswith(HANDED_ON))
    assert rewritten == ["layers.0.norm1", "layers.0.norm2", "layers.1.norm1"], sites
    assert sites["layers.1.norm2"].pattern.endswith(HANDED_ON)


def test_two_chains_into_one_attention_are_refused():
    """Query and key from two transposes of the output: two chains into one call, left alone with a reason."""

    class TwoChains(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm = nn.LayerNorm(D)
            self.attn = nn.MultiheadAttention(D, HEADS)

        def forward(self, x):
            z = self.norm(x)
            return self.attn(z.transpose(0, 1), z.transpose(0, 1), z.transpose(0, 1), need_weights=False)[0]

    report = approxbp_fx.explain(TwoChains(), _input(B, T, D), options=EXACT)
    (site,) = [s for s in report.sites if s.family == "norms"]
    assert not site.rewritten and "two different chains" in site.reason, site


def test_encoder_under_the_inductor_inner():
    """One compiled check: the split attention traces through AOTAutograd and inductor, forward and
    gradients equal plain autograd's, and y_hat replaces the in-projection's copy there too."""
    x = _input(B, T, D)
    layer = nn.TransformerEncoderLayer(D, HEADS, 2 * D, dropout=0.0, batch_first=True, norm_first=True)
    torch.manual_seed(0)
    model = randomize_norm_affines(layer)
    out, grads, saved = _run(model, model, x)
    compiled_model = copy.deepcopy(model)
    torch._dynamo.reset()
    with approxbp_fx.collect_reports() as reports:
        out2, grads2, saved2 = _run(compiled_model, approxbp_fx.compile(compiled_model, inner="inductor",
                                                                        activations=False), x)
    torch.testing.assert_close(out2[0], out[0], rtol=1e-5, atol=1e-5)
    assert_grads_close(grads2, grads, 1e-5)
    sites = {s.path: s for r in reports for s in r.sites if s.family == "norms"}
    assert sites["norm1"].rewritten, sites["norm1"].reason


def test_linear_output_divided_in_place_after_a_transpose():
    """LED's encoder attention: ``q = query(z.transpose(0, 1)); q /= sqrt(head_dim)``. Verification compares
    the linear's output before the in-place division, so it must have recorded the original's value before
    it was divided too, or the site would be dropped as a forward mismatch."""

    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm = nn.LayerNorm(D)
            self.query = nn.Linear(D, D)

        def forward(self, x):
            q = self.query(self.norm(x).transpose(0, 1))
            q /= 4.0
            return q

    torch.manual_seed(0)
    saved, saved2, sites = _compare(randomize_norm_affines(Scaled()), _input(B, T, D))
    assert sites["norm"].rewritten, sites["norm"].reason


def test_bf16_encoder_shares_every_norm():
    """A bf16 nn.TransformerEncoder (weights and input): every norm rewritten, the forward bit for bit eager's,
    gradients plain autograd's to bf16 rounding."""
    model = _encoder(True, 0.0).to(torch.bfloat16)
    x = _input(B, T, D).to(torch.bfloat16)
    out, grads, saved = _run(model, model, x)
    compiled_model = copy.deepcopy(model)
    torch._dynamo.reset()
    with approxbp_fx.collect_reports() as reports:
        out2, grads2, saved2 = _run(compiled_model, approxbp_fx.compile(compiled_model, **EXACT), x)
    sites = [s for r in reports for s in r.sites if s.family == "norms"]
    assert len(sites) == 4 and all(s.rewritten for s in sites), sites
    torch.testing.assert_close(out2[0], out[0], rtol=0, atol=0)
    assert_grads_close(grads2, grads, 2e-2)
    assert saved2 < saved, (saved, saved2)
