"""How many bytes a call keeps alive for backward."""

from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
from torch import Tensor, nn

__all__ = ["saved_activation_bytes", "saved_tensors"]


def _storage_key(t: Tensor) -> tuple[torch.device, int]:
    return t.device, t.untyped_storage().data_ptr()


def _excluded_storages(fn: Callable[..., Any], exclude: Iterable[Any] | None) -> set[tuple[torch.device, int]]:
    tensors: list[Tensor] = []
    for item in [fn, *(exclude or ())]:
        if isinstance(item, nn.Module):
            tensors += list(item.parameters()) + list(item.buffers())
        elif isinstance(item, Tensor):
            tensors.append(item)
        elif item is not fn:
            raise TypeError(f"exclude takes modules and tensors, got {type(item).__name__}")
    return {_storage_key(t) for t in tensors}


def saved_tensors(fn: Callable[..., Any], *args: Any, exclude: Iterable[Any] | None = None, **kwargs: Any) -> list[Tensor]:
    """The tensors one call ``fn(*args, **kwargs)`` saves for backward, one per storage.

    Parameters and buffers (of ``fn`` when it is a module, and of the modules in ``exclude``) and the
    tensors in ``exclude`` are left out. The call's output is dropped before returning.
    """
    skip = _excluded_storages(fn, exclude)
    seen: dict[tuple[torch.device, int], Tensor] = {}

    def pack(t: Tensor) -> Tensor:
        key = _storage_key(t)
        if key[1] != 0 and key not in skip and key not in seen:
            seen[key] = t
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(*args, **kwargs)
    del out
    return list(seen.values())


def saved_activation_bytes(fn: Callable[..., Any], *args: Any, exclude: Iterable[Any] | None = None, **kwargs: Any) -> int:
    """Bytes held for backward by one call ``fn(*args, **kwargs)``: unique storages, parameters excluded.

    Works for eager modules, functions and ``torch.compile``d models alike (compiled graphs save
    through the same autograd hooks). Storages are counted whole, once, however many views are saved.
    """
    return sum(t.untyped_storage().nbytes() for t in saved_tensors(fn, *args, exclude=exclude, **kwargs))
