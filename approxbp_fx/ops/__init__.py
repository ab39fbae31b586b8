"""The paper's operators as ``torch.library`` custom ops (namespace ``approxbp``)."""

from .activations import REGELU2, RESILU2, StepDerivative, regelu2, resilu2, step_activation
from .norms import SharedNorm, linear_shared, ms_layer_norm, ms_rms_norm, mul_shared
from .grouped import grouped_mm_shared

__all__ = [
    "REGELU2", "RESILU2", "SharedNorm", "StepDerivative", "grouped_mm_shared", "linear_shared", "ms_layer_norm", "ms_rms_norm", "mul_shared",
    "regelu2", "resilu2", "step_activation",
]
