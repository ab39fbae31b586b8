"""The architectures people fine-tune, with LoRA and mixed precision, without patching.

Tiny HF models built from configs (tests/architectures.py: 2 layers, hidden 128, MLP 512, 4 heads, 4 x 32
tokens, random weights, randomized norm affines): GPT-2 LM head (Conv1D, gelu_new), LLaMA, Mistral, Qwen2
(decomposed RMSNorm, SwiGLU), Gemma (1 + weight RMSNorm, tanh-GELU GeGLU), RoBERTa and BERT sequence
classification, ViT image classification; PEFT LoRA (r = 8, lora_B non-zero) on q/v and on all linear layers
around ViT and LLaMA; bf16 autocast; a LLaMA cast to bf16.

For each configuration: the forward against plain eager, exact-mode gradients (``activations=False``)
against plain autograd, approximate-mode gradients against plain eager with every GELU/SiLU module's backward
replaced by the paper's step derivative (``architectures.with_step_activations``), and the bytes saved for
backward against the same-mode baseline (plain eager for the eager inner, plain ``torch.compile`` for the
inductor inner) with the thresholds we hold them to.

CI time: every configuration is compiled once per module (``Runs`` caches output, gradients and bytes) and
the tests only compare cached numbers. Every model runs under the eager inner; the inductor inner (a cold
inductor compile of the model, its exact-mode twin and plain torch.compile: ~1 min per model on 2 cores)
runs on GPT-2, LLaMA, Gemma, RoBERTa, LoRA(q, v) ViT, LoRA(q, v) LLaMA and the bf16 autocast rows, the ones
with an inductor number in the acceptance list. Mistral and Qwen2 share LLaMA's code path (decomposed
RMSNorm, SwiGLU) and BERT shares RoBERTa's; their inductor behaviour is that of LLaMA and RoBERTa.
"""

from __future__ import annotations

import pytest

from architectures import MODELS, Runs, assert_forward_matches_eager
from models import BF16_EXACT_GRAD_TOL, assert_grads_close, grad_errors, rel_l2

FORWARD_TOL = {"eager": 1e-5, "inductor": 1e-4}
EXACT_GRAD_TOL = 1e-4
STEP_GRAD_TOL = 5e-3
BF16_FORWARD_TOL = 2e-2

# saved-bytes ratio vs the same-mode baseline, (eager inner, inductor inner); None: that inner is not run
FP32_RATIO = {
    "gpt2": (0.45, 0.75),
    "llama": (0.72, 0.95),
    "mistral": (0.72, None),
    "qwen2": (0.72, None),
    "gemma": (0.72, 0.95),
    "roberta": (0.70, 0.75),
    "bert": (0.70, None),
    "vit": (0.70, None),
    "lora_vit": (0.70, 0.70),
    "lora_llama": (0.85, 1.00),
}
# LoRA on every linear layer: no threshold of its own; the savings must still show (eager inner only)
LORA_ALL_RATIO = {"lora_all_vit": 0.80, "lora_all_llama": 0.90}
AUTOCAST_RATIO = {"vit": (0.76, 1.00), "llama": (0.80, 1.00)}

FP32_RUNS = [(name, inner) for name, limits in FP32_RATIO.items() for inner, limit in zip(("eager", "inductor"), limits)
             if limit is not None]
INDUCTOR_MODELS = [name for name, inner in FP32_RUNS if inner == "inductor"]
# SwiGLU/GeGLU MLPs: their gates are left exact under the inductor inner
GATED_MODELS = {"llama", "mistral", "qwen2", "gemma", "lora_llama", "lora_all_llama"}
AUTOCAST_RUNS = [(name, inner) for name in AUTOCAST_RATIO for inner in ("eager", "inductor")]


@pytest.fixture(scope="module")
def runs() -> Runs:
    return Runs()


def test_every_model_is_covered() -> None:
    assert set(FP32_RATIO) | set(LORA_ALL_RATIO) == set(MODELS)


# --- fp32 -----------------------------------------------------------------------------------------

fp32_runs = pytest.mark.parametrize(("name", "inner"), FP32_RUNS)


@fp32_runs
def test_forward_matches_eager(runs: Runs, name: str, inner: str) -> None:
    assert_forward_matches_eager(runs, name, inner, FORWARD_TOL[inner])


@fp32_runs
def test_gradients_exact_without_activations(runs: Runs, name: str, inner: str) -> None:
    assert_grads_close(runs.get(name, "approxbp_exact", inner).grads, runs.get(name, "eager").grads, EXACT_GRAD_TOL)


@fp32_runs
def test_gradients_match_step_reference(runs: Runs, name: str, inner: str) -> None:
    """Under inductor, GLU gates (SwiGLU/GeGLU) stay exact: the rewrite saves nothing there (the
    backend's per-mode decision), so those models' reference is plain autograd."""
    gated = name in GATED_MODELS and inner == "inductor"
    reference = runs.get(name, "eager") if gated else runs.get(name, "step")
    assert_grads_close(runs.get(name, "approxbp", inner).grads, reference.grads, EXACT_GRAD_TOL if gated else STEP_GRAD_TOL)


@pytest.mark.parametrize("name", list(FP32_RATIO))
def test_step_reference_is_not_exact(runs: Runs, name: str) -> None:
    """Guards the test above: the step derivative moves some gradient far beyond its tolerance."""
    errors = grad_errors(runs.get(name, "step").grads, runs.get(name, "eager").grads)
    assert max(errors.values()) > 10 * STEP_GRAD_TOL


@fp32_runs
def test_saved_bytes_ratio(runs: Runs, name: str, inner: str) -> None:
    limit = FP32_RATIO[name][inner == "inductor"]
    ours, baseline = runs.get(name, "approxbp", inner).saved_bytes, runs.baseline(name, inner).saved_bytes
    assert ours <= limit * baseline, f"{ours} / {baseline} = {ours / baseline:.3f} > {limit}"


@pytest.mark.parametrize("name", INDUCTOR_MODELS)
def test_inductor_never_more_than_torch_compile(runs: Runs, name: str) -> None:
    baseline = runs.get(name, "torch.compile").saved_bytes
    for variant in ("approxbp", "approxbp_exact"):
        ours = runs.get(name, variant, "inductor").saved_bytes
        assert ours <= baseline, f"{variant}: {ours} > torch.compile's {baseline}"


# --- LoRA on all linear layers (eager inner) ------------------------------------------------------

lora_all = pytest.mark.parametrize("name", list(LORA_ALL_RATIO))


@lora_all
def test_lora_all_linear(runs: Runs, name: str) -> None:
    eager = runs.get(name, "eager")
    err = rel_l2(runs.get(name, "approxbp", "eager").out, eager.out)
    assert err <= FORWARD_TOL["eager"], f"forward relative L2 {err:.2e}"
    assert_grads_close(runs.get(name, "approxbp_exact", "eager").grads, eager.grads, EXACT_GRAD_TOL)
    assert_grads_close(runs.get(name, "approxbp", "eager").grads, runs.get(name, "step").grads, STEP_GRAD_TOL)
    ratio = runs.ratio(name, "eager")
    assert ratio <= LORA_ALL_RATIO[name], f"saved-bytes ratio {ratio:.3f}"


@lora_all
def test_lora_trains_only_adapters(runs: Runs, name: str) -> None:
    """The gradients compared above are the adapters' (and A's is not trivially zero: lora_B is non-zero)."""
    grads = runs.get(name, "approxbp", "eager").grads
    trained = {n for n, g in grads.items() if g is not None}
    assert trained and all("lora_" in n for n in trained)
    assert all(grads[n].abs().max() > 0 for n in trained if "lora_A" in n)


# --- bf16 autocast --------------------------------------------------------------------------------

autocast_runs = pytest.mark.parametrize(("name", "inner"), AUTOCAST_RUNS)


@autocast_runs
def test_autocast_forward(runs: Runs, name: str, inner: str) -> None:
    expected = runs.get(name, "eager", precision="autocast").out
    err = rel_l2(runs.get(name, "approxbp", inner, "autocast").out, expected)
    assert err <= BF16_FORWARD_TOL, f"forward relative L2 {err:.2e} against plain autocast eager"


@autocast_runs
def test_autocast_gradients_exact_without_activations(runs: Runs, name: str, inner: str) -> None:
    assert_grads_close(runs.get(name, "approxbp_exact", inner, "autocast").grads,
                       runs.get(name, "eager", precision="autocast").grads, BF16_EXACT_GRAD_TOL)


@autocast_runs
def test_autocast_saved_bytes_ratio(runs: Runs, name: str, inner: str) -> None:
    limit = AUTOCAST_RATIO[name][inner == "inductor"]
    ours = runs.get(name, "approxbp", inner, "autocast").saved_bytes
    baseline = runs.baseline(name, inner, "autocast").saved_bytes
    assert ours <= limit * baseline, f"{ours} / {baseline} = {ours / baseline:.3f} > {limit}"
    if inner == "inductor":
        assert ours <= baseline, "more bytes than plain torch.compile"


def test_autocast_keeps_bf16_tensors(runs: Runs) -> None:
    """Under autocast the linears keep bf16 copies: the baseline keeps fewer bytes than in fp32, and so do we
    (the shared tensor is the one actually kept)."""
    for name in AUTOCAST_RATIO:
        assert runs.get(name, "eager", precision="autocast").saved_bytes < runs.get(name, "eager").saved_bytes
        assert (runs.get(name, "approxbp", "eager", "autocast").saved_bytes
                < runs.get(name, "approxbp", "eager").saved_bytes)


# --- a model cast to bf16 -------------------------------------------------------------------------


def test_bf16_model(runs: Runs) -> None:
    eager = runs.get("llama", "eager", precision="bf16")
    ours = runs.get("llama", "approxbp", "eager", "bf16")
    err = rel_l2(ours.out, eager.out)
    assert err <= BF16_FORWARD_TOL, f"forward relative L2 {err:.2e} against the plain bf16 model"
    assert ours.saved_bytes < eager.saved_bytes, f"{ours.saved_bytes} >= {eager.saved_bytes}"
    assert_grads_close(runs.get("llama", "approxbp_exact", "eager", "bf16").grads, eager.grads, BF16_EXACT_GRAD_TOL)
