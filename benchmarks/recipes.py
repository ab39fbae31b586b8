"""Bytes and step time of the recipes that fit a small GPU, on the tiny LLaMA of tests/architectures.py:
a bf16 checkpoint with PEFT's float32 LoRA adapters (no autocast), and QLoRA (4-bit NF4 base through
bitsandbytes, if installed). 2 layers, hidden 128, MLP 512, 4 x 64 tokens, LoRA r = 8 on all linears.

    python benchmarks/recipes.py [--rounds 15] [--recipes bf16_lora_llama qlora_llama]

Per recipe: eager, eager + approxbp (eager inner), torch.compile and torch.compile + approxbp (inductor
inner), default options. Bytes one forward keeps for backward (``approxbp_fx.saved_activation_bytes``) and
the median step time (forward, backward, AdamW step on the adapters) over interleaved rounds after warm-up,
each as a ratio to the same-mode baseline. Plain torch.compile is left out where it fails (the approxbp
configuration then compares with eager). These geometries are small: per-call overheads weigh more than in
a real model, where the matmuls dominate.
"""

from __future__ import annotations

import argparse
import copy
import pathlib
import statistics
import sys
import time
from typing import Callable

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tests"))

import approxbp_fx  # noqa: E402
from architectures import RECIPES  # noqa: E402

CONFIGS = ("eager", "eager+approxbp", "torch.compile", "torch.compile+approxbp")


def _fn(model: torch.nn.Module, config: str) -> Callable[..., object]:
    if config == "eager":
        return model
    if config == "eager+approxbp":
        return approxbp_fx.compile(model, inner="eager")
    if config == "torch.compile":
        return torch.compile(model)
    return approxbp_fx.compile(model)


def measure(name: str, rounds: int) -> None:
    build, make_inputs = RECIPES[name]
    base, inputs = build(), make_inputs()
    steps, saved = {}, {}
    for config in CONFIGS:
        model = copy.deepcopy(base)
        fn = _fn(model, config)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

        def step(fn=fn, opt=opt) -> None:
            out = fn(**inputs).logits
            out.float().logsumexp(-1).mean().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        try:
            for _ in range(3):
                step()
        except Exception as exc:  # plain torch.compile of some setups fails; report and go on
            print(f"  {config}: failed ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})")
            continue
        saved[config] = approxbp_fx.saved_activation_bytes(fn, exclude=[model], **inputs)
        steps[config] = step
    times: dict[str, list[float]] = {k: [] for k in steps}
    for r in range(rounds):
        for config in (list(steps) if r % 2 == 0 else list(steps)[::-1]):
            t0 = time.perf_counter()
            steps[config]()
            times[config].append(time.perf_counter() - t0)
    print(f"{name} ({rounds} interleaved rounds)")
    for config in steps:
        base_name = "torch.compile" if config.startswith("torch.compile") and "torch.compile" in steps else "eager"
        t, t0 = statistics.median(times[config]), statistics.median(times[base_name])
        print(f"  {config:24s} saved {saved[config] / 2**20:7.3f} MiB ({saved[config] / saved[base_name]:.3f} of "
              f"{base_name})  step {t * 1e3:7.1f} ms ({t / t0:.3f}x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for name in args.recipes:
        measure(name, args.rounds)


if __name__ == "__main__":
    main()
