"""``approxbp-fx``: see what the backend does to a model before spending GPU hours on it.

    approxbp-fx explain vit --layers 1
    approxbp-fx explain llama --layers 2 --hidden 256 --intermediate 688 --seq 64
    approxbp-fx explain ./my-checkpoint --inner inductor --dtype bfloat16
    approxbp-fx bench --help          # forwarded to benchmarks/run.py (a source checkout)
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

__all__ = ["main", "build_model", "build_inputs"]

PROG = "approxbp-fx"

EXPLAIN_EPILOG = """\
MODEL is either a local Hugging Face model directory (its config.json is read; the model is built from the
config with random weights, nothing is downloaded) or a transformers model type such as vit, deit, bert,
roberta, gpt2, llama, mistral, qwen2, gemma, t5 (its default configuration). Depth is cut to --layers;
--hidden/--intermediate/--heads override the widths (default configurations of LLMs are large: use them to keep
it fast). Vision models get random pixel_values of the config's image size, the others random input_ids.

Printed: the explain report (every site found, rewritten or skipped with the reason, estimated bytes), then
the bytes one training forward keeps for backward (approxbp_fx.saved_activation_bytes), measured for the plain
model, for plain torch.compile with the same inner compiler (when it is not eager), and through the backend.
Progress goes to stderr.

exit status: 0 on success, 2 on a usage error (unknown model, bad option)."""

BENCH_HELP = "run the benchmarks: every argument after 'bench' is passed to `python benchmarks/run.py`"


class UsageError(Exception):
    """A problem with what the user asked for: printed without a traceback, exit status 2."""


def _progress(msg: str) -> None:
    print(f"[{PROG}] {msg}", file=sys.stderr, flush=True)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Inspect and benchmark the approxbp torch.compile backend (Approx-BP and MS-BP).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run `approxbp-fx explain --help` for the explain options.",
    )
    sub = parser.add_subparsers(dest="command", metavar="{explain,bench}")
    sub.required = True
    ex = sub.add_parser(
        "explain", help="report the sites the backend rewrites in a model and the activation bytes it saves",
        description="Report what the approxbp backend does to a model and measure the saved activation bytes.",
        epilog=EXPLAIN_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ex.add_argument("model", metavar="MODEL", help="local HF model directory or a transformers model type (vit, llama, ...)")
    ex.add_argument("--layers", type=int, default=2, help="number of layers (num_hidden_layers / n_layer); default 2")
    ex.add_argument("--batch", type=int, default=2, help="batch size; default 2")
    ex.add_argument("--seq", type=int, default=128, help="sequence length for text models; default 128")
    ex.add_argument("--image", type=int, help="image size override for vision models (config default otherwise)")
    ex.add_argument("--hidden", type=int, help="hidden size override (hidden_size / n_embd / d_model)")
    ex.add_argument("--intermediate", type=int, help="MLP width override (intermediate_size / n_inner / d_ff)")
    ex.add_argument("--heads", type=int, help="attention heads override; default with --hidden: hidden/64 (at least 1)")
    ex.add_argument("--inner", default="eager", metavar="INNER",
                    help="inner compiler for the approxbp measurement: eager, aot_eager, inductor (or one registered "
                         "with approxbp_fx.inners.register_inner); default eager (fastest to start)")
    ex.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="model and input dtype")
    ex.add_argument("--no-activations", action="store_true", help="no Approx-BP at GELU/SiLU (exact gradients only)")
    ex.add_argument("--no-norms", action="store_true", help="no MS-BP at norm -> linear sites")
    ex.add_argument("--seed", type=int, default=0, help="seed for the random weights and inputs")
    sub.add_parser("bench", help=BENCH_HELP, description=BENCH_HELP, add_help=False)
    return parser


# -- models -----------------------------------------------------------------------------------------------

_LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
_HIDDEN_KEYS = ("hidden_size", "n_embd", "d_model", "dim")
_INTER_KEYS = ("intermediate_size", "n_inner", "d_ff", "hidden_dim", "ffn_dim")
_HEAD_KEYS = ("num_attention_heads", "n_head", "num_heads", "n_heads")


def _set_first(config: Any, keys: Sequence[str], value: int) -> bool:
    for key in keys:
        if key in config.to_dict():
            setattr(config, key, value)
            return True
    return False


def _text_config(config: Any) -> Any:
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def load_config(model: str) -> Any:
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    if os.path.isdir(model):
        if not os.path.isfile(os.path.join(model, "config.json")):
            raise UsageError(f"{model!r} is a directory without a config.json: not a Hugging Face model directory")
        return AutoConfig.from_pretrained(model)
    if model not in CONFIG_MAPPING_NAMES:
        close = sorted(t for t in CONFIG_MAPPING_NAMES if model.lower()[:3] in t)[:8]
        hint = f" (similar: {', '.join(close)})" if close else ""
        raise UsageError(
            f"unknown model {model!r}: not a local directory and not a transformers model type{hint}; "
            "try vit, bert, roberta, gpt2, llama, mistral, qwen2 or gemma"
        )
    return AutoConfig.for_model(model)


def configure(config: Any, layers: int | None, hidden: int | None, intermediate: int | None, heads: int | None) -> Any:
    cfg = _text_config(config)
    if layers is not None and not _set_first(cfg, _LAYER_KEYS, layers):
        raise UsageError(f"{type(config).__name__} has no layer-count field: cannot apply --layers")
    if hidden is not None:
        if not _set_first(cfg, _HIDDEN_KEYS, hidden):
            raise UsageError(f"{type(config).__name__} has no hidden-size field: cannot apply --hidden")
        heads = heads or max(1, hidden // 64)
    if intermediate is not None and not _set_first(cfg, _INTER_KEYS, intermediate):
        raise UsageError(f"{type(config).__name__} has no MLP-width field: cannot apply --intermediate")
    if heads is not None:
        _set_first(cfg, _HEAD_KEYS, heads)
        d = cfg.to_dict()
        if d.get("num_key_value_heads") and heads % d["num_key_value_heads"]:
            cfg.num_key_value_heads = heads
        if d.get("head_dim") and hidden is not None:
            cfg.head_dim = hidden // heads
    for key in ("layer_types",):  # per-layer lists (e.g. sliding/full attention) must match the new depth
        if layers is not None and isinstance(getattr(cfg, key, None), list):
            setattr(cfg, key, getattr(cfg, key)[:layers])
    return config


def is_vision(config: Any) -> bool:
    d = config.to_dict()
    return "image_size" in d and "num_channels" in d and "vocab_size" not in d


def build_model(config: Any) -> Any:
    """Random-weight model for ``config``: image classification for vision configs, else a causal LM, else
    sequence classification, else the bare model."""
    import transformers
    from transformers.models.auto import modeling_auto as ma

    kind = config.model_type
    candidates = (
        [("AutoModelForImageClassification", ma.MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES)] if is_vision(config) else
        [("AutoModelForCausalLM", ma.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES),
         ("AutoModelForSequenceClassification", ma.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES)]
    ) + [("AutoModel", ma.MODEL_MAPPING_NAMES)]
    for auto_name, mapping in candidates:
        if kind in mapping:
            return getattr(transformers, auto_name).from_config(config)
    raise UsageError(f"no model class for model type {kind!r} in this transformers version")


def build_inputs(config: Any, batch: int, seq: int, dtype: Any, seed: int) -> dict[str, Any]:
    import torch

    g = torch.Generator().manual_seed(seed)
    if is_vision(config):
        size = config.image_size if isinstance(config.image_size, int) else config.image_size[0]
        return {"pixel_values": torch.randn(batch, config.num_channels, size, size, generator=g).to(dtype)}
    vocab = _text_config(config).vocab_size
    inputs = {"input_ids": torch.randint(0, vocab, (batch, seq), generator=g)}
    if config.is_encoder_decoder:
        inputs["decoder_input_ids"] = torch.randint(0, vocab, (batch, seq), generator=g)
    return inputs


# -- commands ---------------------------------------------------------------------------------------------

def _mib(n: int) -> str:
    return f"{n / 2**20:,.2f} MiB"


def explain_command(args: argparse.Namespace) -> int:
    for name in ("layers", "batch", "seq", "image", "hidden", "intermediate", "heads"):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise UsageError(f"--{name} must be positive, got {v}")
    if args.no_activations and args.no_norms:
        raise UsageError("--no-activations and --no-norms together leave nothing to rewrite")
    t0 = time.perf_counter()
    _progress("importing torch and transformers ...")
    import torch

    import approxbp_fx
    from approxbp_fx._compat import reset_dynamo
    from approxbp_fx.inners import INNERS

    if args.inner not in INNERS:
        raise UsageError(f"--inner must be one of {', '.join(INNERS)}, got {args.inner!r}")

    config = configure(load_config(args.model), args.layers, args.hidden, args.intermediate, args.heads)
    if args.image is not None:
        if not is_vision(config):
            raise UsageError(f"--image applies to vision models; {config.model_type} takes input_ids (use --seq)")
        config.image_size = args.image
    dtype = getattr(torch, args.dtype)
    _progress(f"building {config.model_type} with random weights ...")
    torch.manual_seed(args.seed)
    try:
        model = build_model(config).to(dtype).train()
    except UsageError:
        raise
    except Exception as e:  # inconsistent overrides (e.g. heads not dividing hidden) surface here
        raise UsageError(f"cannot build {config.model_type} from this configuration: {e}") from e
    inputs = build_inputs(config, args.batch, args.seq, dtype, args.seed)
    n_params = sum(p.numel() for p in model.parameters())
    shapes = ", ".join(f"{k} {tuple(v.shape)}" for k, v in inputs.items())
    print(f"model: {type(model).__name__} ({config.model_type}), {n_params / 1e6:.2f}M parameters, {args.dtype}; inputs: {shapes}")

    options = {"activations": not args.no_activations, "norms": not args.no_norms, "inner": args.inner}
    _progress("tracing and rewriting (explain) ...")
    report = approxbp_fx.explain(model, options=options, **inputs)
    print()
    print(report)
    print()

    _progress("measuring saved bytes: plain eager ...")
    rows = [("plain eager", approxbp_fx.saved_activation_bytes(model, **inputs))]
    if args.inner != "eager":
        _progress(f"measuring saved bytes: plain torch.compile(backend={args.inner!r}) (compiling) ...")
        reset_dynamo()
        plain = torch.compile(model, backend=args.inner)
        rows.append((f"plain torch.compile ({args.inner})", approxbp_fx.saved_activation_bytes(plain, exclude=[model], **inputs)))
    _progress(f"measuring saved bytes: approxbp (inner={args.inner}, compiling) ...")
    reset_dynamo()
    compiled = approxbp_fx.compile(model, **options)
    approx = approxbp_fx.saved_activation_bytes(compiled, exclude=[model], **inputs)
    base = rows[-1][1]
    rows.append((f"approxbp ({args.inner})", approx))
    print("saved activation bytes, one training forward:")
    width = max(len(r[0]) for r in rows)
    for name, n in rows:
        print(f"  {name.ljust(width)}  {n:>14,} bytes  {_mib(n):>12}")
    if base:
        print(f"  approxbp vs {rows[-2][0]}: {approx / base:.3f}x ({base - approx:,} bytes saved, "
              f"{100 * (base - approx) / base:.1f}%)")
    _progress(f"done in {time.perf_counter() - t0:.1f}s")
    return 0


def _find_bench_script() -> Path | None:
    for root in (Path.cwd(), Path(__file__).resolve().parents[1]):
        script = root / "benchmarks" / "run.py"
        if script.is_file():
            return script
    return None


def bench_command(argv: Sequence[str]) -> int:
    script = _find_bench_script()
    if script is None:
        raise UsageError(
            "benchmarks/run.py not found (looked in the current directory and next to the package): "
            "`approxbp-fx bench` runs the benchmarks of a source checkout; run it from the repository root"
        )
    _progress(f"running {script} {' '.join(argv)}")
    return subprocess.call([sys.executable, str(script), *argv])


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv[:1] == ["bench"]:  # everything after it belongs to benchmarks/run.py, --help included
            return bench_command(argv[1:])
        try:
            args = _parser().parse_args(argv)
        except SystemExit as e:  # --help (0) or a usage error (2, message already printed)
            return int(e.code or 0)
        return explain_command(args)
    except UsageError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
