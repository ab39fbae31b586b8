"""The inductor inner: keep the ops' saved set without making them opaque to the compiler.

Opaque custom ops pin what AOTAutograd saves, but inductor cannot fuse across them (measured: 1.13-1.24x
the step time of plain torch.compile on a small pre-LN transformer). For inductor the ops are therefore
lowered to their traceable forms (``ops/spec.py``), whose forwards tag their values; the partitioner
below turns the tags into recompute policies before torch's min-cut partitioner runs:

    before (after the rewrite):  z, y_hat, r = approxbp::norm_shared(x, ...)          (opaque)
    after:                       z, y_hat, r = norm_shared_traced(x, ..., "norm_shared_3")   (traced, tagged)
                                 y_hat, r: MUST_SAVE   (values leaving region "saved:norm_shared_3")
                                 z:        PREFER_RECOMPUTE (rebuilt from y_hat in backward)

Without the tags the partitioner merges the backward's rebuilt z with the forward's z and saves z as
well as y_hat (the whole MS-BP saving lost). The 2-bit code needs no tag to be kept (it is 16x smaller
than its input, the partitioner's reduction rule keeps it) but gets one anyway so nothing depends on
that heuristic. Region names come from the graph's node names, so tags never depend on what else the
process compiled.

On a torch without inductor's custom-partitioner hook the ops stay opaque under inductor (correct
savings, less fusion) and a warning names the version.
"""

from __future__ import annotations

import pathlib
import warnings
from typing import Any, Callable, Sequence

import torch.fx as fx

from .. import _compat
from ..ops.spec import RECOMPUTE, TAG, traceable_forms

__all__ = ["lower_to_traceable", "SteeringPartitioner", "compile_with_steering"]

_PACKAGE = pathlib.Path(__file__).resolve().parents[1]
# Every tagged node is marked as part of one activation-checkpoint graph, as torch's selective
# checkpointing marks a region: with several ids, the partitioner's clean-up would force-save values
# flowing from one op's rebuilt region into the next op's (e.g. z into a linear's autocast cast).
_AC_GRAPH_ID = 1


def lower_to_traceable(gm: fx.GraphModule) -> fx.GraphModule:
    """Swap the approxbp custom-op calls for their traceable, tagged forms (in place); each call gets its
    node's name as the region it tags."""
    forms = traceable_forms()
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target in forms:
            n.target = forms[n.target]
            n.args = (*n.args, n.name)
    gm.recompile()
    return gm


def _tag(n: fx.Node) -> str | None:
    custom = n.meta.get("custom")
    return custom.get(TAG) if isinstance(custom, dict) else None


class SteeringPartitioner(_compat.CustomPartitionerFn):
    """min-cut partitioning after turning the forwards' tags into recompute policies."""

    def __call__(self, gm: fx.GraphModule, joint_inputs: Any, **kwargs: Any):
        policy = _compat.CheckpointPolicy
        for n in gm.graph.nodes:
            tag = _tag(n)
            if n.op != "call_function" or tag is None:
                continue
            if tag == RECOMPUTE:
                n.meta["recompute"] = policy.PREFER_RECOMPUTE
            elif any(_tag(u) != tag for u in n.users):  # a value leaving its region: what backward keeps
                n.meta["recompute"] = policy.MUST_SAVE
            else:
                continue
            n.meta["ac_graph_id"] = _AC_GRAPH_ID
        return _compat.min_cut_partition(gm, joint_inputs, **kwargs)

    def uuid(self) -> bytes:
        # Part of inductor's cache key: hash every source of the package, since the ops' backward
        # code (not only this file) decides what a compiled graph computes.
        return _compat.hash_files(tuple(str(p) for p in sorted(_PACKAGE.rglob("*.py"))))


def compile_with_steering(gm: fx.GraphModule, example_inputs: Sequence[Any], mode: str | None) -> Callable[..., Any]:
    """compile_fx on the lowered graph with the steering partitioner (opaque ops where torch lacks the hook)."""
    patches = _compat.inductor_mode_options(mode)
    if not (_compat.HAS_CUSTOM_PARTITIONER and _compat.HAS_ANNOTATE):
        warnings.warn(
            f"approxbp: torch {_compat.TORCH_RELEASE} has no custom partitioner hook for inductor (needs torch >= "
            f"{'.'.join(map(str, _compat.MIN_TORCH))}); the rewritten ops stay opaque under inductor: same "
            "savings, less fusion", RuntimeWarning, stacklevel=2)
        return _compat.compile_fx(gm, example_inputs, patches)
    patches["custom_partitioner_fn"] = SteeringPartitioner()
    return _compat.compile_fx(lower_to_traceable(gm), example_inputs, patches)
