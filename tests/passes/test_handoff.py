"""A graph break between a norm and its linears: under the eager inner the norm's graph hands y_hat to the
next graph, whose linears share it (``norms._received_site``, ``ops/handoff.py``)."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from approxbp_fx.inners import INNERS, Inner, register_inner
from approxbp_fx.passes.norms import HANDED_ON, RECEIVED
from architectures import compare_with_autograd
from models import randomize_norm_affines

D, HIDDEN = 16, 32
EAGER = {"inner": "eager"}


class PostNorm(nn.Module):
    """Two post-norm blocks (BERT's order: the norm's output feeds the next block's linears), with a graph
    break between each norm and the linears that read it where ``breaks``: the way Dynamo cuts longformer,
    yoso or wav2vec2's layerdrop."""

    def __init__(self, breaks: bool = True, dropout: float = 0.0) -> None:
        super().__init__()
        self.breaks = breaks
        self.fc1, self.fc2 = nn.Linear(D, HIDDEN), nn.Linear(HIDDEN, D)
        self.q, self.k = nn.Linear(D, D), nn.Linear(D, D, bias=False)
        self.ln1, self.ln2 = nn.LayerNorm(D), nn.LayerNorm(D)
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(D, 4)

    def _break(self) -> None:
        if self.breaks:
            torch._dynamo.graph_break()

    def forward(self, x: Tensor) -> Tensor:
        torch.manual_seed(123)  # every run (plain, compiled, measured) draws the same dropout masks
        h = self.ln1(x + self.fc2(torch.relu(self.fc1(x))))
        self._break()
        h = self.ln2(h + self.drop(self.q(h)) * self.k(h))
        self._break()
        return self.head(h)


def _norm_sites(sites: list) -> list:
    return [s for s in sites if s.pattern.startswith("layer_norm")]


@pytest.mark.parametrize("inner, dropout", [("eager", 0.0), ("eager", 0.1), ("inductor", 0.0)])
def test_linears_after_a_graph_break_share_the_norm_y_hat(fresh_dynamo, inner, dropout):
    """Gradients are plain autograd's, and the broken model keeps exactly what the same model without the
    breaks keeps under the backend, where each norm and its linears are one graph (under inductor: the
    handoff at the compiled function's boundary, and the linears' rebuilt input recomputed in backward)."""
    torch.manual_seed(0)
    x = torch.randn(2, 5, D)
    model = randomize_norm_affines(PostNorm(breaks=True, dropout=dropout))
    eager_bytes, broken_bytes, sites = compare_with_autograd(model, x, inner=inner)
    norms = _norm_sites(sites)
    assert len(norms) == 2 and all(s.rewritten and s.pattern.endswith(HANDED_ON) for s in norms), sites
    received = {s.path for s in sites if s.pattern.startswith(RECEIVED) and s.rewritten}
    assert {"q", "head"} <= received, sites

    torch._dynamo.reset()
    whole = randomize_norm_affines(PostNorm(breaks=False, dropout=dropout))
    whole.load_state_dict(model.state_dict())
    _, whole_bytes, whole_sites = compare_with_autograd(whole, x, inner=inner)
    assert all(s.rewritten for s in _norm_sites(whole_sites))
    assert broken_bytes == whole_bytes < eager_bytes, (eager_bytes, broken_bytes, whole_bytes)


def test_graph_input_from_elsewhere_keeps_what_it_kept(fresh_dynamo):
    """A graph input that no norm handed on (the model's own input, requiring a gradient) read by a linear:
    the same gradients and the same bytes as plain autograd."""

    class Mlp(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(D, HIDDEN), nn.Linear(HIDDEN, D)

        def forward(self, x: Tensor) -> Tensor:
            return self.fc2(torch.relu(self.fc1(x)))

    eager_bytes, ours, sites = compare_with_autograd(Mlp(), torch.randn(2, 5, D), masks=False, **EAGER)
    assert [s.rewritten for s in sites if s.pattern.startswith(RECEIVED)] == [True]
    assert ours == eager_bytes


def test_inner_without_the_capability_leaves_it_and_says_why(fresh_dynamo):
    """An inner that cannot run the handoff (``Inner.shares_across_graphs`` False: a user's own) gets no
    handoff calls: the norms are left alone with the reason, the graph inputs' linears as they were."""
    register_inner(Inner("graph_as_is", lambda gm, example_inputs, mode: gm))
    try:
        _, _, sites = compare_with_autograd(PostNorm(breaks=True), torch.randn(2, 5, D), inner="graph_as_is")
    finally:
        del INNERS["graph_as_is"]
    norms = _norm_sites(sites)
    assert norms and not any(s.rewritten for s in norms)
    assert all("leaves the graph" in s.reason for s in norms), [s.reason for s in norms]
    assert not any(s.pattern.startswith(RECEIVED) for s in sites)


@torch._dynamo.disable
def _doubled_in_place(h: Tensor) -> Tensor:
    return h.mul_(2.0)  # runs eagerly between two graphs: the tensor handed on changes after the norm


class ChangedBetweenGraphs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ln, self.q = nn.LayerNorm(D), nn.Linear(D, D)

    def forward(self, x: Tensor) -> Tensor:
        return self.q(_doubled_in_place(self.ln(x)))


def test_output_changed_in_place_between_graphs_is_not_shared(fresh_dynamo):
    """The norm's output, modified in place after its graph, reaches the linear's graph: the linear keeps it
    (its version moved), and its weight gradient is that of the modified values, as plain autograd's."""
    _, _, sites = compare_with_autograd(randomize_norm_affines(ChangedBetweenGraphs()), torch.randn(2, 5, D), **EAGER)
    assert any(s.pattern.endswith(HANDED_ON) and s.rewritten for s in sites), sites
