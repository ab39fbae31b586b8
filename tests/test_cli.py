"""The ``approxbp-fx`` command line (approxbp_fx.cli.main)."""

from __future__ import annotations

import re

import pytest
import torch

import approxbp_fx
from approxbp_fx import cli

SMALL = ["--layers", "1", "--hidden", "64", "--intermediate", "128", "--heads", "2", "--batch", "2"]


def _bytes(out: str, label: str) -> int:
    m = re.search(rf"^\s+{re.escape(label)}\s+([\d,]+) bytes", out, re.M)
    assert m, f"no {label!r} line in:\n{out}"
    return int(m.group(1).replace(",", ""))


def test_explain_vit(capsys):
    assert cli.main(["explain", "vit", *SMALL, "--image", "32"]) == 0
    out, err = capsys.readouterr()
    for site in ("vit.layers.0.layernorm_before", "vit.layers.0.layernorm_after", "vit.layers.0.mlp.activation_fn"):
        assert re.search(rf"^{re.escape(site)}\s.*rewritten", out, re.M), out
    assert "estimated bytes saved per forward" in out
    assert "tracing" in err and "measuring" in err  # progress on stderr, not mixed into the report
    # The baseline line is the bytes an independently built plain ViT of the same shape keeps for backward.
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(num_hidden_layers=1, hidden_size=64, intermediate_size=128, num_attention_heads=2, image_size=32)
    model = ViTForImageClassification(config).train()
    x = torch.randn(2, 3, 32, 32)
    assert _bytes(out, "plain eager") == approxbp_fx.saved_activation_bytes(model, pixel_values=x)
    assert _bytes(out, "approxbp (eager)") < _bytes(out, "plain eager")


def test_explain_llama(capsys):
    assert cli.main(["explain", "llama", *SMALL, "--seq", "16"]) == 0
    out, _ = capsys.readouterr()
    assert "LlamaForCausalLM" in out
    for site in ("model.layers.0.input_layernorm", "model.layers.0.post_attention_layernorm", "model.layers.0.mlp.act_fn"):
        assert re.search(rf"^{re.escape(site)}\s.*rewritten", out, re.M), out
    assert 0 < _bytes(out, "approxbp (eager)") < _bytes(out, "plain eager")


def test_explain_local_directory_exact_mode(tmp_path, capsys):
    from transformers import BertConfig

    BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64,
               max_position_embeddings=32).save_pretrained(tmp_path)
    assert cli.main(["explain", str(tmp_path), "--layers", "1", "--seq", "8", "--no-activations"]) == 0
    out, _ = capsys.readouterr()
    assert "(bert)" in out and "input_ids (2, 8)" in out
    assert "gelu" not in out  # --no-activations: GELU sites are not even looked for
    assert re.search(r"layer_norm.*rewritten", out), out
    assert not re.search(r"layer\.1\.", out)  # --layers 1 cut the depth


@pytest.mark.parametrize("argv, message", [
    (["explain", "no-such-model"], "unknown model 'no-such-model'"),
    (["explain", "vit", "--layers", "0"], "--layers must be positive"),
    (["explain", "llama", "--image", "32"], "--image applies to vision models"),
    (["explain", "vit", "--inner", "tvm"], "--inner must be one of inductor"),
    ([], "required"),
])
def test_usage_errors_exit_2(argv, message, capsys):
    assert cli.main(argv) == 2
    assert message in capsys.readouterr().err


def test_help_documents_everything(capsys):
    assert cli.main(["--help"]) == 0
    top = capsys.readouterr().out
    assert "explain" in top and "bench" in top
    assert cli.main(["explain", "--help"]) == 0
    text = capsys.readouterr().out
    for opt in ("--layers", "--batch", "--seq", "--image", "--hidden", "--intermediate", "--heads", "--inner",
                "--dtype", "--no-activations", "--no-norms", "aot_eager", "bfloat16", "model type", "exit status"):
        assert opt in text, opt


def test_bench_forwards_arguments(monkeypatch, tmp_path):
    script = tmp_path / "benchmarks" / "run.py"
    script.parent.mkdir()
    script.write_text("")
    monkeypatch.setattr(cli, "_find_bench_script", lambda: script)
    calls = []
    monkeypatch.setattr(cli.subprocess, "call", lambda cmd: calls.append(cmd) or 3)
    assert cli.main(["bench", "--quick", "--help"]) == 3  # its exit status, --help included in the forwarded args
    assert calls == [[cli.sys.executable, str(script), "--quick", "--help"]]


def test_bench_without_script_is_a_clear_error(monkeypatch, capsys):
    monkeypatch.setattr(cli, "_find_bench_script", lambda: None)
    assert cli.main(["bench"]) == 2
    assert "benchmarks/run.py not found" in capsys.readouterr().err


def test_console_script_is_declared():
    from pathlib import Path

    text = (Path(__file__).parents[1] / "pyproject.toml").read_text()
    section = re.search(r"^\[project\.scripts\]\n(.*?)(?:^\[|\Z)", text, re.M | re.S)
    assert section and re.search(r'^approxbp-fx\s*=\s*"approxbp_fx\.cli:main"\s*$', section.group(1), re.M)
