"""Tiny models written by hand the way popular training repositories write them (not from transformers):
the spellings the norm family must follow without anyone patching the model.

- ``clip_tower``: open_clip's vision tower (a LayerNorm subclass that casts back to the input's dtype,
  ``nn.MultiheadAttention`` with ``batch_first``, QuickGELU, ``ln_pre`` before the first block's ``ln_1``, the
  pooled token through ``ln_post`` and ``x @ proj``);
- ``mixer``: an MLP-Mixer (token mixing through ``norm(x).transpose(1, 2)``, channel mixing as usual);
- ``dit``: a diffusion transformer with adaLN-Zero (DiT's spelling: norms without affine, each output
  modulated per sample, ``x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)``, before the qkv and fc1 linears;
  scale, shift and the gates computed from the conditioning by one linear and ``chunk``).
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


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class DiTBlock(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.fc1, self.fc2 = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 6 * width))

    def attn(self, x: Tensor) -> Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(x).reshape(b, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, t, c))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        h = modulate(self.norm2(x), shift_mlp, scale_mlp)
        return x + gate_mlp.unsqueeze(1) * self.fc2(F.gelu(self.fc1(h), approximate="tanh"))


class TinyDiT(nn.Module):
    """Latent tokens in, noise prediction out; the conditioning (DiT: timestep plus class embeddings) is
    computed from the tokens' mean here so the model takes one tensor."""

    def __init__(self, width: int = 64, layers: int = 2, heads: int = 4) -> None:
        super().__init__()
        self.cond = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.blocks = nn.ModuleList(DiTBlock(width, heads) for _ in range(layers))
        self.norm_final = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.adaLN_final = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))
        self.linear = nn.Linear(width, width)

    def forward(self, x: Tensor) -> Tensor:
        c = self.cond(x.mean(1))
        for block in self.blocks:
            x = block(x, c)
        shift, scale = self.adaLN_final(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


def dit(seed: int = 0) -> nn.Module:
    """adaLN-Zero initialises the modulation to zero; random here, so scales and gates are not trivial."""
    torch.manual_seed(seed)
    return TinyDiT()


def dit_inputs(seed: int = 0, batch: int = 2, tokens: int = 64) -> tuple[Tensor]:
    return (torch.randn(batch, tokens, 64, generator=torch.Generator().manual_seed(seed)),)
