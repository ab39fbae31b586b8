"""Memory and speed of approxbp side by side with eager, torch.compile, its activation_memory_budget and
gradient checkpointing. Writes BENCHMARKS.md and benchmarks/results/*.png.

    python benchmarks/run.py --smoke --out /tmp/bench      # CI: one tiny ViT row, 4 configurations (< 2 min)
    python benchmarks/run.py --quick                       # 2-layer versions of the geometries (<= 10 min, CPU)
    python benchmarks/run.py                               # full-size geometries (long)
    python benchmarks/run.py --device cuda --quick         # on a GPU: full-size geometries, the quick rows
    python benchmarks/run.py --quick --only 'vit-b16/full' # rows whose name matches a regex

Rows are named ``geometry/tuning/precision`` (tuning: full, lora-qv, lora-all; precision: fp32, bf16
autocast, or bf16w: bf16 weights with PEFT's float32 adapters and no autocast; a ``+dropout`` tuning sets dropout 0.1 where the others have none). Per row, each configuration is
measured for:

* bytes saved for backward by one forward (``approxbp_fx.saved_tensors``: unique storages, parameters
  excluded), also split by kind of tensor (judged from shape and dtype);
* peak memory of one training step, in a child process of its own (CPU: ``VmHWM`` after resetting it
  through ``/proc/self/clear_refs``, with ``MALLOC_MMAP_THRESHOLD_=65536``; CUDA: ``max_memory_allocated``);
* median step time (forward, backward, AdamW step) over rounds that interleave the row's configurations in
  one process after warm-up, as a ratio to the same-mode baseline (eager for eager configurations,
  torch.compile for compiled ones);
* the ideal: baseline bytes minus the backend's per-site estimate of what each rewritten site removes
  (``approxbp_fx.explain(...).bytes_saved``), and kept / ideal.

Where an approxbp configuration is slower than the same configuration without approxbp (by more than
``--profile-above``), both are profiled with torch.profiler and the ops with the largest differences
go into BENCHMARKS.md. A configuration that fails is reported in the table; the exit status is then 1.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import json
import os
import pathlib
import platform
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))


def _cache_dir() -> str:
    # As in tests/conftest.py: inductor's cache keys a graph by its ops, not by the Python code of a custom
    # op's backward, so each version of the package sources gets a cache of its own.
    import tempfile

    sources = sorted(ROOT.joinpath("approxbp_fx").rglob("*.py"))
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in sources)).hexdigest()[:16]
    return os.path.join(tempfile.gettempdir(), f"approxbp-inductor-{digest}")


os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", _cache_dir())

ALL = ["eager", "eager+approxbp", "torch.compile", "torch.compile+approxbp", "compile+budget0.7",
       "compile+budget0.7+approxbp", "compile+budget0.5", "compile+budget0.5+approxbp", "checkpointing",
       "checkpointing+approxbp"]
PAIRS = ["eager", "eager+approxbp", "torch.compile", "torch.compile+approxbp"]
EAGER_PAIR = ["eager", "eager+approxbp"]
CKPT = ["eager", "eager+approxbp", "checkpointing", "checkpointing+approxbp"]


@dataclass
class Row:
    geometry: str
    tuning: str  # full | lora-qv | lora-all
    precision: str  # fp32 | bf16 (autocast) | bf16w (bf16 weights, float32 adapters)
    configs: list[str]

    @property
    def name(self) -> str:
        return f"{self.geometry}/{self.tuning}/{self.precision}"


def plan(preset: str, device: str) -> tuple[dict[str, Any], list[Row], dict[str, Any]]:
    """(geometries, rows, settings) of a preset; rows in order of importance (--quick drops the tail if late)."""
    import _measure as M

    if preset == "smoke":
        return M.SMOKE, [Row("vit-b16", "full", "fp32", PAIRS)], {"warmup": 2, "rounds": 3, "time_limit": 150}
    if preset == "quick":
        rows = [
            Row("vit-b16", "full", "fp32", ALL),
            Row("vit-b16", "lora-qv", "bf16", CKPT),
            Row("llama", "lora-all", "bf16", PAIRS),
            # a bf16 checkpoint with PEFT's float32 adapters: each adapter casts its input up
            Row("llama", "lora-all", "bf16w", PAIRS),
            Row("vit-b16", "full", "bf16", PAIRS),
            Row("gpt2-small", "full", "fp32", EAGER_PAIR),
            Row("roberta-base", "full", "fp32", EAGER_PAIR),
            # dropout 0.1 (HF's default, PEFT's lora_dropout): the dropout family's masks and linears
            Row("llama", "lora-all+dropout", "fp32", PAIRS),
            Row("roberta-base", "full+dropout", "fp32", EAGER_PAIR),
        ]
        if device == "cuda":  # full-size geometries on a GPU: fewer compiled configurations
            rows = [Row("vit-b16", "full", "fp32", ALL), Row("vit-b16", "full", "bf16", PAIRS),
                    Row("vit-b16", "lora-qv", "bf16", CKPT), Row("llama", "lora-all", "bf16", PAIRS)]
            return M.FULL_CUDA, rows, {"warmup": 3, "rounds": 10, "time_limit": 540}
        return M.QUICK, rows, {"warmup": 2, "rounds": 9, "time_limit": 540}
    rows = []
    for geometry in M.FULL:
        rows += [Row(geometry, "full", "fp32", ALL), Row(geometry, "full", "bf16", ALL),
                 Row(geometry, "lora-qv", "bf16", ALL), Row(geometry, "lora-all", "bf16", ALL)]
    return (M.FULL_CUDA if device == "cuda" else M.FULL), rows, {"warmup": 3, "rounds": 10, "time_limit": None}


# ----------------------------------------------------------------------------------------------- processes


def run_child(spec: dict[str, Any], env_extra: dict[str, str], log) -> dict[str, Any]:
    env = dict(os.environ, **env_extra)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, str(HERE / "run.py"), "--child", json.dumps(spec)],
                          env=env, capture_output=True, text=True, cwd=str(ROOT))
    log.write(f"{spec['kind']} {spec.get('config', '')}: {time.perf_counter() - t0:.1f}s, exit status {proc.returncode}\n")
    log.flush()
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-15:]
    log.write(f"--- child failed ({proc.returncode}): {spec['kind']} {spec.get('config', '')}\n" + "\n".join(tail) + "\n")
    last = next((line for line in reversed(tail) if line.strip()), f"exit status {proc.returncode}")
    return {"error": last.strip()[:300]}


def measure_row(row: Row, geometry, args, settings, log) -> dict[str, Any]:
    import _measure as M

    base = {"geometry": M.geometry_dict(geometry), "tuning": row.tuning, "precision": row.precision,
            "device": args.device}
    t0 = time.perf_counter()
    timing = run_child(dict(base, kind="timing", configs=row.configs, warmup=settings["warmup"],
                            rounds=settings["rounds"], profile_above=args.profile_above), {}, log)
    timing.setdefault("configs", {})
    timing.setdefault("errors", {})
    if "error" in timing:
        timing["errors"]["timing process"] = timing.pop("error")
    memory = {}
    for name in row.configs:
        memory[name] = run_child(dict(base, kind="memory", config=name), {"MALLOC_MMAP_THRESHOLD_": "65536"}, log)
    return {"row": row.name, "geometry": M.geometry_dict(geometry), "timing": timing, "memory": memory,
            "seconds": round(time.perf_counter() - t0, 1), "configs": row.configs}


# ------------------------------------------------------------------------------------------------- reports

MiB = 2**20


def _f(x: float | None, fmt: str = "{:.1f}") -> str:
    return "n/a" if x is None else fmt.format(x)


def row_table(res: dict[str, Any]) -> tuple[list[str], dict[str, dict[str, Any]]]:
    """Markdown lines of a row's table, and the derived numbers per configuration."""
    import _measure as M

    t, mem = res["timing"], res["memory"]
    confs = t["configs"]
    removed = t.get("ideal_removed_bytes")
    derived: dict[str, dict[str, Any]] = {}
    for name in res["configs"]:
        c, m, cfg = confs.get(name, {}), mem.get(name, {}), M.CONFIG_BY_NAME[name]
        d: dict[str, Any] = {"saved": c.get("saved_bytes"), "step": c.get("step_s"),
                             "peak": m.get("peak_bytes"), "resting": m.get("resting_bytes"),
                             "error": t["errors"].get(name) or m.get("error")}
        partner = confs.get(cfg.without_approxbp, {})
        if cfg.approxbp and d["saved"] is not None and partner.get("saved_bytes"):
            d["saved_vs_partner"] = d["saved"] / partner["saved_bytes"]
        baseline = confs.get(cfg.baseline, {})
        if d["step"] is not None and baseline.get("step_s"):
            d["time_ratio"] = d["step"] / baseline["step_s"]
        if cfg.approxbp and d["step"] is not None and partner.get("step_s"):
            d["time_vs_partner"] = d["step"] / partner["step_s"]
        if cfg.approxbp and cfg.budget is None and not cfg.checkpointing and removed is not None and baseline.get("saved_bytes"):
            d["ideal"] = baseline["saved_bytes"] - removed
            if d["saved"] is not None and d["ideal"] > 0:
                d["kept_vs_ideal"] = d["saved"] / d["ideal"]
        derived[name] = d
    lines = ["| configuration | saved for backward (MiB) | vs. without approxbp | ideal (MiB) | kept / ideal "
             "| peak (MiB) | step peak above resting (MiB) | step time (ms) | vs. baseline | vs. without approxbp |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, d in derived.items():
        step_peak = _step_peak(d)
        cells = [name, _f(d["saved"] and d["saved"] / MiB, "{:.2f}"), _f(d.get("saved_vs_partner"), "{:.3f}"),
                 _f(d.get("ideal") and d["ideal"] / MiB, "{:.2f}"), _f(d.get("kept_vs_ideal"), "{:.3f}"),
                 _f(d["peak"] and d["peak"] / MiB, "{:.0f}"), _f(step_peak and step_peak / MiB, "{:.0f}"),
                 _f(d["step"] and d["step"] * 1000, "{:.1f}"), _f(d.get("time_ratio"), "{:.3f}"),
                 _f(d.get("time_vs_partner"), "{:.3f}")]
        if d["error"]:
            cells[0] += f" (**failed**: {d['error'].replace('|', '/')})"
        lines.append("| " + " | ".join(cells) + " |")
    return lines, derived


def acceptance(derived_by_row: dict[str, dict[str, dict[str, Any]]]) -> list[tuple[str, str, str, str]]:
    """(criterion, row, measured, verdict) for the acceptance criteria on the rows that were run."""
    out = []

    def check(label: str, row: str, value: float | None, limit: float) -> None:
        verdict = "n/a" if value is None else ("pass" if value <= limit else "FAIL")
        out.append((f"{label} <= {limit}", row, _f(value, "{:.3f}"), verdict))

    def get(row: str, conf: str, key: str) -> float | None:
        return derived_by_row.get(row, {}).get(conf, {}).get(key)

    for row in derived_by_row:
        geom, tuning, prec = row.split("/")
        if geom == "vit-b16" and tuning == "full":
            check("eager+approxbp bytes / ideal", row, get(row, "eager+approxbp", "kept_vs_ideal"), 1.03)
            a, b = get(row, "torch.compile+approxbp", "saved"), get(row, "eager+approxbp", "saved")
            check("torch.compile+approxbp bytes / eager+approxbp bytes", row, a / b if a and b else None, 1.05)
            if prec == "fp32":
                check("torch.compile+approxbp bytes / torch.compile bytes", row,
                      get(row, "torch.compile+approxbp", "saved_vs_partner"), 0.72)
        if geom in ("vit-b16", "llama"):
            for conf, limit in (("torch.compile+approxbp", 1.05), ("eager+approxbp", 1.10)):
                if conf in derived_by_row[row]:
                    check(f"{conf} step time / without approxbp", row, get(row, conf, "time_vs_partner"), limit)
        if prec == "bf16w":
            # a bf16 checkpoint with PEFT's float32 adapters: the recipe most people run on a small GPU
            check("eager+approxbp bytes / eager", row, get(row, "eager+approxbp", "saved_vs_partner"), 0.60)
            check("torch.compile+approxbp bytes / torch.compile", row,
                  get(row, "torch.compile+approxbp", "saved_vs_partner"), 0.95)
            check("eager+approxbp step time / eager (bf16 weights)", row, get(row, "eager+approxbp", "time_vs_partner"),
                  1.05)
            check("torch.compile+approxbp step time / torch.compile (bf16 weights)", row,
                  get(row, "torch.compile+approxbp", "time_vs_partner"), 1.00)
        if row == "vit-b16/lora-qv/bf16":
            # The step's own peak (above the RSS just before it): the whole-process peak also counts the
            # interpreter and libraries, and approxbp's process has inductor loaded for its kernels
            # (~60 MiB resident on CPU) - the paper's GPU number counts tensor memory only.
            a, b = (_step_peak(derived_by_row[row].get(c)) for c in ("eager+approxbp", "eager"))
            check("step peak memory eager+approxbp / eager", row, a / b if a and b else None, 0.80)
        if "compile+budget0.5+approxbp" in derived_by_row[row]:
            check("budget 0.5: bytes with approxbp / without", row,
                  get(row, "compile+budget0.5+approxbp", "saved_vs_partner"), 0.85)
            check("budget 0.5: step time with approxbp / without", row,
                  get(row, "compile+budget0.5+approxbp", "time_vs_partner"), 1.05)
    return out


def _step_peak(d: dict[str, Any] | None) -> float | None:
    """Peak memory of the training step above the memory in use just before it."""
    if not d or d.get("peak") is None or d.get("resting") is None:
        return None
    return d["peak"] - d["resting"]


def _save(fig: Any, path: pathlib.Path) -> str:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def plot_geometry(geom: str, results: list[dict[str, Any]], derived_by_row, out_dir: pathlib.Path) -> list[str]:
    """Two PNGs per geometry: peak memory vs step time (one point per configuration, a panel per row), and
    saved bytes by kind of tensor, baseline vs approxbp (stacked bars, a panel per row)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    import _measure as M

    names = []
    n = len(results)
    fig, axes = plt.subplots(1, n, figsize=(6.5 * n, 5), squeeze=False)
    for ax, res in zip(axes[0], results):
        for conf, d in derived_by_row[res["row"]].items():
            if _step_peak(d) is None or d["step"] is None:
                continue
            x, y = d["step"] * 1000, _step_peak(d) / MiB
            ax.scatter([x], [y], marker="o" if "approxbp" in conf else "s",
                       color="tab:red" if "approxbp" in conf else "tab:blue")
            ax.annotate(conf, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        ax.set_xlabel("median step time (ms)")
        ax.set_ylabel("step peak above resting (MiB)")
        ax.set_title(res["row"], fontsize=10)
        ax.grid(alpha=0.3)
    names.append(_save(fig, out_dir / f"{geom}-memory-vs-time.png"))

    fig, axes = plt.subplots(1, n, figsize=(6.5 * n, 5), squeeze=False)
    colors = plt.get_cmap("tab10").colors
    for ax, res in zip(axes[0], results):
        confs = [c for c in res["configs"] if c in res["timing"]["configs"] and "budget" not in c]
        bottoms = [0.0] * len(confs)
        for i, kind in enumerate(M.KINDS):
            vals = [res["timing"]["configs"][c]["saved_by_kind"][kind] / MiB for c in confs]
            if any(vals):
                ax.bar(range(len(confs)), vals, bottom=bottoms, label=kind, color=colors[i % 10])
                bottoms = [b + v for b, v in zip(bottoms, vals)]
        ax.set_xticks(range(len(confs)), confs, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("saved for backward (MiB)")
        ax.set_title(res["row"], fontsize=10)
        ax.legend(fontsize=7)
    names.append(_save(fig, out_dir / f"{geom}-saved-by-kind.png"))
    return names


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return (f"{platform.platform()}, {cpu}, {os.cpu_count()} CPUs (torch threads {torch.get_num_threads()}){gpu}; "
            f"Python {platform.python_version()}, torch {torch.__version__}")


def write_report(args, preset, geometries, settings, results, skipped, elapsed, out: pathlib.Path,
                 res_dir: pathlib.Path) -> int:
    import _measure as M

    failures = 0
    derived_by_row, tables = {}, {}
    for res in results:
        lines, derived = row_table(res)
        derived_by_row[res["row"]], tables[res["row"]] = derived, lines
        failures += sum(1 for d in derived.values() if d["error"]) + ("timing process" in res["timing"]["errors"])
    plots = {}
    for geom in dict.fromkeys(r["row"].split("/")[0] for r in results):
        try:
            plots[geom] = plot_geometry(geom, [r for r in results if r["row"].startswith(geom + "/")], derived_by_row, res_dir)
        except Exception as e:  # noqa: BLE001 (the tables matter more than the pictures)
            print(f"plot {geom} failed: {type(e).__name__}: {e}", file=sys.stderr)
            failures += 1
    rel = os.path.relpath(res_dir, out.parent)
    now = _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    md = [f"# Benchmarks ({args.device}, {preset})", "",
          f"Generated by `python benchmarks/run.py {' '.join(shlex.quote(a) for a in args.argv)}` on {now}, "
          f"in {elapsed / 60:.1f} min.", "", f"Machine: {machine()}.", "",
          "Method (see `benchmarks/run.py`): *saved for backward* is the bytes one training forward keeps for "
          "backward (unique storages, parameters excluded); *peak* is the peak memory of one training step "
          "(forward, backward, AdamW step) after warm-up, one child process per configuration "
          + ("(`torch.cuda.max_memory_allocated`)" if args.device == "cuda" else
             "(`VmHWM` after resetting it through `/proc/self/clear_refs`, `MALLOC_MMAP_THRESHOLD_=65536`; "
             "the whole process: interpreter, libraries, weights, optimizer state; *step peak above resting* "
             "subtracts the RSS before the step)")
          + f"; *step time* is the median of {settings['rounds']} rounds that interleave the row's configurations "
          "in one process after warm-up, and *vs. baseline* divides by eager (eager configurations) or "
          "torch.compile (compiled ones). *Ideal* is the baseline's bytes minus the backend's per-site estimate of the bytes each "
          "rewritten site removes (`approxbp_fx.explain(...).bytes_saved`). Models are "
          "randomly initialised HF models built from configs, dropout 0 (0.1 in the rows named +dropout: HF's "
          "hidden and attention dropout, PEFT's lora_dropout); LoRA is peft's, r 8; bf16 is autocast.",
          ""]
    if skipped:
        md += [f"Rows not run (time limit of the preset): {', '.join(skipped)}.", ""]
    checks = acceptance(derived_by_row)
    if checks:
        md += ["## Acceptance", "", "| criterion | row | measured | verdict |", "|---|---|---:|---|"]
        md += [f"| {c} | {r} | {v} | {verdict} |" for c, r, v, verdict in checks]
        md += [""]
    for geom in plots:
        g = geometries[geom]
        md += [f"## {geom}", "", f"Geometry: {g.describe()}.", ""]
        md += [f"![{p}]({rel}/{p})" for p in plots[geom]] + [""]
        for res in results:
            if not res["row"].startswith(geom + "/"):
                continue
            t = res["timing"]
            md += [f"### {res['row']}", ""]
            sites = t.get("sites")
            if sites:
                md += [f"approxbp rewrote {sites['rewritten']} site(s), skipped {sites['skipped']}"
                       + (f" ({'; '.join(sites['skip_reasons'])})" if sites["skip_reasons"] else "")
                       + f"; estimated bytes removed per forward: {t.get('ideal_removed_bytes', 0) / MiB:.2f} MiB. "
                       f"Measured in {res['seconds']:.0f} s.", ""]
            md += tables[res["row"]] + [""]
            by_kind = {c: v["saved_by_kind"] for c, v in t["configs"].items()}
            if by_kind:
                kinds = [k for k in M.KINDS if any(v[k] for v in by_kind.values())]
                md += ["Saved for backward by kind of tensor (MiB):", "",
                       "| configuration | " + " | ".join(kinds) + " |", "|---|" + "---:|" * len(kinds)]
                md += [f"| {c} | " + " | ".join(f"{v[k] / MiB:.2f}" for k in kinds) + " |" for c, v in by_kind.items()]
                md += [""]
            other = {k: v for k, v in t["errors"].items() if k not in res["configs"]}
            if other:
                md += ["Errors: " + "; ".join(f"{k}: {v}" for k, v in other.items()), ""]
                failures += sum(1 for k in other if not k.startswith("profile"))
    profiles = [(res["row"], name, p) for res in results for name, p in res["timing"].get("profiles", {}).items()]
    md += ["## Where the time goes", ""]
    if not profiles:
        md += [f"No approxbp configuration was slower than its counterpart by more than "
               f"{(args.profile_above - 1) * 100:.0f}%.", ""]
    for row, name, p in profiles:
        a, b = p["columns"]
        md += [f"### {row}: {name} ({p['ratio']:.3f} x {a})", "",
               f"{p['time']} time per step (ms), the ops whose time differs most; totals: "
               f"{a} {p['totals_ms'][a]:.1f} ms, {b} {p['totals_ms'][b]:.1f} ms.", "",
               f"| op | {a} | {b} | difference |", "|---|---:|---:|---:|"]
        md += [f"| `{op}` | {x:.3f} | {y:.3f} | {y - x:+.3f} |" for op, x, y in p["rows"]]
        md += [""]
    # Studies produced by their own scripts (bits_study.py, convergence.py, compile_time.py) are carried along, so
    # regenerating this file keeps them; each states the command that made it.
    studies = pathlib.Path(__file__).parent / "results"
    for name in ("bits_study.md", "convergence.md", "compile_time.md"):
        if (studies / name).exists():
            md += ["#" + line if line.startswith("#") else line for line in (studies / name).read_text().splitlines()] + [""]
    out.write_text("\n".join(md))
    (res_dir / f"results-{args.device}-{preset}.json").write_text(json.dumps(results, indent=1))
    return failures


# ---------------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="2-layer geometries, a subset of rows (<= 10 min on CPU)")
    size.add_argument("--smoke", action="store_true", help="one tiny ViT row, 4 configurations (CI, < 2 min)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--out", type=pathlib.Path, default=ROOT,
                   help="directory for BENCHMARKS.md; the PNGs go to OUT/benchmarks/results (default: the repo root)")
    p.add_argument("--only", metavar="PATTERN", help="run only the rows whose name (geometry/tuning/precision) matches")
    p.add_argument("--profile-above", type=float, default=1.03,
                   help="profile approxbp configurations slower than this ratio to their counterpart (default 1.03)")
    p.add_argument("--time-limit", type=float, help="skip remaining rows after this many seconds (default: preset's)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.argv = argv

    if args.child:
        import _measure as M

        print("RESULT " + json.dumps(M.run_child(json.loads(args.child))), flush=True)
        return 0

    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            p.error("--device cuda: torch.cuda.is_available() is False")
    preset = "smoke" if args.smoke else "quick" if args.quick else "full"
    geometries, rows, settings = plan(preset, args.device)
    if args.only:
        rows = [r for r in rows if re.search(args.only, r.name)]
        if not rows:
            p.error(f"--only {args.only!r} matches no row of the {preset} preset")
    limit = args.time_limit if args.time_limit is not None else settings["time_limit"]
    out_dir = args.out.resolve()
    res_dir = out_dir / "benchmarks" / "results"
    res_dir.mkdir(parents=True, exist_ok=True)
    log = open(res_dir / f"log-{args.device}-{preset}.txt", "w")

    start = time.perf_counter()
    results, skipped = [], []
    # Crude per-configuration cost (s) to decide whether a row still fits; rescaled by what rows really took.
    scale = 1.0
    cost = lambda r: sum(60 if n not in ("eager", "eager+approxbp") else 15 for n in r.configs)  # noqa: E731
    for row in rows:
        elapsed = time.perf_counter() - start
        if limit is not None and results and elapsed + scale * cost(row) > limit:
            skipped.append(row.name)
            print(f"[{elapsed:6.0f}s] skip {row.name} (time limit {limit:.0f}s)", flush=True)
            continue
        print(f"[{elapsed:6.0f}s] {row.name}: {', '.join(row.configs)}", flush=True)
        res = measure_row(row, geometries[row.geometry], args, settings, log)
        results.append(res)
        scale = max(scale if len(results) > 1 else 0.0, res["seconds"] / cost(row))
        for name in row.configs:
            c, m = res["timing"]["configs"].get(name, {}), res["memory"].get(name, {})
            err = res["timing"]["errors"].get(name) or m.get("error")
            print(f"    {name:28s} saved {_f(c.get('saved_bytes') and c['saved_bytes'] / MiB, '{:8.2f}')} MiB  "
                  f"peak {_f(m.get('peak_bytes') and m['peak_bytes'] / MiB, '{:6.0f}')} MiB  "
                  f"step {_f(c.get('step_s') and c['step_s'] * 1000, '{:8.1f}')} ms" + (f"  FAILED: {err}" if err else ""),
                  flush=True)
    elapsed = time.perf_counter() - start
    failures = write_report(args, preset, geometries, settings, results, skipped, elapsed, out_dir / "BENCHMARKS.md",
                            res_dir)
    log.close()
    print(f"wrote {out_dir / 'BENCHMARKS.md'} and {res_dir} in {elapsed:.0f}s; {failures} failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
