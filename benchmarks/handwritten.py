"""Bytes kept for backward by models written by hand (not from transformers), the way training repositories
write them: PyTorch's own ``nn.TransformerEncoder``, an open_clip-style vision tower, an MLP-Mixer and a
diffusion transformer with adaLN-Zero (the models of tests/handwritten.py).

    python benchmarks/handwritten.py [--models dit clip] [--out benchmarks/results/handwritten.md]

Per model: the norms rewritten of those found (``approxbp_fx.explain``, default options), the bytes one
forward keeps for backward (``approxbp_fx.saved_activation_bytes``) as ratios to the same-mode baseline
(eager + approxbp with the eager inner, default options and with the activations off, against eager;
torch.compile + approxbp, inductor inner, against plain torch.compile), and the largest relative L2 error of
a gradient in exact mode (activations off, eager inner) against plain autograd (gradients that are zero up
to rounding, below 1e-5 of the largest, left out).
"""

from __future__ import annotations

import argparse
import copy
import pathlib
import sys
from typing import Callable

import torch
from torch import Tensor, nn

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tests"))

import approxbp_fx  # noqa: E402
from approxbp_fx.passes.norms import HANDED_ON, RECEIVED  # noqa: E402
from architectures import train_step  # noqa: E402
from models import randomize_norm_affines  # noqa: E402
from handwritten import clip_inputs, clip_tower, dit, dit_inputs, mixer, mixer_inputs  # noqa: E402

BATCH, TOKENS, WIDTH, HEADS = 4, 32, 64, 4


def encoder(batch_first: bool = True, norm_first: bool = True, dropout: float = 0.1,
            activation: str = "gelu") -> nn.Module:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(WIDTH, HEADS, 4 * WIDTH, dropout=dropout, activation=activation,
                                       batch_first=batch_first, norm_first=norm_first)
    return randomize_norm_affines(nn.TransformerEncoder(layer, 2, enable_nested_tensor=False))


def encoder_inputs(batch_first: bool = True) -> tuple[Tensor]:
    x = torch.randn(BATCH, TOKENS, WIDTH, generator=torch.Generator().manual_seed(0))
    return (x if batch_first else x.transpose(0, 1).contiguous(),)


class BrokenAfterFirstLayer(nn.Module):
    """A two-layer encoder with a graph break between its layers: Dynamo compiles each layer as a graph of its
    own, as it does a model whose layers break the graph (wav2vec2's layerdrop, a call it cannot trace)."""

    def __init__(self, encoder: nn.TransformerEncoder) -> None:
        super().__init__()
        self.layers = encoder.layers

    def forward(self, x: Tensor) -> Tensor:
        x = self.layers[0](x)
        torch._dynamo.graph_break()
        return self.layers[1](x)


MODELS: dict[str, tuple[Callable[[], nn.Module], Callable[[], tuple[Tensor, ...]]]] = {
    "encoder": (encoder, encoder_inputs),
    "encoder_seq_first": (lambda: encoder(batch_first=False), lambda: encoder_inputs(False)),
    "encoder_defaults": (lambda: encoder(norm_first=False, activation="relu"), encoder_inputs),
    "encoder_defaults_break": (lambda: BrokenAfterFirstLayer(encoder(norm_first=False, activation="relu")),
                               encoder_inputs),
    "clip": (clip_tower, clip_inputs),
    "mixer": (mixer, mixer_inputs),
    "dit": (dit, dit_inputs),
}
DESCRIPTIONS = {
    "encoder": "nn.TransformerEncoder, pre-norm, batch_first, GELU, dropout 0.1",
    "encoder_seq_first": "the same, batch_first=False (input transposed)",
    "encoder_defaults": "nn.TransformerEncoder, PyTorch's defaults (post-norm, ReLU, dropout 0.1)",
    "encoder_defaults_break": "the same, a graph break between the layers",
    "clip": "open_clip-style vision tower (nn.MultiheadAttention, QuickGELU, x @ proj)",
    "mixer": "MLP-Mixer (token mixing through a transpose)",
    "dit": "DiT, adaLN-Zero (modulated norms without affine)",
}


def _bytes(model: nn.Module, build: Callable[[nn.Module], Callable[..., Tensor]], x: Tensor) -> tuple[int, dict]:
    torch._dynamo.reset()
    model = copy.deepcopy(model)
    _, grads, saved = train_step(model, build(model), x)
    return saved, grads


def measure(name: str) -> dict[str, object]:
    build, make_inputs = MODELS[name]
    model, (x,) = build(), make_inputs()
    model.train()
    report = approxbp_fx.explain(model, x)
    norms = [s for s in report.sites if s.family == "norms" and not s.pattern.startswith(RECEIVED)]
    # a norm whose output only leaves its graph: rewritten to hand y_hat on, shared only if a later graph's
    # linears read it (the bytes say whether they did)
    handed = [s for s in norms if s.rewritten and s.pattern.endswith(f"-> {HANDED_ON}")]
    eager, ref_grads = _bytes(model, lambda m: m, x)
    inner, _ = _bytes(model, lambda m: approxbp_fx.compile(m, inner="eager"), x)
    exact, grads = _bytes(model, lambda m: approxbp_fx.compile(m, inner="eager", activations=False), x)
    compiled, _ = _bytes(model, torch.compile, x)
    inductor, _ = _bytes(model, approxbp_fx.compile, x)
    # dropout draws differ between the runs: compare gradients only where the model has none in training
    has_dropout = any(isinstance(m, nn.Dropout) and m.p > 0 for m in model.modules())
    # gradients that cancel (MLP-Mixer's token-mixing output bias, which the next norm takes out again: zero
    # up to rounding in both runs) are left out of the relative error
    largest = max(float(g.norm()) for g in ref_grads.values())
    err = None if has_dropout else max(float((grads[k] - g).norm() / g.norm()) for k, g in ref_grads.items()
                                       if float(g.norm()) > 1e-5 * largest)
    return {"name": name, "rewritten": sum(s.rewritten for s in norms) - len(handed), "handed": len(handed),
            "found": len(norms),
            "skips": sorted({s.reason for s in norms if not s.rewritten}), "eager": eager,
            "inner": inner / eager, "exact": exact / eager, "compiled": compiled, "inductor": inductor / compiled,
            "grad_err": err}


def table(rows: list[dict[str, object]]) -> str:
    lines = ["| model | norms rewritten | eager bytes | eager inner / eager | exact / eager | torch.compile bytes "
             "| inductor inner / torch.compile | exact-mode gradient error |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        err = "n/a (dropout)" if r["grad_err"] is None else f"{r['grad_err']:.1e}"
        handed = f" (+{r['handed']} handed on)" if r["handed"] else ""
        lines.append(f"| {DESCRIPTIONS[r['name']]} | {r['rewritten']}/{r['found']}{handed} | {r['eager']:,} "
                     f"| {r['inner']:.3f} | {r['exact']:.3f} | {r['compiled']:,} | {r['inductor']:.3f} | {err} |")
    skips = [f"- {DESCRIPTIONS[r['name']]}: {reason}" for r in rows for reason in r["skips"]]
    return "\n".join(lines + (["", "Norms left alone:", *skips] if skips else []) + [
        "", "\"handed on\": a norm whose output leaves its graph, rewritten to hand its y_hat to the linears of "
        "a later graph; it saves bytes only where one reads it (the last norm of a model does not)."])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--out", type=pathlib.Path, help="also write the table to this file")
    args = parser.parse_args(argv)
    text = table([measure(name) for name in args.models])
    print(text)
    if args.out:
        args.out.write_text("Command: python benchmarks/handwritten.py\n\n" + text + "\n")


if __name__ == "__main__":
    main()
