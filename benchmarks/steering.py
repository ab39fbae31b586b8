"""Saved bytes and step time of the approxbp backend against plain eager / torch.compile on a small
pre-LN transformer, with the inductor inner's two designs side by side: traceable ops steered through
the partitioner (the default) and opaque custom ops (``--opaque`` row, lowering disabled).

    python benchmarks/steering.py [--batch 16] [--reps 15]

Each configuration is compiled once, then steps (forward, backward) are interleaved; medians, as
ratios to the same-mode baseline. Only the ratios mean anything on a shared machine.
"""

from __future__ import annotations

import argparse
import copy
import time
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

import approxbp_fx
from approxbp_fx import saved_activation_bytes
from approxbp_fx.inners import inductor as steer_partitioner


class Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc1, self.fc2, self.act = nn.Linear(d, 4 * d), nn.Linear(4 * d, d), nn.GELU()
        for ln in (self.ln1, self.ln2):
            nn.init.uniform_(ln.weight, 0.5, 1.5)
            nn.init.uniform_(ln.bias, -0.5, 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(self.ln1(x)).chunk(3, -1)
        x = x + self.proj(F.scaled_dot_product_attention(q, k, v))
        return x + self.fc2(self.act(self.fc1(self.ln2(x))))


def _opaque(model: nn.Module) -> nn.Module:
    """The inductor inner with the custom ops left opaque (no lowering, no steering)."""
    compiled = approxbp_fx.compile(model, inner="inductor")
    lower = steer_partitioner.lower_to_traceable

    class Opaque(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            steer_partitioner.lower_to_traceable = lambda gm: gm  # only matters during the first call
            try:
                return compiled(x)
            finally:
                steer_partitioner.lower_to_traceable = lower

    return Opaque()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--d", type=int, default=128)
    parser.add_argument("--reps", type=int, default=15)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = nn.Sequential(Block(args.d), Block(args.d))
    x = torch.randn(args.batch, args.tokens, args.d, requires_grad=True)
    configs = {
        "eager": (model, "eager"),
        "eager + approxbp": (approxbp_fx.compile(copy.deepcopy(model), inner="eager"), "eager"),
        "torch.compile": (torch.compile(copy.deepcopy(model)), "torch.compile"),
        "torch.compile + approxbp (steered)": (approxbp_fx.compile(copy.deepcopy(model)), "torch.compile"),
        "torch.compile + approxbp (opaque ops)": (_opaque(copy.deepcopy(model)), "torch.compile"),
    }
    times: dict[str, list[float]] = {k: [] for k in configs}

    def step(fn: Callable[..., torch.Tensor]) -> None:
        fn(x).sum().backward()

    for fn, _ in configs.values():
        step(fn)
        step(fn)
    for _ in range(args.reps):
        for name, (fn, _) in configs.items():
            t = time.perf_counter()
            step(fn)
            times[name].append(time.perf_counter() - t)
    saved = {name: saved_activation_bytes(fn, x) for name, (fn, _) in configs.items()}  # fn's parameters excluded
    median = {name: sorted(v)[len(v) // 2] for name, v in times.items()}
    print(f"2 pre-LN blocks, d {args.d}, batch {args.batch} x {args.tokens}, fp32, {torch.get_num_threads()} threads\n")
    print("| configuration | saved bytes | vs same-mode baseline | step time vs baseline |")
    print("|---|---|---|---|")
    for name, (_, base) in configs.items():
        print(f"| {name} | {saved[name]:,} | {saved[name] / saved[base]:.3f} | {median[name] / median[base]:.2f} |")


if __name__ == "__main__":
    main()
