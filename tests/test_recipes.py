"""The fine-tuning recipes people run on small GPUs, end to end on a tiny LLaMA (2 layers, hidden 128, MLP 512,
4 x 64 tokens, LoRA r = 8 on all seven projections), with the backend's default options:

* a bf16 checkpoint with PEFT's float32 adapters and no autocast: every adapted projection casts the bf16
  hidden state up to float32 before its adapter;
* QLoRA: the base model in 4-bit NF4 through bitsandbytes (on the CPU), the same float32 adapters.

References are plain autograd on the same model: the forward bit for bit (exact mode, eager inner), the
adapters' gradients to bf16 rounding (the model computes in bf16), and the bytes kept by the same-mode
baseline (eager for the eager inner, plain torch.compile for inductor).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import approxbp_fx

from architectures import bf16_lora_llama, loss_weight, qlora_llama, recipe_inputs
from models import BF16_EXACT_GRAD_TOL, assert_grads_close

EXACT = {"activations": False}


def _run(model: nn.Module, fn) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
    """Logits and the adapters' gradients of one step, and the bytes a second forward keeps."""
    model.zero_grad(set_to_none=True)
    out = fn(**recipe_inputs()).logits
    (out.float() * loss_weight(out.shape)).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out.detach(), grads, approxbp_fx.saved_activation_bytes(fn, exclude=[model], **recipe_inputs())


def _variants(model: nn.Module, inners: tuple[str, ...]) -> dict[str, tuple]:
    """{variant: (logits, grads, bytes)} for eager, plain torch.compile where an inner needs it, and the
    backend with default and exact options under each inner."""
    runs = {"eager": _run(model, model)}
    for inner in inners:
        if inner != "eager":
            plain = copy.deepcopy(model)
            runs["torch.compile"] = _run(plain, torch.compile(plain))
        for name, options in (("default", {}), ("exact", EXACT)):
            m = copy.deepcopy(model)
            runs[f"{inner} {name}"] = _run(m, approxbp_fx.compile(m, inner=inner, **options))
    return runs


def _ratio(runs: dict[str, tuple], variant: str, baseline: str) -> float:
    return runs[variant][2] / runs[baseline][2]


def _assert_eager_inner(runs: dict[str, tuple]) -> None:
    """At most 0.60 of eager's bytes (0.65 in exact mode); in exact mode the forward bit for bit eager's and
    the gradients equal plain autograd's to bf16 rounding."""
    assert _ratio(runs, "eager default", "eager") <= 0.60
    assert _ratio(runs, "eager exact", "eager") <= 0.65
    out, grads, _ = runs["eager exact"]
    ref_out, ref_grads, _ = runs["eager"]
    assert torch.equal(out, ref_out), "forward differs from eager"
    assert_grads_close(grads, ref_grads, BF16_EXACT_GRAD_TOL)


@pytest.fixture(scope="module")
def bf16_lora() -> dict[str, tuple]:
    return _variants(bf16_lora_llama(), ("eager", "inductor"))


def test_bf16_lora_eager_inner(bf16_lora):
    """Each norm's output is kept once in bf16 for every adapter's float32 cast of it, and o_proj's and
    down_proj's adapters keep their bf16 input: 0.926 of eager before (SiLU codes only), 1.01 in exact mode."""
    _assert_eager_inner(bf16_lora)


def test_bf16_lora_inductor_inner(bf16_lora):
    """Plain torch.compile recomputes the casts itself (0.71 of eager); the shared norm outputs still take the
    inductor inner well below it (0.54 measured; GLU gates are left to the compiler, which recomputes them)."""
    assert _ratio(bf16_lora, "inductor default", "torch.compile") <= 0.95
    assert _ratio(bf16_lora, "inductor exact", "torch.compile") <= 1.0
    assert_grads_close(bf16_lora["inductor exact"][1], bf16_lora["eager"][1], BF16_EXACT_GRAD_TOL)


@pytest.fixture(scope="module")
def qlora() -> dict[str, tuple]:
    pytest.importorskip("bitsandbytes")
    return _variants(qlora_llama(), ("eager",))


def test_qlora_eager_inner(qlora):
    """The 4-bit base layers keep nothing of their input, so each norm is shared by its adapters alone; the
    SiLU behind the quantized gate is found as anywhere else (1.00 of eager before: nothing was rewritten)."""
    _assert_eager_inner(qlora)
