"""examples/finetune_digits.py (the README's main job) cannot rot: its --smoke run exits 0, pretrains,
caches and reloads the weights (in a temporary folder, not the user's cache), prints the table, and the
approxbp run keeps fewer bytes for backward than the plain torch.compile run. ~15-30 s on 2 cores."""

from __future__ import annotations

import importlib.util
import os
import pathlib
import re
import subprocess
import sys

import pytest

from scripts import load_script

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "finetune_digits.py"

pytest.importorskip("transformers")
pytest.importorskip("sklearn")


def _load():
    return load_script(SCRIPT, "approxbp_example_finetune_digits")


def test_cache_key_follows_the_configuration():
    ex = _load()
    cfg, budget = ex.ModelConfig(), ex.Budget()
    key = ex.cache_key(cfg, budget, 0)
    assert key == ex.cache_key(ex.ModelConfig(), ex.Budget(), 0)
    assert key != ex.cache_key(cfg, budget, 1)
    assert key != ex.cache_key(cfg, ex.Budget(pretrain_epochs=budget.pretrain_epochs + 1), 0)
    assert key != ex.cache_key(ex.ModelConfig(hidden=32), budget, 0)
    # the fine-tuning budget does not change the pretrained weights
    assert key == ex.cache_key(cfg, ex.Budget(finetune_epochs=1, finetune_lr=0.1), 0)


def test_smoke_run(tmp_path):
    env = dict(os.environ, HOME=str(tmp_path / "home"), PYTHONUNBUFFERED="1")
    env.pop("APPROXBP_FX_CACHE_DIR", None)
    proc = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--out", str(tmp_path / "out")],
                          check=False, capture_output=True, text=True, timeout=120, cwd=str(tmp_path), env=env)
    out = proc.stdout
    assert proc.returncode == 0, out[-3000:] + proc.stderr[-3000:]
    # pretrained once, saved, then loaded back from the cache, which lives in a temporary folder
    assert re.search(r"seed 0: pretrained in [\d.]+s, saved to .*vit-digits-[0-9a-f]{16}\.pt", out), out
    assert "seed 0: loaded pretrained weights from" in out, out
    assert not (tmp_path / "home" / ".cache" / "approxbp_fx").exists()
    # the table: both runs, numbers in every row
    header = next(line for line in out.splitlines() if "torch.compile(eager)" in line and "approxbp(eager)" in line)
    rows = out[out.index(header):].splitlines()
    saved = next(r for r in rows if r.startswith("saved for backward"))
    plain_mib, approx_mib = (float(v) for v in re.findall(r"([\d.]+) MiB", saved))
    assert 0 < approx_mib < plain_mib
    for label in ("test accuracy", "step peak RSS above resting", "median step time", "compile time (first step)"):
        assert any(r.startswith(label) for r in rows), (label, out)
    assert re.search(r"approxbp\(eager\) kept 0\.\d\dx the bytes of plain torch\.compile\(eager\) at [\d.]+x its step "
                     r"time, test accuracy", out), out
    png = tmp_path / "out" / "finetune_digits.png"
    if importlib.util.find_spec("matplotlib") is None:
        assert "matplotlib is not installed" in out
    else:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
