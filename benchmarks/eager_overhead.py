"""Step time of the eager inner against plain eager on a small ViT (fp32, full fine-tuning): what the
rewritten ops cost where nothing compiles the graph around them.

    python benchmarks/eager_overhead.py [--rounds 31]

HF ViT, width 256, 4 layers, 4 heads, MLP 1024, 32 x 32 images in 4 x 4 patches (65 tokens), batch 16,
SGD. Configurations: eager, eager + approxbp with default options, and the same with ``norms`` off (the
activation codes alone). Each is warmed up, then their steps are interleaved (the order alternating by
round); medians of wall-clock and of process CPU time, as ratios to eager. Only ratios mean anything on a
shared machine, and a ratio moves by a few hundredths between runs: compare within one run.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torch.nn.functional as F

import approxbp_fx

CONFIGS = {"eager": None, "eager+approxbp": {}, "eager+approxbp, norms off": {"norms": False}}


def build() -> torch.nn.Module:
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    config = ViTConfig(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024,
                       image_size=32, patch_size=4, num_labels=10, hidden_dropout_prob=0.0,
                       attention_probs_dropout_prob=0.0)
    model = ViTForImageClassification(config).train()
    with torch.no_grad():  # norms' affine away from (1, 0), as a fine-tuned checkpoint has it
        for m in model.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.uniform_(0.5, 1.5), m.bias.uniform_(-0.5, 0.5)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=31)
    args = parser.parse_args()
    base = build()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 3, 32, 32, generator=g), torch.randint(0, 10, (16,), generator=g)
    steps = {}
    for name, options in CONFIGS.items():
        model = copy.deepcopy(base)
        fn = model if options is None else approxbp_fx.compile(model, inner="eager", **options)
        opt = torch.optim.SGD(model.parameters(), lr=1e-3)

        def step(fn=fn, opt=opt) -> None:
            F.cross_entropy(fn(pixel_values=x).logits, y).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        for _ in range(3):
            step()
        steps[name] = step
    wall: dict[str, list[float]] = {k: [] for k in steps}
    cpu: dict[str, list[float]] = {k: [] for k in steps}
    for r in range(args.rounds):
        for name in (list(steps) if r % 2 == 0 else list(steps)[::-1]):
            t0, c0 = time.perf_counter(), time.process_time()
            steps[name]()
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    w0, c0 = statistics.median(wall["eager"]), statistics.median(cpu["eager"])
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.rounds} interleaved rounds")
    print(f"{'configuration':28s} {'wall ms':>8s} {'ratio':>6s} {'cpu ms':>8s} {'ratio':>6s}")
    for name in steps:
        w, c = statistics.median(wall[name]), statistics.median(cpu[name])
        print(f"{name:28s} {w * 1e3:8.1f} {w / w0:6.3f} {c * 1e3:8.1f} {c / c0:6.3f}")


if __name__ == "__main__":
    main()
