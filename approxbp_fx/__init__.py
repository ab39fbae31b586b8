"""approxbp-fx: a torch.compile backend that lowers fine-tuning activation memory (Approx-BP and MS-BP)."""

from . import inners, ops
from .fit import fit_step_derivative
from .backend import Options, approxbp_backend, compile, explain, rewrite
from .meter import saved_activation_bytes, saved_tensors
from .report import Report, Site, collect_reports

__all__ = [
    "Options", "Report", "Site", "approxbp_backend", "collect_reports", "compile", "explain", "fit_step_derivative", "inners",
    "ops", "rewrite",
    "saved_activation_bytes", "saved_tensors",
]
