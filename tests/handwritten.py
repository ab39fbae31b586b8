"""Tiny models written by hand the way popular training repositories write them (not from transformers):
the spellings the norm family must follow without anyone patching the model.

- ``clip_tower``: open_clip's vision tower (a LayerNorm subclass that casts back to the input's dtype,
  ``nn.MultiheadAttention`` with ``batch_first``, QuickGELU, ``ln_pre`` before the first block's ``ln_1``, the
  pooled token through ``ln_post`` and ``x @ proj``);
- ``mixer``: an MLP-Mixer (token mixing through ``norm(x).transpose(1, 2)``, channel mixing as usual).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from architectures import randomize_norms


class CastBackLayerNorm(nn.LayerNorm):
    """open_clip's ``LayerNorm``: the norm in the input's dtype, its output cast back to it."""

    def forward(self, x: Tensor) -> Tensor:
        orig_type = x.dtype
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.to(orig_type)


class QuickGELU(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(1.702 * x)


class ResidualAttentionBlock(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.ln_1 = CastBackLayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln_2 = CastBackLayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), QuickGELU(), nn.Linear(4 * width, width))

    def forward(self, x: Tensor) -> Tensor:
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class ClipVisionTower(nn.Module):
    def __init__(self, width: int = 64, layers: int = 2, heads: int = 4, patch: int = 4, image: int = 16,
                 output_dim: int = 32) -> None:
        super().__init__()
        scale = width ** -0.5
        self.conv1 = nn.Conv2d(3, width, patch, patch, bias=False)
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn((image // patch) ** 2 + 1, width))
        self.ln_pre = CastBackLayerNorm(width)
        self.blocks = nn.ModuleList(ResidualAttentionBlock(width, heads) for _ in range(layers))
        self.ln_post = CastBackLayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, output_dim))

    def forward(self, pixels: Tensor) -> Tensor:
        x = self.conv1(pixels)
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
        cls = self.class_embedding.to(x.dtype) + torch.zeros(x.shape[0], 1, x.shape[-1], dtype=x.dtype)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
        x = self.ln_pre(x)
        for block in self.blocks:
            x = block(x)
        pooled = self.ln_post(x[:, 0])
        return pooled @ self.proj


def clip_tower(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return randomize_norms(ClipVisionTower(), seed + 1)


def clip_inputs(seed: int = 0) -> tuple[Tensor]:
    return (torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(seed)),)


class MixerBlock(nn.Module):
    def __init__(self, tokens: int, width: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.token_mix = nn.Sequential(nn.Linear(tokens, 2 * tokens), nn.GELU(), nn.Linear(2 * tokens, tokens))
        self.norm2 = nn.LayerNorm(width)
        self.channel_mix = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.token_mix(self.norm1(x).transpose(1, 2)).transpose(1, 2)
        return x + self.channel_mix(self.norm2(x))


class Mixer(nn.Module):
    def __init__(self, tokens: int = 16, width: int = 32, layers: int = 2) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*(MixerBlock(tokens, width) for _ in range(layers)))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, 10)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.norm(self.blocks(x)).mean(1))


def mixer(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return randomize_norms(Mixer(), seed + 1)


def mixer_inputs(seed: int = 0) -> tuple[Tensor]:
    return (torch.randn(4, 16, 32, generator=torch.Generator().manual_seed(seed)),)
