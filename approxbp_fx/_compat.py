"""Every private torch API the package uses, in one place, each behind a feature probe.

torch's private modules change between releases without notice. Keeping them here means an upgrade is
checked in one file: each name below is either imported successfully or set to ``None`` with the
feature flag that says so, and the rest of the package asks the flag instead of failing with an
``AttributeError`` deep inside a compile. ``MIN_TORCH`` is the oldest release the test suite has run on.

Call targets such as ``torch._C._nn.linear`` are not imported here: they are what Dynamo writes into
graphs, so they live in the pattern tables that match them (each with a comment).
"""

from __future__ import annotations

import contextlib
import logging
import re
from typing import Any, Callable, Iterator

import torch

__all__ = [
    "MIN_TORCH", "TORCH_VERSION", "TORCH_RELEASE", "HAS_CUSTOM_PARTITIONER", "HAS_ANNOTATE", "HAS_FUSED_RMS_NORM",
    "is_fake", "unset_fake_temporarily", "get_proxy_mode", "DynamoError", "reset_dynamo", "tree_leaves", "tree_map",
    "is_mutable_op", "fused_rms_norm", "annotate", "CheckpointPolicy", "aot_eager", "compile_fx",
    "inductor_mode_options", "CustomPartitionerFn", "hash_files", "min_cut_partition", "dynamo_module_path",
    "version_tuple",
]

log = logging.getLogger("approxbp_fx")

#: The oldest torch release this package is tested on (also declared in pyproject.toml and the README).
MIN_TORCH = (2, 13)


def version_tuple(version: str) -> tuple[int, int]:
    """(major, minor) of a version string such as ``2.13.0+cpu``."""
    parts = re.findall(r"\d+", version)[:2]
    return int(parts[0]), int(parts[1])


#: the running torch's version string, and its (major, minor)
TORCH_RELEASE = torch.__version__
TORCH_VERSION = version_tuple(TORCH_RELEASE)

# --- fake tensors and tracing ------------------------------------------------------------------------
from torch._subclasses.fake_tensor import is_fake, unset_fake_temporarily  # noqa: E402
from torch.fx.experimental.proxy_tensor import get_proxy_mode  # noqa: E402

#: Base class of the errors a failed Dynamo compile raises.
DynamoError: type[Exception] = torch._dynamo.exc.TorchDynamoException


def reset_dynamo() -> None:
    """Forget every graph Dynamo compiled (a fresh start for a measurement)."""
    torch._dynamo.reset()


def tree_leaves(tree: Any) -> list[Any]:
    return torch.utils._pytree.tree_leaves(tree)


def tree_map(fn: Any, tree: Any) -> Any:
    return torch.utils._pytree.tree_map(fn, tree)


def is_mutable_op(target: Any) -> bool:
    """True for an aten/custom op overload whose schema says it writes to an argument."""
    return isinstance(target, torch._ops.OpOverload) and target._schema.is_mutable


# --- kernels -----------------------------------------------------------------------------------------
#: torch's grouped matmul (one matrix per group of rows, mixture-of-experts experts): private, and the
#: target Dynamo writes for it and for its public wrapper ``F.grouped_mm``; None where torch lacks it.
grouped_mm = getattr(torch, "_grouped_mm", None)
_fused_rms = getattr(torch.ops.aten, "_fused_rms_norm", None)
#: aten's fused RMSNorm forward that also returns rstd (torch >= 2.9).
HAS_FUSED_RMS_NORM = _fused_rms is not None


def fused_rms_norm(rows: torch.Tensor, d: int, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(y_hat, rstd) of RMSNorm without affine over the last dim of ``rows`` [n, d]."""
    if _fused_rms is None:
        raise RuntimeError("aten._fused_rms_norm is not available in this torch; check HAS_FUSED_RMS_NORM first")
    return _fused_rms(rows, [d], None, eps)


# --- region tags read by the steering partitioner ------------------------------------------------------
from torch.utils.checkpoint import CheckpointPolicy  # noqa: E402  (public)

try:  # documented as not backward compatible: probe it
    from torch.fx.traceback import annotate as _annotate

    HAS_ANNOTATE = True
except ImportError:  # pragma: no cover - older torch
    _annotate = None
    HAS_ANNOTATE = False


@contextlib.contextmanager
def annotate(tags: dict[str, str]) -> Iterator[None]:
    """Attach ``tags`` to ``node.meta["custom"]`` of every node traced inside the block (no-op without support)."""
    if _annotate is None:
        yield
        return
    with _annotate(tags):
        yield


# --- inner compilers -----------------------------------------------------------------------------------
def aot_eager(gm: torch.fx.GraphModule, example_inputs: Any) -> Callable[..., Any]:
    from torch._dynamo.backends.debugging import aot_eager as _aot_eager

    return _aot_eager(gm, example_inputs)


def compile_fx(gm: torch.fx.GraphModule, example_inputs: Any, config_patches: dict[str, Any]) -> Callable[..., Any]:
    from torch._inductor.compile_fx import compile_fx as _compile_fx

    return _compile_fx(gm, example_inputs, config_patches=config_patches)


def inductor_mode_options(mode: str | None) -> dict[str, Any]:
    """The inductor config a ``torch.compile(mode=...)`` stands for."""
    if not mode:
        return {}
    from torch._inductor import list_mode_options

    return dict(list_mode_options(mode))


try:
    from torch._functorch.partitioners import min_cut_rematerialization_partition as min_cut_partition
    from torch._inductor.custom_graph_pass import CustomPartitionerFn, get_hash_for_files

    import torch._inductor.config as _inductor_config

    #: inductor accepts a partitioner object (config ``custom_partitioner_fn``; torch >= 2.9).
    HAS_CUSTOM_PARTITIONER = hasattr(_inductor_config, "custom_partitioner_fn")
except ImportError:  # pragma: no cover - older torch
    min_cut_partition = None
    CustomPartitionerFn = object  # type: ignore[assignment,misc]
    get_hash_for_files = None
    HAS_CUSTOM_PARTITIONER = False


def hash_files(paths: tuple[str, ...]) -> bytes:
    return get_hash_for_files(paths)


# --- Dynamo's spelling of module paths ------------------------------------------------------------------
def dynamo_module_path(node: torch.fx.Node) -> str | None:
    """The user's module path of a node from Dynamo's ``nn_module_stack`` metadata, as the user writes it.

    Dynamo spells paths ``L['self'].encoder.layer[0]`` (``L['args'][0]. ...`` behind a wrapper, with
    ``__dict__['_modules']['x']`` for some containers)."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    path = list(stack.values())[-1][0]
    path = re.sub(r"^L\['\w+'\](\[\d+\])?\.?", "", path)
    path = re.sub(r"\.?__dict__\['_modules'\]\['([^']+)'\]", r".\1", path).lstrip(".")
    return path.replace("[", ".").replace("]", "").replace("'", "") or None
