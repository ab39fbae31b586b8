"""What a rewrite did, site by site: the account ``explain`` prints and the backend logs."""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from typing import Iterator

import torch.fx as fx

__all__ = ["Site", "Report", "collect_reports"]


@dataclass
class Site:
    """One place in a graph where a pattern was found."""

    id: str  # the anchor node's name in the original graph: stable across re-runs of the passes
    path: str  # module path (``encoder.layer.0.output.LayerNorm``) or the node name
    pattern: str  # e.g. "layer_norm -> 3 x linear", "gelu(tanh)", "gelu_new (decomposed)"
    rewritten: bool
    reason: str = ""  # why it was skipped; empty when rewritten
    bytes_saved: int = 0  # estimate from shapes, for one call
    constants: str = ""  # the step derivative used, for activations
    family: str = ""  # the rewrite family (its option's name: "norms", "activations")

    @property
    def action(self) -> str:
        return "rewritten" if self.rewritten else f"skipped: {self.reason}"


@dataclass
class Report:
    """Sites of every graph the backend saw, with ``graphs`` = [(original, rewritten) GraphModules]."""

    sites: list[Site] = field(default_factory=list)
    graphs: list[tuple[fx.GraphModule, fx.GraphModule]] = field(default_factory=list)
    #: seconds the backend spent, summed over graphs: "find", "apply", "verify"
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def rewritten(self) -> list[Site]:
        return [s for s in self.sites if s.rewritten]

    @property
    def skipped(self) -> list[Site]:
        return [s for s in self.sites if not s.rewritten]

    @property
    def bytes_saved(self) -> int:
        return sum(s.bytes_saved for s in self.rewritten)

    @property
    def counts(self) -> dict[tuple[str, str], int]:
        """{(family, "rewritten" or the reason it was skipped): number of sites}."""
        out: dict[tuple[str, str], int] = {}
        for s in self.sites:
            key = (s.family, "rewritten" if s.rewritten else s.reason)
            out[key] = out.get(key, 0) + 1
        return out

    def extend(self, other: "Report") -> None:
        self.sites += other.sites
        self.graphs += other.graphs
        for k, v in other.timings.items():
            self.timings[k] = self.timings.get(k, 0.0) + v

    def __str__(self) -> str:
        rows = [("site", "pattern", "action", "est. bytes saved")]
        rows += [(s.path, s.pattern + (f" [{s.constants}]" if s.constants else ""), s.action, f"{s.bytes_saved:,}")
                 for s in self.sites]
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        lines.append(
            f"{len(self.rewritten)} rewritten, {len(self.skipped)} skipped, in {len(self.graphs)} graph(s); "
            f"estimated bytes saved per forward: {self.bytes_saved:,}"
        )
        return "\n".join(lines)


class _Collector(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.reports: list[Report] = []

    def emit(self, record: logging.LogRecord) -> None:
        report = getattr(record, "approxbp_report", None)
        if isinstance(report, Report):
            self.reports.append(report)


@contextlib.contextmanager
def collect_reports() -> Iterator[list[Report]]:
    """The ``Report`` of every graph the backend rewrites inside the block, in compile order (read from
    the INFO records it logs to the ``approxbp_fx`` logger; the logger's level is restored after)::

        with approxbp_fx.collect_reports() as reports:
            loss = compiled(batch).sum(); loss.backward()
        print(sum(len(r.sites) for r in reports))
    """
    logger = logging.getLogger("approxbp_fx")
    handler, level = _Collector(), logger.level
    logger.addHandler(handler)
    if logger.getEffectiveLevel() > logging.INFO:
        logger.setLevel(logging.INFO)
    try:
        yield handler.reports
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
