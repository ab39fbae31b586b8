"""Train with the ``approxbp`` backend under Hugging Face ``Trainer`` (and Accelerate).

    from approxbp_fx.integrations.transformers import compile_for_trainer

    model = AutoModelForSequenceClassification.from_pretrained(...)
    compile_for_trainer(model, activations=True)          # in place; returns the same model
    trainer = Trainer(model=model, args=TrainingArguments(..., torch_compile=False), ...)
    trainer.train()
    trainer.save_model(out)                               # plain keys: from_pretrained(out) works

Why not the obvious routes (measured with transformers 5.x, accelerate 1.x):

- ``TrainingArguments(torch_compile=True, torch_compile_backend="approxbp")``: Accelerate's dynamo plugin
  checks the name against its own list of backends and rejects ``"approxbp"``.
- ``Trainer(model=torch.compile(model, backend="approxbp"))``: the wrapper (``OptimizedModule``) has a
  ``(*args, **kwargs)`` forward, so Trainer's unused-column filter finds no argument names and drops every
  column; and its state dict keys carry an ``_orig_mod.`` prefix.

``nn.Module.compile`` compiles the module's ``__call__`` in place instead: the object Trainer sees is still the
``PreTrainedModel`` with its own ``forward`` signature, its ``state_dict`` keys, its ``save_pretrained`` and its
``config``, so the column filter, checkpointing, ``from_pretrained`` and PEFT all behave as without compilation.
Leave ``torch_compile`` off in ``TrainingArguments`` (Trainer would otherwise compile a second time).

Evaluation and prediction call the same compiled module under ``torch.no_grad()``; the rewrite only changes
what backward keeps, so their outputs are unchanged (within the usual compile tolerance). Dynamo recompiles
for a new input shape (e.g. the last, smaller batch): pass ``dataloader_drop_last=True`` to avoid it, or
``dynamic=True`` here.

Under DistributedDataParallel (``torchrun`` + Trainer: Accelerate wraps the in-place compiled module in DDP),
Dynamo's DDPOptimizer splits the graph at the gradient buckets and calls the backend once per piece, with fake
example inputs: pass ``verify=False`` there for now (verification needs real values; see
tests/test_distributed.py).
"""

from __future__ import annotations

from typing import Any, TypeVar

from torch import nn

from .. import Options

__all__ = ["compile_for_trainer", "is_compiled_for_trainer"]

M = TypeVar("M", bound=nn.Module)


def compile_for_trainer(model: M, *, dynamic: bool | None = None, **options: Any) -> M:
    """Compile ``model`` in place with ``backend="approxbp"`` and return it (the same object).

    ``options`` are the backend's (``activations``, ``norms``, ``inner``, ``verify``; see
    :class:`approxbp_fx.Options`), checked here so a typo fails before training starts. ``dynamic`` is passed
    to ``torch.compile``. Calling it again recompiles with the new options.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"compile_for_trainer expects an nn.Module, got {type(model).__name__}")
    if hasattr(model, "_orig_mod"):
        raise TypeError(
            "compile_for_trainer expects the plain model, not a torch.compile wrapper: pass model._orig_mod"
        )
    Options.parse(options)
    model.compile(backend="approxbp", options=options or None, dynamic=dynamic)
    return model


def is_compiled_for_trainer(model: nn.Module) -> bool:
    """Whether ``model`` has an in-place compiled ``__call__`` (``nn.Module.compile``)."""
    return getattr(model, "_compiled_call_impl", None) is not None
