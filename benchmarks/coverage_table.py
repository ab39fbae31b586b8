"""Coverage table: model x mode x dtype -> bytes saved for backward, relative to the same-mode baseline.

Builds the tiny models of tests/architectures.py (2 layers, hidden 128, MLP 512, 4 heads, 4 x 32 tokens,
random weights, randomized norm affines), runs one forward + backward per configuration and measures the
bytes one forward keeps for backward (``approxbp_fx.saved_activation_bytes``). Ratios are against the
same-mode baseline: plain eager for the eager inner, plain ``torch.compile`` for the inductor inner.
Forward error: relative L2 of the logits against plain eager in the same precision.

A second table takes plain GELU (GPT-2), GeGLU (Gemma) and SwiGLU (LLaMA) apart: which rewrite pays in
which mode (all rewrites; exact mode, ``activations=False``; norms off, ``norms=False``).

    python benchmarks/coverage_table.py                  # print the tables (Markdown)
    python benchmarks/coverage_table.py --write-readme   # and replace README.md's coverage section
    python benchmarks/coverage_table.py --models llama gpt2 --inners eager
    python benchmarks/coverage_table.py --families                 # sweep of transformers families (families.py)
    python benchmarks/coverage_table.py --families --write-readme  # and README.md's families summary
    python benchmarks/coverage_table.py --families --only t5 whisper --family-budget 120
    python benchmarks/coverage_table.py --families --resume benchmarks/results/families.json  # what the budget left
    python benchmarks/coverage_table.py --families --from-json benchmarks/results/families.json --write-readme

Every configuration compiles a model once (inductor: ~20 s each on 2 CPU cores); the full run takes
about 10 minutes there.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import pathlib
import sys
import tempfile
import time
import warnings

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
START, END = "<!-- coverage:start -->", "<!-- coverage:end -->"
COMMAND = "python benchmarks/coverage_table.py --write-readme"
FAMILIES_START, FAMILIES_END = "<!-- families:start -->", "<!-- families:end -->"
RESULTS = ROOT / "benchmarks" / "results"

# A compile cache per version of the package sources: torch's caches key a graph by its ops, not by the
# Python code of a custom op's backward (as in tests/conftest.py). Must be set before torch compiles anything.
_sources = sorted(ROOT.joinpath("approxbp_fx").rglob("*.py"))
_digest = hashlib.sha256(b"".join(p.read_bytes() for p in _sources)).hexdigest()[:16]
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(tempfile.gettempdir(), f"approxbp-inductor-{_digest}"))

sys.path.insert(0, str(ROOT / "tests"))

import torch  # noqa: E402

from architectures import MODELS, RECIPES, Runs, rel_l2  # noqa: E402

LABELS = {
    "gpt2": "GPT-2 (LM head)", "llama": "LLaMA", "mistral": "Mistral", "qwen2": "Qwen2", "gemma": "Gemma",
    "roberta": "RoBERTa (seq. cls.)", "bert": "BERT (seq. cls.)", "vit": "ViT (image cls.)",
    "lora_vit": "LoRA(q, v) ViT", "lora_llama": "LoRA(q, v) LLaMA",
    "lora_all_vit": "LoRA(all linear) ViT", "lora_all_llama": "LoRA(all linear) LLaMA",
    "bf16_lora_llama": "LoRA(all linear) LLaMA, 4 x 64 tokens", "qlora_llama": "QLoRA LLaMA, 4 x 64 tokens",
}
# the recipes run as loaded: their own dtypes, no autocast
RECIPE_DTYPES = {"bf16_lora_llama": "bf16 weights, fp32 adapters", "qlora_llama": "nf4 (bitsandbytes), fp32 adapters"}
PRECISION_LABELS = {"fp32": "fp32", "autocast": "bf16 autocast", "bf16": "bf16 weights"}
DEFAULT_ROWS = [(name, "fp32") for name in MODELS] + [
    ("vit", "autocast"), ("llama", "autocast"), ("gpt2", "autocast"), ("lora_vit", "autocast"),
    ("lora_llama", "autocast"), ("llama", "bf16"),
] + [(name, "fp32") for name in RECIPES]
STUDY = {"approxbp": "all", "approxbp_exact": "norms only", "approxbp_no_norms": "activations only"}
# plain GELU (GPT-2), gated GELU (Gemma's GeGLU), gated SiLU (LLaMA's SwiGLU)
STUDY_ROWS = [("gpt2", "fp32"), ("gemma", "fp32"), ("llama", "fp32"), ("llama", "autocast")]


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f}"


def coverage_table(runs: Runs, rows: list[tuple[str, str]], inners: list[str]) -> str:
    head = "| model | dtype | " + " | ".join(f"{inner} inner" for inner in inners) + " | baseline MiB (" + \
        " / ".join("eager" if i == "eager" else "torch.compile" for i in inners) + ") | forward error (" + \
        " / ".join(inners) + ") |"
    lines = [head, "|" + "---|" * (4 + len(inners))]
    for name, precision in rows:
        ratios, baselines, errors = [], [], []
        for inner in inners:
            ours, base = runs.get(name, "approxbp", inner, precision), runs.baseline(name, inner, precision)
            ratios.append(f"{ours.saved_bytes / base.saved_bytes:.2f}")
            baselines.append(_mib(base.saved_bytes))
            errors.append(f"{rel_l2(ours.out, runs.get(name, 'eager', precision=precision).out):.1e}")
        dtype = RECIPE_DTYPES.get(name, PRECISION_LABELS[precision])
        lines.append(f"| {LABELS[name]} | {dtype} | " + " | ".join(ratios)
                     + f" | {' / '.join(baselines)} | {' / '.join(errors)} |")
    return "\n".join(lines)


def study_table(runs: Runs, rows: list[tuple[str, str]], inners: list[str]) -> str:
    cols = [(inner, variant) for inner in inners for variant in STUDY]
    lines = ["| model | dtype | " + " | ".join(f"{inner}: {STUDY[v]}" for inner, v in cols) + " |",
             "|" + "---|" * (2 + len(cols))]
    for name, precision in rows:
        cells = [f"{runs.ratio(name, inner, precision, variant):.3f}" for inner, variant in cols]
        lines.append(f"| {LABELS[name]} | {PRECISION_LABELS[precision]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def section(tables: str, seconds: float) -> str:
    return f"""{START}
Bytes one forward keeps for backward with the `approxbp` backend, relative to the same-mode baseline (plain eager
for the eager inner, plain `torch.compile` for the inductor inner); lower is better. Tiny models built from HF
configs (2 layers, hidden 128, MLP 512, 4 heads, batch 4 x 32 tokens, random weights, randomized norm affines),
PEFT LoRA with r = 8. Forward error: relative L2 of the logits against plain eager in the same precision.
Generated on CPU (torch {torch.__version__}) in {seconds / 60:.0f} min by

```bash
{COMMAND}
```

{tables}
{END}"""


def write_readme(text: str) -> None:
    readme = README.read_text()
    if START in readme and END in readme:
        before, rest = readme.split(START, 1)
        after = rest.split(END, 1)[1]
        readme = before + text + after
    else:
        readme = readme.rstrip("\n") + "\n\n## Coverage\n\n" + text + "\n"
    README.write_text(readme)


def families_section(results: list, seconds: float, command: str) -> str:
    """README's families summary, between the families markers: the summary line and how it was made (the
    per-family table, skip reasons and norm exceptions stay in benchmarks/results/families.md)."""
    import families

    return (f"{FAMILIES_START}\n**Model families.** Every transformers family listed in "
            "benchmarks/results/families.md is built from its config at a tiny size and trained one step under "
            "`torch.compile(backend=\"approxbp\", options={\"inner\": \"eager\"})`; that file has the table per "
            "family, the families not measured and every norm left alone with its reason.\n\n"
            f"{families.markdown(results, seconds, command).split(chr(10) + '| family |')[0].rstrip()}"
            f"\n{FAMILIES_END}")


def write_families_readme(text: str) -> None:
    """Replace README.md between the families markers; the first time, put them after the coverage table."""
    readme = README.read_text()
    if FAMILIES_START in readme and FAMILIES_END in readme:
        before, rest = readme.split(FAMILIES_START, 1)
        readme = before + text + rest.split(FAMILIES_END, 1)[1]
    elif END in readme:
        before, after = readme.split(END, 1)
        readme = before + END + "\n\n" + text + after
    else:
        readme = readme.rstrip("\n") + "\n\n## Coverage\n\n" + text + "\n"
    README.write_text(readme)


def families_main(args: argparse.Namespace) -> None:
    """The families sweep (benchmarks/families.py): table to stdout, results/families.{md,json}, README."""
    import json

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import families

    if args.from_json:  # the tables again from a saved sweep, without measuring
        results, seconds, command = families.from_json(json.loads(pathlib.Path(args.from_json).read_text()))
    elif args.resume:  # measure what a saved sweep left for lack of time, keep the rest
        results, before, command = families.from_json(json.loads(pathlib.Path(args.resume).read_text()))
        todo = [families.BY_NAME.get(r.family) or families.guess_family(r.family) for r in results
                if r.status == "budget" or r.family in (args.only or ())]
        start = time.perf_counter()
        done = {r.family: r for r in families.sweep(todo, args.family_budget, args.total_budget,
                                                    dynamo_check=args.dynamo_check,
                                                    progress=lambda msg: print(msg, file=sys.stderr, flush=True))}
        results = [done.get(r.family, r) for r in results]
        seconds = before + time.perf_counter() - start
        command += " then `python " + " ".join(["benchmarks/coverage_table.py", *sys.argv[1:]]) + "`"
    else:
        chosen = families.select(args.only, args.kinds)
        start = time.perf_counter()
        results = families.sweep(chosen, args.family_budget, args.total_budget,
                                 dynamo_check=args.dynamo_check,
                                 progress=lambda msg: print(msg, file=sys.stderr, flush=True))
        seconds = time.perf_counter() - start
        command = "`python " + " ".join(["benchmarks/coverage_table.py", *sys.argv[1:]]) + "`"
    text = families.markdown(results, seconds, command)
    print(text)
    if args.resume or not args.only and not args.kinds:  # the committed results are those of the full sweep
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "families.md").write_text("# Model families under the approxbp backend\n\n" + text + "\n")
        if not args.from_json:
            (RESULTS / "families.json").write_text(json.dumps(families.to_json(results, seconds, command), indent=1)
                                                   + "\n")
        if args.write_readme:
            write_families_readme(families_section(results, seconds, command))
    elif args.write_readme:
        raise SystemExit("--families --write-readme writes the full sweep only: drop --only/--kinds")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--families", action="store_true",
                        help="sweep transformers model families instead (benchmarks/families.py)")
    parser.add_argument("--only", nargs="+", metavar="MODEL_TYPE", help="--families: these model types only")
    parser.add_argument("--kinds", nargs="+", choices=["decoder", "encoder", "encoder-decoder", "vision", "audio"],
                        help="--families: these kinds only")
    parser.add_argument("--family-budget", type=float, default=60.0, help="--families: seconds per family")
    parser.add_argument("--total-budget", type=float, default=1800.0, help="--families: seconds in all")
    parser.add_argument("--resume", metavar="PATH",
                        help="--families: sweep again the families a saved families.json skipped for the total budget "
                             "(and those --only names), keep the others")
    parser.add_argument("--from-json", metavar="PATH",
                        help="--families: rewrite the tables (and README) from a saved families.json, no sweep")
    parser.add_argument("--dynamo-check", choices=["on-problem", "always", "never"], default="on-problem",
                        help="--families: when to train under plain torch.compile(backend='eager') too")
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), help="fp32 rows of these models only")
    parser.add_argument("--inners", nargs="+", default=["eager", "inductor"], choices=["eager", "inductor"])
    parser.add_argument("--no-study", action="store_true", help="skip the per-rewrite table")
    parser.add_argument("--write-readme", action="store_true", help=f"replace README.md between {START} and {END}")
    args = parser.parse_args()
    if args.families:
        families_main(args)
        return
    if args.only or args.kinds:
        parser.error("--only/--kinds go with --families")

    warnings.filterwarnings("ignore")
    torch._dynamo.config.recompile_limit = 64
    torch._dynamo.config.accumulated_recompile_limit = 4096
    start = time.perf_counter()
    runs = Runs(models={**MODELS, **RECIPES})
    rows = [(n, "fp32") for n in args.models] if args.models else DEFAULT_ROWS
    tables = coverage_table(runs, rows, args.inners)
    if not args.no_study:
        tables += ("\n\nWhat each rewrite pays, per inner: all rewrites; norms only (`activations=False`, exact "
                   "gradients); activations only (`norms=False`). Ratios to the same baseline as above.\n\n"
                   + study_table(runs, STUDY_ROWS, args.inners))
    seconds = time.perf_counter() - start
    print(tables)
    print(f"\n({seconds:.0f} s)", file=sys.stderr)
    if args.write_readme:
        if args.models or args.inners != ["eager", "inductor"] or args.no_study:
            parser.error("--write-readme writes the full table only: drop --models/--inners/--no-study")
        write_readme(section(tables, seconds))


if __name__ == "__main__":
    main()
