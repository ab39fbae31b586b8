"""Private torch APIs live in one module, behind feature probes; where one is missing, the backend still works."""

from __future__ import annotations

import pathlib
import re
import tomllib

import pytest
import torch
from torch import nn

import approxbp_fx
from approxbp_fx import _compat
from approxbp_fx.inners import inductor

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "approxbp_fx"


def test_private_torch_names_only_in_compat() -> None:
    """Outside _compat.py, ``torch._`` appears only as a call target Dynamo writes (``torch._C._nn.*``)
    in a pattern table, and every such table says so in a comment."""
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "_compat.py":
            continue
        lines = path.read_text().splitlines()
        for i, line in enumerate(lines):
            for use in re.findall(r"torch\._[\w.]*", line):
                if not use.startswith("torch._C._nn."):
                    offenders.append(f"{path.relative_to(ROOT)}:{i + 1}: {use}")
                    continue
                comments = [c for c in lines[max(0, i - 12): i + 1] if "#" in c and "torch._C._nn" in c.split("#", 1)[1]]
                if not comments:
                    offenders.append(f"{path.relative_to(ROOT)}:{i + 1}: {use} without a comment")
    assert not offenders, offenders


def test_declared_minimum_torch_is_the_probed_one() -> None:
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    declared = next(d for d in meta["project"]["dependencies"] if d.startswith("torch"))
    assert declared == "torch>=" + ".".join(map(str, _compat.MIN_TORCH))
    assert f"torch >= {'.'.join(map(str, _compat.MIN_TORCH))}" in (ROOT / "README.md").read_text()
    assert _compat.TORCH_VERSION >= _compat.MIN_TORCH


def test_version_tuple() -> None:
    assert _compat.version_tuple("2.13.0+cpu") == (2, 13)
    assert _compat.version_tuple("2.9.1") == (2, 9)
    assert _compat.version_tuple("3.0.0a0+git1234") == (3, 0)


def test_no_reference_outside_the_repository() -> None:
    """Code and docs explain themselves: no pointer to a design brief or to issue numbers."""
    offenders = []
    for path in [*ROOT.glob("*.md"), *ROOT.glob("docs/*.md"), *PACKAGE.rglob("*.py"), *ROOT.glob("tests/**/*.py"),
                 *ROOT.glob("benchmarks/*.py"), *ROOT.glob("examples/*.py")]:
        text = path.read_text()
        if path.name == "test_compat.py":
            continue
        for pattern in (r"DESIGN\.md", r"\bissue #?\d+", r"\(issue\b"):
            offenders += [f"{path.relative_to(ROOT)}: {m}" for m in re.findall(pattern, text, flags=re.IGNORECASE)]
    assert not offenders, offenders


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm, self.fc, self.out = nn.LayerNorm(16), nn.Linear(16, 32), nn.Linear(32, 16)

    def forward(self, x):
        return x + self.out(nn.functional.gelu(self.fc(self.norm(x))))


def test_inductor_without_the_partitioner_hook_falls_back(monkeypatch, fresh_dynamo) -> None:
    """A torch without inductor's custom-partitioner hook: the ops stay opaque under inductor, with a
    warning that names the version; the model trains and its gradients match the eager inner's."""
    monkeypatch.setattr(_compat, "HAS_CUSTOM_PARTITIONER", False)
    lowered = []
    monkeypatch.setattr(inductor, "lower_to_traceable", lambda gm: lowered.append(gm) or gm)
    torch.manual_seed(0)
    model, x = _Block(), torch.randn(2, 8, 16)
    reference = approxbp_fx.compile(_clone(model), inner="eager")
    with pytest.warns(RuntimeWarning, match=r"torch .* has no custom partitioner hook .*torch >= 2\.13"):
        out = approxbp_fx.compile(model, inner="inductor")(x)
    out.sum().backward()
    expected = reference(x)
    expected.sum().backward()
    assert not lowered
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model.fc.weight.grad, reference._orig_mod.fc.weight.grad, rtol=1e-5, atol=1e-5)


def _clone(model: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(model)
