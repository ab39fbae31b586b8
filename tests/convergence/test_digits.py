"""Convergence on real data, CI-sized: scikit-learn's digits, plain vs approxbp.

Runs ``benchmarks/convergence.py``'s protocol (plain pretraining on digits 0-4, then fine-tuning on all
ten digits from that checkpoint, same batches for every variant) for 3 seeds with the eager inner only:
the inductor inner adds ~45 s of compilation per seed on 2 busy cores, beyond the CI budget. The full
study (both inners, loss curves) is ``python benchmarks/convergence.py``.

Takes ~1.5-3 minutes on 2 cores (one torch thread: this tiny model runs 5x faster that way on a shared machine).
"""

from __future__ import annotations

import pathlib

import pytest
import torch

from scripts import load_script

_PATH = pathlib.Path(__file__).parents[2] / "benchmarks" / "convergence.py"


def _load_benchmark():
    return load_script(_PATH, "approxbp_convergence_benchmark")


@pytest.fixture(scope="module")
def study():
    conv = _load_benchmark()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch._dynamo.reset()
    try:
        runs = conv.study([0, 1, 2], ["plain", "approxbp/eager"], conv.Config(), log=lambda *a: None)
    finally:
        torch.set_num_threads(threads)
        torch._dynamo.reset()
    return conv, runs


def test_runs_learned(study) -> None:
    """Guards the comparison: both variants reach a useful accuracy (chance is 10%)."""
    conv, runs = study
    for variant in ("plain", "approxbp/eager"):
        assert conv.mean_accuracy(runs, variant) >= 0.90, conv.markdown(runs, conv.Config())


def test_same_batches_different_gradients(study) -> None:
    """The approxbp run really trained with its own (approximate) gradients: its loss curve is not the
    plain one, although both start from the same checkpoint on the same batches."""
    _, runs = study
    for seed in (0, 1, 2):
        plain, ours = (next(r for r in runs if r.seed == seed and r.variant == v) for v in ("plain", "approxbp/eager"))
        assert len(plain.losses) == len(ours.losses)
        assert abs(plain.losses[0] - ours.losses[0]) <= 1e-4 * abs(plain.losses[0])  # same start, same batch
        assert plain.losses[-10:] != ours.losses[-10:]


def test_mean_accuracy_within_one_point(study) -> None:
    conv, runs = study
    diff = conv.differences(runs)["approxbp/eager"]
    assert abs(diff) <= conv.ACCEPT_POINTS, conv.markdown(runs, conv.Config())
