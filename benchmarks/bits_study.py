"""Bits per activation code vs bytes kept vs gradient fidelity vs digits fine-tuning accuracy.

    python benchmarks/bits_study.py [--seeds 0 1 2] [--out benchmarks/results]

For bits in (1, 2, 3) (2: the paper's constants; 1 and 3: fitted by ``fit_step_derivative``) and the
exact baseline, on the digits ViT of ``benchmarks/convergence.py`` (pretrained plainly on digits 0-4,
fine-tuned on all ten, eager inner): the bytes one training forward keeps, the cosine similarity of the
fine-tuning gradient to the exact one (at the pretrained checkpoint, first batch), and test accuracy.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import torch

import approxbp_fx

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import convergence as C  # noqa: E402


def _gradient(fn, module, x, y) -> torch.Tensor:
    module.zero_grad(set_to_none=True)
    torch.nn.functional.cross_entropy(fn(pixel_values=x).logits, y).backward()
    return torch.cat([p.grad.reshape(-1) for p in module.parameters() if p.grad is not None])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=pathlib.Path, default=pathlib.Path(__file__).parent / "results")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = C.Config()
    rows: dict[str, dict[str, list[float]]] = {}
    for seed in args.seeds:
        data = C.load_data(seed)
        state = C.pretrain(seed, cfg, data)
        x, y = data.x_train[:cfg.batch_size], data.y_train[:cfg.batch_size]
        probe = C.build_model(seed, cfg)
        probe.load_state_dict(state)
        exact = _gradient(probe, probe, x, y)
        for bits in (None, 1, 2, 3):
            name = "exact (activations off)" if bits is None else f"{bits} bit"
            options = {"activations": False} if bits is None else {"bits": bits}
            torch._dynamo.reset()
            fn = approxbp_fx.compile(probe, inner="eager", **options)
            saved = approxbp_fx.saved_activation_bytes(fn, pixel_values=x)
            cosine = torch.nn.functional.cosine_similarity(_gradient(fn, probe, x, y), exact, dim=0).item()
            module = C.build_model(seed, cfg)
            module.load_state_dict(state)
            torch._dynamo.reset()
            run_fn = approxbp_fx.compile(module, inner="eager", **options)
            batches = C.batch_order(len(data.y_train), cfg.batch_size, cfg.finetune_epochs, seed)
            C.train(run_fn, module, data.x_train, data.y_train, batches, cfg.finetune_lr)
            acc = 100 * C.accuracy(module, data.x_test, data.y_test)
            r = rows.setdefault(name, {"saved": [], "cosine": [], "accuracy": []})
            r["saved"].append(saved), r["cosine"].append(cosine), r["accuracy"].append(acc)
            print(f"seed {seed} {name}: saved {saved:,} B, gradient cosine {cosine:.4f}, accuracy {acc:.2f}%", flush=True)
    mean = lambda v: sum(v) / len(v)  # noqa: E731
    lines = [
        "# Bits per activation code (digits ViT, eager inner)", "",
        f"Command: `python benchmarks/bits_study.py --seeds {' '.join(map(str, args.seeds))}`; "
        f"means over {len(args.seeds)} seeds.", "",
        "| code | bytes kept per forward | gradient cosine to exact | test accuracy (%) |", "|---|---|---|---|",
    ]
    for name, r in rows.items():
        lines.append(f"| {name} | {mean(r['saved']):,.0f} | {mean(r['cosine']):.4f} | {mean(r['accuracy']):.2f} |")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bits_study.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
