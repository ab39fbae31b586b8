"""Look inside the rewrite: ``explain``, the graph before and after (``print_readable``), per-site savings.

    python examples/inspect_graphs.py                 # a 1-layer ViT (default), full graphs printed
    python examples/inspect_graphs.py --model llama   # LLaMA: decomposed RMSNorm and SiLU sites
    python examples/inspect_graphs.py --smoke         # CI: same, graphs cut to their first lines

``approxbp_fx.explain(model, **inputs)`` traces one forward through the backend (no backward, no optimizer
step, parameters untouched) and returns a Report: every site found, rewritten or skipped with the reason, and
``report.graphs``, the (original, rewritten) torch.fx GraphModules that Dynamo handed the backend. This script
prints the first graph both ways, what the rewrite replaced (the call targets that appear in only one of
them), the per-site byte estimates, and the measured bytes one training forward keeps for backward.
"""

from __future__ import annotations

import argparse
import collections
import sys

import torch

import approxbp_fx


def build(kind: str, hidden: int) -> tuple[torch.nn.Module, dict]:
    torch.manual_seed(0)
    if kind == "vit":
        from transformers import ViTConfig, ViTForImageClassification

        config = ViTConfig(hidden_size=hidden, num_hidden_layers=1, num_attention_heads=2, intermediate_size=4 * hidden,
                           image_size=32, patch_size=8, num_labels=10)
        return ViTForImageClassification(config).train(), {"pixel_values": torch.randn(2, 3, 32, 32)}
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=100, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config).train(), {"input_ids": torch.randint(0, 100, (2, 16))}


def targets(gm: torch.fx.GraphModule) -> collections.Counter:
    def name(t) -> str:
        return getattr(t, "__qualname__", None) or getattr(t, "__name__", None) or str(t)

    return collections.Counter(name(n.target) for n in gm.graph.nodes if n.op in ("call_function", "call_method"))


def show(title: str, gm: torch.fx.GraphModule, max_lines: int | None) -> None:
    text = gm.print_readable(print_output=False)
    lines = text.splitlines()
    print(f"\n===== {title}: {len(gm.graph.nodes)} nodes =====")
    if max_lines is not None and len(lines) > max_lines:
        print("\n".join(lines[:max_lines]))
        print(f"... ({len(lines) - max_lines} more lines; run without --smoke for the whole graph)")
    else:
        print(text)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=("vit", "llama"), default="vit")
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--smoke", action="store_true", help="for CI: print only the first lines of each graph")
    p.add_argument("--max-lines", type=int, default=None, help="print at most this many lines per graph")
    args = p.parse_args(argv)
    max_lines = args.max_lines if args.max_lines is not None else (40 if args.smoke else None)

    model, inputs = build(args.model, args.hidden)
    print(f"explaining {type(model).__name__} (1 layer, d={args.hidden}) ...", file=sys.stderr, flush=True)
    report = approxbp_fx.explain(model, **inputs)
    if not report.graphs:
        print("the backend saw no graph", file=sys.stderr)
        return 1
    original, rewritten = report.graphs[0]
    show("original graph (as Dynamo traced it)", original, max_lines)
    show("rewritten graph (what the inner compiler gets)", rewritten, max_lines)

    before, after = targets(original), targets(rewritten)
    print("\n===== what changed (call targets, count before -> after) =====")
    for name in sorted(set(before) | set(after)):
        if before[name] != after[name]:
            print(f"  {name:50s} {before[name]:3d} -> {after[name]:3d}")

    print("\n===== sites =====")
    print(report)

    print("\n===== measured: bytes one training forward keeps for backward =====")
    plain = approxbp_fx.saved_activation_bytes(model, **inputs)
    torch._dynamo.reset()
    compiled = approxbp_fx.compile(model, inner="eager")
    approx = approxbp_fx.saved_activation_bytes(compiled, exclude=[model], **inputs)
    print(f"  plain eager      {plain:>12,d}")
    print(f"  approxbp (eager) {approx:>12,d}   ({approx / plain:.3f}x; estimated saving {report.bytes_saved:,}, "
          f"measured {plain - approx:,})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
