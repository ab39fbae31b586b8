"""Tiny models and references shared by the backend tests.

Builders return fp32 models in train mode with random weights, dropout 0 and randomized norm affines
(gamma ~ U(0.5, 1.5), beta ~ U(-0.5, 0.5): with gamma = 1 and beta = 0 a folding bug would hide).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# DESIGN.md section 2, ReGELU2: h(x) = sum_i a_i ReLU(x - c_i); its derivative is a step function.
REGELU2_A = (-0.04922261145617846, 1.0979632065417297, -0.048740595085551286)
REGELU2_C = (-3.1858810036855245, -0.001178821281161997, 3.190832613414926)
REGELU2_LEVELS = (0.0, REGELU2_A[0], REGELU2_A[0] + REGELU2_A[1], REGELU2_A[0] + REGELU2_A[1] + REGELU2_A[2])

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


class ReferenceStepGELU(torch.autograd.Function):
    """GELU forward; backward dy * levels[k] with k = #{i : x > c_i} (the paper's ReGELU2 derivative)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        ctx.save_for_backward(x)
        return F.gelu(x)

    @staticmethod
    def backward(ctx, dy: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        k = sum((x > c).long() for c in REGELU2_C)
        levels = torch.tensor(REGELU2_LEVELS, dtype=torch.float64)
        return (dy.double() * levels[k]).to(dy.dtype)


class StepGELU(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return ReferenceStepGELU.apply(x)


def with_step_gelu(model: nn.Module) -> nn.Module:
    """``model`` with every GELU module (HF's GELUActivation, nn.GELU) replaced by the step reference."""
    from transformers.activations import GELUActivation

    for name, m in list(model.named_modules()):
        for child_name, child in list(m.named_children()):
            if isinstance(child, (GELUActivation, nn.GELU)):
                if isinstance(child, nn.GELU):
                    assert child.approximate == "none"
                setattr(m, child_name, StepGELU())
    return model


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
