"""The installed package: the backend name resolves through the ``torch_dynamo_backends`` entry point."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
import textwrap

import pytest


def test_entry_point_is_declared():
    eps = importlib.metadata.entry_points(group="torch_dynamo_backends")
    assert any(ep.name == "approxbp" and ep.value.startswith("approxbp_fx.") for ep in eps), list(eps)


def test_backend_name_resolves_without_importing_the_package():
    code = textwrap.dedent(
        """
        import sys
        import torch

        assert "approxbp_fx" not in sys.modules
        model = torch.compile(torch.nn.Linear(4, 4), backend="approxbp")
        out = model(torch.randn(2, 4))
        assert out.shape == (2, 4)
        out.sum().backward()
        assert model.weight.grad is not None
        print("ok")
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


@pytest.mark.parametrize("module", ["approxbp_fx", "approxbp_fx.ops", "approxbp_fx.meter"])
def test_public_modules_import(module):
    __import__(module)
