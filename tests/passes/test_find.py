"""Finding never mutates: every family's ``find`` leaves the graph exactly as it was.

Graphs: Dynamo's graphs of LLaMA (decomposed RMSNorm, SwiGLU), ViT (LayerNorm, GELU) and GPT-2
(decomposed tanh GELU, Conv1D addmm), and a ``symbolic_trace`` graph whose norms and linears are
``call_module`` nodes (whose parameters a rewrite must reach through new get_attr nodes).
"""

from __future__ import annotations

import pytest
import torch
import torch.fx as fx
from torch import nn

from approxbp_fx.options import Options
from approxbp_fx.passes import FAMILIES

from architectures import gpt2, llama, vit_inputs
from models import tiny_vit


def _dynamo_graph(model, **inputs) -> fx.GraphModule:
    graphs: list[fx.GraphModule] = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm

    torch._dynamo.reset()
    torch.compile(model, backend=capture)(**inputs)
    torch._dynamo.reset()
    return graphs[0]


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm, self.fc, self.act, self.out = nn.LayerNorm(16), nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16)

    def forward(self, x):
        return x + self.out(self.act(self.fc(self.norm(x))))


def _ids():
    return torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(0))


GRAPHS = {
    "llama": lambda: _dynamo_graph(llama(), input_ids=_ids()),
    "vit": lambda: _dynamo_graph(tiny_vit(), **vit_inputs()),
    "gpt2": lambda: _dynamo_graph(gpt2(), input_ids=_ids()),
    "symbolic_trace": lambda: fx.symbolic_trace(Block()),
}


def _fingerprint(gm: fx.GraphModule) -> tuple[int, str, str]:
    return len(gm.graph.nodes), gm.print_readable(print_output=False), gm.code


@pytest.mark.parametrize("inner", ["eager", "inductor"])
@pytest.mark.parametrize("graph", list(GRAPHS))
def test_find_does_not_mutate(graph: str, inner: str) -> None:
    gm = GRAPHS[graph]()
    before = _fingerprint(gm)
    found = 0
    for family in FAMILIES:
        found += len(family.find(gm, Options(inner=inner)))
        assert _fingerprint(gm) == before, f"{family.FAMILY}.find changed the graph"
    assert found > 0
