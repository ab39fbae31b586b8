"""Unusual use of the approxbp backend: every case ends in a correct result or a clear error.

References are independent of the package: the plain eager model under autograd (exact rewrites), and
the same model with GELU/SiLU replaced by a hand-written step-derivative autograd.Function (approximate
rewrites, the paper's ReGELU2/ReSiLU2 levels). Every test also checks that the backend actually
rewrote something in the case under test, so a silently skipped rewrite cannot pass for a correct one.

Models are tiny and compiled with the eager inner (plus aot_eager where AOTAutograd matters).
"""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import approxbp_fx
from approxbp_fx.backend import approxbp_backend
from approxbp_fx.passes.norms import HANDED_ON

from models import SILU_STEP, BNDropoutLN, randomize_norm_affines, swap_activations, with_step_gelu

FWD_TOL = dict(rtol=1e-5, atol=1e-6)
GRAD_TOL = dict(rtol=1e-4, atol=1e-6)

# ReSiLU2 (Yang et al., ICML 2024): levels are partial sums of a, thresholds c.


@pytest.fixture(autouse=True)
def _reset_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


# --- models ---------------------------------------------------------------------------------------


class Block(nn.Module):
    """Pre-LN MLP block: x + fc2(act(fc1(ln(x))))."""

    def __init__(self, d: int = 16, mlp: int = 32, act: nn.Module | None = None) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, mlp)
        self.act = act if act is not None else nn.GELU()
        self.fc2 = nn.Linear(mlp, d)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.fc2(self.act(self.fc1(self.ln(x))))


class Tiny(nn.Module):
    def __init__(self, d_in: int = 8, d: int = 16, layers: int = 2, graph_break: bool = False) -> None:
        super().__init__()
        self.embed = nn.Linear(d_in, d)
        self.blocks = nn.ModuleList(Block(d) for _ in range(layers))
        self.head = nn.Linear(d, 3)
        self.graph_break = graph_break

    def forward(self, x: Tensor) -> Tensor:
        x = self.embed(x)
        if self.graph_break:  # written out: Dynamo cannot resume a frame inside a for loop after a break
            x = self.blocks[0](x)
            torch._dynamo.graph_break()
            x = self.blocks[1](x)
            torch._dynamo.graph_break()
            x = self.blocks[2](x)
        else:
            for block in self.blocks:
                x = block(x)
        return self.head(x)


def tiny(seed: int = 0, **kwargs) -> nn.Module:
    torch.manual_seed(seed)
    return randomize_norm_affines(Tiny(**kwargs).train(), seed + 1)


def step_reference(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose GELU and SiLU modules backpropagate the paper's step derivatives."""
    model = with_step_gelu(copy.deepcopy(model))
    swap_activations(model, {nn.SiLU: SILU_STEP})
    return model


def ours(model: nn.Module, **options) -> nn.Module:
    return torch.compile(model, backend="approxbp", options={"inner": "eager", **options})


def run(fn, model: nn.Module, args: tuple, loss_weight: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor | None]]:
    """Forward + backward of a fixed weighted sum; returns the output and the gradients of the
    parameters and of the floating-point inputs that require grad."""
    model.zero_grad(set_to_none=True)
    for a in args:
        if isinstance(a, Tensor) and a.grad is not None:
            a.grad = None
    out = fn(*args)
    w = loss_weight if loss_weight is not None else torch.randn(out.shape, generator=torch.Generator().manual_seed(5),
                                                                 dtype=out.dtype)
    (out * w).sum().backward()
    grads = {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}
    for i, a in enumerate(args):
        if isinstance(a, Tensor) and a.requires_grad:
            grads[f"input{i}"] = a.grad.clone()
    return out.detach(), grads


def assert_grads_equal(actual: dict, expected: dict, **tol) -> None:
    assert actual.keys() == expected.keys()
    for name, ref in expected.items():
        got = actual[name]
        assert (got is None) == (ref is None), f"{name}: gradient {'missing' if got is None else 'unexpected'}"
        if ref is not None:
            torch.testing.assert_close(got, ref, **(tol or GRAD_TOL), msg=lambda m: f"{name}: {m}")


def fresh_inputs(args: tuple) -> tuple:
    return tuple(a.detach().clone().requires_grad_(a.requires_grad) if isinstance(a, Tensor) else a for a in args)


def check_exact_and_approximate(model: nn.Module, args: tuple, min_rewritten: int = 1, **tol) -> None:
    """activations=False: output and gradients equal plain autograd. Default options: output equal,
    gradients equal the step-derivative reference. And the backend rewrote at least ``min_rewritten`` sites."""
    report = approxbp_fx.explain(copy.deepcopy(model), *fresh_inputs(args))
    assert len(report.rewritten) >= min_rewritten, str(report)
    torch._dynamo.reset()

    plain = copy.deepcopy(model)
    out_ref, grads_ref = run(plain, plain, fresh_inputs(args))
    exact = copy.deepcopy(model)
    out, grads = run(ours(exact, activations=False), exact, fresh_inputs(args))
    torch.testing.assert_close(out, out_ref, **FWD_TOL)
    assert_grads_equal(grads, grads_ref, **tol)

    torch._dynamo.reset()
    stepped = step_reference(model)
    out_ref, grads_ref = run(stepped, stepped, fresh_inputs(args))
    approx = copy.deepcopy(model)
    out, grads = run(ours(approx), approx, fresh_inputs(args))
    torch.testing.assert_close(out, out_ref, **FWD_TOL)
    assert_grads_equal(grads, grads_ref, **tol)


# --- double backward ------------------------------------------------------------------------------


def _grad_and_hessian_vector(fn, x: Tensor) -> tuple[Tensor, Tensor]:
    """g = d/dx sum(fn(x)^2) with create_graph=True, then d/dx sum(g^2): a second derivative."""
    (g,) = torch.autograd.grad(fn(x).pow(2).sum(), x, create_graph=True)
    (h,) = torch.autograd.grad(g.pow(2).sum(), x)
    return g.detach(), h


def test_double_backward_through_exact_rewrites_is_exact() -> None:
    """Only MS-BP (exact) rewrites, eager inner: the second derivative equals plain autograd's."""
    model = Block()
    randomize_norm_affines(model)
    x = torch.randn(3, 5, 16, requires_grad=True)
    g_ref, h_ref = _grad_and_hessian_vector(model, x)
    assert len(approxbp_fx.explain(model, x, options={"activations": False}).rewritten) == 1  # the ln -> fc1 site
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="approxbp", options={"inner": "eager", "activations": False})
    g, h = _grad_and_hessian_vector(compiled, x)
    torch.testing.assert_close(g, g_ref, **GRAD_TOL)
    torch.testing.assert_close(h, h_ref, **GRAD_TOL, msg=lambda m: f"wrong second derivative: {m}")


def test_double_backward_under_aot_inner_fails_like_plain_compile() -> None:
    """AOTAutograd (aot_eager, inductor) refuses create_graph=True for any compiled model, before approxbp
    code runs: ours raises exactly where plain torch.compile with the same inner does, never a number."""
    model = Block()
    x = torch.randn(3, 5, 16, requires_grad=True)
    messages = []
    for backend, kwargs in (("aot_eager", {}), ("approxbp", {"options": {"inner": "aot_eager", "activations": False}})):
        torch._dynamo.reset()
        with pytest.raises(RuntimeError) as info:
            _grad_and_hessian_vector(torch.compile(copy.deepcopy(model), backend=backend, **kwargs), x)
        messages.append(str(info.value))
    assert all("double backward" in m for m in messages), messages


@pytest.mark.parametrize("inner", ["eager", "aot_eager"])
def test_double_backward_through_approximate_activation_raises(inner: str) -> None:
    """The step derivative has no meaningful derivative of its own: create_graph must be refused with an
    error that names approxbp and the option that turns the approximation off."""
    model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 4))
    x = torch.randn(3, 16, requires_grad=True)
    compiled = torch.compile(model, backend="approxbp", options={"inner": inner})
    with pytest.raises(RuntimeError) as info:
        _grad_and_hessian_vector(compiled, x)
    message = str(info.value)
    if inner == "eager":
        assert "approxbp" in message and "activations" in message, message
    else:  # AOTAutograd refuses double backward itself, before any approxbp code runs: also a clear error
        assert "double backward" in message, message


# --- no_grad, inference_mode, eval ----------------------------------------------------------------


@pytest.mark.parametrize("context", ["no_grad", "inference_mode", "eval"])
def test_inference_outputs_equal_plain(context: str) -> None:
    model = tiny()
    x = torch.randn(4, 6, 8)
    compiled = ours(copy.deepcopy(model))
    if context == "eval":
        model.eval()
        compiled._orig_mod.eval()
        expected, out = model(x), compiled(x)
    else:
        ctx = getattr(torch, context)
        with ctx():
            expected, out = model(x), compiled(x)
    torch.testing.assert_close(out, expected, **FWD_TOL)


@pytest.mark.parametrize("context", ["no_grad", "inference_mode"])
def test_no_rewrite_overhead_without_grad(context: str) -> None:
    """Without autograd nothing is saved for backward, so a rewrite can only cost time (the 2-bit code,
    a copy of y_hat): graphs traced under no_grad/inference_mode must be left as they are."""
    model = tiny()
    x = torch.randn(4, 6, 8)
    assert len(approxbp_fx.explain(model, x).rewritten) == 4  # with grad: 2 norms + 2 GELUs
    torch._dynamo.reset()
    with getattr(torch, context)():
        report = approxbp_fx.explain(model, x)
    assert report.sites and not report.rewritten, str(report)


# --- dynamic shapes -------------------------------------------------------------------------------

SHAPES = [(3, 5), (4, 5), (4, 7), (6, 9), (2, 3)]  # (batch, sequence)


def _counting(backend):
    calls = []

    def counted(gm, example_inputs):
        calls.append(len(gm.graph.nodes))
        return backend(gm, example_inputs)

    return counted, calls


@pytest.mark.parametrize("dynamic", [None, True], ids=["automatic", "dynamic=True"])
def test_dynamic_shapes_recompile_no_more_than_plain(dynamic, eager_kernels) -> None:
    """Counts Dynamo graphs handed to the backend. (The ops' own kernels run as plain torch code here:
    compiled, they add one kernel compile per new shape, which is no Dynamo recompile of the model.)"""
    model = tiny()
    stepped = step_reference(model)

    plain_backend, plain_calls = _counting(lambda gm, ex: gm)
    plain = torch.compile(copy.deepcopy(model), backend=plain_backend, dynamic=dynamic)
    for b, t in SHAPES:
        plain(torch.randn(b, t, 8))

    torch._dynamo.reset()
    approx = copy.deepcopy(model)
    our_backend, our_calls = _counting(lambda gm, ex: approxbp_backend(gm, ex, options={"inner": "eager"}))
    compiled = torch.compile(approx, backend=our_backend, dynamic=dynamic)
    for b, t in SHAPES:
        x = torch.randn(b, t, 8)
        out_ref, grads_ref = run(stepped, stepped, (x,))
        out, grads = run(compiled, approx, (x,))
        torch.testing.assert_close(out, out_ref, **FWD_TOL)
        assert_grads_equal(grads, grads_ref)
    assert len(our_calls) <= len(plain_calls), f"approxbp compiled {len(our_calls)} graphs, plain {len(plain_calls)}"
    if dynamic:
        assert len(our_calls) == 1


# --- graph breaks -----------------------------------------------------------------------------------


def test_graph_breaks_between_blocks_every_subgraph_rewritten() -> None:
    model = tiny(layers=3, graph_break=True)
    x = torch.randn(4, 6, 8)
    report = approxbp_fx.explain(model, x)
    assert len(report.graphs) >= 3, str(report)
    # each block's norm and GELU is in a different graph, and each is rewritten
    rewritten_graphs = {id(orig) for orig, new in report.graphs if any(
        "approxbp" in str(n.target) for n in new.graph.nodes)}
    assert len(rewritten_graphs) >= 3
    check_exact_and_approximate(model, (x,), min_rewritten=6)


class SplitByBreak(nn.Module):
    """LayerNorm, a graph break, then the linear that would share the norm's output."""

    def __init__(self) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(16)
        self.fc = nn.Linear(16, 8)
        self.act = nn.GELU()
        self.out = nn.Linear(8, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = self.ln(x)
        torch._dynamo.graph_break()
        return self.out(self.act(self.fc(h)))


def test_pattern_split_by_graph_break_is_bridged() -> None:
    """The norm's graph hands y_hat on to the graph of the linear (tests/passes/test_handoff.py has the
    bytes); gradients as plain autograd's, the GELU after the break rewritten too."""
    torch.manual_seed(0)
    model = randomize_norm_affines(SplitByBreak())
    x = torch.randn(4, 5, 16, requires_grad=True)
    report = approxbp_fx.explain(model, x)
    (norm,) = [s for s in report.sites if s.pattern.startswith("layer_norm")]
    assert norm.rewritten and norm.pattern.endswith(HANDED_ON), str(report)
    check_exact_and_approximate(model, (x,), min_rewritten=2)


# --- inputs, frozen parameters, dtypes, layouts ---------------------------------------------------


def test_input_without_grad() -> None:
    check_exact_and_approximate(tiny(), (torch.randn(4, 6, 8),), min_rewritten=4)


def test_input_requires_grad() -> None:
    check_exact_and_approximate(tiny(), (torch.randn(4, 6, 8, requires_grad=True),), min_rewritten=4)


def test_frozen_norms() -> None:
    model = tiny()
    for block in model.blocks:
        block.ln.weight.requires_grad_(False)
        block.ln.bias.requires_grad_(False)
    check_exact_and_approximate(model, (torch.randn(4, 6, 8),), min_rewritten=3)


def test_frozen_linears() -> None:
    model = tiny()
    for block in model.blocks:
        for p in (*block.fc1.parameters(), *block.fc2.parameters()):
            p.requires_grad_(False)
    # no trainable linear reads the norms' outputs: nothing to share, only the GELUs are rewritten
    check_exact_and_approximate(model, (torch.randn(4, 6, 8),), min_rewritten=2)


def test_everything_frozen_but_the_input() -> None:
    model = tiny()
    model.requires_grad_(False)
    check_exact_and_approximate(model, (torch.randn(4, 6, 8, requires_grad=True),), min_rewritten=2)


class EmbeddingModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 16)
        self.ln = nn.LayerNorm(16)
        self.fc = nn.Linear(16, 24)
        self.act = nn.SiLU()
        self.out = nn.Linear(24, 3)

    def forward(self, ids: Tensor) -> Tensor:
        return self.out(self.act(self.fc(self.ln(self.emb(ids)))))


def test_integer_inputs_embedding_ids() -> None:
    torch.manual_seed(0)
    model = randomize_norm_affines(EmbeddingModel())
    ids = torch.randint(0, 50, (4, 7))
    check_exact_and_approximate(model, (ids,), min_rewritten=2)


def test_zero_size_batch() -> None:
    model = tiny()
    x = torch.randn(0, 6, 8, requires_grad=True)
    plain = copy.deepcopy(model)
    out_ref, grads_ref = run(plain, plain, (x.detach().clone().requires_grad_(),))
    for options in ({"activations": False}, {}):
        torch._dynamo.reset()
        m = copy.deepcopy(model)
        out, grads = run(ours(m, **options), m, (x.detach().clone().requires_grad_(),))
        assert out.shape == out_ref.shape == (0, 6, 3)
        assert_grads_equal(grads, grads_ref)  # zeros for the weights, an empty input gradient


class ConvStem(nn.Module):
    """A conv stem whose NHWC view (non-contiguous) feeds a LayerNorm -> linear -> GELU."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.ln = nn.LayerNorm(16)
        self.fc = nn.Linear(16, 20)
        self.act = nn.GELU()
        self.out = nn.Linear(20, 4)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv(x).permute(0, 2, 3, 1)  # [B, H, W, C], not contiguous for a contiguous conv output
        return self.out(self.act(self.fc(self.ln(h))))


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_conv_stem_before_layer_norm(layout: str) -> None:
    torch.manual_seed(0)
    model = randomize_norm_affines(ConvStem())
    x = torch.randn(2, 3, 5, 7)
    if layout == "channels_last":
        model = model.to(memory_format=torch.channels_last)
        x = x.to(memory_format=torch.channels_last)
    check_exact_and_approximate(model, (x.requires_grad_(),), min_rewritten=2)


def test_non_contiguous_input() -> None:
    x = torch.randn(6, 4, 8).transpose(0, 1)  # [4, 6, 8], not contiguous
    assert not x.is_contiguous()
    check_exact_and_approximate(tiny(), (x.requires_grad_(),), min_rewritten=4)


def test_numel_not_divisible_by_four() -> None:
    """GELU inputs of 3 * 7 * 5 = 105 elements: the last code byte is partly padding."""
    torch.manual_seed(0)
    model = randomize_norm_affines(nn.Sequential(nn.LayerNorm(7), nn.Linear(7, 5), nn.GELU(), nn.Linear(5, 3)))
    x = torch.randn(3, 7, 7, requires_grad=True)
    assert (3 * 7 * 5) % 4
    check_exact_and_approximate(model, (x,), min_rewritten=2)


def test_float64_model_exact_or_rejected() -> None:
    model = tiny().double()
    x = torch.randn(4, 6, 8, dtype=torch.float64, requires_grad=True)
    try:
        check_exact_and_approximate(model, (x,), min_rewritten=4, rtol=1e-10, atol=1e-12)
    except (RuntimeError, TypeError, ValueError) as e:
        assert "float64" in str(e), f"rejected without saying float64: {e}"


# --- the user's model is never changed ----------------------------------------------------------------


def _snapshot(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_model_parameters_and_state_dict_unchanged_by_compile_and_run() -> None:
    model = tiny()
    params = dict(model.named_parameters())
    before = _snapshot(model)
    compiled = ours(model)
    out = compiled(torch.randn(4, 6, 8))
    out.sum().backward()
    assert dict(model.named_parameters()).keys() == params.keys()
    assert all(p is params[n] for n, p in model.named_parameters()), "a parameter object was replaced"
    after = model.state_dict()
    assert list(after) == list(before)
    for k, v in before.items():
        assert after[k].dtype == v.dtype and torch.equal(after[k], v), k
    assert all(type(m) in (Tiny, Block, nn.Linear, nn.LayerNorm, nn.GELU, nn.ModuleList) for m in model.modules())


def test_checkpoint_after_training_loads_into_plain_model() -> None:
    model = tiny()
    reference = copy.deepcopy(model)
    compiled = ours(model, activations=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    opt_ref = torch.optim.SGD(reference.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(9)
    for _ in range(3):
        x, target = torch.randn(4, 6, 8, generator=g), torch.randn(4, 6, 3, generator=g)
        for fn, o in ((compiled, opt), (reference, opt_ref)):
            o.zero_grad()
            F.mse_loss(fn(x), target).backward()
            o.step()
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    plain = tiny(seed=1)  # different weights, same architecture
    plain.load_state_dict(torch.load(buffer), strict=True)
    x = torch.randn(4, 6, 8)
    torch.testing.assert_close(plain(x), model(x), rtol=0, atol=0)
    # exact rewrites: training went as it does without the backend
    for (n, p), p_ref in zip(plain.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p, p_ref, rtol=1e-5, atol=1e-6, msg=lambda m: f"{n}: {m}")


# --- verification has no side effects, across train/eval toggles --------------------------------


def test_verification_no_side_effects_across_train_eval_toggles() -> None:
    """train -> eval -> train forwards (each mode compiles, so verifies, a graph of its own): RNG,
    running statistics, num_batches_tracked and outputs end as after the same plain forwards."""
    torch.manual_seed(3)
    model = BNDropoutLN()
    plain, approx = copy.deepcopy(model), copy.deepcopy(model)
    compiled = ours(approx)
    xs = [torch.randn(16, 8, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    modes = ["train", "eval", "train", "eval"]
    assert len(approxbp_fx.explain(copy.deepcopy(model), xs[0]).rewritten) >= 2
    torch._dynamo.reset()
    for x, mode in zip(xs, modes):
        plain.train(mode == "train")
        approx.train(mode == "train")
        torch.manual_seed(11)
        expected = plain(x)
        rng_expected = torch.get_rng_state()
        torch.manual_seed(11)
        out = compiled(x)
        assert torch.equal(torch.get_rng_state(), rng_expected), f"{mode}: RNG advanced differently"
        torch.testing.assert_close(out, expected, **FWD_TOL)  # same dropout mask in train mode
        torch.testing.assert_close(approx.bn.running_mean, plain.bn.running_mean, rtol=0, atol=1e-6)
        torch.testing.assert_close(approx.bn.running_var, plain.bn.running_var, rtol=0, atol=1e-6)
        assert approx.bn.num_batches_tracked.item() == plain.bn.num_batches_tracked.item()
    assert plain.bn.num_batches_tracked.item() == 2


def test_report_of_a_graph_with_symbolic_sizes(fresh_dynamo) -> None:
    """With dynamic shapes the byte estimates come from symbolic sizes: the report holds plain ints (the
    example's sizes) and prints."""
    model = tiny()
    with approxbp_fx.collect_reports() as reports:
        torch.compile(model, backend="approxbp", dynamic=True, options={"inner": "eager"})(torch.randn(4, 6, 8))
    sites = [s for r in reports for s in r.sites if s.rewritten]
    assert sites and all(type(s.bytes_saved) is int and s.bytes_saved > 0 for s in sites)
    assert all(f"{r.bytes_saved:,}" in str(r) for r in reports)
