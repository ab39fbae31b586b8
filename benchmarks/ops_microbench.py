"""Micro-benchmark of each approxbp op against the torch op it replaces (forward + backward, CPU).

    python benchmarks/ops_microbench.py            # prints a Markdown table of medians and ratios

Each pair runs interleaved in one process after warm-up (the ops compile their kernels on first use);
only the ratios mean anything on a shared machine.
"""

from __future__ import annotations

import argparse
import time
from typing import Callable

import torch
import torch.nn.functional as F

import approxbp_fx.ops as O


def _median_us(fns: dict[str, Callable[[], None]], reps: int) -> dict[str, float]:
    for f in fns.values():
        for _ in range(3):
            f()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for k, f in fns.items():
            t = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t)
    return {k: sorted(v)[len(v) // 2] * 1e6 for k, v in times.items()}


def cases(rows: int, d: int, mlp: int) -> dict[str, tuple[Callable[[], None], Callable[[], None]]]:
    x = torch.randn(rows, d, requires_grad=True)
    w = torch.rand(d, requires_grad=True)
    b = torch.rand(d, requires_grad=True)
    W = torch.randn(3 * d, d, requires_grad=True)
    bW = torch.randn(3 * d, requires_grad=True)
    h = torch.randn(rows, mlp, requires_grad=True)
    g_qkv, g_h = torch.randn(rows, 3 * d), torch.randn(rows, mlp)

    def ln_linear_torch() -> None:
        F.linear(F.layer_norm(x, (d,), w, b), W, bW).backward(g_qkv)

    def ln_linear_ours() -> None:
        n = O.ms_layer_norm(x, d, w, b)
        O.linear_shared(n.z, n.y_hat, W, bW, w, b).backward(g_qkv)

    def rms_linear_torch() -> None:
        F.linear(F.rms_norm(x, (d,), w, 1e-6), W).backward(g_qkv)

    def rms_linear_ours() -> None:
        n = O.ms_rms_norm(x, d, w, 1e-6)
        O.linear_shared(n.z, n.y_hat, W, None, w).backward(g_qkv)

    return {
        "gelu -> regelu2": (lambda: F.gelu(h).backward(g_h), lambda: O.regelu2(h).backward(g_h)),
        "silu -> resilu2": (lambda: F.silu(h).backward(g_h), lambda: O.resilu2(h).backward(g_h)),
        "layer_norm + linear -> ms_layer_norm + linear_shared": (ln_linear_torch, ln_linear_ours),
        "rms_norm + linear -> ms_rms_norm + linear_shared": (rms_linear_torch, rms_linear_ours),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1024, help="tokens (batch x sequence)")
    parser.add_argument("--d", type=int, default=768)
    parser.add_argument("--mlp", type=int, default=3072)
    parser.add_argument("--reps", type=int, default=30)
    args = parser.parse_args()
    print(f"rows {args.rows}, d {args.d}, mlp {args.mlp}, fp32, {torch.get_num_threads()} threads, torch {torch.__version__}\n")
    print("| op (forward + backward) | torch (us) | approxbp (us) | ratio |")
    print("|---|---|---|---|")
    for name, (theirs, ours) in cases(args.rows, args.d, args.mlp).items():
        t = _median_us({"torch": theirs, "ours": ours}, args.reps)
        print(f"| {name} | {t['torch']:.0f} | {t['ours']:.0f} | {t['ours'] / t['torch']:.2f} |")


if __name__ == "__main__":
    main()
