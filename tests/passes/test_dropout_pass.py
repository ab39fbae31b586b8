"""The dropout family: every training dropout keeps a 1-bit mask, and the trainable linears after it keep
dropout's input instead of its output.

References are independent of the code under test: plain autograd with the same RNG seed (forward bit for
bit, gradients to float rounding) and byte counts computed from shapes (what eager's dropout and linear
keep: a float mask and the dropout's output; what the rewrite should keep: a packed mask, 1 bit/elem).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

import approxbp_fx

from architectures import ALL_LINEAR, llama, loss_weight, randomize_norms, token_inputs, with_lora
from models import HEADS, HIDDEN, LAYERS, MLP, VOCAB, assert_grads_close

SEED = 7
ROWS, WIDTH = (4, 16), 64
N = math.prod(ROWS) * WIDTH  # elements of one activation
PACKED = math.ceil(N / 8)


def _run(model: nn.Module, fn, *args: torch.Tensor, **kwargs: torch.Tensor):
    """Forward + backward with RNG seed SEED; then the bytes kept by a second seeded forward."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(SEED)
    out = fn(*args, **kwargs)
    out = out.logits if hasattr(out, "logits") else out
    (out * loss_weight(out.shape)).sum().backward()
    grads = {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    torch.manual_seed(SEED)
    saved = approxbp_fx.saved_activation_bytes(fn, *args, exclude=[model], **kwargs)
    return out.detach(), grads, saved


class Standalone(nn.Module):
    """Dropouts whose outputs feed only an add: only their masks change."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(WIDTH, WIDTH)

    def forward(self, x):
        h = self.fc(x)
        return F.dropout(h, 0.3, training=True) + torch.dropout(h, 0.2, True)


class ToLinear(nn.Module):
    """tanh (keeps its output h) -> nn.Dropout -> two trainable linears (one behind a view) and a frozen one."""

    def __init__(self) -> None:
        super().__init__()
        self.drop = nn.Dropout(0.1)
        self.a, self.b, self.frozen = nn.Linear(WIDTH, WIDTH), nn.Linear(WIDTH, WIDTH), nn.Linear(WIDTH, WIDTH)
        self.frozen.requires_grad_(False)

    def forward(self, x):
        h = torch.tanh(x)
        d = self.drop(h)
        return self.a(d) + self.b(d.view(-1, WIDTH)).view(d.shape) + self.frozen(d)


def _input() -> torch.Tensor:
    return torch.randn(*ROWS, WIDTH, generator=torch.Generator().manual_seed(0)).requires_grad_()


@pytest.fixture(scope="module")
def standalone():
    torch.manual_seed(0)
    model = Standalone()
    x = _input()
    eager = _run(model, model, x)
    model2 = copy.deepcopy(model)
    compiled = _run(model2, approxbp_fx.compile(model2, inner="eager"), x)
    return eager, compiled


def test_standalone_dropout_keeps_packed_mask(standalone) -> None:
    (out, grads, saved), (out2, grads2, saved2) = standalone
    assert torch.equal(out2, out), "forward differs from eager dropout with the same seed"
    assert_grads_close(grads2, grads, 1e-6)
    # eager: two float masks (4 bytes/elem) and fc's input x; rewritten: two packed masks and x
    assert saved == 2 * 4 * N + 4 * N
    assert saved2 == 2 * PACKED + 4 * N


@pytest.fixture(scope="module")
def to_linear():
    torch.manual_seed(0)
    model = ToLinear()
    x = _input()
    eager = _run(model, model, x)
    model2 = copy.deepcopy(model)
    compiled = _run(model2, approxbp_fx.compile(model2, inner="eager", activations=False), x)
    report = approxbp_fx.explain(copy.deepcopy(model), x, options={"inner": "eager"})
    return eager, compiled, report


def test_linears_after_dropout_keep_its_input(to_linear) -> None:
    (out, grads, saved), (out2, grads2, saved2), report = to_linear
    assert torch.equal(out2, out)
    assert_grads_close(grads2, grads, 1e-6)
    # eager keeps h (tanh), the float mask and d; rewritten: h (kept by tanh and shared by the linears)
    # and the packed mask, which the dropout and both linears share
    assert saved == 3 * 4 * N
    assert saved2 == 4 * N + PACKED
    (site,) = [s for s in report.sites if s.family == "dropout"]
    assert site.rewritten and site.pattern == "dropout -> 2 x linear (keeps input)"
    assert site.bytes_saved == saved - saved2


def test_masks_off_leaves_dropout_alone() -> None:
    report = approxbp_fx.explain(ToLinear(), _input(), options={"inner": "eager", "masks": False})
    assert not [s for s in report.sites if s.family == "dropout"]
    rewritten, _ = approxbp_fx.rewrite(fx.symbolic_trace(ToLinear()), [_input()], masks=False)
    assert not any(n.target is torch.ops.approxbp.dropout_packed.default for n in rewritten.graph.nodes)


class Identities(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.drop, self.fc = nn.Dropout(0.5), nn.Linear(WIDTH, WIDTH)

    def forward(self, x):
        return self.fc(self.drop(x)) + F.dropout(x, 0.0, training=True)


def test_eval_mode_and_p_zero_are_not_sites() -> None:
    model = Identities().eval()  # nn.Dropout is the identity; p = 0 is the identity in any mode
    report = approxbp_fx.explain(model, _input(), options={"inner": "eager"})
    assert not [s for s in report.sites if s.family == "dropout"]
    report = approxbp_fx.explain(model.train(), _input(), options={"inner": "eager"})
    assert [s.path for s in report.sites if s.family == "dropout"] == ["drop"]  # the p = 0.5 module only


class InPlace(nn.Module):
    def forward(self, x):
        h = x * 2
        return F.dropout(h, 0.5, True, True) + h


def test_in_place_dropout_is_skipped_with_reason() -> None:
    report = approxbp_fx.explain(InPlace(), _input(), options={"inner": "eager"})
    (site,) = [s for s in report.sites if s.family == "dropout"]
    assert not site.rewritten and "in-place" in site.reason


def test_symbolic_trace_module_form() -> None:
    """symbolic_trace graphs keep nn.Dropout and nn.Linear as call_module nodes."""
    torch.manual_seed(0)
    model = ToLinear()
    x = _input()
    gm, report = approxbp_fx.rewrite(fx.symbolic_trace(model), [x])
    (site,) = [s for s in report.sites if s.family == "dropout"]
    assert site.rewritten and site.pattern == "dropout -> 2 x linear (keeps input)"
    expected, grads, _ = _run(model, model, x)
    got, grads2, _ = _run(gm, gm, x)
    assert torch.equal(got, expected)
    assert_grads_close({k: v for k, v in grads2.items()}, grads, 1e-6)


class AutocastLinear(nn.Module):
    """fp32 x -> dropout -> one trainable linear, under bf16 autocast: the linear keeps a bf16 cast of d."""

    def __init__(self, keeper: bool) -> None:
        super().__init__()
        self.keeper = keeper
        self.fc, self.pre = nn.Linear(WIDTH, WIDTH), nn.Linear(WIDTH, WIDTH)

    def forward(self, x):
        h = torch.tanh(x) if self.keeper else x * 3.0  # tanh keeps h; a scaling keeps nothing
        return self.fc(F.dropout(h, 0.1, True)).float()


@pytest.mark.parametrize("keeper", [False, True])
def test_autocast_decides_per_site(keeper: bool) -> None:
    torch.manual_seed(0)
    model, x = AutocastLinear(keeper), _input()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        report = approxbp_fx.explain(copy.deepcopy(model), x, options={"inner": "eager"})
        _, _, eager = _run(model, model, x)
        model2 = copy.deepcopy(model)
        _, _, rewritten = _run(model2, approxbp_fx.compile(model2, inner="eager"), x)
    sites = [s for s in report.sites if s.family == "dropout"]
    if keeper:  # h is kept anyway: the linear keeps it instead of its bf16 cast of d
        assert [s.pattern for s in sites if s.rewritten] == ["dropout -> 1 x linear (keeps input)"]
    else:  # keeping fp32 h (4 bytes/elem) instead of the bf16 cast (2) would keep more
        assert [s.pattern for s in sites if s.rewritten] == ["dropout (1-bit mask)"]
        (skipped,) = [s for s in sites if not s.rewritten]
        assert "autocast" in skipped.reason
    assert rewritten < eager
    # the float mask (4 bytes/elem) is gone; the bf16 cast of d (2 bytes/elem) is gone where h is kept
    assert eager - rewritten >= 4 * N - PACKED + (2 * N if keeper else 0)


def _lora_mlp():
    """PEFT LoRA with lora_dropout=0.1 on a small MLP: lora_A(dropout(x)) in every adapted linear."""
    from peft import LoraConfig, get_peft_model

    class MLP(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.up, self.down = nn.Linear(WIDTH, 2 * WIDTH), nn.Linear(2 * WIDTH, WIDTH)

        def forward(self, x):
            return self.down(torch.tanh(self.up(x)))

    torch.manual_seed(0)
    model = get_peft_model(MLP(), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=["up", "down"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    return model


def test_peft_lora_dropout() -> None:
    model, x = _lora_mlp(), _input()
    out, grads, saved = _run(model, model, x)
    model2 = copy.deepcopy(model)
    out2, grads2, saved2 = _run(model2, approxbp_fx.compile(model2, inner="eager"), x)
    report = approxbp_fx.explain(copy.deepcopy(model), x, options={"inner": "eager"})
    assert torch.equal(out2, out)
    assert_grads_close(grads2, grads, 1e-6)
    sites = [s for s in report.sites if s.family == "dropout"]
    assert len(sites) == 2 and all(s.rewritten and s.pattern == "dropout -> 1 x linear (keeps input)" for s in sites)
    # up's adapter (x: N elements): eager keeps a float mask and d; rewritten, the packed mask and x itself,
    # which nobody else keeps (up's base weight is frozen). down's (tanh's output: 2N elements): eager keeps
    # a float mask and d, rewritten the packed mask only, tanh keeps its output anyway.
    removed = (4 * N + 4 * N - PACKED - 4 * N) + (2 * (4 * N + 4 * N) - 2 * PACKED)
    assert saved - saved2 == removed


def _bert_with_dropout() -> nn.Module:
    """BertForSequenceClassification of the tiny geometry with HF's default dropout (0.1 everywhere)."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                        intermediate_size=MLP, max_position_embeddings=64, num_labels=3)
    assert config.hidden_dropout_prob == 0.1
    return randomize_norms(BertForSequenceClassification(config).float().train(), 1)


def test_bert_dropout_exact() -> None:
    model, inputs = _bert_with_dropout(), token_inputs()
    out, grads, saved = _run(model, model, **inputs)
    model2 = copy.deepcopy(model)
    out2, grads2, saved2 = _run(model2, approxbp_fx.compile(model2, inner="eager", activations=False), **inputs)
    assert torch.equal(out2, out)
    assert_grads_close(grads2, grads, 1e-5)
    assert saved2 < saved
    # default options (GELU's 2-bit codes too): 0.745 of eager before the dropout family; SDPA's own
    # attention dropout (its CPU math path) stays as it is
    model3 = copy.deepcopy(model)
    _, _, saved3 = _run(model3, approxbp_fx.compile(model3, inner="eager"), **inputs)
    assert saved3 <= 0.65 * saved, f"saved {saved3} / {saved} = {saved3 / saved:.3f}"


@pytest.fixture(scope="module")
def lora_llama_dropout():
    """The tests' tiny LLaMA with LoRA on every linear and ``lora_dropout=0.1``: plain eager, plain
    torch.compile, and the backend in exact mode (``activations=False``) with each inner, every run seeded
    alike; inductor draws eager's masks (``fallback_random``)."""
    base, inputs = with_lora(llama(), ALL_LINEAR, dropout=0.1), token_inputs()
    runs = {}
    with torch._inductor.config.patch(fallback_random=True):
        for name, make in (("eager", lambda m: m), ("torch.compile", torch.compile),
                           ("eager inner", lambda m: approxbp_fx.compile(m, inner="eager", activations=False)),
                           ("inductor inner", lambda m: approxbp_fx.compile(m, inner="inductor", activations=False))):
            torch._dynamo.reset()
            model = copy.deepcopy(base)
            runs[name] = _run(model, make(model), **inputs)
    torch._dynamo.reset()
    return runs


@pytest.mark.parametrize("inner, baseline, limit, tol", [("eager inner", "eager", 0.70, 1e-5),
                                                         ("inductor inner", "torch.compile", 0.90, 1e-4)])
def test_lora_all_llama_dropout(lora_llama_dropout, inner: str, baseline: str, limit: float, tol: float) -> None:
    """Every adapter's lora_A(dropout(x)) keeps a 1-bit mask and shares x: at most ``limit`` of the same-mode
    baseline's bytes (0.896 of eager's and 1.00 of torch.compile's before the dropout family), gradients
    of every adapter equal plain autograd's under the same seed."""
    out, grads, saved = lora_llama_dropout[inner]
    ref_out, ref_grads, _ = lora_llama_dropout["eager"]
    if inner == "eager inner":
        assert torch.equal(out, ref_out)
    assert_grads_close(grads, ref_grads, tol)
    base_saved = lora_llama_dropout[baseline][2]
    assert saved <= limit * base_saved, f"saved {saved} / {base_saved} = {saved / base_saved:.3f}"
