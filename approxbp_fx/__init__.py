"""approxbp-fx: a torch.compile backend that lowers fine-tuning activation memory (Approx-BP and MS-BP)."""

from . import ops
from .meter import saved_activation_bytes, saved_tensors

__all__ = ["ops", "saved_activation_bytes", "saved_tensors"]
