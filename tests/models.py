"""Tiny models and references shared by the backend tests.

Builders return fp32 models in train mode with random weights, dropout 0 and randomized norm affines
(gamma ~ U(0.5, 1.5), beta ~ U(-0.5, 0.5): with gamma = 1 and beta = 0 a folding bug would hide).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

# Yang et al. (ICML 2024): h(x) = sum_i a_i ReLU(x - c_i); the derivative is levels[k], k = #{i : x > c_i},
# levels the partial sums of a. Written here from the paper, independently of the package.
REGELU2_A = (-0.04922261145617846, 1.0979632065417297, -0.048740595085551286)
REGELU2_C = (-3.1858810036855245, -0.001178821281161997, 3.190832613414926)
RESILU2_A = (-0.04060357190528599, 1.080925428529668, -0.040321856624382146)
RESILU2_C = (-6.3050461001646445, -0.0008684942046214787, 6.325815242089708)


def step_levels(a: tuple[float, ...]) -> tuple[float, ...]:
    levels = [0.0]
    for ai in a:
        levels.append(levels[-1] + ai)
    return tuple(levels)


REGELU2_LEVELS = step_levels(REGELU2_A)
GELU_STEP = (REGELU2_C, REGELU2_LEVELS)
# relative L2 of gradients of an exact rewrite against plain autograd, both under bf16 (autocast or weights)
BF16_EXACT_GRAD_TOL = 3e-2
SILU_STEP = (RESILU2_C, step_levels(RESILU2_A))

HIDDEN, LAYERS, HEADS, MLP = 128, 2, 4, 512
IMAGE, PATCH, BATCH, TOKENS, VOCAB = 32, 4, 4, 32, 100


def randomize_norm_affines(model: nn.Module, seed: int = 1) -> nn.Module:
    """gamma ~ U(0.5, 1.5), beta ~ U(-0.5, 0.5) for every LayerNorm of ``model``."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):
                if m.weight is not None:
                    m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                if m.bias is not None:
                    m.bias.copy_(torch.rand(m.bias.shape, generator=g) - 0.5)
    return model


def tiny_vit(seed: int = 0) -> nn.Module:
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(seed)
    config = ViTConfig(
        hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS, intermediate_size=MLP,
        image_size=IMAGE, patch_size=PATCH, num_channels=3, num_labels=10,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    return randomize_norm_affines(ViTForImageClassification(config).float().train(), seed + 1)


def vit_inputs(seed: int = 0) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"pixel_values": torch.randn(BATCH, 3, IMAGE, IMAGE, generator=g)}


def tiny_bert(seed: int = 0) -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
        intermediate_size=MLP, max_position_embeddings=64, num_labels=3,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    return randomize_norm_affines(BertForSequenceClassification(config).float().train(), seed + 1)


def bert_inputs(seed: int = 0) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(0, VOCAB, (BATCH, TOKENS), generator=g)}


class StepBackward(torch.autograd.Function):
    """Forward: the original activation module, untouched. Backward: dy * levels[k(x)], k = #{i : x > c_i},
    computed in float64 (the paper's step derivative)."""

    @staticmethod
    def forward(ctx, x: Tensor, module: nn.Module, thresholds: tuple, levels: tuple) -> Tensor:
        ctx.save_for_backward(x)
        ctx.thresholds, ctx.levels = thresholds, levels
        return module(x)

    @staticmethod
    def backward(ctx, dy: Tensor):
        (x,) = ctx.saved_tensors
        k = sum((x > c).long() for c in ctx.thresholds)
        levels = torch.tensor(ctx.levels, dtype=torch.float64, device=dy.device)
        return (dy.double() * levels[k]).to(dy.dtype), None, None, None


class StepActivation(nn.Module):
    """``original`` in forward, the step derivative ``step = (thresholds, levels)`` in backward."""

    def __init__(self, original: nn.Module, step: tuple) -> None:
        super().__init__()
        self.original = original
        self.thresholds, self.levels = tuple(step[0]), tuple(step[1])

    def forward(self, x: Tensor) -> Tensor:
        return StepBackward.apply(x, self.original, self.thresholds, self.levels)


def swap_activations(model: nn.Module, steps: dict[type, tuple]) -> int:
    """Replace (in place) every child module of a type in ``steps`` by its ``StepActivation``; returns how many."""
    swapped = 0
    for m in list(model.modules()):
        for child_name, child in list(m.named_children()):
            step = steps.get(type(child))
            if step is not None:
                setattr(m, child_name, StepActivation(child, step))
                swapped += 1
    return swapped


def with_step_gelu(model: nn.Module) -> nn.Module:
    """``model`` with every GELU module (HF's GELUActivation, nn.GELU) replaced by the step reference."""
    from transformers.activations import GELUActivation

    assert all(m.approximate == "none" for m in model.modules() if isinstance(m, nn.GELU))
    swap_activations(model, {GELUActivation: GELU_STEP, nn.GELU: GELU_STEP})
    return model


def rel_l2(actual: Tensor, expected: Tensor) -> float:
    actual, expected = actual.detach().double(), expected.detach().double()
    denom = torch.linalg.vector_norm(expected).item()
    diff = torch.linalg.vector_norm(actual - expected).item()
    return diff / denom if denom > 0 else diff


def grad_errors(actual: dict[str, Tensor | None], expected: dict[str, Tensor | None]) -> dict[str, float]:
    """Relative L2 per parameter. The denominator is floored at 1e-4 of the largest gradient norm: attention
    key biases have an analytically zero gradient (softmax is shift-invariant), so what is computed for them
    is rounding noise that no relative measure can compare. A gradient present on one side only is inf."""
    assert actual.keys() == expected.keys(), "different parameters"
    floor = 1e-4 * max(torch.linalg.vector_norm(g.double()).item() for g in expected.values() if g is not None)
    errors = {}
    for name, ref in expected.items():
        got = actual[name]
        if ref is None or got is None:
            if not (ref is None and got is None):
                errors[name] = float("inf")
            continue
        diff = torch.linalg.vector_norm((got - ref).double()).item()
        errors[name] = diff / max(torch.linalg.vector_norm(ref.double()).item(), floor)
    return errors


def assert_grads_close(actual: dict[str, Tensor | None], expected: dict[str, Tensor | None], tol: float) -> None:
    bad = [f"{name}: relative L2 {err:.2e}" for name, err in grad_errors(actual, expected).items() if not err <= tol]
    assert not bad, f"gradients differ beyond {tol:.0e}:\n" + "\n".join(bad)


class BNDropoutLN(nn.Module):
    """BatchNorm (running stats), Dropout(0.5) (RNG), rewritable sites, and optionally an input updated in
    place: what verification must not disturb."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 32)
        self.bn = nn.BatchNorm1d(32)
        self.act = nn.GELU()
        self.drop = nn.Dropout(0.5)
        self.ln = nn.LayerNorm(32)
        self.fc2 = nn.Linear(32, 4)

    def forward(self, x: Tensor, counter: Tensor | None = None) -> Tensor:
        if counter is not None:
            counter.add_(1)
        return self.fc2(self.ln(self.drop(self.act(self.bn(self.fc1(x))))))


class PreLNBlock(nn.Module):
    def __init__(self, d: int, heads: int, mlp: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, mlp)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(mlp, d)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        h = self.heads
        qkv = self.qkv(self.ln1(x)).reshape(b, t, 3, h, d // h).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        att = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(d // h), dim=-1)
        x = x + self.proj((att @ v).transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(self.act(self.fc1(self.ln2(x))))


class TinyPreLN(nn.Module):
    """A pre-LN transformer out of plain nn modules (symbolic_trace sees call_module leaves)."""

    def __init__(self, d_in: int = 16, d: int = 64, heads: int = 4, mlp: int = 256, layers: int = 2) -> None:
        super().__init__()
        self.embed = nn.Linear(d_in, d)
        self.blocks = nn.ModuleList(PreLNBlock(d, heads, mlp) for _ in range(layers))
        self.head = nn.Linear(d, 5)

    def forward(self, x: Tensor) -> Tensor:
        x = self.embed(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def tiny_preln(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return randomize_norm_affines(TinyPreLN().float().train(), seed + 1)


def preln_inputs(seed: int = 0) -> tuple[Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(4, 16, 16, generator=g),)
