"""Verification: does each rewritten site compute what the original graph computed, on real inputs?

Two runs, whatever the number of sites:

1. the original graph, recording the value of every node a rewrite replaced, and the outputs;
2. the rewritten graph, comparing each replacing node's value with the recorded one as soon as it is
   computed. A mismatch is blamed on the site that made the replacement, and the recorded value is
   passed on, so every later site is checked on the inputs it would see in the original graph: one bad
   site never makes its neighbours look bad. A node that raises is blamed on the site that created it.

If every site matches but the outputs do not, only a combination fails, and no site can be blamed. After
the failing sites are dropped, one plain run of the rebuilt graph checks the others together.
Both runs happen under ``no_grad``, with the RNG state restored before each and with copies of every
input but the parameters, so dropout draws the same masks and BatchNorm statistics and in-place updated
inputs are left as they were.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
import torch.fx as fx
from torch import Tensor, nn

from ._compat import is_fake, tree_leaves, tree_map, unset_fake_temporarily
from .passes._edit import SITE_KEY

__all__ = ["mismatch", "concrete_inputs", "Verdict", "check_sites", "check_outputs", "record_original", "OriginalRun"]

_TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}


def _flat_tensors(out: Any) -> list[Tensor]:
    return [t for t in tree_leaves(out) if isinstance(t, Tensor)]


def mismatch(expected: Any, actual: Any) -> str | None:
    """None when the outputs agree within the dtype's tolerance, else what differs."""
    exp, act = _flat_tensors(expected), _flat_tensors(actual)
    if len(exp) != len(act):
        return f"{len(act)} outputs instead of {len(exp)}"
    for i, (e, a) in enumerate(zip(exp, act)):
        if e.shape != a.shape or e.dtype != a.dtype:
            return f"output {i}: {tuple(a.shape)} {a.dtype} instead of {tuple(e.shape)} {e.dtype}"
        if not e.is_floating_point():
            if not torch.equal(e, a):
                return f"output {i} differs"
            continue
        err = (torch.linalg.vector_norm((a - e).double()) / (torch.linalg.vector_norm(e.double()) + 1e-30)).item()
        if not err <= _TOLERANCE.get(e.dtype, 1e-4):  # also catches NaN
            return f"output {i}: relative error {err:.2e} (tolerance {_TOLERANCE.get(e.dtype, 1e-4):.0e} for {e.dtype})"
    return None


def _synthetic(t: Tensor) -> Tensor:
    """Real data for a fake example input (DDP's graph splitter passes FakeTensors): uniform [0, 1)
    floats (valid variances, no NaN from BatchNorm), zeros for integers (valid embedding indices)."""
    shape = [int(d.node.hint) if isinstance(d, torch.SymInt) else d for d in t.shape]
    with unset_fake_temporarily():
        if t.is_floating_point():
            out = torch.rand(shape, dtype=t.dtype, device=t.device)
        else:
            out = torch.zeros(shape, dtype=t.dtype, device=t.device)
    return nn.Parameter(out, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else out


def concrete_inputs(example_inputs: Sequence[Any]) -> list[Any]:
    """Inputs both runs can use: synthetic data for fake tensors, hints for symbolic sizes."""
    return [_synthetic(a) if isinstance(a, Tensor) and is_fake(a) else
            a.node.hint if isinstance(a, (torch.SymInt, torch.SymFloat, torch.SymBool)) else a
            for a in example_inputs]


def _copy(a: Any) -> Any:
    """A copy of a non-parameter tensor input, so a run cannot change the caller's tensors."""
    if isinstance(a, Tensor) and not isinstance(a, nn.Parameter):
        return a.detach().clone()
    return a


def _isolated(run: Callable[..., Any], inputs: Sequence[Any]) -> Any:
    copies = [_copy(a) for a in inputs]
    devices = sorted({t.device.index or 0 for t in copies if isinstance(t, Tensor) and t.device.type == "cuda"})
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        return run(*copies)


class _Recorder(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, keep: set[str]) -> None:
        super().__init__(gm)
        self.keep, self.values = keep, {}

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        if n.name in self.keep:
            # a copy: the graph may change the value in place later (LED's ``query /= sqrt(head_dim)`` on a
            # linear's output), and the rewritten graph's node is compared before that happens
            self.values[n.name] = tree_map(lambda t: t.detach().clone() if isinstance(t, Tensor) else t, out)
        return out


class OriginalRun:
    """The original graph's outputs and the values of the nodes that rewrites replace."""

    def __init__(self, outputs: Any, values: dict[str, Any]) -> None:
        self.outputs, self.values = outputs, values


def record_original(gm: fx.GraphModule, inputs: Sequence[Any], keep: set[str]) -> OriginalRun:
    recorder = _Recorder(gm, keep)
    outputs = _isolated(recorder.run, inputs)
    return OriginalRun(outputs, recorder.values)


class Verdict:
    """``bad``: {site id: why}; ``combination``: what differs when only the sites together fail;
    ``complete``: False when a raising site cut the run short (later sites are unchecked)."""

    def __init__(self, bad: dict[str, str], combination: str | None, complete: bool = True) -> None:
        self.bad, self.combination, self.complete = bad, combination, complete


class _Checker(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, original: OriginalRun, replacements: dict[fx.Node, tuple[str, str]]) -> None:
        super().__init__(gm)
        self.original, self.replacements = original, replacements
        self.bad: dict[str, str] = {}

    def run_node(self, n: fx.Node) -> Any:
        try:
            out = super().run_node(n)
        except Exception as exc:
            site = n.meta.get(SITE_KEY)
            if not site:
                raise
            raise _SiteRaised(site, f"the rewritten graph raised {type(exc).__name__}: {exc}") from exc
        if n in self.replacements:
            name, site = self.replacements[n]
            expected = self.original.values[name]
            problem = mismatch(expected, out)
            if problem is not None:
                self.bad.setdefault(site, f"forward mismatch in verification ({problem})")
                return expected  # later sites are checked on the original's values
        return out


class _SiteRaised(Exception):
    def __init__(self, site: str, reason: str) -> None:
        super().__init__(reason)
        self.site, self.reason = site, reason


def check_sites(rewritten: fx.GraphModule, replacements: dict[fx.Node, tuple[str, str]], original: OriginalRun,
                inputs: Sequence[Any]) -> Verdict:
    """Check every site of ``rewritten`` against the original run (module docstring)."""
    checker = _Checker(rewritten, original, replacements)
    try:
        outputs = _isolated(checker.run, inputs)
    except _SiteRaised as exc:
        return Verdict({**checker.bad, exc.site: exc.reason}, None, complete=False)
    if checker.bad:
        return Verdict(checker.bad, None)
    problem = mismatch(original.outputs, outputs)
    return Verdict({}, None if problem is None else f"forward mismatch in verification ({problem})")


def check_outputs(rewritten: fx.GraphModule, original: OriginalRun, inputs: Sequence[Any]) -> str | None:
    """What differs between the rewritten graph's outputs and the original run's (None: nothing), from one
    plain run of the rewritten graph."""
    try:
        problem = mismatch(original.outputs, _isolated(rewritten, inputs))
    except Exception as exc:
        return f"forward mismatch in verification (the rewritten graph raised {type(exc).__name__}: {exc})"
    return None if problem is None else f"forward mismatch in verification ({problem})"
