"""Tiny HF models of the architectures people fine-tune, and the step-derivative reference.

Every builder returns an fp32 model in train mode built from a config (random weights, seeded): 2 layers,
hidden 128, MLP 512, 4 heads, vocab 100, dropout 0, and every norm's affine randomized (gamma ~ U(0.5, 1.5),
beta ~ U(-0.5, 0.5)) for every module whose class name contains "norm": with gamma = 1 and beta = 0 a
folding bug would hide. Inputs are 4 x 32 tokens (ViT: 4 images of 8 x 8 patches).

Used by tests/test_architectures.py and benchmarks/coverage_table.py.
"""

from __future__ import annotations

import copy
from typing import Callable

import torch
from torch import Tensor, nn

import approxbp_fx

from models import (  # noqa: F401  (rel_l2, grad_errors: re-exported for the tests and benchmarks/coverage_table.py)
    BATCH, GELU_STEP, HEADS, HIDDEN, LAYERS, MLP, SILU_STEP, TOKENS, VOCAB, grad_errors, rel_l2,
    assert_grads_close, swap_activations, tiny_bert, tiny_vit, vit_inputs,
)

def randomize_norms(model: nn.Module, seed: int = 1) -> nn.Module:
    """gamma ~ U(0.5, 1.5), beta ~ U(-0.5, 0.5) for every module whose class name contains "norm"."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if "norm" not in type(m).__name__.lower():
                continue
            weight, bias = getattr(m, "weight", None), getattr(m, "bias", None)
            if isinstance(weight, Tensor):
                weight.copy_(torch.rand(weight.shape, generator=g) + 0.5)
            if isinstance(bias, Tensor):
                bias.copy_(torch.rand(bias.shape, generator=g) - 0.5)
    return model


def _finish(model: nn.Module, seed: int) -> nn.Module:
    return randomize_norms(model.float().train(), seed + 1)


def gpt2(seed: int = 0) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=VOCAB, n_positions=64, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_inner=MLP,
        activation_function="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False,
        bos_token_id=0, eos_token_id=0,
    )
    return _finish(GPT2LMHeadModel(config), seed)


def _decoder_config(config_cls, **extra):
    return config_cls(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=MLP, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=HEADS, max_position_embeddings=64,
        attention_dropout=0.0, use_cache=False, **extra,
    )


def llama(seed: int = 0) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return _finish(LlamaForCausalLM(_decoder_config(LlamaConfig)), seed)


def mistral(seed: int = 0) -> nn.Module:
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(seed)
    return _finish(MistralForCausalLM(_decoder_config(MistralConfig, head_dim=HIDDEN // HEADS)), seed)


def qwen2(seed: int = 0) -> nn.Module:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    return _finish(Qwen2ForCausalLM(_decoder_config(Qwen2Config)), seed)


def mixtral(seed: int = 0, experts_implementation: str | None = None) -> nn.Module:
    """A mixture-of-experts decoder (4 experts, top-2): the post-attention norm feeds the router linear and
    every expert's gathered rows. ``experts_implementation``: transformers' choice (None: its default,
    the grouped matmul), or e.g. "eager" (one F.linear per expert on ``hidden[token_idx]``)."""
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(seed)
    config = _decoder_config(MixtralConfig, num_local_experts=4, num_experts_per_tok=2)
    if experts_implementation is not None:
        config._experts_implementation = experts_implementation
    return _finish(MixtralForCausalLM(config), seed)


def gemma(seed: int = 0) -> nn.Module:
    from transformers import GemmaConfig, GemmaForCausalLM

    torch.manual_seed(seed)
    config = _decoder_config(GemmaConfig, head_dim=HIDDEN // HEADS, hidden_activation="gelu_pytorch_tanh")
    return _finish(GemmaForCausalLM(config), seed)


def roberta(seed: int = 0) -> nn.Module:
    from transformers import RobertaConfig, RobertaForSequenceClassification

    torch.manual_seed(seed)
    config = RobertaConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
        intermediate_size=MLP, max_position_embeddings=TOKENS + 2 + 30, num_labels=3,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    return _finish(RobertaForSequenceClassification(config), seed)


def bert(seed: int = 0) -> nn.Module:
    return _finish(tiny_bert(seed), seed)


def vit(seed: int = 0) -> nn.Module:
    return _finish(tiny_vit(seed), seed)


def _t5(seed: int, feed_forward_proj: str) -> nn.Module:
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=VOCAB, d_model=HIDDEN, d_kv=HIDDEN // HEADS, d_ff=MLP, num_layers=LAYERS, num_heads=HEADS,
        dropout_rate=0.0, feed_forward_proj=feed_forward_proj, decoder_start_token_id=0, pad_token_id=0,
        eos_token_id=1, use_cache=False,
    )
    return _finish(T5ForConditionalGeneration(config), seed)


def t5(seed: int = 0) -> nn.Module:
    """T5 (encoder-decoder, ReLU feed-forward): its ``T5LayerNorm`` is an RMSNorm written out, multiplying
    the uncast input. Call with ``t5_inputs``."""
    return _t5(seed, "relu")


def flan_t5(seed: int = 0) -> nn.Module:
    """Flan-T5: T5 with a gated-GELU feed-forward. Call with ``t5_inputs``."""
    return _t5(seed, "gated-gelu")


def t5_inputs(seed: int = 0) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(3, VOCAB, (BATCH, TOKENS), generator=g),
            "decoder_input_ids": torch.randint(3, VOCAB, (BATCH, TOKENS), generator=g)}


class HandLayerNorm(nn.Module):
    """LayerNorm written out as some LLM code bases do: in fp32 (mean, subtract, variance, rsqrt), weight
    only, cast back to the input's dtype."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        h = x.float()
        mean = h.mean(-1, keepdim=True)
        var = (h - mean).pow(2).mean(-1, keepdim=True)
        return (self.weight * ((h - mean) * torch.rsqrt(var + self.eps))).to(x.dtype)


class _Block(nn.Module):
    def __init__(self, norm: Callable[[int], nn.Module]) -> None:
        super().__init__()
        self.norm1, self.qkv, self.proj = norm(HIDDEN), nn.Linear(HIDDEN, 3 * HIDDEN), nn.Linear(HIDDEN, HIDDEN)
        self.norm2, self.fc1, self.fc2 = norm(HIDDEN), nn.Linear(HIDDEN, MLP), nn.Linear(MLP, HIDDEN)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, HEADS, d // HEADS).permute(2, 0, 3, 1, 4)
        a = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(nn.functional.gelu(self.fc1(self.norm2(x))))


class TinyDecoder(nn.Module):
    """A pre-norm decoder (embedding, LAYERS blocks, final norm, head) whose norms ``norm(dim)`` makes."""

    def __init__(self, norm: Callable[[int], nn.Module]) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, HIDDEN)
        self.blocks = nn.ModuleList(_Block(norm) for _ in range(LAYERS))
        self.norm, self.head = norm(HIDDEN), nn.Linear(HIDDEN, VOCAB)

    def forward(self, input_ids: Tensor) -> Tensor:
        x = self.embed(input_ids)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def hand_layernorm_decoder(seed: int = 0) -> nn.Module:
    """``TinyDecoder`` with ``HandLayerNorm``s; same seed, same weights as ``layernorm_decoder``."""
    torch.manual_seed(seed)
    return _finish(TinyDecoder(HandLayerNorm), seed)


def layernorm_decoder(seed: int = 0) -> nn.Module:
    """``TinyDecoder`` with ``nn.LayerNorm(bias=False)``: the reference for ``hand_layernorm_decoder``."""
    torch.manual_seed(seed)
    return _finish(TinyDecoder(lambda d: nn.LayerNorm(d, bias=False)), seed)


def token_inputs(seed: int = 0) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(seed)
    # ids from 3 up: RoBERTa's padding index is 1, and a padding token would change its position ids
    return {"input_ids": torch.randint(3, VOCAB, (BATCH, TOKENS), generator=g)}


def with_lora(model: nn.Module, target_modules, seed: int = 2, dropout: float = 0.0) -> nn.Module:
    """PEFT LoRA (r = 8, ``lora_dropout=dropout``) with lora_B ~ N(0, 0.02^2): at zero, A's gradient would be
    trivially zero."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=8, lora_alpha=16, lora_dropout=dropout, target_modules=target_modules)
    peft_model = get_peft_model(model, config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return peft_model


QV = ["q_proj", "v_proj"]
ALL_LINEAR = "all-linear"
RECIPE_TOKENS = 64  # the real-recipe models are measured at 4 x 64 tokens


def bf16_lora_llama(seed: int = 0) -> nn.Module:
    """A bf16 LLaMA (a bf16 checkpoint) with PEFT LoRA on all linears, the adapters in float32 as PEFT keeps
    them: each adapted projection casts its bf16 input up. Run without autocast."""
    model = with_lora(llama(seed).to(torch.bfloat16), ALL_LINEAR)
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if "lora_" in n)
    return model


def qlora_llama(seed: int = 0) -> nn.Module:
    """QLoRA: the LLaMA's linears loaded in 4-bit NF4 through bitsandbytes (on the CPU), everything else in
    bf16, PEFT LoRA on all linears in float32. Needs bitsandbytes."""
    import tempfile

    from transformers import BitsAndBytesConfig, LlamaForCausalLM

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
    with tempfile.TemporaryDirectory() as checkpoint:
        llama(seed).save_pretrained(checkpoint)
        base = LlamaForCausalLM.from_pretrained(checkpoint, quantization_config=config, dtype=torch.bfloat16,
                                                device_map="cpu")
    return with_lora(base, ALL_LINEAR).train()


def recipe_inputs(seed: int = 0) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(3, VOCAB, (BATCH, RECIPE_TOKENS), generator=g)}


# The recipes people run on small GPUs, measured as built (precision "fp32": no conversion)
RECIPES: dict[str, tuple[Callable[[], nn.Module], Callable[[], dict[str, Tensor]]]] = {
    "bf16_lora_llama": (bf16_lora_llama, recipe_inputs),
    "qlora_llama": (qlora_llama, recipe_inputs),
}

# name -> (builder, inputs)
MODELS: dict[str, tuple[Callable[[], nn.Module], Callable[[], dict[str, Tensor]]]] = {
    "gpt2": (gpt2, token_inputs),
    "llama": (llama, token_inputs),
    "mistral": (mistral, token_inputs),
    "qwen2": (qwen2, token_inputs),
    "gemma": (gemma, token_inputs),
    "roberta": (roberta, token_inputs),
    "bert": (bert, token_inputs),
    "vit": (vit, vit_inputs),
    "lora_vit": (lambda: with_lora(vit(), QV), vit_inputs),
    "lora_llama": (lambda: with_lora(llama(), QV), token_inputs),
    "lora_all_vit": (lambda: with_lora(vit(), ALL_LINEAR), vit_inputs),
    "lora_all_llama": (lambda: with_lora(llama(), ALL_LINEAR), token_inputs),
}


# --- the step-derivative reference (tests/models.py) ---------------------------------------------


def _step_classes() -> dict[type, tuple]:
    from transformers import activations as act

    classes: dict[type, tuple] = {nn.GELU: GELU_STEP, nn.SiLU: SILU_STEP}
    for name, step in (("gelu", GELU_STEP), ("gelu_new", GELU_STEP), ("gelu_pytorch_tanh", GELU_STEP),
                       ("silu", SILU_STEP), ("swish", SILU_STEP)):
        entry = act.ACT2CLS[name]
        classes[entry[0] if isinstance(entry, tuple) else entry] = step
    return classes


def with_step_activations(model: nn.Module) -> tuple[nn.Module, int]:
    """``model`` with every GELU/tanh-GELU/SiLU module swapped for ``StepActivation``; and how many were swapped."""
    return model, swap_activations(model, _step_classes())


# --- one measured run -----------------------------------------------------------------------------

# precision -> how the model runs: fp32; fp32 weights under bf16 autocast; weights cast to bf16
PRECISIONS = ("fp32", "autocast", "bf16")
# variant -> how the model is called (inner is ignored for the eager variants)
VARIANTS = ("eager", "step", "torch.compile", "dynamo_eager", "approxbp", "approxbp_exact", "approxbp_no_norms")


def logits_of(out) -> Tensor:
    return out.logits if hasattr(out, "logits") else out


def loss_weight(shape: torch.Size) -> Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(123))


def train_step(model: nn.Module, fn: Callable[[Tensor], Tensor], x: Tensor) -> tuple[Tensor, dict[str, Tensor], int]:
    """One forward and backward of ``fn`` (``model`` or a compiled form of it) on a leaf copy of x: the output,
    the gradients of the parameters that got one and of the input (``"input"``), and the bytes kept for
    backward by another call."""
    model.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_()
    out = fn(x)
    (out.float() * loss_weight(out.shape)).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    grads["input"] = x.grad.clone()
    return out.detach(), grads, approxbp_fx.saved_activation_bytes(fn, x, exclude=[model])


def compare_with_autograd(model: nn.Module, x: Tensor, tol: float = 1e-5, forward_tol: float = 1e-6,
                          **options) -> tuple[int, int, list]:
    """``train_step`` of plain autograd and of the backend (``options``) on a copy of model: forward equal to
    ``forward_tol``, gradients to ``tol`` (relative L2). Returns the bytes each kept and the norm sites of
    every graph the backend compiled."""
    ref = train_step(model, model, x)
    rewritten = copy.deepcopy(model)
    with approxbp_fx.collect_reports() as reports:
        got = train_step(rewritten, approxbp_fx.compile(rewritten, **options), x)
    torch.testing.assert_close(got[0], ref[0], rtol=forward_tol, atol=forward_tol)
    assert_grads_close(got[1], ref[1], tol)
    return ref[2], got[2], [s for r in reports for s in r.sites if s.family == "norms"]


class Result:
    """Forward output, gradients per parameter name (None where frozen or untouched) and saved bytes of one run."""

    def __init__(self, out: Tensor, grads: dict[str, Tensor | None], saved_bytes: int) -> None:
        self.out, self.grads, self.saved_bytes = out, grads, saved_bytes


def build_fn(model: nn.Module, variant: str, inner: str | None) -> Callable[..., object]:

    if variant == "eager":
        return model
    if variant == "step":
        model, swapped = with_step_activations(model)
        assert swapped > 0, "no activation module to swap"
        return model
    if variant == "torch.compile":
        return torch.compile(model)
    if variant == "dynamo_eager":  # Dynamo's graph run eagerly: what tracing alone changes
        return torch.compile(model, backend="eager")
    options = {"approxbp": {}, "approxbp_exact": {"activations": False}, "approxbp_no_norms": {"norms": False}}[variant]
    return approxbp_fx.compile(model, inner=inner, **options)


def run_and_measure(model: nn.Module, fn: Callable[..., object], *args: Tensor, **kwargs: Tensor) -> Result:
    """Forward + backward of ``fn`` (which runs ``model``'s parameters; loss: a fixed random projection of the
    logits), then saved bytes on a second call. Outputs and gradients come back as float32 on the CPU."""
    import approxbp_fx

    model.zero_grad(set_to_none=True)
    out = logits_of(fn(*args, **kwargs))
    (out.float() * loss_weight(out.shape).to(out.device)).sum().backward()
    grads = {n: None if p.grad is None else p.grad.detach().float().cpu() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    saved = approxbp_fx.saved_activation_bytes(fn, *args, exclude=[model], **kwargs)
    return Result(out.detach().float().cpu(), grads, saved)


def measure(model: nn.Module, variant: str, inner: str | None, precision: str, inputs: dict[str, Tensor],
            device: str = "cpu") -> Result:
    """``run_and_measure`` of one variant on ``device``. Under ``precision="autocast"`` compile, forward and
    backward all run inside ``torch.autocast(device, bf16)``."""
    import contextlib

    model = model.to(device)
    inputs = {k: v.to(device) for k, v in inputs.items()}
    if precision == "bf16":
        model = model.to(torch.bfloat16)
        inputs = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in inputs.items()}
    context = (torch.autocast(device, dtype=torch.bfloat16) if precision == "autocast" else contextlib.nullcontext())
    with context:
        return run_and_measure(model, build_fn(model, variant, inner), **inputs)


class Runs:
    """Lazily computed, cached results per (model, variant, inner, precision); each model built once and deep-copied."""

    def __init__(self, device: str = "cpu", models: dict[str, tuple[Callable[[], nn.Module], Callable[[], dict[str, Tensor]]]]
                 | None = None) -> None:
        self.device = device
        self.models = MODELS if models is None else models
        self._models: dict[str, nn.Module] = {}
        self._cache: dict[tuple, Result] = {}
        self.seconds: dict[tuple, float] = {}

    def model(self, name: str) -> nn.Module:
        if name not in self._models:
            self._models[name] = self.models[name][0]()
        return self._models[name]

    def get(self, name: str, variant: str, inner: str | None = None, precision: str = "fp32") -> Result:
        import copy
        import time

        if variant in ("eager", "step", "torch.compile", "dynamo_eager"):
            inner = None
        key = (name, variant, inner, precision)
        if key not in self._cache:
            start = time.perf_counter()
            self._cache[key] = measure(copy.deepcopy(self.model(name)), variant, inner, precision, self.models[name][1](),
                                       self.device)
            self.seconds[key] = time.perf_counter() - start
        return self._cache[key]

    def baseline(self, name: str, inner: str, precision: str = "fp32") -> Result:
        return self.get(name, "eager" if inner == "eager" else "torch.compile", precision=precision)

    def ratio(self, name: str, inner: str, precision: str = "fp32", variant: str = "approxbp") -> float:
        return self.get(name, variant, inner, precision).saved_bytes / self.baseline(name, inner, precision).saved_bytes


def assert_forward_matches_eager(runs: Runs, name: str, inner: str, tol: float) -> None:
    """Both approxbp variants (approximate and exact) compute the plain eager forward, within ``tol`` relative L2."""
    expected = runs.get(name, "eager").out
    for variant in ("approxbp", "approxbp_exact"):
        err = rel_l2(runs.get(name, variant, inner).out, expected)
        assert err <= tol, f"{variant}: forward relative L2 {err:.2e}"
