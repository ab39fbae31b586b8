"""The ``approxbp`` torch.compile backend: rewrite, verify, then compile with the chosen inner compiler.

    torch.compile(model, backend="approxbp", options={"activations": False})
    approxbp_fx.compile(model, inner="eager")
"""

from __future__ import annotations

import logging
import warnings
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.fx as fx
from torch import Tensor, nn
from torch._subclasses.fake_tensor import is_fake

from .options import INNERS, Options
from .passes import run_passes
from .report import Report, Site

__all__ = ["Options", "approxbp_backend", "compile", "rewrite", "explain", "INNERS"]

log = logging.getLogger("approxbp_fx")

# explain() collects the reports of the graphs it compiles here
_collectors: list[Report] = []

_TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}


def _flat_tensors(out: Any) -> list[Tensor]:
    return [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, Tensor)]


def _mismatch(expected: Any, actual: Any) -> str | None:
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
    with torch._subclasses.fake_tensor.unset_fake_temporarily():
        if t.is_floating_point():
            out = torch.rand(shape, dtype=t.dtype, device=t.device)
        else:
            out = torch.zeros(shape, dtype=t.dtype, device=t.device)
    return nn.Parameter(out, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else out


def _concrete(a: Any) -> Any:
    """A copy of a non-parameter tensor input; the hint of a symbolic size (dynamic-shape recompiles)."""
    if isinstance(a, Tensor) and is_fake(a):
        return _synthetic(a)
    if isinstance(a, nn.Parameter):
        return a
    if isinstance(a, Tensor):
        return a.detach().clone()
    if isinstance(a, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        return a.node.hint
    return a


def _run_isolated(gm: Callable[..., Any], example_inputs: Sequence[Any]) -> Any:
    """Run a graph without side effects: RNG restored, inputs other than parameters copied first
    (BatchNorm running statistics and in-place updated inputs stay as they were)."""
    inputs = [_concrete(t) for t in example_inputs]
    devices = [t.device for t in inputs if isinstance(t, Tensor) and t.device.type == "cuda"]
    with torch.random.fork_rng(devices=sorted({d.index or 0 for d in devices})), torch.no_grad():
        return gm(*inputs)


def _verified_rewrite(gm: fx.GraphModule, example_inputs: Sequence[Any], opts: Options) -> tuple[fx.GraphModule, list[Site]]:
    rewritten, sites = run_passes(gm, opts)
    if not opts.verify or not any(s.rewritten for s in sites):
        return rewritten, sites
    if any(isinstance(t, Tensor) and is_fake(t) for t in example_inputs):
        example_inputs = [_concrete(t) for t in example_inputs]  # the same synthetic data for both runs
    try:
        expected = _run_isolated(gm, example_inputs)
    except Exception as exc:  # the original graph itself cannot run on these inputs: nothing to compare
        log.warning("approxbp: forward not verified (the original graph failed on the example inputs: %s)", exc)
        return rewritten, sites

    def problem_of(graph: fx.GraphModule) -> str | None:
        try:
            return _mismatch(expected, _run_isolated(graph, example_inputs))
        except Exception as exc:
            return f"the rewritten graph raised {type(exc).__name__}: {exc}"

    problem = problem_of(rewritten)
    if problem is None:
        return rewritten, sites
    # Find the offending rewrites one by one, keep the others.
    ids = [s.id for s in sites if s.rewritten]
    bad: dict[str, str] = {}
    for sid in ids:
        alone, _ = run_passes(gm, opts, {o: "not under test" for o in ids if o != sid})
        err = problem_of(alone)
        if err is not None:
            bad[sid] = f"forward mismatch in verification ({err})"
    rewritten, sites = run_passes(gm, opts, bad)
    if not bad or problem_of(rewritten) is not None:  # only a combination fails: keep nothing rather than guess
        bad = {sid: bad.get(sid, f"forward mismatch in verification ({problem})") for sid in ids}
        rewritten, sites = run_passes(gm, opts, bad)
    for s in sites:
        if s.id in bad:
            warnings.warn(f"approxbp: left {s.path} ({s.pattern}) unrewritten: {s.reason}", RuntimeWarning, stacklevel=2)
            log.warning("approxbp: left %s (%s) unrewritten: %s", s.path, s.pattern, s.reason)
    return rewritten, sites


def _compile_inner(gm: fx.GraphModule, example_inputs: Sequence[Any], opts: Options, mode: str | None) -> Callable[..., Any]:
    if opts.inner == "eager":
        return gm
    if opts.inner == "aot_eager":
        from torch._dynamo.backends.debugging import aot_eager

        return aot_eager(gm, example_inputs)
    from torch._inductor import list_mode_options
    from torch._inductor.compile_fx import compile_fx

    from .passes.steer_partitioner import SteeringPartitioner, lower_to_traceable

    patches = dict(list_mode_options(mode) if mode else {})
    patches["custom_partitioner_fn"] = SteeringPartitioner()
    return compile_fx(lower_to_traceable(gm), example_inputs, config_patches=patches)


def approxbp_backend(gm: fx.GraphModule, example_inputs: Sequence[Any], *, options: Mapping[str, Any] | None = None,
                     mode: str | None = None) -> Callable[..., Any]:
    """Dynamo backend (registered as ``"approxbp"``): see the module and ``Options`` docstrings."""
    opts = Options.parse(options)
    rewritten, sites = _verified_rewrite(gm, example_inputs, opts)
    report = Report(sites, [(gm, rewritten)])
    if log.isEnabledFor(logging.INFO):
        log.info("approxbp: graph with %d nodes\n%s", len(gm.graph.nodes), report)
    for collector in _collectors:
        collector.extend(report)
    return _compile_inner(rewritten, example_inputs, opts, mode)


def compile(model: Callable[..., Any], **options: Any) -> Callable[..., Any]:
    """``torch.compile(model, backend="approxbp", options=options)``, with the options checked now."""
    Options.parse(options)
    return torch.compile(model, backend="approxbp", options=options or None)


def rewrite(gm: fx.GraphModule, example_inputs: Sequence[Any] | None = None, **options: Any) -> tuple[fx.GraphModule, Report]:
    """Apply the passes to a ``torch.fx`` GraphModule (e.g. from ``symbolic_trace``) for eager training.

    With ``example_inputs`` the graph is shape-propagated (for dtypes and byte estimates) and, unless
    ``verify=False``, the rewritten forward is checked against the original. ``inner`` is ignored.
    """
    if not isinstance(gm, fx.GraphModule):
        raise TypeError(f"rewrite expects a torch.fx.GraphModule, got {type(gm).__name__}")
    opts = Options.parse(options)
    if example_inputs is not None:
        from torch.fx.passes.shape_prop import ShapeProp

        with torch.random.fork_rng():
            ShapeProp(gm).propagate(*example_inputs)
        rewritten, sites = _verified_rewrite(gm, example_inputs, opts)
    else:
        rewritten, sites = run_passes(gm, opts)
    return rewritten, Report(sites, [(gm, rewritten)])


def explain(model: nn.Module | Callable[..., Any], *args: Any, options: Mapping[str, Any] | None = None, **kwargs: Any) -> Report:
    """What the backend does to ``model`` on these inputs: one traced forward, no backward, no optimizer
    step; parameters, buffers and RNG state are left as they were."""
    opts = dict(options or {})
    opts.setdefault("inner", "eager")  # the rewrite decisions are the same; skip the inductor compile
    Options.parse(opts)
    buffers = [(b, b.detach().clone()) for b in model.buffers()] if isinstance(model, nn.Module) else []
    report = Report()
    _collectors.append(report)
    try:
        compiled = torch.compile(model, backend=approxbp_backend_with(opts), dynamic=False)
        with torch.random.fork_rng():
            compiled(*args, **kwargs)
    finally:
        _collectors.remove(report)
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)
    return report


def approxbp_backend_with(options: Mapping[str, Any]) -> Callable[..., Any]:
    """The backend with fixed options, as a callable for ``torch.compile(backend=...)``."""

    def backend(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> Callable[..., Any]:
        return approxbp_backend(gm, example_inputs, options=options)

    return backend
