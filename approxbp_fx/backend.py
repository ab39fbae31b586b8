"""The ``approxbp`` torch.compile backend: rewrite, verify, then compile with the chosen inner compiler.

    torch.compile(model, backend="approxbp", options={"activations": False})
    approxbp_fx.compile(model, inner="eager")

``explain`` runs the same rewrite with the same options and skips only the inner compile, so its report
is what the backend does, site for site.
"""

from __future__ import annotations

import logging
import time
import warnings
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.fx as fx
from torch import nn

from .driver import Applied, apply_candidates, decide, find_candidates
from .inners import get_inner
from .options import Options
from .passes._edit import Candidate
from .report import Report
from .verify import check_outputs, check_sites, concrete_inputs, record_original

__all__ = ["Options", "approxbp_backend", "compile", "rewrite", "explain", "rewrite_graph"]

log = logging.getLogger("approxbp_fx")


def rewrite_graph(gm: fx.GraphModule, example_inputs: Sequence[Any] | None, opts: Options) -> tuple[fx.GraphModule, Report]:
    """find -> decide -> apply, then (with ``example_inputs`` and ``opts.verify``) verify and apply again
    without the sites that failed. ``gm`` itself is left as it was."""
    start = time.perf_counter()
    candidates = find_candidates(gm, opts)
    timings = {"find": time.perf_counter() - start, "apply": 0.0, "verify": 0.0}
    applied = apply_candidates(gm, candidates, decide(candidates, gm))
    timings["apply"] += applied.seconds
    if opts.verify and example_inputs is not None and applied.edit.replacements:
        applied = _verified(gm, example_inputs, candidates, applied, timings)
    return applied.gm, Report(applied.sites, [(gm, applied.gm)], timings=timings)


def _verified(gm: fx.GraphModule, example_inputs: Sequence[Any], candidates: list[Candidate],
              applied: Applied, timings: dict[str, float]) -> Applied:
    """``applied`` checked site by site (``approxbp_fx.verify``); failing sites are dropped with a warning."""
    start = time.perf_counter()
    inputs = concrete_inputs(example_inputs)  # the same (synthetic, for fake inputs) data for every run
    keep = {name for name, _site in applied.edit.replacements.values()}
    try:
        original = record_original(gm, inputs, keep)
    except Exception as exc:  # the original graph itself cannot run on these inputs: nothing to compare
        log.warning("approxbp: forward not verified (the original graph failed on the example inputs: %s)", exc)
        timings["verify"] += time.perf_counter() - start
        return applied
    rewritten_ids = [s.id for s in applied.sites if s.rewritten]
    verdicts: dict[str, str] = {}
    combination: str | None = None
    while True:
        verdict = check_sites(applied.gm, applied.edit.replacements, original, inputs)
        verdicts.update(verdict.bad)
        combination = verdict.combination
        if not verdict.bad:
            break
        timings["verify"] += time.perf_counter() - start
        applied = apply_candidates(gm, candidates, decide(candidates, gm, verdicts))
        timings["apply"] += applied.seconds
        start = time.perf_counter()
        if not applied.edit.replacements:
            break
        if verdict.complete:
            # every other site was checked on the original's values: one plain run of the rebuilt graph
            # checks them together
            combination = check_outputs(applied.gm, original, inputs)
            break
    if combination is not None:  # only the sites together fail: keep none rather than guess
        verdicts.update({sid: combination for sid in rewritten_ids if sid not in verdicts})
        timings["verify"] += time.perf_counter() - start
        applied = apply_candidates(gm, candidates, decide(candidates, gm, verdicts))
        timings["apply"] += applied.seconds
        start = time.perf_counter()
    timings["verify"] += time.perf_counter() - start
    for s in applied.sites:
        if s.id in verdicts:
            warnings.warn(f"approxbp: left {s.path} ({s.pattern}) unrewritten: {s.reason}", RuntimeWarning, stacklevel=3)
            log.warning("approxbp: left %s (%s) unrewritten: %s", s.path, s.pattern, s.reason)
    return applied


def _prepare(gm: fx.GraphModule, example_inputs: Sequence[Any], opts: Options) -> tuple[fx.GraphModule, Report]:
    """The rewritten graph and its report; the graph unrewritten (with a warning) if the rewrite itself fails,
    so a model never trains worse than under plain torch.compile."""
    try:
        rewritten, report = rewrite_graph(gm, example_inputs, opts)
    except Exception as exc:
        message = (f"approxbp: could not rewrite a graph of {len(gm.graph.nodes)} nodes "
                   f"({type(exc).__name__}: {exc}); compiling it unrewritten with the {opts.inner} inner")
        warnings.warn(message, RuntimeWarning, stacklevel=3)
        log.warning(message, exc_info=True)
        return gm, Report([], [(gm, gm)])
    if log.isEnabledFor(logging.INFO):
        log.info("approxbp: graph with %d nodes\n%s", len(gm.graph.nodes), report, extra={"approxbp_report": report})
    return rewritten, report


def approxbp_backend(gm: fx.GraphModule, example_inputs: Sequence[Any], *, options: Mapping[str, Any] | None = None,
                     mode: str | None = None) -> Callable[..., Any]:
    """Dynamo backend (registered as ``"approxbp"``): see the module and ``Options`` docstrings."""
    opts = Options.parse(options)
    rewritten, _report = _prepare(gm, example_inputs, opts)
    return get_inner(opts.inner).compile(rewritten, example_inputs, mode)


def compile(model: Callable[..., Any], **options: Any) -> Callable[..., Any]:
    """``torch.compile(model, backend="approxbp", options=options)``, with the options checked now."""
    Options.parse(options)
    return torch.compile(model, backend="approxbp", options=options or None)


def rewrite(gm: fx.GraphModule, example_inputs: Sequence[Any] | None = None, **options: Any) -> tuple[fx.GraphModule, Report]:
    """Apply the rewrite to a ``torch.fx`` GraphModule (e.g. from ``symbolic_trace``) for eager training.

    With ``example_inputs`` the graph is shape-propagated (for dtypes and byte estimates) and, unless
    ``verify=False``, the rewritten forward is checked against the original. The decisions are those of
    the ``inner`` option (default: the backend's); nothing is compiled.
    """
    if not isinstance(gm, fx.GraphModule):
        raise TypeError(f"rewrite expects a torch.fx.GraphModule, got {type(gm).__name__}")
    opts = Options.parse(options)
    if example_inputs is not None:
        from torch.fx.passes.shape_prop import ShapeProp

        with torch.random.fork_rng():
            ShapeProp(gm).propagate(*example_inputs)
    return rewrite_graph(gm, example_inputs, opts)


def explain(model: nn.Module | Callable[..., Any], *args: Any, options: Mapping[str, Any] | None = None, **kwargs: Any) -> Report:
    """What ``torch.compile(model, backend="approxbp", options=options)`` does to ``model`` on these inputs,
    site for site: the same rewrite and verification, the inner compile skipped (one traced forward, no
    backward, no optimizer step); parameters, buffers and RNG state are left as they were."""
    opts = Options.parse(options)
    buffers = [(b, b.detach().clone()) for b in model.buffers()] if isinstance(model, nn.Module) else []
    report = Report()

    def backend(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> Callable[..., Any]:
        rewritten, graph_report = _prepare(gm, example_inputs, opts)
        report.extend(graph_report)
        return rewritten

    try:
        compiled = torch.compile(model, backend=backend, dynamic=False)
        with torch.random.fork_rng():
            compiled(*args, **kwargs)
    finally:
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)
    return report
