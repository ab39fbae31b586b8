"""Shared fixtures: every test starts from the same RNG state and a clean Dynamo cache."""

from __future__ import annotations

import hashlib
import os
import pathlib
import tempfile

# torch's compile caches key a graph by its ops, not by the Python code of a custom op's backward:
# a cache written by an older version of approxbp_fx would replay stale backward kernels. Tests get
# a cache of their own per version of the package sources. (Must run before torch compiles anything.)
_sources = sorted(pathlib.Path(__file__).parents[1].joinpath("approxbp_fx").rglob("*.py"))
_digest = hashlib.sha256(b"".join(p.read_bytes() for p in _sources)).hexdigest()[:16]
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(tempfile.gettempdir(), f"approxbp-inductor-{_digest}"))

import pytest  # noqa: E402
import torch  # noqa: E402


# The ops compile their bodies once per argument combination (dtype, bias or not, which grads are
# needed, ...). One test process visits far more combinations than a model does; without this, which
# tests hit Dynamo's per-function limit (8) would depend on test order.
# Many compiled copies of the same model classes (tests/architectures.py) also share code objects: Dynamo
# must not fall back to eager for them either.
# tests/ops/test_norms.py::test_ops_survive_dynamos_recompile_limit lowers it again on purpose (with config.patch).
torch._dynamo.config.recompile_limit = 64
torch._dynamo.config.accumulated_recompile_limit = 4096


DEVICES = ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    """A test that takes ``device`` runs on the CPU, and again on CUDA where a GPU is present (not in CI)."""
    return request.param


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def fresh_dynamo():
    """Reset Dynamo before and after a test that compiles, so graphs from other tests never leak in."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture
def eager_kernels(monkeypatch):
    """Run the ops' bodies as plain torch code instead of compiled kernels (``APPROXBP_FX_KERNELS=eager``).

    For finite-difference checks of the math: they call the ops hundreds of times over many argument
    combinations, and each combination would otherwise be compiled once. The compiled kernels are
    checked against these bodies separately.
    """
    monkeypatch.setenv("APPROXBP_FX_KERNELS", "eager")
