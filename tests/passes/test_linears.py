"""The weight_casts family: linears under autocast keep their parameter, not its bf16 copy.

A small model with every kind of linear the family meets (after a norm, after an activation, frozen,
a weight that is not a parameter, GPT-2's addmm) traced by Dynamo with and without bf16 autocast; and the
tests' tiny LoRA(q, v) ViT under autocast with the eager inner. References: plain autograd under the
same autocast, and the tensors plain autocast keeps (measured, not assumed).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

import approxbp_fx
from approxbp_fx.options import Options
from approxbp_fx.passes import linears

from architectures import MODELS
from models import BF16_EXACT_GRAD_TOL, assert_grads_close

D = 16


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.norm, self.fc1 = nn.LayerNorm(D), nn.Linear(D, 2 * D)  # norm -> linear: the norm family's
        self.fc2 = nn.Linear(2 * D, D, bias=False)  # after an activation
        self.frozen = nn.Linear(D, D).requires_grad_(False)
        self.conv_w = nn.Parameter(torch.randn(D, D) / 4)  # GPT-2's Conv1D layout: addmm(b, x, W[in, out])
        self.conv_b = nn.Parameter(torch.randn(D))
        self.head = nn.Linear(D, 3)

    def forward(self, x: torch.Tensor, extra: torch.Tensor) -> torch.Tensor:
        h = self.fc2(F.gelu(self.fc1(self.norm(x))))
        h = self.frozen(h)
        h = torch.addmm(self.conv_b, h.reshape(-1, D), self.conv_w).view(h.shape)
        h = h + F.linear(h, extra)  # a weight that is not a parameter
        return self.head(h)


def _inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {"x": torch.randn(2, 5, D, generator=g), "extra": torch.randn(D, D, generator=g) / 4}


def _graph(autocast: bool) -> fx.GraphModule:
    graphs: list[fx.GraphModule] = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm

    torch._dynamo.reset()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        torch.compile(Net(), backend=capture)(**_inputs())
    torch._dynamo.reset()
    return graphs[0]


@pytest.fixture(scope="module")
def autocast_graph() -> fx.GraphModule:
    return _graph(True)


def _weight_copies(tensors: list[torch.Tensor], model: nn.Module) -> list[torch.Tensor]:
    """Saved bf16 tensors with as many elements as a float32 parameter: the weights' autocast copies."""
    sizes = {p.numel() for p in model.parameters() if p.dim() == 2}
    return [t for t in tensors if t.dtype == torch.bfloat16 and t.numel() in sizes]


def _train(model: nn.Module, fn, inputs) -> tuple[torch.Tensor, dict[str, torch.Tensor], list[torch.Tensor]]:
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fn(**inputs)
        out.float().square().sum().backward()
        saved = approxbp_fx.saved_tensors(fn, exclude=[model], **inputs)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.detach(), grads, saved


def test_finds_only_autocast_linears(autocast_graph: fx.GraphModule) -> None:
    assert linears.find(_graph(False), Options()) == []
    found = {c.path: c for c in linears.find(autocast_graph, Options(inner="eager"))}
    # every linear is found, the norm's too (the driver leaves that one to the norm family); the
    # estimate is the weight's bf16 copy, 2 bytes per element
    expected = {"fc1": 2 * D * D, "fc2": 2 * D * D, "frozen": D * D, "addmm": D * D, "head": 3 * D}
    assert {p: c.bytes_saved // 2 for p, c in found.items() if not c.skip} == expected
    assert found["addmm"].pattern == "addmm (autocast bf16: weight cast rebuilt)"
    assert found["head"].pattern == "linear (autocast bf16: weight cast rebuilt)"
    skipped = [c for c in found.values() if c.skip]
    assert len(skipped) == 1 and "l_extra_ is not a parameter" in skipped[0].skip


def test_aot_eager_keeps_the_parameter() -> None:
    """Under aot_eager the min-cut partitioner may keep either a weight or its bf16 cast for backward. It
    keeps the parameter (which the model holds anyway) only when it knows which inputs are parameters: the
    backend must hand Dynamo's record of them on with the rewritten graph (without it, the norm-shared
    linear's weight copy was kept). Only the copy of the weight that is no parameter is left."""
    base, inputs = Net(), _inputs()
    model, plain = copy.deepcopy(base), copy.deepcopy(base)
    torch._dynamo.reset()
    fn = approxbp_fx.compile(model, inner="aot_eager", activations=False)
    _, grads, saved = _train(model, fn, inputs)
    torch._dynamo.reset()
    _, expected, plain_saved = _train(plain, plain, inputs)
    assert len(_weight_copies(plain_saved, plain)) == 6
    assert len(_weight_copies(saved, model)) == 1
    assert_grads_close(grads, expected, BF16_EXACT_GRAD_TOL)


@pytest.fixture(scope="module")
def net_runs():
    base, inputs = Net(), _inputs()
    runs = {}
    for name, options in (("eager", None), ("weight_casts", {"norms": False, "activations": False}),
                          ("exact", {"activations": False}), ("off", {"activations": False, "weight_casts": False})):
        torch._dynamo.reset()
        model = copy.deepcopy(base)
        fn = model if options is None else approxbp_fx.compile(model, inner="eager", **options)
        runs[name] = (model, *_train(model, fn, inputs))
    torch._dynamo.reset()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        runs["report"] = approxbp_fx.explain(copy.deepcopy(base), options={"inner": "eager"}, **inputs)
    return runs


def test_bit_for_bit_alone(net_runs) -> None:
    """Only this family on: forward and every gradient equal plain eager autocast's bit for bit."""
    _, out, grads, _ = net_runs["eager"]
    _, out2, grads2, _ = net_runs["weight_casts"]
    assert torch.equal(out, out2)
    assert grads.keys() == grads2.keys()
    for name in grads:
        assert torch.equal(grads[name], grads2[name]), name


def test_weight_copies_gone(net_runs) -> None:
    model, _, _, saved_eager = net_runs["eager"]
    assert _weight_copies(saved_eager, model), "plain autocast keeps weight copies (else this test shows nothing)"
    model, _, _, saved_off = net_runs["off"]
    assert _weight_copies(saved_off, model)
    model, _, grads, saved = net_runs["exact"]
    # the only copy left is that of the weight that is no parameter (a graph input)
    assert len(_weight_copies(saved, model)) == 1
    assert_grads_close(grads, net_runs["eager"][2], BF16_EXACT_GRAD_TOL)


def test_linear_after_norm_stays_the_norms(net_runs) -> None:
    report = net_runs["report"]
    by_family = {}
    for s in report.rewritten:
        by_family.setdefault(s.family, []).append(s.path)
    assert by_family["norms"] == ["norm"]
    assert "fc1" not in by_family["weight_casts"] and "fc2" in by_family["weight_casts"]
    targets = [n.target for _, gm in report.graphs for n in gm.graph.nodes if n.op == "call_function"]
    assert targets.count(torch.ops.approxbp.linear_shared.default) == 1
    assert targets.count(torch.ops.approxbp.linear_cast.default) == 4  # fc2, frozen, addmm, head
    skipped = [s for s in report.skipped if s.family == "weight_casts"]
    assert len(skipped) == 1 and "is not a parameter" in skipped[0].reason


def test_lora_vit_autocast_eager_inner() -> None:
    """The tests' tiny LoRA(q, v) ViT under bf16 autocast, eager inner: no weight copy is kept, and the whole
    rewrite keeps at most 0.52 of what plain eager keeps (0.73 with the weight copies)."""
    build, make_inputs = MODELS["lora_vit"]
    base = build()
    model, plain_model = copy.deepcopy(base), copy.deepcopy(base)
    torch._dynamo.reset()
    fn = approxbp_fx.compile(model, inner="eager")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        saved = approxbp_fx.saved_tensors(fn, exclude=[model], **make_inputs())
        plain = approxbp_fx.saved_tensors(plain_model, **make_inputs())
    torch._dynamo.reset()
    ours, eager = (sum(t.untyped_storage().nbytes() for t in ts) for ts in (saved, plain))
    assert ours <= 0.52 * eager, f"saved bytes {ours} / {eager} = {ours / eager:.3f}"
    assert sum(t.untyped_storage().nbytes() for t in _weight_copies(plain, plain_model)) > 0.25 * eager
    assert _weight_copies(saved, model) == []


def test_graph_with_checkpointed_regions_keeps_its_linears() -> None:
    """HF gradient checkpointing under Dynamo: each layer is a ``tag_activation_checkpoint`` region. With the
    head linear rewritten, torch's checkpoint failed in backward (its recompute saw other casts than the
    forward); the family now leaves such graphs' linears alone, and the step trains like plain eager."""
    build, make_inputs = MODELS["lora_vit"]
    base = build()
    model, plain_model = copy.deepcopy(base), copy.deepcopy(base)
    for m in (model, plain_model):
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    compiled = approxbp_fx.compile(model, inner="eager")
    torch._dynamo.reset()
    with approxbp_fx.collect_reports() as reports:
        _, grads, _ = _train(model, lambda **kw: compiled(**kw).logits, make_inputs())
    torch._dynamo.reset()
    _, ref_grads, _ = _train(plain_model, lambda **kw: plain_model(**kw).logits, make_inputs())
    sites = [s for r in reports for s in r.sites if s.family == "weight_casts"]
    assert sites and all(not s.rewritten and "activation-checkpointed" in s.reason for s in sites), sites
    assert_grads_close(grads, ref_grads, BF16_EXACT_GRAD_TOL)
