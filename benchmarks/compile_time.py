"""Compile time: what the approxbp backend adds to torch.compile, by model depth.

Builds a LLaMA-style decoder (``LlamaForCausalLM``) and a ViT-style encoder (``ViTForImageClassification``)
from tiny HF configs (hidden 64, MLP 256, 4 heads; LLaMA: vocab 100, batch 2 x 16 tokens; ViT: 16 x 16
images in 4 x 4 patches, batch 2), random weights, randomized norm affines, fp32, train mode, at 4, 12, 24
and 48 layers. For each model and depth, after ``torch._dynamo.reset()`` and on a freshly built model:

1. plain ``torch.compile(model)`` (inductor): the time of the first forward + backward, i.e. the compile time;
2. ``torch.compile(model, backend="approxbp", options={"inner": inner})`` for each inner: the same time, and
   the backend's own time (find / apply / verify, from the ``Report`` the backend logs on the
   ``approxbp_fx`` logger at INFO), the sites rewritten and the nodes of the graph;
3. the same with one norm site made to compute a wrong forward (its eps set to 10): verification must drop
   exactly that site, and its cost is compared with the clean run's verification (with the eager inner by
   default: verification comes before the inner compile; min of ``--repeats`` compiles each).

    python benchmarks/compile_time.py                        # 4, 12, 24, 48 layers (slow: see below)
    python benchmarks/compile_time.py --quick                # LLaMA at 4 and 12 layers only
    python benchmarks/compile_time.py --models llama --layers 4 12 48 --inners inductor

Inductor's caches are off (``TORCHINDUCTOR_FORCE_DISABLE_CACHES=1``; fx graph, AOTAutograd and autotune
caches off too), so every compile is a cold one, and one untimed warm-up compile per model and configuration
at one layer absorbs the process's one-time costs (imports, compile workers, the ops' first calls). Results
go to benchmarks/results/compile_time.{md,json} (``--quick``: compile_time-quick.{md,json}). Every inductor
compile takes tens of seconds on 2 CPU cores, the full run most of an hour; the times are wall-clock on
whatever else the machine is doing, only the ratios mean much. Verification runs the graph eagerly, op by op,
so on a loaded machine it suffers most from intra-op threads waiting on each other (``--threads 1`` pins them).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import hashlib
import json
import os
import pathlib
import platform
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator

ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
COMMAND = "python benchmarks/compile_time.py"

# A compile cache per version of the package sources: torch's caches key a graph by its ops, not by the
# Python code of a custom op's backward (as in tests/conftest.py). Must be set before torch compiles anything.
_sources = sorted(ROOT.joinpath("approxbp_fx").rglob("*.py"))
_digest = hashlib.sha256(b"".join(p.read_bytes() for p in _sources)).hexdigest()[:16]
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(tempfile.gettempdir(), f"approxbp-inductor-{_digest}"))
# ... and no cache hits at all: a second compile of the same graph (the same model under another
# configuration, or the same kernels) would otherwise be nearly free. Read when torch is imported.
os.environ.setdefault("TORCHINDUCTOR_FORCE_DISABLE_CACHES", "1")

import torch  # noqa: E402
from torch import Tensor, nn  # noqa: E402

import approxbp_fx  # noqa: E402
from approxbp_fx import backend as approxbp_backend_module  # noqa: E402

HIDDEN, MLP, HEADS, VOCAB = 64, 256, 4, 100
BATCH, TOKENS, IMAGE, PATCH = 2, 16, 16, 4  # ViT: (16 / 4)^2 = 16 patches (+ CLS)
LAYERS = [4, 12, 24, 48]
QUICK_LAYERS = [4, 12]
MODEL_LABELS = {"llama": "LLaMA", "vit": "ViT"}
WRONG_EPS = 10.0  # the forced-mismatch site's eps: its norm's output is far from the original
BUDGET = {"fraction": 0.10, "linearity": 1.5, "mismatch": 2.0}


# ----------------------------------------------------------------------------------------------- models

def _randomize_norms(model: nn.Module, seed: int) -> nn.Module:
    """gamma ~ U(0.5, 1.5), beta ~ U(-0.5, 0.5) for every module whose class name contains "norm"
    (as tests/architectures.py: with gamma = 1 and beta = 0 a folding bug would hide)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if "norm" not in type(m).__name__.lower():
                continue
            for name, offset in (("weight", 0.5), ("bias", -0.5)):
                p = getattr(m, name, None)
                if isinstance(p, Tensor):
                    p.copy_(torch.rand(p.shape, generator=g) + offset)
    return model


def llama(layers: int, seed: int = 0) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=MLP, num_hidden_layers=layers,
        num_attention_heads=HEADS, num_key_value_heads=HEADS, max_position_embeddings=64,
        attention_dropout=0.0, use_cache=False,
    )
    return _randomize_norms(LlamaForCausalLM(config).float().train(), seed + 1)


def llama_inputs(seed: int = 0) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(3, VOCAB, (BATCH, TOKENS), generator=g)}


def vit(layers: int, seed: int = 0) -> nn.Module:
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(seed)
    config = ViTConfig(
        hidden_size=HIDDEN, num_hidden_layers=layers, num_attention_heads=HEADS, intermediate_size=MLP,
        image_size=IMAGE, patch_size=PATCH, num_channels=3, num_labels=10,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    return _randomize_norms(ViTForImageClassification(config).float().train(), seed + 1)


def vit_inputs(seed: int = 0) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"pixel_values": torch.randn(BATCH, 3, IMAGE, IMAGE, generator=g)}


MODELS: dict[str, tuple[Callable[[int], nn.Module], Callable[[], dict[str, Tensor]]]] = {
    "llama": (llama, llama_inputs),
    "vit": (vit, vit_inputs),
}


# ------------------------------------------------------------------------------------------ measurement

@dataclass
class Run:
    """One compile: (model, layers, configuration)."""

    model: str
    layers: int
    config: str  # "inductor" (plain torch.compile), "approxbp" or "approxbp-mismatch"
    inner: str  # the approxbp inner ("inductor" for plain torch.compile)
    first_step_s: float  # first forward + backward: the compile, plus one step
    graphs: int = 0  # reports the backend logged
    nodes: int = 0  # nodes of the graph(s) the backend received
    sites: int = 0
    rewritten: int = 0
    find_s: float = 0.0
    apply_s: float = 0.0
    verify_s: float = 0.0
    dropped: list[dict[str, str]] = field(default_factory=list)  # sites verification left unrewritten
    forced_site: str = ""  # the site made wrong (mismatch runs)
    warnings: list[str] = field(default_factory=list)  # RuntimeWarnings raised during the compile
    #: verify_s of repeated compiles of the same configuration (the mismatch comparison: see --repeats)
    verify_samples: list[float] = field(default_factory=list)
    repeat_problems: list[str] = field(default_factory=list)  # mismatch repeats that did not drop the site

    @property
    def own_s(self) -> float:
        return self.find_s + self.apply_s + self.verify_s


@contextlib.contextmanager
def _forced_mismatch() -> Iterator[list[str]]:
    """One norm site (the middle one of the first graph) computes a wrong forward: after its own apply,
    its ``norm_shared`` node gets eps = WRONG_EPS. Yields the list that receives the site's id."""
    find_candidates = approxbp_backend_module.find_candidates
    chosen: list[str] = []

    def wrong(candidate: Any, apply: Callable[[Any], None]) -> Callable[[Any], None]:
        def apply_wrong(edit: Any) -> None:
            apply(edit)
            nodes = [n for n in edit.graph.nodes if n.meta.get("approxbp_site") == candidate.id
                     and n.target is torch.ops.approxbp.norm_shared.default]
            if len(nodes) != 1:
                raise RuntimeError(f"forced mismatch: {len(nodes)} norm_shared nodes for site {candidate.id}")
            nodes[0].update_arg(5, WRONG_EPS)
        return apply_wrong

    def find(gm: Any, options: Any) -> list[Any]:
        candidates = find_candidates(gm, options)
        norms = [c for c in candidates if c.family == "norms" and not c.skip]
        if norms and not chosen:  # one site in all, in the first graph that has one
            candidate = norms[len(norms) // 2]
            candidate.apply = wrong(candidate, candidate.apply)
            chosen.append(candidate.id)
        return candidates

    approxbp_backend_module.find_candidates = find
    try:
        yield chosen
    finally:
        approxbp_backend_module.find_candidates = find_candidates


def _loss(out: Any) -> Tensor:
    return out.logits.float().sum()


def measure(name: str, layers: int, config: str, inner: str = "inductor") -> Run:
    """A fresh model and a fresh Dynamo: the time of the first forward + backward under ``config``."""
    build, make_inputs = MODELS[name]
    torch._dynamo.reset()
    gc.collect()
    model, inputs = build(layers), make_inputs()
    if config == "inductor":
        compiled = torch.compile(model)
    else:
        compiled = torch.compile(model, backend="approxbp", options={"inner": inner})
    forced = _forced_mismatch() if config == "approxbp-mismatch" else contextlib.nullcontext([])
    with approxbp_fx.collect_reports() as reports, forced as chosen, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        start = time.perf_counter()
        _loss(compiled(**inputs)).backward()
        seconds = time.perf_counter() - start
    run = Run(name, layers, config, inner, seconds, forced_site=chosen[0] if chosen else "",
              warnings=[str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)])
    for report in reports:
        run.graphs += 1
        run.nodes += sum(len(original.graph.nodes) for original, _ in report.graphs)
        run.sites += len(report.sites)
        run.rewritten += len(report.rewritten)
        run.find_s += report.timings.get("find", 0.0)
        run.apply_s += report.timings.get("apply", 0.0)
        run.verify_s += report.timings.get("verify", 0.0)
        run.dropped += [{"id": s.id, "path": s.path, "reason": s.reason} for s in report.skipped
                        if s.reason.startswith("forward mismatch")]
    if config != "inductor" and not reports:
        raise RuntimeError(f"{name} x {layers}: the backend logged no report (was the approxbp backend called?)")
    del compiled, model
    torch._dynamo.reset()
    return run


def mismatch_ok(run: Run) -> str:
    """Empty when verification dropped exactly the forced site, else what went wrong."""
    if not run.forced_site:
        return "no norm site to force"
    ids = [d["id"] for d in run.dropped]
    if ids != [run.forced_site]:
        return f"dropped {ids or 'nothing'} instead of [{run.forced_site}]"
    if not any("unrewritten" in w for w in run.warnings):
        return "no RuntimeWarning 'left ... unrewritten'"
    return next((p for p in run.repeat_problems if p), "")


def _log(run: Run) -> None:
    own = "" if run.config == "inductor" else (
        f", own {run.own_s:.3f} s (find {run.find_s:.3f}, apply {run.apply_s:.3f}, verify {run.verify_s:.3f}), "
        f"{run.rewritten}/{run.sites} sites")
    print(f"{run.model} x {run.layers} {run.config} ({run.inner}): first fwd+bwd {run.first_step_s:.2f} s{own}",
          file=sys.stderr, flush=True)


# -------------------------------------------------------------------------------------------- reporting

def _s(x: float) -> str:
    return f"{x:.2f}" if x >= 1 else f"{x:.3f}"


def _ms(x: float) -> str:
    return f"{x * 1e3:.1f}"


def _pct(x: float) -> str:
    return f"{x * 100:.1f}%"


class Results:
    def __init__(self, runs: list[Run]) -> None:
        self.runs = runs

    def get(self, model: str, layers: int, config: str, inner: str = "inductor") -> Run | None:
        return next((r for r in self.runs if (r.model, r.layers, r.config, r.inner) == (model, layers, config, inner)),
                    None)

    def fraction(self, model: str, layers: int, inner: str = "inductor") -> float | None:
        """Backend own time over plain torch.compile's compile (first forward + backward)."""
        ours, plain = self.get(model, layers, "approxbp", inner), self.get(model, layers, "inductor")
        return ours.own_s / plain.first_step_s if ours and plain else None

    def per_layer(self, model: str, layers: int, inner: str = "inductor") -> float | None:
        ours = self.get(model, layers, "approxbp", inner)
        return ours.own_s / layers if ours else None

    def mismatch_ratio(self, model: str, layers: int, inner: str) -> float | None:
        bad, clean = self.get(model, layers, "approxbp-mismatch", inner), self.get(model, layers, "approxbp", inner)
        if not bad or not clean or not min(clean.verify_samples or [clean.verify_s]) > 0:
            return None
        return min(bad.verify_samples or [bad.verify_s]) / min(clean.verify_samples or [clean.verify_s])


def main_table(res: Results, models: list[str], layers: list[int], inners: list[str]) -> str:
    lines = ["| model | layers | configuration | graph nodes | sites rewritten | first fwd+bwd s | find s | apply s "
             "| verify s | backend own s | own / plain compile | own per layer ms | extra over plain s |",
             "|" + "---|" * 13]
    for m in models:
        for n in layers:
            plain = res.get(m, n, "inductor")
            lines.append(f"| {MODEL_LABELS[m]} | {n} | torch.compile (inductor) | | | {_s(plain.first_step_s)} "
                         "| | | | | | | |")
            for inner in inners:
                r = res.get(m, n, "approxbp", inner)
                lines.append(
                    f"| {MODEL_LABELS[m]} | {n} | approxbp, {inner} inner | {r.nodes} | {r.rewritten}/{r.sites} "
                    f"| {_s(r.first_step_s)} | {_s(r.find_s)} | {_s(r.apply_s)} | {_s(r.verify_s)} | {_s(r.own_s)} "
                    f"| {_pct(r.own_s / plain.first_step_s)} | {_ms(r.own_s / n)} "
                    f"| {r.first_step_s - plain.first_step_s:+.2f} |")
    return "\n".join(lines)


def linearity_table(res: Results, models: list[str], layers: list[int], inners: list[str]) -> str:
    lines = ["| model | inner | " + " | ".join(f"{n} layers" for n in layers) + " |", "|" + "---|" * (2 + len(layers))]
    for m in models:
        for inner in inners:
            cells = [_ms(res.per_layer(m, n, inner)) for n in layers]
            lines.append(f"| {MODEL_LABELS[m]} | {inner} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _samples(run: Run) -> str:
    samples = run.verify_samples or [run.verify_s]
    return f"{_s(min(samples))} ({', '.join(_s(x) for x in samples)})"


def mismatch_table(res: Results, models: list[str], layers: list[int], inner: str) -> str:
    lines = ["| model | layers | forced site | dropped by verification | clean verify s: min (runs) "
             "| mismatch verify s: min (runs) | mismatch / clean | sites rewritten (clean -> mismatch) |",
             "|" + "---|" * 8]
    for m in models:
        for n in layers:
            bad, clean = res.get(m, n, "approxbp-mismatch", inner), res.get(m, n, "approxbp", inner)
            problem = mismatch_ok(bad)
            dropped = "exactly that site" if not problem else f"**{problem}**"
            ratio = res.mismatch_ratio(m, n, inner)
            lines.append(f"| {MODEL_LABELS[m]} | {n} | `{bad.forced_site}` | {dropped} | {_samples(clean)} "
                         f"| {_samples(bad)} | {'n/a' if ratio is None else f'{ratio:.2f}x'} "
                         f"| {clean.rewritten} -> {bad.rewritten} |")
    return "\n".join(lines)


def acceptance(res: Results, models: list[str], layers: list[int], mismatch_inner: str) -> list[tuple[bool, str]]:
    """(passed, line) per model and criterion, at the largest layer count measured."""
    top = max(layers)
    ref = 12 if 12 in layers and 12 < top else min(layers)
    note = "" if top == 48 else f" (at {top} layers: 48 not measured)"
    out: list[tuple[bool, str]] = []
    for m in models:
        label = MODEL_LABELS[m]
        ours, plain = res.get(m, top, "approxbp", "inductor"), res.get(m, top, "inductor")
        if ours is None:
            out.append((False, f"{label}: backend own time <= {_pct(BUDGET['fraction'])} of plain torch.compile: "
                               "not measured (needs the inductor inner)"))
        else:
            frac = ours.own_s / plain.first_step_s
            out.append((frac <= BUDGET["fraction"],
                        f"{label}: backend own time at {top} layers (inductor inner) {_s(ours.own_s)} s = {_pct(frac)} "
                        f"of plain torch.compile's {_s(plain.first_step_s)} s; "
                        f"budget {_pct(BUDGET['fraction'])}{note}"))
        a, b = res.per_layer(m, ref, "inductor"), res.per_layer(m, top, "inductor")
        if a is None or b is None or ref == top:
            out.append((False, f"{label}: backend time per layer: needs the inductor inner at two layer counts"))
        else:
            out.append((b / a <= BUDGET["linearity"],
                        f"{label}: backend own time per layer {_ms(b)} ms at {top} layers vs {_ms(a)} ms at {ref} "
                        f"= {b / a:.2f}x; budget {BUDGET['linearity']}x{note}"))
        bad, clean = res.get(m, top, "approxbp-mismatch", mismatch_inner), res.get(m, top, "approxbp", mismatch_inner)
        ratio, problem = res.mismatch_ratio(m, top, mismatch_inner), mismatch_ok(bad)
        if problem or ratio is None:
            out.append((False, f"{label}: forced mismatch at {top} layers: {problem or 'no clean verify time'}"))
        else:
            out.append((ratio <= BUDGET["mismatch"],
                        f"{label}: forced mismatch at {top} layers ({mismatch_inner} inner) verify "
                        f"{_s(min(bad.verify_samples))} s = {ratio:.2f}x the clean run's "
                        f"{_s(min(clean.verify_samples))} s (min of {len(bad.verify_samples)} each), "
                        f"the one bad site dropped; budget {BUDGET['mismatch']}x{note}"))
    return out


def markdown(res: Results, args: argparse.Namespace, inners: list[str], seconds: float,
             checks: list[tuple[bool, str]]) -> str:
    command = " ".join([COMMAND] + sys.argv[1:])
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    acceptance_lines = "\n".join(f"- {'PASS' if ok else 'FAIL'}: {line}" for ok, line in checks)
    verdict = "PASS" if all(ok for ok, _ in checks) else "FAIL"
    return f"""# Compile time of the approxbp backend

What `torch.compile(model, backend="approxbp")` adds to compiling a model, by depth. Tiny HF models (hidden
{HIDDEN}, MLP {MLP}, {HEADS} heads; LLaMA: vocab {VOCAB}, batch {BATCH} x {TOKENS} tokens; ViT: {IMAGE} x {IMAGE}
images, patch {PATCH}, batch {BATCH}), random weights, fp32, train mode. Every row is a fresh model after
`torch._dynamo.reset()`, with inductor's caches off (every compile cold). "first fwd+bwd": wall time of the
first forward + backward, i.e. the compile. "backend own": find + apply + verify, from the `Report` the backend
logs (`approxbp_fx` logger, INFO); the rest of the difference to plain `torch.compile` ("extra over plain")
is the inner compiler working on the rewritten graph. Wall-clock on CPU (torch {torch.__version__},
{os.cpu_count()} cores, {torch.get_num_threads()} intra-op threads, load average {load} at the end),
{seconds / 60:.1f} min in all. Reproduce with

```bash
{command}
```

(the full sweep: `{COMMAND}`.)

## Compile times

{main_table(res, args.models, args.layers, inners)}

## Backend own time per layer (ms)

Linear cost in the depth shows as a flat row (the embedding and the head add a fixed part, largest per layer at
few layers).

{linearity_table(res, args.models, args.layers, inners)}

## Forced mismatch ({args.mismatch_inner} inner)

One norm site (the middle one) made to compute a wrong forward (its eps set to {WRONG_EPS:g}): verification must
drop that site alone, with a `RuntimeWarning`. Verification does not depend on the inner, so the cheaper
{args.mismatch_inner} inner is used. Verify times are short and noisy: clean and forced-mismatch compiles with
that inner run {args.repeats} times each, interleaved, and their minima are compared.

{mismatch_table(res, args.models, args.layers, args.mismatch_inner)}

## Acceptance: {verdict}

{acceptance_lines}
"""


# ------------------------------------------------------------------------------------------------ main

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--layers", nargs="+", type=int, default=LAYERS)
    parser.add_argument("--inners", nargs="+", default=["inductor", "eager"],
                        choices=["inductor", "eager", "aot_eager"])
    parser.add_argument("--mismatch-inner", default="eager", choices=["inductor", "eager", "aot_eager"],
                        help="the inner of the forced-mismatch runs (verification does not depend on it)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="clean and forced-mismatch compiles with the mismatch inner, for the verify ratio (min)")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's own)")
    parser.add_argument("--quick", action="store_true", help=f"LLaMA at {QUICK_LAYERS} layers only")
    parser.add_argument("--no-warmup", action="store_true", help="skip the untimed one-layer compiles")
    parser.add_argument("--no-write", action="store_true", help="print only; write nothing to benchmarks/results")
    args = parser.parse_args()
    if args.quick:
        args.models, args.layers = ["llama"], QUICK_LAYERS
    args.layers = sorted(set(args.layers))
    inners = list(dict.fromkeys(args.inners + [args.mismatch_inner]))  # the mismatch needs a clean run to compare

    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch._dynamo.config.recompile_limit = 64
    torch._dynamo.config.accumulated_recompile_limit = 4096
    torch._inductor.config.fx_graph_cache = False
    torch._inductor.config.autotune_local_cache = False
    torch._functorch.config.enable_autograd_cache = False
    warnings.filterwarnings("ignore", module="transformers")

    start = time.perf_counter()
    if not args.no_warmup:  # imports, compile workers, first calls of the ops: not what a compile costs
        for m in args.models:
            for config, inner in [("inductor", "inductor")] + [("approxbp", i) for i in inners]:
                t = measure(m, 1, config, inner).first_step_s
                print(f"warm-up {m} x 1 {config} ({inner}): {t:.1f} s", file=sys.stderr, flush=True)

    runs: list[Run] = []
    for m in args.models:
        for n in args.layers:
            for config, inner in [("inductor", "inductor")] + [("approxbp", i) for i in inners]:
                runs.append(measure(m, n, config, inner))
                _log(runs[-1])
            # verification with and without the wrong site, interleaved; each side's minimum is compared
            clean, bad = next(r for r in runs[::-1] if r.config == "approxbp" and r.inner == args.mismatch_inner), []
            clean.verify_samples = [clean.verify_s]
            for i in range(args.repeats):
                if i:
                    again = measure(m, n, "approxbp", args.mismatch_inner)
                    clean.verify_samples.append(again.verify_s)
                    _log(again)
                bad.append(measure(m, n, "approxbp-mismatch", args.mismatch_inner))
                _log(bad[-1])
            bad[0].verify_samples = [b.verify_s for b in bad]
            bad[0].repeat_problems = [mismatch_ok(b) for b in bad[1:]]
            runs.append(bad[0])
    seconds = time.perf_counter() - start

    res = Results(runs)
    checks = acceptance(res, args.models, args.layers, args.mismatch_inner)
    text = markdown(res, args, inners, seconds, checks)
    print(text)
    if not args.no_write:
        RESULTS.mkdir(parents=True, exist_ok=True)
        stem = "compile_time-quick" if args.quick else "compile_time"
        (RESULTS / f"{stem}.md").write_text(text)
        raw = {
            "command": " ".join([COMMAND] + sys.argv[1:]), "torch": torch.__version__,
            "python": platform.python_version(), "cpus": os.cpu_count(), "threads": torch.get_num_threads(),
            "seconds": seconds, "models": args.models, "layers": args.layers, "inners": inners,
            "mismatch_inner": args.mismatch_inner, "repeats": args.repeats,
            "caches": {"TORCHINDUCTOR_FORCE_DISABLE_CACHES": os.environ.get("TORCHINDUCTOR_FORCE_DISABLE_CACHES"),
                       "force_disable_caches": bool(torch._inductor.config.force_disable_caches),
                       "TORCHINDUCTOR_CACHE_DIR": os.environ.get("TORCHINDUCTOR_CACHE_DIR")},
            "runs": [dict(asdict(r), own_s=r.own_s) for r in runs],
            "derived": {
                f"{m}/{n}/{inner}": {"own_fraction_of_plain_compile": res.fraction(m, n, inner),
                                     "own_per_layer_s": res.per_layer(m, n, inner),
                                     "mismatch_verify_ratio": res.mismatch_ratio(m, n, inner)}
                for m in args.models for n in args.layers for inner in inners},
            "acceptance": [{"pass": ok, "check": line} for ok, line in checks],
        }
        (RESULTS / f"{stem}.json").write_text(json.dumps(raw, indent=2) + "\n")
        print(f"\nwrote {RESULTS / stem}.md and .json ({seconds:.0f} s)", file=sys.stderr)


if __name__ == "__main__":
    main()
