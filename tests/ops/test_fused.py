"""Compiled op bodies: a kernel that fails to compile falls back to eager for its own signature only."""

from __future__ import annotations

import logging

import torch

from approxbp_fx._compat import DynamoError
from approxbp_fx.ops import _fused


def test_failed_kernel_falls_back_per_signature(monkeypatch, caplog) -> None:
    compiled_runs: list[torch.dtype] = []
    real_compile = torch.compile

    def compile_that_fails_for_float64(fn, **kwargs):
        kernel = real_compile(fn, **kwargs)

        def run(*args):
            if args[0].dtype == torch.float64:
                raise DynamoError("no C compiler for this one")
            compiled_runs.append(args[0].dtype)
            return kernel(*args)

        return run

    monkeypatch.setattr(torch, "compile", compile_that_fails_for_float64)
    monkeypatch.delenv("APPROXBP_FX_KERNELS", raising=False)

    @_fused.fused
    def double(x: torch.Tensor) -> torch.Tensor:
        return x * 2

    x64, x32 = torch.arange(4, dtype=torch.float64), torch.arange(4, dtype=torch.float32)
    with caplog.at_level(logging.WARNING, logger="approxbp_fx"):
        assert torch.equal(double(x64), x64 * 2)  # falls back, correct
        assert torch.equal(double(x32), x32 * 2)  # another signature: still compiled
        assert torch.equal(double(x64), x64 * 2)  # the fallback is remembered: no second warning
    assert compiled_runs == [torch.float32]
    warnings = [r.getMessage() for r in caplog.records if "using eager kernels" in r.getMessage()]
    assert len(warnings) == 1 and "float64" in warnings[0], warnings
